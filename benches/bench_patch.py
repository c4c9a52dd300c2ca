"""Patch benchmark: the `ggml-lora patch` CLI against llama.cpp's own tools and an I/O floor, paired in one run.

A benchmark, not a test. On a synthetic model of TinyLlama-1.1B shape (n_embd 2048, n_ff 5632, 22 layers, 32
heads / 4 kv heads, vocab 32000; generated once and cached in --dir) and a rank-16 f32 GGUF LoRA adapter on all
seven projections, in two quantizations (--model):

  q4_0    every matrix q4_0 (general.file_type 2, MOSTLY_Q4_0);
  q4_k_m  the Q4_K_M mixture, made from the f16 model by ggml_lora.quantize with the types llama-quantize's
          Q4_K_M picks (src/llama-quant.cpp): q4_K for most matrices, including token_embd; q6_K for
          output.weight and for attn_v / ffn_down in the layers `use_more_bits(i_layer, n_layer)` picks; q5_0
          (for q4_K) or q8_0 (for q6_K) where a row length is not a multiple of 256, f16 where not even of 32;
          f32 norms (general.file_type 15, MOSTLY_Q4_K_M). The warm-up checks these types against the real
          `llama-quantize f16 Q4_K_M` and stops if a single tensor differs.

and two ways of patching (--mode; `both` measures the two in the same rounds):

  base    (a) ggml-lora  `ggml-lora patch -m MODEL --lora A --lora-base f16 -o out -t T`, the command a user runs;
          (b) llama.cpp  `llama-export-lora -m f16 --lora A -o merged-f16 -t T`, then
                         `llama-quantize [--pure] merged-f16 out Q4_0|Q4_K_M T`;
  naive   (a) without --lora-base; (b) `llama-export-lora -m MODEL ...` (the quantized model; the merged tensors
          come out f16, the others are copied), then `llama-quantize [--pure] --allow-requantize ...`.
  (c) I/O floor, for each: every byte the patch reads and writes, read and written the same way and nothing else:
          the model (copied tensors, and the patched ones the quality report reads), the adapter, the f16 base's
          header and patched tensors (base mode), memory-mapped and copied out; then a file of the output's size
          written in 8 MiB blocks to a temporary name, fsynced, renamed and the folder fsynced, as the CLI does
          (llama.cpp's tools do not fsync).

Each round runs every step once, in a rotating order, and measures the wall time and peak RSS of each process
(llama.cpp's pipeline: the time is the sum of its two processes, its peak RSS the larger of the two). --pure
(q4_0 only): every tensor q4_0, like the model (without it llama-quantize makes output.weight q6_K).

llama.cpp's tools are built from the llama.cpp sources vendored in the llama-cpp-python sdist
(tests/oracles/llama_tools.py, cmake from PyPI, cached). Children are started by a small launcher process so
that each one's peak RSS (wait4's ru_maxrss) is its own, not inherited from this (large) process. One warm-up
round fills the page cache first and checks that ggml-lora's and llama.cpp's outputs have the same tensor
names, types and shapes. Figures are medians over the rounds with min-max; ratios are taken per round (pair)
because the machine is shared and noisy.

    python benches/bench_patch.py [--model q4_0|q4_k_m] [--mode base|naive|both] [--rounds N] [--threads 2]
                                  [--dir /tmp/ggml-lora-bench]
        defaults: --model q4_0: --mode base, 5 rounds; --model q4_k_m: --mode both, 3 rounds
    python benches/bench_patch.py --quick   # 2 layers, 1 round, both models, both modes: checks everything runs
"""

from __future__ import annotations

import argparse
import datetime
import json
import mmap
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import ggml_lora
import numpy as np
from ggml_lora import GGUFValueType, MetadataValue

ROOT = Path(__file__).resolve().parent.parent
SHAPE = {"n_embd": 2048, "n_ff": 5632, "n_layer": 22, "n_head": 32, "n_head_kv": 4, "n_vocab": 32000}
PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
RANK = 16
BLOCK = 8 << 20


