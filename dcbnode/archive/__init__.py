"""The archive: DCBS volumes plus the index, with one ingest path for every source of data.

The archive knows nothing about the network: the C-STORE SCP and ``dcbnode-admin import`` both call
:meth:`Archive.store`, and retrieval calls :meth:`Archive.open_instance`.
"""

from .archive import Archive, DuplicateInstanceError, StoreOutcome, StoreResult, volume_path_for

__all__ = ["Archive", "DuplicateInstanceError", "StoreOutcome", "StoreResult", "volume_path_for"]
