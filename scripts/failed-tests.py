#!/usr/bin/env python3
"""Prints, for each meson build directory given, the tests that did not
pass and the end of each one's output. test.sh calls it last, so that a CI
log cut to its tail still says which test failed and why."""
import json
import os
import sys

TAIL = 40  # lines of each failed test's output


def failed(build):
    path = os.path.join(build, "meson-logs", "testlog.json")
    if not os.path.exists(path):
        return [(f"{build}: no test log", "")]
    out = []
    with open(path) as f:
        for line in f:
            t = json.loads(line)
            if t["result"] not in ("OK", "EXPECTEDFAIL"):
                out.append((f"{build}: {t['name']} {t['result']} after {t['duration']:.0f} s", t.get("stdout") or ""))
    return out


def main():
    bad = [x for b in sys.argv[1:] for x in failed(b)]
    for head, log in bad:
        if not log:
            print(f"==== {head}")
            continue
        print(f"==== {head}; its last {TAIL} lines:")
        print("\n".join(log.rstrip("\n").splitlines()[-TAIL:]))
    print("==== failed: " + ("; ".join(h for h, _ in bad) if bad else "none"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