# ---------------------------------------------------------------------------------------------- inputs


def tensor_shapes(n_layer: int, shape: dict[str, int] = SHAPE) -> dict[str, tuple[int, ...]]:
    """The tensors of a llama model of `shape` (SHAPE's keys) with `n_layer` layers, in llama.cpp's file order."""
    e, f, v = shape["n_embd"], shape["n_ff"], shape["n_vocab"]
    kv = e * shape["n_head_kv"] // shape["n_head"]
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (v, e)}
    for i in range(n_layer):
        p = f"blk.{i}"
        shapes.update({
            f"{p}.attn_norm.weight": (e,),
            f"{p}.attn_q.weight": (e, e),
            f"{p}.attn_k.weight": (kv, e),
            f"{p}.attn_v.weight": (kv, e),
            f"{p}.attn_output.weight": (e, e),
            f"{p}.ffn_norm.weight": (e,),
            f"{p}.ffn_gate.weight": (f, e),
            f"{p}.ffn_up.weight": (f, e),
            f"{p}.ffn_down.weight": (e, f),
        })
    shapes["output_norm.weight"] = (e,)
    shapes["output.weight"] = (v, e)
    return shapes


def metadata(n_layer: int, file_type: int, shape: dict[str, int] = SHAPE,
             name: str = "synthetic TinyLlama-1.1B shape") -> dict[str, object]:
    """Enough llama hyper-parameters for llama.cpp's model loader (llama-quantize reads them)."""
    u32, f32 = GGUFValueType.UINT32, GGUFValueType.FLOAT32
    return {
        "general.architecture": "llama",
        "general.name": name,
        "general.file_type": MetadataValue(file_type, u32),
        "llama.vocab_size": MetadataValue(shape["n_vocab"], u32),
        "llama.context_length": MetadataValue(2048, u32),
        "llama.block_count": MetadataValue(n_layer, u32),
        "llama.embedding_length": MetadataValue(shape["n_embd"], u32),
        "llama.feed_forward_length": MetadataValue(shape["n_ff"], u32),
        "llama.attention.head_count": MetadataValue(shape["n_head"], u32),
        "llama.attention.head_count_kv": MetadataValue(shape["n_head_kv"], u32),
        "llama.rope.dimension_count": MetadataValue(shape["n_embd"] // shape["n_head"], u32),
        "llama.attention.layer_norm_rms_epsilon": MetadataValue(1e-5, f32),
    }


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama-quant.cpp's `use_more_bits`: the first and last eighth of the layers and every third in between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


# llama-quant.cpp's tensor_type_fallback: the type used when a row length is not a multiple of the block size.
FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}


def with_fallback(ggml_type: str, row_length: int) -> str:
    """`ggml_type`, or llama-quantize's fallback for it when `row_length` does not fit its blocks (f16 when the
    fallback does not fit either)."""
    if row_length % ggml_lora.type_info(ggml_type).block_size == 0:
        return ggml_type
    fallback = FALLBACK.get(ggml_type, ggml_type)
    return fallback if row_length % ggml_lora.type_info(fallback).block_size == 0 else "f16"


def q4_0_types(shapes: dict[str, tuple[int, ...]], n_layer: int) -> dict[str, str]:
    """The type of every quantized tensor of `llama-quantize --pure ... Q4_0`: q4_0 for every matrix."""
    return {name: "q4_0" for name, shape in shapes.items() if len(shape) >= 2}


