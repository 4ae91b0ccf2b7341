"""Every test file — pydicom's, pydicom-data's, real vendor files and crafted ones — through a real node
and the library, compared byte for byte with what was sent (see ``tests/fidelity.py`` for the routes and
``tests/fidelity_verdict.py`` for what each cell must be).

The sweep runs once per module (a fresh node per group of files); each file is then one test, so a
failure names the file, the route and syntax, and the first differing element.  With
``DCBNODE_FIDELITY_REPORT=PATH`` the sweep also writes its report there (docs/fidelity.md).
"""

from __future__ import annotations

import os
from pathlib import Path

import crafted
import fidelity
import pytest
import rawdicom
from fidelity_verdict import EXPECTED_STORE_REFUSALS, report, unexplained

REPORT_ENV = "DCBNODE_FIDELITY_REPORT"
IN_CI = os.environ.get("CI") == "true"
VENDOR = not fidelity.missing_vendor_packages()
NAMES = [source.name for source in fidelity.catalogue(vendor=VENDOR)]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> fidelity.Sweep:
    result = fidelity.run_sweep(tmp_path_factory.mktemp("fidelity"), vendor=VENDOR)
    if os.environ.get(REPORT_ENV):
        Path(os.environ[REPORT_ENV]).write_text(report(result))
    return result


def test_vendor_data_is_installed() -> None:
    """scripts/install-test-deps extracts the vendor files; in CI their absence is a failure."""
    missing = fidelity.missing_vendor_packages()
    if missing and not IN_CI:
        pytest.skip(f"vendor data missing in {fidelity.vendor_dir()}: {missing} (run scripts/install-test-deps)")
    assert not missing, f"vendor data missing in {fidelity.vendor_dir()}: {missing}"


def test_catalogue_is_complete() -> None:
    """Both pydicom sources, the crafted files, unique names; every expected refusal names a listed file."""
    assert len(NAMES) == len(set(NAMES))
    assert sum(name.startswith("pydicom/") for name in NAMES) >= 140
    assert sum(name.startswith("pydicom-data/") for name in NAMES) >= 60, "is pydicom-data installed?"
    assert {"pydicom/CT_small.dcm", "pydicom-data/emri_small.dcm", *crafted.CRAFTED} <= set(NAMES)
    assert set(EXPECTED_STORE_REFUSALS) <= set(NAMES), set(EXPECTED_STORE_REFUSALS) - set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_file_comes_back_faithful(sweep: fidelity.Sweep, name: str) -> None:
    """Own syntax: byte-identical; other syntaxes: value-bytes identical; refusals explained."""
    assert unexplained(sweep, name) == {}


@pytest.mark.parametrize("name", list(crafted.CRAFTED))
def test_crafted_file_holds_what_it_claims(name: str) -> None:
    """The oracle reads back the paddings the crafted files were written with (so a loss is the node's)."""
    parsed = rawdicom.parse_part10(crafted.CRAFTED[name])
    assert rawdicom.find(parsed, 0x00080080).value == b"AB" + b" " * 10  # InstitutionName
    assert rawdicom.find(parsed, 0x00080000) is not None and rawdicom.find(parsed, 0x00280000) is not None
    padded = rawdicom.find(parsed, 0x00400275)  # RequestAttributesSequence: one item per padding
    assert padded is not None and padded.items is not None and padded.length == rawdicom.UNDEFINED
    assert len(padded.items) == len(crafted.PADDINGS)
    assert all(len(item.elements or ()) >= len(crafted.STRING_VRS) for item in padded.items)
    deep = rawdicom.find(parsed, 0x00081115)  # three undefined-length sequences deep
    for _ in range(3):
        assert deep is not None and deep.length == rawdicom.UNDEFINED and deep.items
        deep = next((e for e in deep.items[0].elements or () if e.vr in ("SQ", None) and e.items), None)
