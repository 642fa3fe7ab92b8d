"""`python -m tools.deploy_check`: every offline check of deploy/ (make lint runs it); exit 1 on a problem."""

from __future__ import annotations

import sys
import time

from tools.deploy_check import compose, images, kubernetes, monitoring
from tools.deploy_check.common import ToolMissing


def main() -> int:
    started = time.perf_counter()
    failed = 0
    for module in (images, compose, kubernetes, monitoring):
        try:
            results = module.check_all()
        except (ToolMissing, ValueError) as exc:
            print(f"FAIL {module.__name__}: {exc}")
            failed += 1
            continue
        for check, problems in results.items():
            print(f"{'ok  ' if not problems else 'FAIL'} {check}")
            for problem in problems:
                print(f"     {problem}")
            failed += bool(problems)
    print(f"deploy checks: {failed} failed ({time.perf_counter() - started:.1f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
