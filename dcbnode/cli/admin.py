"""dcbnode-admin: administer a dcbnode archive (works while the node runs).

Exit status: 0 success, 1 problems found or some items failed, 2 usage or configuration error.
The CLI only parses arguments, calls the archive library (maintenance, verification, compaction) and prints.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from .. import version_line
from ..config import Config, ConfigError, load_config
from .admin_output import Progress, emit_json, human_bytes, table

if TYPE_CHECKING:
    from ..archive import Archive

PROG = "dcbnode-admin"
#: Exceptions a command reports per item (loaded with the archive, so that --help, peers and echo stay fast).
_ITEM_ERRORS: tuple[type[BaseException], ...] = (OSError,)
_DATE = re.compile(r"^\d{8}$")


class UsageError(Exception):
    """A mistake on the command line or in the configuration: exit status 2."""


# -- argument parsing ------------------------------------------------------------------------------------

_COMMANDS: dict[str, tuple[str, str]] = {
    "init": ("create the data directory and the index (idempotent)",
             "dcbnode-admin init --config /etc/dcbnode/dcbnode.toml"),
    "stats": ("counts, sizes and compression ratio, per modality", "dcbnode-admin stats\n  dcbnode-admin stats --json"),
    "import": ("store DICOM files or folders (recursive) exactly as C-STORE does",
               "dcbnode-admin import /media/cdrom\n  dcbnode-admin import a.dcm b.dcm --json"),
    "export": ("write instances as Part-10 files (HTJ2K Lossless where possible)",
               "dcbnode-admin export --study 1.2.3.4 /tmp/out\n"
               "  dcbnode-admin export --patient 12345 /tmp/out --uncompressed"),
    "ls": ("list studies and series", "dcbnode-admin ls --modality CT --date 20240101-20241231"),
    "query": ("list studies and series (same as ls)", "dcbnode-admin query --patient 12345 --json"),
    "verify": ("check every checksum and that index and volumes agree", "dcbnode-admin verify"),
    "reindex": ("rebuild the index from the volumes", "dcbnode-admin reindex"),
    "upgrade": ("bring the index schema up to this version (stop the node first)",
                "dcbnode-admin upgrade --config /etc/dcbnode/dcbnode.toml"),
    "backup": ("copy the archive consistently into a new folder (while the node runs)",
               "dcbnode-admin backup /srv/backup/dcbnode-$(date +%F)"),
    "restore": ("put a backup back into an empty data folder and index (node stopped)",
                "dcbnode-admin restore /srv/backup/dcbnode-2024-05-01 --config /etc/dcbnode/dcbnode.toml"),
    "delete": ("delete instances (tombstones); needs --yes",
               "dcbnode-admin delete --series 1.2.3.4.5            # shows what would be deleted\n"
               "  dcbnode-admin delete --series 1.2.3.4.5 --yes"),
    "compact": ("rewrite volumes without their dead records", "dcbnode-admin compact"),
    "echo": ("C-ECHO a configured peer", "dcbnode-admin echo PACS"),
    "peers": ("list configured peers", "dcbnode-admin peers --json"),
    "commitments": ("list the Storage Commitment reports waiting to be delivered, or drop them",
                    "dcbnode-admin commitments --json\n  dcbnode-admin commitments --drop 1.2.3.4.5\n"
                    "  dcbnode-admin commitments --drop-all"),
}


def _common(defaults: bool) -> argparse.ArgumentParser:
    """--config and --json, accepted before and after the command."""
    parser = argparse.ArgumentParser(add_help=False)
    suppress = {} if defaults else {"default": argparse.SUPPRESS}
    parser.add_argument("--config", type=Path, metavar="PATH", help="TOML configuration file", **suppress)
    parser.add_argument("--json", action="store_true", help="machine-readable output on stdout", **suppress)
    return parser


def _selection_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group(required=True)
    for key, label in (("patient", "Patient ID"), ("study", "Study Instance UID"),
                       ("series", "Series Instance UID"), ("instance", "SOP Instance UID")):
        group.add_argument(f"--{key}", metavar="ID" if key == "patient" else "UID", help=f"select by {label}")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests)."""
    parser = argparse.ArgumentParser(prog=PROG, parents=[_common(True)], description=__doc__.split("\n\n")[0],
                                     epilog="Run 'dcbnode-admin COMMAND --help' for examples.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # version unwrapped
    parser.add_argument("--version", action="version", version=version_line(PROG))
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sub: dict[str, argparse.ArgumentParser] = {}
    for name, (summary, example) in _COMMANDS.items():
        sub[name] = commands.add_parser(name, parents=[_common(False)], help=summary, description=summary,
                                        epilog=f"example:\n  {example}",
                                        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub["import"].add_argument("paths", nargs="+", type=Path, metavar="PATH", help="files or folders")
    _selection_args(sub["export"])
    sub["export"].add_argument("directory", type=Path, metavar="DIR", help="output folder")
    sub["export"].add_argument("--uncompressed", action="store_true", help="Explicit VR Little Endian")
    for name in ("ls", "query"):
        sub[name].add_argument("--patient", metavar="ID", help="Patient ID")
        sub[name].add_argument("--date", metavar="RANGE", help="YYYYMMDD, YYYYMMDD-YYYYMMDD, -YYYYMMDD or YYYYMMDD-")
        sub[name].add_argument("--date-from", metavar="YYYYMMDD")
        sub[name].add_argument("--date-to", metavar="YYYYMMDD")
        sub[name].add_argument("--modality", metavar="CODE", help="e.g. CT, MR")
    _selection_args(sub["delete"])
    sub["delete"].add_argument("--yes", action="store_true", help="really delete")
    sub["backup"].add_argument("destination", type=Path, metavar="DEST", help="a new (or empty) folder")
    sub["restore"].add_argument("source", type=Path, metavar="SRC", help="a folder 'dcbnode-admin backup' wrote")
    sub["echo"].add_argument("peer", metavar="AET", help="AE title of a [peers.<AET>] entry")
    dropping = sub["commitments"].add_mutually_exclusive_group()
    dropping.add_argument("--drop", metavar="UID", help="forget the waiting request with this Transaction UID: its "
                          "report is not sent")
    dropping.add_argument("--drop-all", action="store_true", help="forget every waiting request")
    return parser


# -- commands --------------------------------------------------------------------------------------------


def _mt() -> ModuleType:
    """The maintenance library, imported on first use (keeps ``--help`` fast)."""
    from ..archive import maintenance

    return maintenance


def _verification() -> ModuleType:
    """The verification library, imported on first use."""
    from ..archive import verification

    return verification


def _compaction() -> ModuleType:
    """The compaction library, imported on first use."""
    from ..archive import compaction

    return compaction


def _open(config: Config) -> Archive:
    global _ITEM_ERRORS
    from ..archive import Archive  # lazy: pydicom and the codecs take a second to import
    from ..dcbs import DcbsError
    from ..index.schema import SchemaError

    _ITEM_ERRORS = (DcbsError, OSError)
    node = config.node
    try:
        return Archive(node.data_dir, node.resolved_database_url, duplicate_policy=node.duplicate_policy)
    except OSError as exc:
        raise UsageError(f"cannot open data directory {node.data_dir}: {exc.strerror}") from exc
    except SchemaError as exc:
        raise UsageError(str(exc)) from exc


def cmd_init(args: argparse.Namespace, config: Config) -> int:
    archive = _open(config)
    archive.close()
    info = {"data_dir": str(config.node.data_dir), "database": config.node.redacted_database_url}
    if args.json:
        emit_json(info)
    else:
        print(f"data directory {info['data_dir']} and index {info['database']} are ready")
    return 0


def cmd_stats(args: argparse.Namespace, config: Config) -> int:
    with _Session(config, create=False) as archive:
        result = _mt().stats(archive)
    if args.json:
        emit_json(result)
        return 0
    print(table(["", "count"], [(k, result[k]) for k in ("patients", "studies", "series", "instances", "frames",
                                                         "volumes")]))
    ratio = f"{result['ratio']:.2f}:1" if result["ratio"] else "-"
    print(f"\nreceived {human_bytes(result['received_bytes'])}, on disk {human_bytes(result['on_disk_bytes'])}"
          f" (ratio {ratio})\n")
    rows = [(m, v["series"], v["instances"], human_bytes(v["received_bytes"]), human_bytes(v["stored_bytes"]))
            for m, v in result["modalities"].items()]
    print(table(["modality", "series", "instances", "received", "stored"], rows))
    return 0


def cmd_import(args: argparse.Namespace, config: Config) -> int:
    files = list(_mt().iter_files(args.paths))
    progress = Progress("import", enabled=not args.json)
    outcomes: dict[str, int] = {}
    failures: list[dict[str, str]] = []
    with _Session(config) as archive:
        for number, path in enumerate(files, 1):
            try:
                result = _mt().import_file(archive, path)
                outcomes[result.outcome.value] = outcomes.get(result.outcome.value, 0) + 1
            except _ITEM_ERRORS as exc:
                failures.append({"file": str(path), "reason": _reason(exc)})
            progress(number, len(files))
    missing = [p for p in args.paths if not p.exists()]
    failures += [{"file": str(p), "reason": "no such file or directory"} for p in missing]
    if args.json:
        emit_json({"files": len(files) + len(missing), "outcomes": outcomes, "failed": len(failures),
                   "failures": failures})
    else:
        for failure in failures:
            print(f"FAILED {failure['file']}: {failure['reason']}", file=sys.stderr)
        done = ", ".join(f"{n} {k}" for k, n in sorted(outcomes.items())) or "nothing stored"
        print(f"{len(files) + len(missing)} files: {done}, {len(failures)} failed")
    return 1 if failures else 0


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
    return " ".join(str(reason).splitlines())


def _selection(args: argparse.Namespace):  # -> maintenance.Selection
    return _mt().Selection(args.patient, args.study, args.series, args.instance)


def _describe(selection) -> str:  # selection: maintenance.Selection
    key, value = next((k, v) for k, v in vars(selection).items() if v is not None)
    return f"{key} {value}"


def cmd_export(args: argparse.Namespace, config: Config) -> int:
    with _Session(config, create=False) as archive:
        selected = _mt().select_instances(archive, _selection(args))
        if not selected:
            raise UsageError(f"no instances match {_describe(_selection(args))}")
        progress = Progress("export", enabled=not args.json)
        written, failures = [], []
        for number, (uid, series_uid) in enumerate(selected, 1):
            try:
                path, syntax = _mt().export_instance(archive, uid, series_uid, args.directory,
                                                  uncompressed=args.uncompressed)
                written.append({"sop_instance_uid": uid, "file": str(path), "transfer_syntax": syntax})
            except (*_ITEM_ERRORS, KeyError) as exc:
                failures.append({"sop_instance_uid": uid, "reason": _reason(exc)})
            progress(number, len(selected))
    if args.json:
        emit_json({"exported": written, "failures": failures})
    else:
        for failure in failures:
            print(f"FAILED {failure['sop_instance_uid']}: {failure['reason']}", file=sys.stderr)
        print(f"exported {len(written)} instances to {args.directory}, {len(failures)} failed")
    return 1 if failures else 0


def _date_range(args: argparse.Namespace) -> tuple[str | None, str | None]:
    low, high = args.date_from, args.date_to
    if args.date:
        if "-" in args.date:
            low, high = (part or None for part in args.date.split("-", 1))
        else:
            low = high = args.date
    for value in (low, high):
        if value is not None and not _DATE.match(value):
            raise UsageError(f"bad date {value!r}: use YYYYMMDD, e.g. --date 20240101-20241231")
    return low, high


def cmd_ls(args: argparse.Namespace, config: Config) -> int:
    low, high = _date_range(args)
    with _Session(config, create=False) as archive:
        studies = _mt().list_series(archive, patient=args.patient, date_from=low, date_to=high, modality=args.modality)
    if args.json:
        emit_json(studies)
        return 0
    rows = [(s["patient_id"], s["patient_name"], s["study_date"], s["study_instance_uid"], x["modality"],
             x["series_number"], x["instances"], x["series_instance_uid"], x["series_description"])
            for s in studies for x in s["series"]]
    print(table(["patient", "name", "date", "study", "mod", "#", "inst", "series", "description"], rows))
    return 0


def cmd_verify(args: argparse.Namespace, config: Config) -> int:
    with _Session(config, create=False) as archive:
        report = _verification().verify(archive, Progress("verify", enabled=not args.json))
    if args.json:
        emit_json({"volumes": report.volumes, "records": report.records, "frames": report.frames,
                   "problems": report.problems, "repaired": report.repaired, "ok": not report.problems})
    else:
        for path in report.repaired:
            print(f"REPAIRED removed {path}: left over by an interrupted compaction")
        for problem in report.problems:
            print(f"PROBLEM {problem}")
        verdict = f"{len(report.problems)} problems" if report.problems else "OK"
        print(f"verified {report.volumes} volumes, {report.records} records, {report.frames} frames: {verdict}")
    return 1 if report.problems else 0


def cmd_reindex(args: argparse.Namespace, config: Config) -> int:
    with _Session(config) as archive:
        from ..archive.recovery import reindex

        report = reindex(archive, Progress("reindex", enabled=not args.json))
    if args.json:
        emit_json(vars(report))
    else:
        for problem in report.problems:
            print(f"PROBLEM {problem}", file=sys.stderr)
        print(f"reindexed {report.volumes} volumes: {report.instances_indexed} instances"
              f" ({report.torn_bytes_cut} torn bytes cut)")
    return 1 if report.problems else 0


def _no_node_running(data_dir: Path, doing: str):  # -> NodeLock | None
    """The data folder's node lock, taken exclusively so that no node starts meanwhile (None when the folder
    does not exist); raises UsageError when a node runs on it."""
    from ..archive.node_lock import DataDirError, NodeLock

    if not data_dir.is_dir():
        return None
    try:
        return NodeLock(data_dir, exclusive=True)
    except DataDirError as exc:
        raise UsageError(f"{exc} (stop every node on {data_dir} before {doing}: 'systemctl stop dcbnode')") from exc


def cmd_upgrade(args: argparse.Namespace, config: Config) -> int:
    from sqlalchemy.engine import make_url

    from ..index import Index
    from ..index.schema import SchemaError, upgrade

    url = config.node.resolved_database_url
    sqlite_file = make_url(url).database if url.startswith("sqlite") else None
    if sqlite_file is not None and not Path(sqlite_file).is_file():
        raise UsageError(f"no index at {sqlite_file}: nothing to upgrade. Check --config (node.data_dir, "
                         "node.database_url); 'dcbnode-admin init' creates a new archive")
    lock = _no_node_running(config.node.data_dir, "upgrading the index")
    index = Index(url)
    try:
        result = upgrade(index.engine, index.redacted_url)
    except SchemaError as exc:
        raise UsageError(str(exc)) from exc
    finally:
        index.dispose()
        if lock is not None:
            lock.release()
    if args.json:
        emit_json({"database": index.redacted_url, **vars(result)})
    elif result.applied:
        print(f"upgraded the index {index.redacted_url} from schema {result.before} to revision {result.after} "
              f"(applied {', '.join(result.applied)})")
    else:
        print(f"the index {index.redacted_url} is at revision {result.after} already: nothing to do")
    return 0


def cmd_backup(args: argparse.Namespace, config: Config) -> int:
    from ..archive.backup import BackupError, backup
    from ..archive.index_dump import IndexDumpError

    hold = os.environ.get("DCBNODE_ADMIN_BACKUP_HOLD")  # test hook: seconds to wait once the index is copied

    def pause(step: str) -> None:
        print(f"holding after: {step}", file=sys.stderr, flush=True)
        time.sleep(float(hold or 0))

    def on_wait() -> None:
        if not args.json:
            print("waiting for a running compaction to finish its volume", file=sys.stderr, flush=True)

    node = config.node
    try:
        manifest = backup(node.data_dir, node.resolved_database_url, args.destination, on_wait=on_wait,
                          progress=Progress("backup (bytes)", enabled=not args.json), pause=pause if hold else None)
    except (BackupError, IndexDumpError) as exc:
        return _failed(exc)
    except OSError as exc:  # e.g. the destination's disk is full
        return _failed(f"backup failed: {exc}. The incomplete folder {args.destination} has no manifest (restore "
                       "refuses it): remove it, fix the cause (space, permissions, mount) and run the backup again")
    if args.json:
        emit_json({"destination": str(args.destination), "database": manifest.database, "created": manifest.created,
                   "schema_revision": manifest.schema_revision, "volumes": len(manifest.volumes),
                   "bytes": manifest.bytes})
    else:
        print(f"backed up {len(manifest.volumes)} volumes and the {manifest.database} index "
              f"({human_bytes(manifest.bytes)}) to {args.destination}; restore with "
              f"'dcbnode-admin restore {args.destination}'")
    return 0


def cmd_restore(args: argparse.Namespace, config: Config) -> int:
    from ..archive.backup import BackupError, restore
    from ..archive.index_dump import IndexDumpError
    from ..index.schema import head_revision

    node = config.node
    lock = _no_node_running(node.data_dir, "restoring into it")
    try:
        manifest = restore(args.source, node.data_dir, node.resolved_database_url,
                           progress=Progress("restore (bytes)", enabled=not args.json))
    except (BackupError, IndexDumpError) as exc:
        return _failed(exc)
    finally:
        if lock is not None:
            lock.release()
    upgrade = manifest.schema_revision != head_revision()
    if args.json:
        emit_json({"source": str(args.source), "data_dir": str(node.data_dir), "database": manifest.database,
                   "created": manifest.created, "schema_revision": manifest.schema_revision,
                   "volumes": len(manifest.volumes), "bytes": manifest.bytes, "needs_upgrade": upgrade})
    else:
        print(f"restored {len(manifest.volumes)} volumes and the index ({human_bytes(manifest.bytes)}, backed up "
              f"{manifest.created}) into {node.data_dir}")
        then = "'dcbnode-admin upgrade', then " if upgrade else ""
        print(f"next: {then}'dcbnode-admin verify', then start the node (its recovery indexes what arrived while "
              "the backup ran)")
    return 0


def _failed(exc: BaseException | str) -> int:
    """Report a command that could not go on (the message says what to do); exit status 1."""
    print(f"{PROG}: error: {exc}", file=sys.stderr)
    return 1


def cmd_delete(args: argparse.Namespace, config: Config) -> int:
    selection = _selection(args)
    with _Session(config, create=False) as archive:
        selected = _mt().select_instances(archive, selection)
        if not selected:
            raise UsageError(f"no instances match {_describe(selection)}")
        series = sorted({s for _, s in selected})
        if not args.yes:
            raise UsageError(f"would delete {len(selected)} instances in {len(series)} series ({_describe(selection)});"
                             " add --yes to delete them")
        deleted = sum(archive.delete_instance(uid) for uid, _ in selected)
    if args.json:
        emit_json({"deleted": deleted, "series": series})
    else:
        print(f"deleted {deleted} instances in {len(series)} series; run 'dcbnode-admin compact' to reclaim space")
    return 0


def _say_if_a_backup_runs(data_dir: Path, quiet: bool) -> None:
    """Tell why compaction is about to wait (it waits for a running backup to end)."""
    from ..archive.rewrite_lock import RewritesPaused, rewriting

    try:
        with rewriting(data_dir, wait=False):
            return
    except RewritesPaused:
        if not quiet:
            print("a backup is copying the volumes: compaction waits until it ends", file=sys.stderr, flush=True)


def cmd_compact(args: argparse.Namespace, config: Config) -> int:
    pause_at = os.environ.get("DCBNODE_ADMIN_COMPACT_PAUSE_AT")  # test hook: stop at a step to be killed

    def pause(step: str) -> None:
        if step == pause_at:
            print(f"paused at {step}", file=sys.stderr, flush=True)
            time.sleep(3600)

    results, failures = [], []
    with _Session(config, create=False) as archive:
        _say_if_a_backup_runs(archive.data_dir, args.json)
        volumes = _compaction().compactable_volumes(archive)
        progress = Progress("compact", enabled=not args.json)
        for number, path in enumerate(volumes, 1):
            try:
                result = _compaction().compact_volume(archive, path, pause=pause if pause_at else None)
                if result is not None:
                    results.append(vars(result))
            except _ITEM_ERRORS as exc:
                failures.append({"volume": str(path), "reason": _reason(exc)})
            progress(number, len(volumes))
    if args.json:
        emit_json({"compacted": results, "failures": failures})
    else:
        for failure in failures:
            print(f"FAILED {failure['volume']}: {failure['reason']}", file=sys.stderr)
        saved = sum(r["bytes_before"] - r["bytes_after"] for r in results)
        print(f"compacted {len(results)} volumes, reclaimed {human_bytes(saved)}, {len(failures)} failed")
    return 1 if failures else 0


def cmd_echo(args: argparse.Namespace, config: Config) -> int:
    from ..net.echo_scu import echo  # lazy: pynetdicom only for this command

    peer = config.peers.get(args.peer.strip())
    if peer is None:
        known = ", ".join(config.peers) or "none"
        raise UsageError(f"unknown peer {args.peer!r}; configured peers: {known} (add [peers.{args.peer}])")
    result = echo(config, peer)
    if args.json:
        emit_json(vars(result))
    else:
        print(f"C-ECHO {peer.ae_title} at {peer.host}:{peer.port}: {result.message} ({result.seconds * 1000:.0f} ms)")
    return 0 if result.ok else 1


def cmd_peers(args: argparse.Namespace, config: Config) -> int:
    peers = [{"ae_title": p.ae_title, "host": p.host, "port": p.port} for p in config.peers.values()]
    if args.json:
        emit_json(peers)
    else:
        print(table(["AE title", "host", "port"], [(p["ae_title"], p["host"], p["port"]) for p in peers]))
    return 0


def cmd_commitments(args: argparse.Namespace, config: Config) -> int:
    from .admin_commitments import run

    with _Session(config, create=False) as archive:
        try:
            return run(args, archive.index)
        except LookupError as exc:  # --drop UID: none such
            raise UsageError(str(exc)) from exc


_HANDLERS: dict[str, Callable[[argparse.Namespace, Config], int]] = {
    "init": cmd_init, "stats": cmd_stats, "import": cmd_import, "export": cmd_export, "ls": cmd_ls,
    "query": cmd_ls, "verify": cmd_verify, "reindex": cmd_reindex, "upgrade": cmd_upgrade, "delete": cmd_delete,
    "compact": cmd_compact, "backup": cmd_backup, "restore": cmd_restore, "echo": cmd_echo, "peers": cmd_peers,
    "commitments": cmd_commitments,
}


def _require_existing(config: Config) -> None:
    """:class:`UsageError` unless the data folder (and a SQLite index) exist: a read-only command must not
    create an empty archive and report on it."""
    node = config.node
    where = "--config" if config.source is None else f"node.data_dir in {config.source}"
    if not node.data_dir.is_dir():
        raise UsageError(f"no archive at {node.data_dir.resolve()}: the data folder does not exist; check {where} "
                         "(the node's configuration file), or run 'dcbnode-admin init' to create an empty archive")
    index = node.data_dir / "index.sqlite"
    if node.resolved_database_url.startswith("sqlite") and not node.database_url and not index.is_file():
        raise UsageError(f"no archive at {node.data_dir.resolve()}: it has no index ({index.name}); check {where}, "
                         "or run 'dcbnode-admin reindex' to build the index from its volumes")


class _Session:
    """``with _Session(config) as archive``: the archive, closed afterwards.  Created if missing, except
    for the read-only commands (``create=False``)."""

    def __init__(self, config: Config, *, create: bool = True) -> None:
        if not create:
            _require_existing(config)
        self.archive = _open(config)

    def __enter__(self) -> Archive:
        return self.archive

    def __exit__(self, *exc: object) -> None:
        self.archive.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dcbnode-admin`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)  # usage errors exit 2 with argparse's message
    warnings.filterwarnings("ignore", module=r"pydicom\..*")  # per-file problems are reported as failures
    try:
        config = load_config(args.config)
        if args.config is None:  # never silently: the defaults suit a development checkout only
            print(f"{PROG}: no --config given: built-in defaults, data folder {config.node.data_dir.resolve()},"
                  " no [peers]", file=sys.stderr)
        return _HANDLERS[args.command](args, config)
    except (ConfigError, UsageError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except _ITEM_ERRORS as exc:
        print(f"{PROG}: error: {_reason(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
