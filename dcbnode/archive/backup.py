"""``dcbnode-admin backup`` and ``restore``: a consistent copy of an archive while its node runs, and
putting it back on an empty machine.

Backup, while the node ingests and compresses:

1. take the data folder's rewrite lock exclusively (:mod:`.rewrite_lock`): compaction and deferred
   compression wait, so no volume file is replaced or removed until the copy is done;
2. copy the index as one snapshot (:mod:`.index_dump`): every instance acknowledged before this moment
   is in it, pointing at records already on disk;
3. copy every volume file, generation and all, up to the end of its last complete record (the size is
   read under the volume's append ``flock``, so no record is half copied).  Files only grew since step 2:
   the copy holds every record the index snapshot points to.  Records appended after the snapshot are
   copied too, and the restored node's recovery indexes them like after a crash;
4. write ``manifest.json`` last, with the size and SHA-256 of every file: a backup without it is
   incomplete.  Every file is a real copy (never a hard link) and fsynced.

Restore checks every file against the manifest while copying the volumes into a hidden staging folder,
loads the index copy (one transaction), and only then moves the volumes into place.  It needs an empty
data folder and an empty index (no instances), and no node running on them.
"""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sqlalchemy import create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from .. import __version__
from ..dcbs.volume import fsync_directory
from ..index.schema import schema_state
from . import index_dump
from .archive import VOLUMES_DIR
from .recovery import volume_files_in
from .rewrite_lock import rewrites_paused

MANIFEST = "manifest.json"
FORMAT = "dcbnode-backup"
FORMAT_VERSION = 1
_CHUNK = 8 << 20

#: ``progress(bytes done, bytes in all)``
Progress = Callable[[int, int], None]


class BackupError(Exception):
    """A backup or restore that cannot go on; the message says what to do."""


@dataclass
class CopiedFile:
    """One file of a backup: its path inside the backup, its size and its SHA-256."""

    path: str
    size: int
    sha256: str


@dataclass
class Manifest:
    """What a backup holds (``manifest.json``)."""

    database: str
    index: CopiedFile
    schema_revision: str | None
    volumes: list[CopiedFile] = field(default_factory=list)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    dcbnode_version: str = __version__
    created: str = ""

    @property
    def bytes(self) -> int:
        return self.index.size + sum(volume.size for volume in self.volumes)

    def write(self, directory: Path) -> None:
        """Write ``manifest.json`` into ``directory`` durably, atomically."""
        temporary = directory / f".{MANIFEST}.tmp"
        temporary.write_text(json.dumps(asdict(self), indent=1, sort_keys=True) + "\n")
        _fsync_file(temporary)
        os.replace(temporary, directory / MANIFEST)
        fsync_directory(directory)

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        """The manifest of the backup in ``directory``; :class:`BackupError` if there is none or it is not one."""
        path = directory / MANIFEST
        if not directory.is_dir():
            raise BackupError(f"{directory} is not a folder: give the folder 'dcbnode-admin backup' wrote")
        if not path.is_file():
            raise BackupError(f"{directory} is not a complete dcbnode backup (no {MANIFEST}: a backup that was "
                              "interrupted has none); use another backup")
        try:
            raw = json.loads(path.read_text())
            if raw.get("format") != FORMAT or raw.get("format_version") != FORMAT_VERSION:
                raise BackupError(f"{path} is not a dcbnode backup manifest of format version {FORMAT_VERSION}: "
                                  "restore it with the dcbnode version that wrote it")
            raw["index"] = CopiedFile(**raw["index"])
            raw["volumes"] = [CopiedFile(**volume) for volume in raw["volumes"]]
            manifest = cls(**raw)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise BackupError(f"{path} is damaged ({exc}); use another backup") from exc
        unsafe = [v.path for v in manifest.volumes if not _is_volume_path(v.path)]
        if manifest.index.path not in index_dump.DUMP_NAMES.values() or unsafe:
            raise BackupError(f"{path} names files outside a backup ({manifest.index.path}, {unsafe[:3]}): "
                              "it was not written by dcbnode-admin backup; use another backup")
        return manifest


