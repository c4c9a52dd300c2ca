"""Mutation check: break the code on purpose and expect the tests to notice.

Each mutation below replaces one exact piece of source in a throw-away copy of the repository (``target/`` and
``.git`` left out; ``../shared`` reached through a symlink beside the copy, as the tests expect), then runs the
tests that must catch it against the copy. A mutation the tests miss ("survived") is a test that proves less
than it claims: the script prints a table and exits 1. It also exits 1 when a mutation no longer applies (its
source text moved) or when the unmutated copy does not pass the same tests (a red baseline would make every
mutation look caught).

Python mutations need no build: the copy's ``python/`` comes first on ``PYTHONPATH`` (inherited by the
subprocesses the tests start) and the installed extension module ``ggml_lora._native`` is copied into it.
Rust-side mutations (for example a SIMD check compared with itself) go in ``RUST_MUTATIONS`` with a ``cargo test``
command: the copy holds ``rust/`` and the Cargo files, and ``CARGO_TARGET_DIR`` points at this repository's
``target/`` so that dependencies are not rebuilt.

Usage: ``python scripts/mutations.py [-k SUBSTRING]`` (run by ``scripts/test.sh`` after pytest).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # relative to the repository root
    old: str  # must occur exactly once
    new: str
    command: tuple[str, ...]  # run in the copy's root; exit status `caught` = the tests caught it
    caught: int = 1  # pytest's "tests failed"; cargo test uses 101 for failures (and for build errors, hence `build`)
    build: tuple[str, ...] = ()  # must succeed on the mutated copy first, so a build error never counts as caught


PYTEST = (sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider")


def pytest(*selection: str) -> tuple[str, ...]:
    return PYTEST + selection


PYTHON_MUTATIONS = [
    Mutation("quality: cosine and error_ratio fields swapped", "python/ggml_lora/patch.py",
             "    cosine: float\n    error_ratio: float\n", "    error_ratio: float\n    cosine: float\n",
             pytest("tests/test_quality_report.py")),
    Mutation("quality: relative_change and retained fields swapped", "python/ggml_lora/patch.py",
             "    relative_change: float\n    retained: float\n", "    retained: float\n    relative_change: float\n",
             pytest("tests/test_quality_report.py")),
    Mutation("converter: no q/k row permutation of lora_b", "python/ggml_lora/convert/core.py",
             'permute = (n_head, n_head if which == "q" else info.n_head_kv[blk])', "permute = None",
             pytest("tests/test_convert_scales.py")),
    Mutation("converter: q8_0 outtype keeps lora_b in f32 instead of llama.cpp's f16 fallback",
             "python/ggml_lora/convert/writers.py",
             "cannot be q8_0 blocks.\n            return _to_f16(name, x)", "cannot be q8_0 blocks.\n            return x",
             pytest("tests/test_convert_output.py", "-k", "outtype")),
    Mutation("patch: default output name <model>-merged.gguf", "python/ggml_lora/patch.py",
             'f"{model.stem}-lora.gguf"', 'f"{model.stem}-merged.gguf"',
             pytest("tests/test_patch.py", "-k", "default_output")),
    Mutation("patch: no --out-type q8_0 suggestion", "python/ggml_lora/patch.py",
             'and out_type is None:\n        tips.append("write the patched tensors at higher precision',
             'and False:\n        tips.append("write the patched tensors at higher precision',
             pytest("tests/test_quality_report.py", "-k", "suggest")),
    Mutation("patch: no advice appended to the engine's cannot_dequantize message", "python/ggml_lora/patch.py",
             '"cannot_dequantize": " (base=..., CLI: --lora-base)",', '"cannot_dequantize": "",',
             pytest("tests/test_patch.py", "-k", "advice")),
]

#: Rust-side mutations (each needs a debug build of the core's unit tests in the copy).
CARGO_TEST = ("cargo", "test", "-q", "-p", "ggml-lora-core", "--lib")
RUST_MUTATIONS: list[Mutation] = [
    # A CPU without AVX2, as the dispatcher sees it: the SIMD-vs-portable tests must fail, not compare the
    # portable fallback with itself.
    Mutation(
        "kernels: AVX2 path unavailable (self-compared SIMD check)",
        "rust/core/src/quant/x86/mod.rs",
        "pub(in crate::quant) fn q4_0_quantize(src: &[f32], dst: &mut [u8], scalar: ScalarBlock) -> Option<bool> {\n"
        "    if !has_avx2() {",
        "pub(in crate::quant) fn q4_0_quantize(src: &[f32], dst: &mut [u8], scalar: ScalarBlock) -> Option<bool> {\n"
        "    if true {",
        CARGO_TEST + ("quant::q4_0",),
        caught=101,
        build=CARGO_TEST + ("--no-run",),
    ),
    Mutation(
        "converter: rsLoRA scale alpha/r instead of alpha/sqrt(r)",
        "rust/core/src/scale.rs",
        "alpha / (r as f64).sqrt()",
        "alpha / r as f64",
        CARGO_TEST + ("scale::",),
        caught=101,
        build=CARGO_TEST + ("--no-run",),
    ),
    Mutation(
        "converter: q/k rows permuted with n_head where llama.cpp uses n_head_kv",
        "rust/core/src/peft.rs",
        "let heads = if n_head != n_head_kv { n_head_kv } else { n_head };\n    let half = rows / heads / 2;\n"
        "    let (h, within)",
        "let heads = n_head;\n    let half = rows / heads / 2;\n    let (h, within)",
        CARGO_TEST + ("peft::",),
        caught=101,
        build=CARGO_TEST + ("--no-run",),
    ),
    # A SIMD kernel that drifts from the C reference by one rounding step on some inputs.
    Mutation(
        "kernels: AVX2 q4_0 offset 8.5 -> 8.4999",
        "rust/core/src/quant/x86/mod.rs",
        "match legacy_codes(x, -8.0, 8.5, 15) {",
        "match legacy_codes(x, -8.0, 8.4999, 15) {",
        CARGO_TEST + ("quant::q4_0",),
        caught=101,
        build=CARGO_TEST + ("--no-run",),
    ),
    # The patch engine's SIMD low-rank add never taken: its SIMD-vs-portable test must fail.
    Mutation(
        "patch kernel: AVX2 low-rank tiles unavailable (self-compared SIMD check)",
        "rust/core/src/quant/x86/lowrank.rs",
        'LowRankIsa::Avx2 => is_x86_feature_detected!("avx2"),',
        "LowRankIsa::Avx2 => false,",
        CARGO_TEST + ("patch::kernel",),
        caught=101,
        build=CARGO_TEST + ("--no-run",),
    ),
    # --tensor-type patterns matched case-sensitively, unlike llama-quantize.
    Mutation(
        "patch plan: tensor-type patterns case-sensitive",
        "rust/core/src/patch/plan.rs",
        "regex::RegexBuilder::new(p).case_insensitive(true)",
        "regex::RegexBuilder::new(p).case_insensitive(false)",
        CARGO_TEST + ("patch::plan",),
        caught=101,
        build=CARGO_TEST + ("--no-run",),
    ),
]


def installed_native() -> Path:
    """The installed ``ggml_lora._native`` extension (found outside this repository, without PYTHONPATH)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = "import importlib.util as u; print(u.find_spec('ggml_lora._native').origin)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
    if done.returncode != 0:
        raise SystemExit(f"mutations: ggml_lora is not installed in {sys.executable}: {done.stderr.strip()[-500:]}")
    return Path(done.stdout.strip())


