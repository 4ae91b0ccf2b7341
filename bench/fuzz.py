"""The fuzz properties of ``tests/test_fuzz.py`` and ``tests/test_fuzz_nested.py`` for longer: random (not the
CI's fixed) mutated PDUs, C-STORE data sets, nested sequences and P-DATA-TF framings against a real node,
``--examples`` cases per property (CI runs 30).

Run: ``python bench/fuzz.py [--examples 2000]``.  Prints the cases run and the pytest summary; a failure
shows hypothesis's falsifying (shrunk) example and the node's log.  Exit status: pytest's.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=2000, help="cases per property (default 2000)")
    args = parser.parse_args(argv)
    env = dict(os.environ, DCBNODE_FUZZ_EXAMPLES=str(args.examples))
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "pytest", "tests/test_fuzz.py", "tests/test_fuzz_nested.py", "-q",
                             "-s", "-p", "no:cacheprovider"], cwd=REPO, env=env, check=False)
    print(f"{4 * args.examples} cases ({args.examples} PDUs, data sets, P-DATA framings, nested sequences) in "
          f"{time.monotonic() - started:.0f} s: {'no failure' if result.returncode == 0 else 'FAILED'}")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