def _is_volume_path(path: str) -> bool:
    """A relative path under the volumes folder, ending in ``.dcbs``, with no ``..``: never a path that a
    damaged or hostile manifest could use to write elsewhere."""
    parts = path.split("/")
    return (len(parts) >= 2 and parts[0] == VOLUMES_DIR and path.endswith(".dcbs")
            and all(part not in ("", ".", "..") and "\\" not in part for part in parts))


# -- backup ----------------------------------------------------------------------------------------------


def backup(data_dir: Path, database_url: str, destination: Path, *, progress: Progress | None = None,
           on_wait: Callable[[], None] | None = None, pause: Callable[[str], None] | None = None) -> Manifest:
    """Copy the archive in ``data_dir`` with its index at ``database_url`` into the new folder ``destination``
    (see the module docstring).  ``on_wait()`` is called if a compaction must finish first; ``pause(step)``
    after the index is copied (tests hold the backup there)."""
    kind = index_dump.database_kind(database_url)
    if not (data_dir / VOLUMES_DIR).is_dir():
        raise BackupError(f"{data_dir} holds no archive (no {VOLUMES_DIR} folder): check --config (node.data_dir)")
    if index_dump.instance_count(database_url) is None:
        raise BackupError(f"no index at {_redacted(database_url)}: check --config (node.database_url)")
    _check_destination(data_dir, destination)
    destination.mkdir(mode=0o750, parents=True, exist_ok=True)  # patient data: not for every user
    with rewrites_paused(data_dir, on_wait):
        index_file = destination / index_dump.DUMP_NAMES[kind]
        index_dump.dump(database_url, index_file)
        index_file.chmod(0o640)
        _fsync_file(index_file)
        revision = schema_state_of(f"sqlite:///{index_file}" if kind == "sqlite" else database_url)
        manifest = Manifest(kind, CopiedFile(index_file.name, index_file.stat().st_size, _sha256(index_file)),
                            revision)
        if pause:
            pause("index copied")
        files = volume_files_in(data_dir)
        total = sum(_size(path) for path in files)
        done = 0
        for path in files:
            relative = path.relative_to(data_dir).as_posix()
            copied = _copy_volume(path, destination / relative)
            if copied is not None:
                manifest.volumes.append(CopiedFile(relative, *copied))
                done += copied[0]
            if progress:
                progress(done, max(total, done))
    _fsync_tree(destination)
    manifest.created = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    manifest.write(destination)
    return manifest


def schema_state_of(url: str) -> str | None:
    """The schema revision of the index at ``url`` (None: unversioned, as 0.1.0 left it)."""
    engine = create_engine(url, poolclass=NullPool)
    try:
        return schema_state(engine).current
    finally:
        engine.dispose()


def _check_destination(data_dir: Path, destination: Path) -> None:
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        raise BackupError(f"{destination} exists and is not an empty folder: give a new folder (a backup never "
                          "overwrites anything)")
    if destination.resolve().is_relative_to(data_dir.resolve()):
        raise BackupError(f"{destination} is inside the data folder {data_dir}: put backups elsewhere, ideally on "
                          "another disk")


def _copy_volume(source: Path, target: Path) -> tuple[int, str] | None:
    """Copy a volume up to the end of its last complete record; ``(size, sha256)``, None if it is gone
    (all its instances were deleted and a compaction that ran before the backup removed it)."""
    try:
        fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # appends are whole records under this lock: read the size between two
        size = os.fstat(fd).st_size
        fcntl.flock(fd, fcntl.LOCK_UN)
        return size, _copy_fd(fd, size, target)
    finally:
        os.close(fd)


# -- restore ---------------------------------------------------------------------------------------------