def make_copy(root: Path, native: Path) -> Path:
    """A copy of the repository at ``root/repo`` (beside a ``shared`` symlink) with the installed extension."""
    copy = root / "repo"
    shutil.copytree(REPO, copy, symlinks=True,
                    ignore=shutil.ignore_patterns("target", ".git", "__pycache__", ".pytest_cache", "*.so"))
    (root / "shared").symlink_to((REPO.parent / "shared").resolve())
    shutil.copy2(native, copy / "python" / "ggml_lora" / native.name)
    return copy


def run(copy: Path, command: tuple[str, ...]) -> int:
    env = dict(os.environ, PYTHONPATH=str(copy / "python"), CARGO_TARGET_DIR=str(REPO / "target"))
    return subprocess.run(command, cwd=copy, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          timeout=1800).returncode


def check_import(copy: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(copy / "python"))
    done = subprocess.run([sys.executable, "-c", "import ggml_lora; print(ggml_lora.__file__)"], cwd=copy,
                          env=env, capture_output=True, text=True)
    where = Path(done.stdout.strip() or "?").resolve()
    if done.returncode != 0 or copy.resolve() not in where.parents:
        raise SystemExit(f"mutations: the copy's package is not the one imported ({where}; {done.stderr[-500:]})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", default="", help="only mutations whose name contains this")
    args = parser.parse_args()
    mutations = [m for m in PYTHON_MUTATIONS + RUST_MUTATIONS if args.k in m.name]
    native = installed_native()
    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory(prefix="ggml-lora-mutations-") as tmp:
        copy = make_copy(Path(tmp), native)
        check_import(copy)
        for m in mutations:
            path = copy / m.file
            source = path.read_text()
            selection = " ".join(m.command[len(PYTEST):] if m.command[: len(PYTEST)] == PYTEST else m.command)
            if source.count(m.old) != 1:
                rows.append((m.name, selection, f"ERROR: source text found {source.count(m.old)} times"))
                continue
            baseline = run(copy, m.command)
            if baseline != 0:
                rows.append((m.name, selection, f"ERROR: unmutated copy fails these tests (exit {baseline})"))
                continue
            path.write_text(source.replace(m.old, m.new))
            try:
                built = run(copy, m.build) if m.build else 0
                status = run(copy, m.command) if built == 0 else -1
            finally:
                path.write_text(source)
            verdict = {0: "SURVIVED", m.caught: "killed"}.get(status, f"ERROR: exit {status} (not a test failure)")
            if built != 0:
                verdict = f"ERROR: the mutated copy does not build (exit {built})"
            rows.append((m.name, selection, verdict))
    widths = [max(len(r[i]) for r in rows + [("mutation", "tests", "result")]) for i in range(3)]
    for row in [("mutation", "tests", "result"), tuple("-" * w for w in widths)] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    bad = [r for r in rows if r[2] != "killed"]
    print(f"\n{len(rows) - len(bad)} of {len(rows)} mutations caught by the tests")
    return 1 if bad or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
