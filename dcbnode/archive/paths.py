"""Where a series' volume lives under the data directory, and how its generations are named."""

from __future__ import annotations

import hashlib

__all__ = ["VOLUMES_DIR", "volume_generation", "volume_path_for", "volume_stem"]

VOLUMES_DIR = "volumes"


def volume_path_for(series_instance_uid: str) -> str:
    """Relative path of a series' volume (first generation): a hash of the UID, never the raw UID."""
    digest = hashlib.sha256(series_instance_uid.encode("ascii")).hexdigest()[:40]
    return f"{VOLUMES_DIR}/{digest[:2]}/{digest[2:4]}/{digest}.dcbs"


def volume_generation(relative: str) -> int:
    """1 for ``<hash>.dcbs``, N for ``<hash>.gN.dcbs`` (compaction's generations)."""
    parts = relative.rsplit("/", 1)[-1].split(".")
    return int(parts[1][1:]) if len(parts) == 3 and parts[1][:1] == "g" and parts[1][1:].isdigit() else 1


def volume_stem(relative: str) -> str:
    """The path (or name) of a volume without its generation and extension: the same for all its
    generations."""
    directory, slash, name = relative.rpartition("/")
    return f"{directory}{slash}{name.split('.', 1)[0]}"
