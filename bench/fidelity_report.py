"""Regenerate docs/fidelity.md: run the fidelity sweep of tests/test_fidelity_sweep.py and write its report.

Usage: ``python bench/fidelity_report.py [OUTPUT]`` (default docs/fidelity.md).  Needs what the tests need
(DCMTK is not used; pydicom-data and the vendor data of scripts/install-test-deps).  Takes a few minutes.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # this checkout's dcbnode, as the node it starts

import fidelity  # noqa: E402
from fidelity_verdict import report  # noqa: E402


def main() -> None:
    output = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "docs" / "fidelity.md"
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip()
    warnings.simplefilter("ignore")  # the test files are full of deliberately invalid values
    with tempfile.TemporaryDirectory() as workdir:
        sweep = fidelity.run_sweep(Path(workdir), vendor=not fidelity.missing_vendor_packages())
    output.write_text(report(sweep, commit=commit))
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
