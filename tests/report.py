"""Print one line per pytest run (from their JUnit XML files) and a closing total.

    python -m tests.report host=FILE vm-boot=FILE kernel=FILE
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET

KINDS = ("passed", "failed", "errors", "skipped")


def counts(path: str) -> dict[str, int]:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = dict.fromkeys(KINDS, 0)
    for suite in suites:
        tests, failures, errors, skipped = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
        total["failed"] += failures
        total["errors"] += errors
        total["skipped"] += skipped
        total["passed"] += tests - failures - errors - skipped
    return total


def main(argv: list[str]) -> int:
    grand = dict.fromkeys(KINDS, 0)
    for arg in argv:
        label, _, path = arg.partition("=")
        try:
            found = counts(path)
        except (OSError, ET.ParseError) as error:
            print(f"{label}: no report ({error})")
            grand["errors"] += 1
            continue
        print(f"{label}: " + ", ".join(f"{found[k]} {k}" for k in KINDS))
        for k in KINDS:
            grand[k] += found[k]
    print(f"{grand['passed']} passed, {grand['failed'] + grand['errors']} failed, {grand['skipped']} skipped")
    return 0 if grand["failed"] + grand["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