def q4_k_m_types(shapes: dict[str, tuple[int, ...]], n_layer: int) -> dict[str, str]:
    """The type of every quantized tensor of `llama-quantize ... Q4_K_M` on a llama model without experts, as
    llama_tensor_get_type (src/llama-quant.cpp of llama.cpp in the llama-cpp-python 0.3.36 sdist) picks it.
    `shapes` in file order (the attn_v / ffn_down counters follow it, as llama-quantize's do)."""
    n_attn_v = sum(1 for name in shapes if "attn_v.weight" in name)
    tied = "output.weight" not in shapes  # token_embd then takes the output's type
    i_attn_v = i_ffn_down = 0
    types = {}
    for name, shape in shapes.items():
        if len(shape) < 2 or not name.endswith("weight") or "_norm.weight" in name:
            continue  # not quantized: kept as they are (f32)
        ggml_type = "q4_k"  # the default type of Q4_K_M
        if name == "output.weight" or (tied and name == "token_embd.weight"):
            ggml_type = "q8_0" if shape[-1] % 256 else "q6_k"
        elif "attn_v.weight" in name:
            ggml_type = "q6_k" if use_more_bits(i_attn_v, n_attn_v) else ggml_type
            i_attn_v += 1
        elif "ffn_down" in name:
            ggml_type = "q6_k" if use_more_bits(i_ffn_down, n_layer) else ggml_type
            i_ffn_down += 1
        types[name] = with_fallback(ggml_type, shape[-1])
    return types


class ModelKind(NamedTuple):
    """One quantization of the synthetic model, and the llama-quantize arguments that make it."""

    name: str  # file name part and --model value
    file_type: int  # general.file_type (llama_ftype)
    ftype: str  # llama-quantize's name for it
    pure: bool  # llama-quantize --pure
    types: Callable[[dict[str, tuple[int, ...]], int], dict[str, str]]
    default_mode: str
    default_rounds: int


MODELS = {
    "q4_0": ModelKind("q4_0", 2, "Q4_0", True, q4_0_types, "base", 5),
    "q4_k_m": ModelKind("q4_k_m", 15, "Q4_K_M", False, q4_k_m_types, "both", 3),
}


# llama.cpp's GGUF LoRA adapter keys (what llama-export-lora and ggml-lora read).
ADAPTER_METADATA = {
    "general.architecture": "llama",
    "general.type": "adapter",
    "adapter.type": "lora",
    "adapter.lora.alpha": MetadataValue(32.0, GGUFValueType.FLOAT32),
}


