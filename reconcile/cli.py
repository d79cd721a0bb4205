"""`sorami-reconcile`: the operator's batch job."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sorami-reconcile",
        description="Match orphaned backend job ids to the jobs they belong to.",
    )
    parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.parse_args(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