def restore(source: Path, data_dir: Path, database_url: str, *, progress: Progress | None = None) -> Manifest:
    """Put the backup in ``source`` back into the empty ``data_dir`` and the empty index at ``database_url``
    (see the module docstring); raises :class:`BackupError` before changing anything if the backup is not
    complete, does not fit the configured database, or the target is not empty."""
    manifest = Manifest.read(source)
    kind = index_dump.database_kind(database_url)
    if manifest.database != kind:
        raise BackupError(f"this backup holds a {manifest.database} index and the configuration uses {kind} "
                          f"({_redacted(database_url)}): set node.database_url to an empty {manifest.database} "
                          "index")
    if volume_files_in(data_dir):
        raise BackupError(f"{data_dir} holds volumes already: restore into an empty data folder (a restore never "
                          "merges into an archive)")
    count = index_dump.instance_count(database_url)
    if count:
        raise BackupError(f"the index {_redacted(database_url)} holds {count} instances already: restore into an "
                          "empty index (SQLite: remove the index file; PostgreSQL: drop and create the database)")
    data_dir.mkdir(parents=True, exist_ok=True)
    for stale in data_dir.glob(".restore-*"):  # left by a restore that was killed
        shutil.rmtree(stale, ignore_errors=True)
    staging = data_dir / f".restore-{uuid.uuid4().hex}"
    try:
        done = 0
        for volume in manifest.volumes:
            _copy_checked(source, volume, staging / volume.path)
            done += volume.size
            if progress:
                progress(done, manifest.bytes)
        index_file = source / manifest.index.path
        _check(index_file, manifest.index)
        index_dump.load(database_url, index_file)
        if progress:
            progress(manifest.bytes, manifest.bytes)
        _fsync_tree(staging)
        _move_into_place(staging / VOLUMES_DIR, data_dir / VOLUMES_DIR)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _copy_checked(source: Path, expected: CopiedFile, target: Path) -> None:
    """Copy one backup file, checking its size and SHA-256 against the manifest."""
    path = source / expected.path
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise BackupError(f"{path} is missing from the backup: use another backup") from None
    try:
        size = os.fstat(fd).st_size
        digest = _copy_fd(fd, size, target)
    finally:
        os.close(fd)
    if (size, digest) != (expected.size, expected.sha256):
        raise BackupError(f"{path} is damaged (its size or SHA-256 differs from the manifest): nothing was "
                          "restored; use another backup")


def _check(path: Path, expected: CopiedFile) -> None:
    if not path.is_file() or (path.stat().st_size, _sha256(path)) != (expected.size, expected.sha256):
        raise BackupError(f"{path} is missing or damaged (differs from the manifest): nothing was restored; use "
                          "another backup")


def _move_into_place(staged: Path, volumes: Path) -> None:
    """Replace the (empty) volumes folder with the staged one."""
    staged.mkdir(parents=True, exist_ok=True)  # a backup of an archive without volumes
    if volumes.exists():
        shutil.rmtree(volumes)  # only empty folders: checked before
    os.rename(staged, volumes)
    fsync_directory(volumes.parent)


# -- files -----------------------------------------------------------------------------------------------


def _copy_fd(fd: int, size: int, target: Path) -> str:
    """Copy the first ``size`` bytes of ``fd`` into the new file ``target`` (fsynced); their SHA-256."""
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
    try:
        position = 0
        while position < size:
            chunk = os.pread(fd, min(_CHUNK, size - position), position)
            if not chunk:
                raise BackupError(f"{target.name}: the source ended early at byte {position} of {size}")
            digest.update(chunk)
            view = memoryview(chunk)
            while view:
                view = view[os.write(out, view):]
            position += len(chunk)
        os.fsync(out)
    finally:
        os.close(out)
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every folder under ``root`` (and ``root``): the new files' names are durable."""
    if root.is_dir():
        for directory, _, _ in os.walk(root):
            fsync_directory(Path(directory))


def _redacted(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)
