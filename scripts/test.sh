#!/usr/bin/env bash
# Installs everything the tests need, then runs every test: Rust (cargo test), Python (pytest), the mutation check
# (scripts/mutations.py: code broken on purpose must turn the tests red) and a smoke run of every fuzz target
# (cargo-fuzz, installed if missing).
# This is the README's test command; .ci/run calls it.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check ".[test]"
cargo test --quiet
# The exhaustive kernel checks (every f32 through the f16 conversions, every f32 in [-127, 127] through q8_0's
# rounding) take minutes in a debug build and about 15 s each in release, so they run here in release.
cargo test --release --quiet -p ggml-lora-core --lib -- --ignored exhaustively
python -m pytest -q
# The repository alone (no ../shared beside it) must run green too, with only the fixture tests skipped.
python scripts/standalone_check.py
python scripts/mutations.py
bash scripts/fuzz-smoke.sh
