"""DCBS format versions: volumes this code writes are refused, clearly, by code that cannot read them.

``tests/data/layout1.dcbs`` is a version 1 volume written by an earlier dcbnode; the refusals are checked
against this code with crafted headers and records, and against the released code itself (the package as
it was at the last version 1 commit, taken from git).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from dcbnode import dcbs
from dcbnode.dcbs.errors import DcbsFormatError
from dcbnode.dcbs.format import FILE_HEADER_SIZE, FORMAT_VERSION, pack_file_header, unpack_file_header
from dcbnode.dcbs.record import NewerRecordError, _pack, unpack_content
from dcbnode.dcbs.series import append_instance

REPO = Path(__file__).resolve().parent.parent
LAYOUT1 = Path(__file__).parent / "data" / "layout1.dcbs"
#: The last commit whose code writes and reads only version 1 volumes.
LAST_VERSION_1 = "230ef04"


def _header(path: Path) -> bytes:
    return path.read_bytes()[:FILE_HEADER_SIZE]


def _with_header(path: Path, header: bytes) -> None:
    data = bytearray(path.read_bytes())
    data[:FILE_HEADER_SIZE] = header
    path.write_bytes(bytes(data))


def test_new_volumes_are_version_2(tmp_path: Path) -> None:
    path = tmp_path / "new.dcbs"
    with dcbs.Volume.open(path, writable=True, create=True) as volume:
        append_instance(volume, dcbs.encode_instance(get_testdata_file("CT_small.dcm")))
    assert unpack_file_header(_header(path)).version == FORMAT_VERSION == 2


def test_version_1_volume_reads_and_becomes_version_2_when_appended_to(tmp_path: Path) -> None:
    path = tmp_path / "old.dcbs"
    shutil.copyfile(LAYOUT1, path)
    assert unpack_file_header(_header(path)).version == 1
    with dcbs.Volume.open(path, writable=True) as volume:  # repair-capable open alone changes nothing
        before = len(dcbs.live_instances(volume))
    assert unpack_file_header(_header(path)).version == 1
    with dcbs.Volume.open(path, writable=True) as volume:
        append_instance(volume, dcbs.encode_instance(get_testdata_file("MR_small.dcm")))
    header = unpack_file_header(_header(path))
    assert header.version == 2
    assert header.volume_id == unpack_file_header(_header(LAYOUT1)).volume_id
    with dcbs.Volume.open(path) as volume:
        assert len(dcbs.live_instances(volume)) == before + 1


@pytest.mark.parametrize(("version", "features", "expected"), [
    (3, 0, "DCBS format version 3"),
    (2, 0x4, "DCBS format features 0x4"),
])
def test_volume_of_a_newer_dcbnode_is_refused_clearly(tmp_path: Path, version: int, features: int,
                                                     expected: str) -> None:
    path = tmp_path / "newer.dcbs"
    shutil.copyfile(LAYOUT1, path)
    volume_id = unpack_file_header(_header(path)).volume_id
    _with_header(path, pack_file_header(volume_id, version=version, features=features))
    with pytest.raises(DcbsFormatError) as caught:
        dcbs.Volume.open(path)
    message = str(caught.value)
    assert str(path) in message and expected in message and "written by a newer dcbnode" in message
    assert "upgrade dcbnode" in message


def test_record_with_fields_of_a_newer_dcbnode_is_refused_clearly() -> None:
    encoded = dcbs.encode_instance(get_testdata_file("CT_small.dcm"))
    content = _pack(encoded.meta, {name: getattr(encoded.blobs, name) for name in
                                   ("header", "suffix", "file_meta", "basic_offsets", "native_tail")}, set())
    length = int.from_bytes(content[:4], "little")
    document = json.loads(content[4 : 4 + length])
    document["image"]["colour_space_v9"] = "future"
    encoded_json = json.dumps(document).encode()
    newer = len(encoded_json).to_bytes(4, "little") + encoded_json + content[4 + length :]
    with pytest.raises(NewerRecordError, match=r"written by a newer dcbnode \(fields colour_space_v9\)"):
        unpack_content(newer)


def test_released_version_1_code_refuses_a_version_2_volume(tmp_path: Path) -> None:
    """The package as released before version 2, run against a volume this code wrote: it must refuse
    with its own clear message rather than misread anything."""
    old = tmp_path / "released"
    shallow = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--is-shallow-repository"], capture_output=True,
                             text=True, check=False)
    if shallow.stdout.strip() == "true":
        pytest.skip("a shallow clone has no released code to run")
    archive = subprocess.run(["git", "-C", str(REPO), "archive", LAST_VERSION_1, "dcbnode"],
                             capture_output=True, check=False)
    if archive.returncode != 0:
        pytest.fail(f"git cannot give the released code (a full clone is needed): {archive.stderr.decode()}")
    old.mkdir()
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
    path = tmp_path / "new.dcbs"
    with dcbs.Volume.open(path, writable=True, create=True) as volume:
        append_instance(volume, dcbs.encode_instance(get_testdata_file("CT_small.dcm")))
    probe = ("import sys; from dcbnode import dcbs\n"
             "try:\n    dcbs.Volume.open(sys.argv[1])\nexcept dcbs.DcbsFormatError as exc:\n    print(exc)\n")
    result = subprocess.run([sys.executable, "-c", probe, str(path)], cwd=old, capture_output=True, text=True,
                            check=True)
    assert "unsupported DCBS format version 2; upgrade dcbnode to read it" in result.stdout
