#!/usr/bin/env bash
# Installs everything the tests need, then runs every test: Rust (cargo test) and Python (pytest).
# This is the README's test command; .ci/run calls it.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check ".[test]"
cargo test --quiet
python -m pytest -q