def generate(folder: Path, n_layer: int) -> tuple[Path, Path]:
    """Writes (or reuses) the f16 model and the GGUF LoRA adapter for `n_layer` layers.

    The adapter is llama.cpp's GGUF LoRA format (general.type=adapter, adapter.type=lora, adapter.lora.alpha,
    `<tensor>.lora_a` of shape (rank, n_in) and `<tensor>.lora_b` of shape (n_out, rank), f32), which both
    ggml-lora and llama-export-lora read."""
    f16, lora = (folder / f"tiny-{n_layer}L-{k}.gguf" for k in ("f16", "lora-r16"))
    stamp = folder / f"tiny-{n_layer}L.v2.done"
    if stamp.exists() and f16.exists() and lora.exists():
        return f16, lora
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    shapes = tensor_shapes(n_layer)
    weights16: dict[str, Any] = {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            weights16[name] = (1 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
        else:
            weights16[name] = (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float16)
    ggml_lora.write(f16, metadata(n_layer, 1), weights16, sync=False)
    del weights16
    adapter: dict[str, Any] = {}
    for name, shape in shapes.items():
        if name.split(".")[-2] in PROJECTIONS:
            n_out, n_in = shape
            adapter[f"{name}.lora_a"] = 0.01 * rng.standard_normal((RANK, n_in), dtype=np.float32)
            adapter[f"{name}.lora_b"] = 0.01 * rng.standard_normal((n_out, RANK), dtype=np.float32)
    ggml_lora.write(lora, ADAPTER_METADATA, adapter, sync=False)
    stamp.touch()
    return f16, lora


def quantized_model(folder: Path, n_layer: int, kind: ModelKind, f16: Path) -> Path:
    """Writes (or reuses) the `kind` model: the f16 model's matrices quantized by ggml_lora.quantize to the types
    `kind.types` gives, the other tensors copied."""
    path = folder / f"tiny-{n_layer}L-{kind.name}.gguf"
    stamp = folder / f"tiny-{n_layer}L-{kind.name}.v2.done"
    if stamp.exists() and path.exists():
        return path
    shapes = tensor_shapes(n_layer)
    types = kind.types(shapes, n_layer)
    tensors: dict[str, Any] = {}
    with ggml_lora.open(f16) as source:
        for name, shape in shapes.items():
            raw = source.raw(name)
            if name in types:
                tensors[name] = (ggml_lora.quantize(raw.view(np.float16).reshape(shape), types[name]), types[name], shape)
            else:
                tensors[name] = raw.view(np.float32).reshape(shape).copy()
    ggml_lora.write(path, metadata(n_layer, kind.file_type), tensors, sync=False)
    stamp.touch()
    return path


# ---------------------------------------------------------------------------------------------- launcher

# A small process (no numpy) that starts each measured command with posix_spawn and reports wait4's rusage.
# Its own resident set is ~10 MB, so a child's ru_maxrss (which starts from the spawning process's) is the
# child's own figure; the bench reports that inherited floor by spawning /bin/true.
LAUNCHER = r"""
import json, os, sys, time
for line in sys.stdin:
    job = json.loads(line)
    actions = [(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
               (os.POSIX_SPAWN_OPEN, 1, job["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644),
               (os.POSIX_SPAWN_OPEN, 2, job["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)]
    start = time.perf_counter()
    pid = os.posix_spawn(job["argv"][0], job["argv"], os.environ, file_actions=actions)
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - start
    print(json.dumps({"wall": wall, "rss_mb": usage.ru_maxrss / 1024, "cpu": usage.ru_utime + usage.ru_stime,
                      "code": os.waitstatus_to_exitcode(status)}), flush=True)
"""


class Launcher:
    def __init__(self, logs: Path):
        self.logs = logs
        self.proc = subprocess.Popen([sys.executable, "-c", LAUNCHER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)

    def run(self, argv: list[str], tag: str) -> dict[str, Any]:
        out, err = self.logs / f"{tag}.out", self.logs / f"{tag}.err"
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps({"argv": argv, "stdout": str(out), "stderr": str(err)}) + "\n")
        self.proc.stdin.flush()
        result = json.loads(self.proc.stdout.readline())
        if result["code"] != 0:
            raise RuntimeError(f"{shlex.join(argv)} exited with {result['code']}:\n{err.read_text()[-3000:]}")
        result["stdout"] = out.read_text()
        return result

    def close(self) -> None:
        assert self.proc.stdin
        self.proc.stdin.close()
        self.proc.wait()


# ---------------------------------------------------------------------------------------------- I/O floor


def floor_ranges(model: Path, base: Path | None, lora: Path) -> list[tuple[Path, int, int]]:
    """(file, offset, length) of every byte the patch reads: the whole q4_0 model (header, copied tensors, and
    the patched tensors the quality report compares with), the whole adapter, and, with a base, the base's
    header and the tensors that are patched."""
    with ggml_lora.open(lora) as a:
        targets = {n[: -len(".lora_a")] for n in a.tensors if n.endswith(".lora_a")}
    ranges = [(model, 0, model.stat().st_size), (lora, 0, lora.stat().st_size)]
    if base is not None:
        with ggml_lora.open(base) as b:
            ranges.append((base, 0, b.data_offset))
            ranges += [(base, t.offset, t.nbytes) for n, t in b.tensors.items() if n in targets]
    return ranges


def io_floor(ranges: list[tuple[Path, int, int]], out: Path, out_bytes: int) -> float:
    """Reads `ranges` through memory maps (the patch maps its inputs) into an 8 MiB buffer, then writes
    `out_bytes` to a temporary file beside `out` in 8 MiB blocks, fsyncs it, renames it onto `out` and fsyncs
    the folder (what the CLI does by default). Returns the seconds taken; `out` is removed afterwards."""
    buffer = np.empty(BLOCK, dtype=np.uint8)
    start = time.perf_counter()
    maps = {}
    try:
        for path in {p for p, _, _ in ranges}:
            with open(path, "rb") as f:
                maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        for path, offset, nbytes in ranges:
            view = memoryview(maps[path])
            end = offset + nbytes
            while offset < end:
                n = min(BLOCK, end - offset)
                buffer[:n] = np.frombuffer(view[offset: offset + n], dtype=np.uint8)
                offset += n
            view.release()
        temp = out.with_name(out.name + ".floor-tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            written = 0
            data = memoryview(buffer.data)
            while written < out_bytes:
                written += os.write(fd, data[: min(BLOCK, out_bytes - written)])
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temp, out)
        dir_fd = os.open(out.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        for m in maps.values():
            m.close()
    elapsed = time.perf_counter() - start
    out.unlink()
    return elapsed


# ---------------------------------------------------------------------------------------------- measuring


def layout(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    with ggml_lora.open(path) as f:
        return {n: (t.type, t.shape) for n, t in f.tensors.items()}


def type_counts(path: Path) -> str:
    counts: dict[str, int] = {}
    for ggml_type, _ in layout(path).values():
        counts[ggml_type] = counts.get(ggml_type, 0) + 1
    return ", ".join(f"{t} {n}" for t, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def compare_with_reference(model: Path, reference: Path) -> str:
    """Checks that `model` (made by ggml_lora) has exactly the tensor names, types and shapes of `reference`
    (made by llama-quantize from the f16 model) and stops the benchmark if not; says how many tensors also hold
    the same bytes."""
    ours, theirs = layout(model), layout(reference)
    if ours != theirs:
        diff = [f"{n}: ggml_lora {ours.get(n)}, llama-quantize {theirs.get(n)}"
                for n in sorted(set(ours) | set(theirs)) if ours.get(n) != theirs.get(n)]
        raise SystemExit(f"the {model.name} mixture differs from llama-quantize's in {len(diff)} tensors:\n  "
                         + "\n  ".join(diff[:20]))
    with ggml_lora.open(model) as a, ggml_lora.open(reference) as b:
        same = sum(np.array_equal(a.raw(n), b.raw(n)) for n in ours)
    return f"same type and shape for all {len(ours)} tensors; {same} of {len(ours)} tensors byte-identical"


class Comparison:
    """One mode's measured steps: the `ggml-lora patch` CLI, llama.cpp's export-lora + quantize pipeline, and the
    I/O floor of the patch."""

    def __init__(self, mode: str, kind: ModelKind, model: Path, f16: Path, lora: Path, folder: Path,
                 tools: Path | None, threads: int, launcher: Launcher):
        self.mode, self.launcher = mode, launcher
        base = f16 if mode == "base" else None
        self.out = folder / f"out-ggml-lora-{mode}.gguf"
        cli = Path(sys.executable).parent / "ggml-lora"
        self.patch_cmd = [str(cli), "patch", "-m", str(model), "--lora", str(lora)]
        self.patch_cmd += ["--lora-base", str(f16)] if base else []
        self.patch_cmd += ["-o", str(self.out), "-t", str(threads)]
        self.merged16, self.out_llama = folder / "out-llama-f16.gguf", folder / f"out-llama-{kind.name}.gguf"
        self.export_cmd: list[str] | None = None
        self.quantize_cmd: list[str] | None = None
        if tools is not None:
            # export-lora merges into the f16 model (base mode) or the quantized model (naive mode) and writes the
            # merged tensors as f16, which llama-quantize quantizes to the model's file type; naive mode:
            # --allow-requantize, as the tensors export-lora copied are quantized already (llama-quantize copies
            # those whose type is already the one it picks).
            self.export_cmd = [str(tools / "llama-export-lora"), "-m", str(f16 if base else model), "--lora",
                               str(lora), "-o", str(self.merged16), "-t", str(threads)]
            self.quantize_cmd = [str(tools / "llama-quantize"), *(["--pure"] if kind.pure else []),
                                 *([] if base else ["--allow-requantize"]), str(self.merged16), str(self.out_llama),
                                 kind.ftype, str(threads)]
        self.ranges = floor_ranges(model, base, lora)
        self.read_bytes = sum(n for _, _, n in self.ranges)
        self.out_bytes = 0
        self.summary = ""
        self.same_layout = "not compared (no llama.cpp run)"

    def patch(self, tag: str, keep: bool = False) -> dict[str, Any]:
        r = self.launcher.run(self.patch_cmd, tag)
        r["bytes"] = self.out.stat().st_size
        if not keep:
            self.out.unlink()
        return r

    def llama(self, tag: str, keep: bool = False) -> dict[str, float]:
        assert self.export_cmd and self.quantize_cmd
        e = self.launcher.run(self.export_cmd, tag + "-export")
        q = self.launcher.run(self.quantize_cmd, tag + "-quantize")
        self.merged16.unlink()
        result = {"export": e["wall"], "quantize": q["wall"], "wall": e["wall"] + q["wall"],
                  "export_rss": e["rss_mb"], "quantize_rss": q["rss_mb"], "rss_mb": max(e["rss_mb"], q["rss_mb"]),
                  "bytes": self.out_llama.stat().st_size}
        if not keep:
            self.out_llama.unlink()
        return result

    def floor(self) -> dict[str, float]:
        return {"wall": io_floor(self.ranges, self.out.with_name("floor.bin"), self.out_bytes)}

    def warm_up(self) -> None:
        """One round not counted (page cache, first-run costs) that also compares the two outputs' layouts."""
        warm = self.patch(f"warmup-{self.mode}-patch", keep=True)
        self.out_bytes = int(warm["bytes"])
        self.summary = next((ln for ln in warm["stdout"].splitlines() if "retained" in ln), "").strip()
        if self.export_cmd is not None:
            self.llama(f"warmup-{self.mode}-llama", keep=True)
            same = layout(self.out) == layout(self.out_llama)
            self.same_layout = "same tensor names, types and shapes" if same else "DIFFERENT tensor layouts"
            self.out_llama.unlink()
        self.out.unlink()
        self.floor()

    def measure(self, step: str, tag: str) -> dict[str, float]:
        if step == "patch":
            return self.patch(tag)
        return self.llama(tag) if step == "llama" else self.floor()


# ---------------------------------------------------------------------------------------------- report


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def report(c: Comparison, rounds: list[dict[str, dict[str, float]]]) -> None:
    def col(step: str, key: str) -> list[float]:
        return [r[step][key] for r in rounds]

    print(f"  mode {c.mode}")
    print(f"  ggml-lora   {shlex.join(c.patch_cmd)}")
    if c.export_cmd and c.quantize_cmd:
        print(f"  llama.cpp   {shlex.join(c.export_cmd)}")
        print(f"              {shlex.join(c.quantize_cmd)}")
    print(f"  I/O floor   read {c.read_bytes / 1e6:.1f} MB via mmap ({len(c.ranges)} ranges), write "
          f"{c.out_bytes / 1e6:.1f} MB + fsync + rename + fsync(folder), one thread")
    print(f"  ggml-lora quality report (warm-up run): {c.summary}")
    print(f"  outputs of the warm-up run (ggml-lora vs llama.cpp): {c.same_layout}")
    print()
    has_llama = c.export_cmd is not None
    rows = [("ggml-lora patch (CLI)", col("patch", "wall"), col("patch", "rss_mb"))]
    if has_llama:
        rows += [("llama-export-lora", col("llama", "export"), col("llama", "export_rss")),
                 ("llama-quantize", col("llama", "quantize"), col("llama", "quantize_rss")),
                 ("llama.cpp pipeline", col("llama", "wall"), col("llama", "rss_mb"))]
    rows.append(("I/O floor", col("floor", "wall"), []))
    print(f"  {'':<24}{'wall s':>22}{'peak RSS MB':>22}")
    for name, walls, rss in rows:
        print(f"  {name:<24}{spread(walls):>22}{spread(rss, '{:.0f}') if rss else '-':>22}")
    print()
    ratios = {"ggml-lora / I/O floor (time)": [r["patch"]["wall"] / r["floor"]["wall"] for r in rounds]}
    if has_llama:
        ratios["llama.cpp / ggml-lora (time)"] = [r["llama"]["wall"] / r["patch"]["wall"] for r in rounds]
        ratios["llama.cpp / ggml-lora (peak RSS)"] = [r["llama"]["rss_mb"] / r["patch"]["rss_mb"] for r in rounds]
    for name, values in ratios.items():
        print(f"  {name:<34} median {spread(values)}x   per round: {', '.join(f'{v:.2f}' for v in values)}")
    print()


def run_model(kind: ModelKind, modes: list[str], args: argparse.Namespace, f16: Path, lora: Path,
              tools: Path | None, launcher: Launcher, true_rss: float) -> dict[str, Any]:
    """Warm-up and `args.rounds` paired rounds of every mode on the `kind` model; prints the report."""
    folder = Path(args.dir)
    t = time.perf_counter()
    model = quantized_model(folder, args.layers, kind, f16)
    print(f"{kind.name} model ready in {time.perf_counter() - t:.1f} s: {model.stat().st_size / 1e9:.3f} GB, "
          f"{type_counts(model)}", flush=True)

    type_check = "not checked (no llama.cpp run)"
    if tools is not None:
        # The model's types against the real llama-quantize on the f16 model (warm-up; stops if they differ).
        reference = folder / f"reference-llama-quantize-{kind.name}.gguf"
        argv = [str(tools / "llama-quantize"), *(["--pure"] if kind.pure else []), str(f16), str(reference),
                kind.ftype, str(args.threads)]
        r = launcher.run(argv, f"reference-{kind.name}")
        try:
            type_check = f"`{shlex.join(argv)}` ({r['wall']:.1f} s): " + compare_with_reference(model, reference)
        finally:
            reference.unlink()
        print(f"  type check: {type_check}", flush=True)

    comparisons = [Comparison(m, kind, model, f16, lora, folder, tools, args.threads, launcher) for m in modes]
    for c in comparisons:
        c.warm_up()

    rounds: list[dict[str, dict[str, dict[str, float]]]] = []
    steps = [(c, s) for c in comparisons for s in (("patch", "llama", "floor") if tools else ("patch", "floor"))]
    for i in range(args.rounds):
        k = i % len(steps)
        order = steps[k:] + steps[:k]  # rotate which one goes first
        got: dict[str, dict[str, dict[str, float]]] = {c.mode: {} for c in comparisons}
        for c, step in order:
            got[c.mode][step] = c.measure(step, f"r{i}-{c.mode}-{step}")
        rounds.append(got)
        print(f"  round {i + 1}/{args.rounds} ({' -> '.join(f'{s}-{c.mode}' for c, s in order)}):", flush=True)
        for c in comparisons:
            g = got[c.mode]
            line = f"    {c.mode}: ggml-lora {g['patch']['wall']:.2f} s {g['patch']['rss_mb']:.0f} MB, " \
                   f"floor {g['floor']['wall']:.2f} s"
            if "llama" in g:
                line += f", llama.cpp {g['llama']['export']:.2f} + {g['llama']['quantize']:.2f} s " \
                        f"{g['llama']['export_rss']:.0f} / {g['llama']['quantize_rss']:.0f} MB"
            print(line, flush=True)

    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print()
    print(f"ggml-lora {ggml_lora.__version__}, {when}, {platform.machine()} {os.cpu_count()} cores, "
          f"{args.threads} threads, {args.layers} layers, model {kind.name}, mode {'+'.join(modes)}, warm page "
          f"cache, {args.rounds} paired rounds after 1 warm-up; median (min-max)")
    print(f"  model: {model.name}, {model.stat().st_size / 1e6:.1f} MB, {type_counts(model)} "
          "(quantized by ggml_lora.quantize from the f16 model)")
    print(f"  model types vs llama-quantize on the f16 model (warm-up): {type_check}")
    print(f"  peak RSS of /bin/true from the launcher (inherited floor of every RSS figure): {true_rss:.1f} MB")
    print()
    for c in comparisons:
        report(c, [r[c.mode] for r in rounds])
    return {"when": when, "model": kind.name, "type_check": type_check, "rounds": rounds,
            "modes": {c.mode: {"read_bytes": c.read_bytes, "out_bytes": c.out_bytes, "summary": c.summary,
                               "same_layout": c.same_layout,
                               "commands": {"patch": c.patch_cmd, "export": c.export_cmd, "quantize": c.quantize_cmd}}
                      for c in comparisons}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp/ggml-lora-bench", help="where inputs and outputs go (cached inputs)")
    parser.add_argument("--model", choices=list(MODELS), help="the quantized model patched: q4_0 (default) or the "
                        "Q4_K_M mixture (with --quick and no --model: both)")
    parser.add_argument("--mode", choices=["base", "naive", "both"],
                        help="base: --lora-base f16; naive: patch the quantized tensors directly; both: the two in "
                             "the same rounds (default: base for q4_0, both for q4_k_m)")
    parser.add_argument("--rounds", type=int, help="paired rounds after the warm-up round (default: 5 for q4_0, "
                        "3 for q4_k_m)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="threads of every tool")
    parser.add_argument("--layers", type=int, default=SHAPE["n_layer"], help="number of layers (default 22)")
    parser.add_argument("--skip-llama", action="store_true", help="do not build or run llama.cpp's tools")
    parser.add_argument("--quick", action="store_true",
                        help="2 layers, 1 round, both modes, both models unless --model: a smoke run of the whole bench")
    parser.add_argument("--json", metavar="FILE", help="also write every measurement to FILE")
    args = parser.parse_args()
    if args.quick:
        args.layers, args.rounds, args.mode = 2, 1, args.mode or "both"
    kinds = [MODELS[args.model or "q4_0"]] if args.model or not args.quick else list(MODELS.values())
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be at least 1")
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="logs-", dir=folder))
    launcher = Launcher(logs)  # before this process grows

    tools: Path | None = None
    if not args.skip_llama:
        sys.path.insert(0, str(ROOT))
        from tests.oracles import llama_tools

        t = time.perf_counter()
        with open(folder / "llama-tools-build.log", "a") as build_log:
            tools = llama_tools.tools_dir(install_cmake=True, jobs=2, log=build_log)
        print(f"llama.cpp tools: {tools} (ready in {time.perf_counter() - t:.0f} s; {llama_tools.build_key()})")

    t = time.perf_counter()
    f16, lora = generate(folder, args.layers)
    print(f"inputs ready in {time.perf_counter() - t:.1f} s: f16 {f16.stat().st_size / 1e9:.3f} GB, "
          f"adapter {lora.stat().st_size / 1e6:.1f} MB ({args.layers} layers)", flush=True)
    true_rss = launcher.run(["/bin/true"], "true")["rss_mb"]

    results = []
    for kind in kinds:
        mode = args.mode or kind.default_mode
        kind_args = argparse.Namespace(**{**vars(args), "rounds": args.rounds or kind.default_rounds})
        results.append(run_model(kind, ["base", "naive"] if mode == "both" else [mode], kind_args, f16, lora, tools,
                                 launcher, true_rss))
    launcher.close()
    if args.json:
        Path(args.json).write_text(json.dumps({
            "version": ggml_lora.__version__, "threads": args.threads, "layers": args.layers,
            "true_rss_mb": true_rss, "results": results}, indent=1))
    for p in logs.iterdir():
        p.unlink()
    logs.rmdir()


if __name__ == "__main__":
    main()
