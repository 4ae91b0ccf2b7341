"""How this folder was made, with dcbnode 0.1.0 (commit 230ef04) on PYTHONPATH: ``python make_fixture.py OUT``.

Kept as the record of what the fixture holds; running it with newer code makes a newer archive, not this one.
"""

import hashlib
import json
import sys
from io import BytesIO
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian

from dcbnode.archive import Archive
from dcbnode.dcbs import available_syntaxes, rebuild

#: (file, stored with deferred compression)
FILES = [("CT_small.dcm", False), ("MR_small.dcm", True), ("SC_rgb_jpeg_dcmtk.dcm", False), ("rtplan.dcm", False),
         ("MR_small_RLE.dcm", False), ("SC_rgb.dcm", True)]


def dataset_bytes(part10: bytes) -> bytes:
    """The encoded dataset after the file meta group (which names the writing release)."""
    stream = BytesIO(part10)
    pydicom.filereader.read_preamble(stream, False)
    pydicom.filereader._read_file_meta_info(stream)
    return part10[stream.tell():]


def served(archive: Archive, uid: str) -> tuple[str, bytes]:
    """The syntax and the dataset bytes of the instance rebuilt in Explicit VR Little Endian (in the syntax it
    was received in where that is not available): a form every release serves."""
    with archive.open_instance(uid) as stored:
        syntaxes = available_syntaxes(stored.meta)
        syntax = ExplicitVRLittleEndian if ExplicitVRLittleEndian in syntaxes else stored.meta.received_syntax
        return str(syntax), dataset_bytes(rebuild(stored.meta, stored.blobs, stored.frame, syntax).part10())


def with_uids(name: str, sop_instance_uid: str, series_instance_uid: str | None = None) -> bytes:
    """A test file with another SOP Instance UID (and Series Instance UID)."""
    ds = pydicom.dcmread(get_testdata_file(name, download=False))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid
    if series_instance_uid:
        ds.SeriesInstanceUID = series_instance_uid
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def main(out: Path) -> None:
    archive = Archive(out, f"sqlite:///{out / 'index.sqlite'}")
    stored = {}
    for name, defer in FILES:
        if name == "MR_small_RLE.dcm":  # shares MR_small's SOP Instance UID: its own instance and series
            data = with_uids(name, "1.2.826.0.1.3680043.8.498.1001", "1.2.826.0.1.3680043.8.498.1002")
        else:
            data = Path(get_testdata_file(name, download=False)).read_bytes()
        result = archive.store(data, source_ae_title="MODALITY", defer_compression=defer)
        stored[result.sop_instance_uid] = name
    # a deleted instance: its tombstone stays in the CT volume
    archive.store(with_uids("CT_small.dcm", "1.2.826.0.1.3680043.8.498.1003"))
    assert archive.delete_instance("1.2.826.0.1.3680043.8.498.1003")
    expected = {}
    for uid, name in stored.items():
        syntax, dataset = served(archive, uid)
        expected[uid] = {"file": name, "syntax": syntax, "dataset_sha256": hashlib.sha256(dataset).hexdigest()}
    archive.close()
    (out / "expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
