"""The repository alone runs its suite: a clone without ``../shared`` beside it is green, fixture tests skipped.

Part of the README's test command (scripts/test.sh), after the full run. It clones this repository's committed
state into a temporary folder (nothing beside it), then runs there, with ``CI`` unset:

- ``pytest``: must pass, with at least one skipped test and every skip giving the fixtures-absent reason (so no
  other test skips quietly, and every test that needs the fixtures is marked as such: an unmarked one fails);
- ``cargo test --tests`` (the core's unit and integration tests): must pass, and the fixture tests must say
  they skipped.

The installed package (the test command installs it from this checkout) is what the clone's tests import.

    python scripts/standalone_check.py
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REASON = "needs the shared reference fixtures"


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    print(f"standalone check: {' '.join(cmd)}  (in {cwd})", flush=True)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)


def main() -> int:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    # The clone's Rust build reuses this checkout's dependency builds (only the workspace crates rebuild).
    env["CARGO_TARGET_DIR"] = str(REPO / "target")
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="ggml-lora-standalone-") as tmp:
        clone = Path(tmp) / "ggml-lora"
        subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(REPO), str(clone)], check=True)
        assert not (clone.parent / "shared").exists()

        py = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs"], clone, env)
        failed = "\n".join(line for line in py.stdout.splitlines() if line.startswith(("FAILED", "ERROR")))
        summary = py.stdout.strip().splitlines()[-1] if py.stdout.strip() else ""
        skips = [line for line in py.stdout.splitlines() if line.startswith("SKIPPED")]
        skipped = int(m.group(1)) if (m := re.search(r"(\d+) skipped", summary)) else 0
        if py.returncode != 0:
            failures.append(f"pytest failed without the fixtures (exit {py.returncode}):\n{failed}\n{py.stderr[-2000:]}")
        elif skipped == 0:
            failures.append(f"no test skipped without the fixtures (are the fixture tests marked?): {summary}")
        other = [line for line in skips if REASON not in line]
        if other:
            failures.append("tests skipped for another reason than the absent fixtures:\n" + "\n".join(other))
        print(f"standalone check: pytest: {summary}")

        rs = run(["cargo", "test", "-q", "--tests", "--", "--nocapture"], clone, env)
        if rs.returncode != 0:
            failures.append(f"cargo test failed without the fixtures (exit {rs.returncode}):\n{rs.stdout[-3000:]}"
                            f"\n{rs.stderr[-3000:]}")
        rust_skips = [line for line in (rs.stdout + rs.stderr).splitlines() if f"skipped: {REASON}" in line]
        if rs.returncode == 0 and not rust_skips:
            failures.append("cargo test: no fixture test reported a skip without the fixtures")
        print(f"standalone check: cargo test: {len(rust_skips)} fixture tests skipped, exit {rs.returncode}")
    for f in failures:
        print(f"standalone check FAILED: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
