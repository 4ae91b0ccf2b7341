"""The fidelity oracle itself (tests/rawdicom.py, tests/faithful.py): it finds what a faithless node would do,
and accepts what a faithful change of syntax does."""

from __future__ import annotations

import struct

import faithful
import pytest
import rawdicom
from crafted import SYNTAXES, crafted_instance

EXPLICIT = crafted_instance("explicit", rawdicom.EXPLICIT_LE, 1)


def _replace_first(data: bytes, old: bytes, new: bytes) -> bytes:
    assert old in data
    return data.replace(old, new, 1)


@pytest.mark.parametrize("name", [n for n in SYNTAXES if n != "explicit"])
def test_same_instance_in_another_syntax_is_value_bytes_identical(name: str) -> None:
    """Implicit, Big Endian (values swapped by VR), Deflated: the same values, so no difference."""
    other = crafted_instance(name, SYNTAXES[name], 1)
    assert other != EXPLICIT
    assert faithful.difference(EXPLICIT, other) is None
    assert faithful.difference(other, EXPLICIT) is None


def test_stripped_padding_is_found_with_its_path() -> None:
    """'AB' + 10 spaces cut to 'AB': in the same syntax the element itself differs; from another syntax the
    group length no longer measures its group, and beyond it the value differs."""
    stripped = _replace_first(EXPLICIT, b"LO\x0c\x00AB" + b" " * 10, b"LO\x02\x00AB")
    found = faithful.difference(EXPLICIT, stripped)
    assert found is not None and found.path == "(0008,0080)" and "header" in found.what
    implicit = crafted_instance("implicit", rawdicom.IMPLICIT_LE, 1)
    found = faithful.difference(implicit, stripped)
    assert found is not None and found.path == "(0008,0000)" and "group takes" in found.what
    beyond = faithful.difference(implicit, stripped, skip_group_lengths=True)
    assert beyond is not None and beyond.path == "(0008,0080)" and "12 bytes" in beyond.what


def test_nested_difference_is_found_with_its_path() -> None:
    """A NUL-padded value three levels down."""
    changed = _replace_first(EXPLICIT, b"DCM\0", b"DCM ")
    found = faithful.difference(EXPLICIT, changed)
    assert found is not None
    assert found.path == "(0008,1115)[0].(0008,1140)[0].(0040,A730)[0].(0008,0102)", found


def test_dropped_group_length_and_defined_length_sequence_are_found() -> None:
    """Another syntax may recompute a group length, never drop it; undefined lengths stay undefined."""
    implicit = crafted_instance("implicit", rawdicom.IMPLICIT_LE, 1)
    dropped = _replace_first(implicit, struct.pack("<HHL", 0x0010, 0x0000, 4), struct.pack("<HHL", 0x0010, 0x0001, 4))
    found = faithful.difference(EXPLICIT, dropped)
    assert found is not None and found.path == "(0010,0000)"
    parsed = rawdicom.parse_part10(EXPLICIT)
    sequence = rawdicom.find(parsed, 0x00081115)
    assert sequence is not None and sequence.length == rawdicom.UNDEFINED


def test_big_endian_values_must_be_swapped() -> None:
    """A Big Endian US value copied unswapped into Little Endian output is a difference."""
    big = crafted_instance("bigendian", rawdicom.EXPLICIT_BE, 1)
    unswapped = _replace_first(EXPLICIT, b"\x28\x00\x10\x00US\x02\x00\x04\x00", b"\x28\x00\x10\x00US\x02\x00\x00\x04")
    assert faithful.difference(big, EXPLICIT) is None
    found = faithful.difference(big, unswapped)
    assert found is not None and found.path == "(0028,0010)"


def test_same_syntax_must_be_byte_identical() -> None:
    """In the received syntax even a header change (here an explicit VR) is a difference."""
    relabelled = _replace_first(EXPLICIT, b"\x08\x00\x80\x00LO", b"\x08\x00\x80\x00SH")
    found = faithful.difference(EXPLICIT, relabelled)
    assert found is not None and found.path == "(0008,0080)" and "header" in found.what


def test_truncated_dataset_is_an_oracle_error() -> None:
    with pytest.raises(rawdicom.RawError, match="needs"):
        rawdicom.parse_part10(EXPLICIT[:-10])
