"""Bad bytes inside sequences: hypothesis builds C-STORE data sets with a sequence nested up to three deep,
each sequence and item of defined or undefined length, and breaks their structure (item lengths off or
claiming 4 GiB, missing or extra item/sequence delimiters, an element running past its item), then a stock
pynetdicom SCU sends them to a real node.

Every C-STORE gets a DICOM status or an A-ABORT (an intact one: Success), the node keeps answering, and a
Success stores exactly the bytes sent (the node's rebuild in the syntax sent, Explicit VR Little Endian,
equals them byte for byte).
Bounded for CI like ``test_fuzz.py`` (fixed seed; ``DCBNODE_FUZZ_EXAMPLES`` runs more, random).
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Iterator

import pydicom
import pytest
from conftest import RunningNode, read_back, rebuilt_part10
from hypothesis import given
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pynetdicom.dsutils import encode
from test_fuzz import _VALID_STATUS, FUZZ, _alive, fuzzed_node, store_raw

_SEQUENCE_TAG = (0x0008, 0x1140)  # Referenced Image Sequence: the outermost sequence
_NESTED_TAG = (0x0040, 0xA730)  # Content Sequence: the nested ones
_UNDEFINED = 0xFFFFFFFF
_ITEM_MUTATIONS = ["none"] * 5 + ["item length", "4 GiB item", "no item delimiter", "extra item delimiter",
                                  "element past item"]


def _element(group: int, element: int, vr: bytes, value: bytes, length: int | None = None) -> bytes:
    """One explicit VR little endian element with a 2-byte length field (SH, UI)."""
    return struct.pack("<HH2sH", group, element, vr, len(value) if length is None else length) + value


def _sequence(tag: tuple[int, int], depth: int, draw, mutations: list[str]) -> bytes:
    """A sequence of 1-2 items, each holding a code value and (down to depth 3) a nested sequence; every
    sequence and item of defined or undefined length, with at most one structural mutation drawn here."""
    items = []
    for n in range(draw(st.integers(1, 2))):
        body = _element(0x0008, 0x0100, b"SH", f"D{depth}I{n}".encode().ljust(6, b" "))
        mutation = draw(st.sampled_from(_ITEM_MUTATIONS))
        if mutation == "element past item":  # a value length running past the item's end
            body = body[:6] + struct.pack("<H", len(body) + draw(st.integers(1, 200))) + body[8:]
        if depth < 3 and draw(st.booleans()):
            body += _sequence(_NESTED_TAG, depth + 1, draw, mutations)
        undefined = draw(st.booleans()) and mutation != "element past item"
        length = _UNDEFINED if undefined else len(body)
        if mutation == "item length":
            length = draw(st.sampled_from([0, 1, max(0, len(body) - 1), len(body) + 1, len(body) + 8]))
        elif mutation == "4 GiB item":
            length = draw(st.sampled_from([0xFFFFFFFE, 0xFFFFFFF0, 0x7FFFFFFF]))
        item = struct.pack("<HHL", 0xFFFE, 0xE000, length) + body
        if length == _UNDEFINED and mutation != "no item delimiter":
            item += struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
        elif mutation == "no item delimiter" and length != _UNDEFINED:  # a defined-length item has none to leave out
            mutation = "none"
        mutations.append(mutation)
        if mutation == "extra item delimiter":
            item += struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
        items.append(item)
    content = b"".join(items)
    sequence_mutation = draw(st.sampled_from(["none"] * 3 + ["no sequence delimiter", "extra sequence delimiter"]))
    undefined = draw(st.booleans())
    mutations.append("none" if sequence_mutation == "no sequence delimiter" and not undefined else sequence_mutation)
    header = struct.pack("<HH2sHL", *tag, b"SQ", 0, _UNDEFINED if undefined else len(content))
    if undefined and sequence_mutation != "no sequence delimiter":
        content += struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    if sequence_mutation == "extra sequence delimiter":
        content += struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    return header + content


def _data_set(uid: str, draw) -> tuple[bytes, list[str]]:
    """CT_small (with SOP Instance UID ``uid``) with a fuzzed sequence inserted in tag order."""
    dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    dataset.SOPInstanceUID = uid
    before, after = pydicom.Dataset(), pydicom.Dataset()
    for element in dataset:
        (before if element.tag < pydicom.tag.Tag(*_SEQUENCE_TAG) else after).add(element)
    mutations: list[str] = []
    sequence = _sequence(_SEQUENCE_TAG, 1, draw, mutations)
    return encode(before, False, True) + sequence + encode(after, False, True), mutations


def _data_set_bytes(part10: bytes) -> bytes:
    """The data set of a Part-10 file: what follows the file meta group (its length from (0002,0000))."""
    group_length = struct.unpack("<L", part10[140:144])[0]
    return part10[144 + group_length:]


@pytest.fixture(scope="module")
def node(tmp_path_factory) -> Iterator[RunningNode]:
    yield from fuzzed_node(tmp_path_factory, "fuzz-nested")


_SENT: dict[str, bytes] = {}
_OUTCOMES: list[str] = []


@FUZZ
@given(data=st.data())
def test_mutated_nested_sequences_get_a_status_or_an_abort(node: RunningNode, data) -> None:
    uid = generate_uid()
    payload, mutations = _data_set(uid, data.draw)
    responses = store_raw(node, uid, payload)
    kind = "+".join(sorted(set(mutations) - {"none"})) or "intact"
    assert responses is not None or kind != "intact", f"a well-formed data set was aborted\n{node.log()[-2000:]}"
    if responses is None:
        _OUTCOMES.append(f"{kind}: A-ABORT")
        return
    status = int(responses[-1].Status)
    assert status in _VALID_STATUS
    assert status == 0x0000 or kind != "intact", f"a well-formed data set got {status:04X}\n{node.log()[-2000:]}"
    _OUTCOMES.append(f"{kind}: {status:04X}")
    if status == 0x0000:
        _SENT[uid] = payload


def test_successes_store_exactly_the_bytes_sent_and_the_node_is_alive(node: RunningNode) -> None:
    """Runs after the property (file order): every Success rebuilds byte for byte as sent."""
    _alive(node)
    assert _SENT or not _OUTCOMES, f"no case was stored: the byte comparison checked nothing\n{_OUTCOMES}"
    archive = read_back(node.data_dir)
    try:
        for uid, sent in _SENT.items():
            assert _data_set_bytes(rebuilt_part10(archive, uid)) == sent, uid
    finally:
        archive.close()
    print(f"nested fuzz: {len(_OUTCOMES)} cases, {len(_SENT)} stored; outcomes: {dict(Counter(_OUTCOMES))}")
