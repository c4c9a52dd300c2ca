#!/usr/bin/env bash
# Installs everything the tests need, then runs every test: Rust (cargo test), Python (pytest), the mutation check
# (scripts/mutations.py: code broken on purpose must turn the tests red) and a smoke run of every fuzz target
# (cargo-fuzz, installed if missing).
# This is the README's test command; .ci/run calls it.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check ".[test]"
cargo test --quiet
python -m pytest -q
python scripts/mutations.py
bash scripts/fuzz-smoke.sh
