#!/usr/bin/env python3
"""Size limits for production Rust code (run by check-boundaries): no file over MAX_FILE lines
before its `#[cfg(test)]`, no function over MAX_FN lines unless the lines above it say why
("Longer than the usual limit"). Test files and test modules are not counted."""
import re
import subprocess
import sys

MAX_FILE = 800
MAX_FN = 150
REASON = "Longer than the usual limit"
FN = re.compile(r"^(\s*)(pub(\([a-z]+\))? )?(const )?(async )?(unsafe )?fn (\w+)")

files = subprocess.check_output(["git", "ls-files", "*.rs"], text=True).split()
problems = []
for path in files:
    if path.startswith("tests/") or "/tests/" in path:
        continue
    lines = open(path, encoding="utf-8").read().split("\n")
    end = next((i for i, l in enumerate(lines) if l.startswith("#[cfg(test)]")), len(lines))
    if end > MAX_FILE:
        problems.append(f"{path}: {end} lines of production code (at most {MAX_FILE})")
    for i in range(end):
        m = FN.match(lines[i])
        if not m:
            continue
        close = next((j for j in range(i + 1, end) if lines[j] == m.group(1) + "}"), None)
        if close is None or close - i + 1 <= MAX_FN:
            continue
        above = lines[max(0, i - 8):i]
        if not any(REASON in l for l in above):
            problems.append(
                f"{path}:{i + 1}: fn {m.group(7)} is {close - i + 1} lines "
                f"(at most {MAX_FN}, or say why at its top: \"{REASON}...\")"
            )
for p in problems:
    print(f"size limit: {p}", file=sys.stderr)
sys.exit(1 if problems else 0)
