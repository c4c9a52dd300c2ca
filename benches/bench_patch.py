"""Patch benchmark: the `ggml-lora patch` CLI against llama.cpp's own tools and an I/O floor, paired in one run.

A benchmark, not a test. On a synthetic model of TinyLlama-1.1B shape (n_embd 2048, n_ff 5632, 22 layers, 32
heads / 4 kv heads, vocab 32000; f16 and q4_0 files, generated once and cached in --dir) and a rank-16 f32
GGUF LoRA adapter on all seven projections, each of N rounds measures, in a rotating order:

  (a) ggml-lora   `ggml-lora patch -m q4_0 --lora A --lora-base f16 -o out -t T`, the command a user runs
                  (--mode naive: without --lora-base): wall time and peak RSS of the whole process;
  (b) llama.cpp   `llama-export-lora -m f16 --lora A -o merged-f16 -t T`, then
                  `llama-quantize --pure merged-f16 out Q4_0 T`: wall time and peak RSS of each process
                  (the pipeline's time is the sum, its peak RSS the larger of the two); --mode naive:
                  `llama-export-lora -m q4_0 ...` then `llama-quantize --pure --allow-requantize ...`;
  (c) I/O floor   every byte the patch reads and writes, read and written the same way and nothing else:
                  the q4_0 model (copied tensors, and the patched ones the quality report reads), the adapter,
                  the f16 base's header and patched tensors (base mode), memory-mapped and copied out; then a
                  file of the output's size written in 8 MiB blocks to a temporary name, fsynced, renamed and
                  the folder fsynced, as the CLI does (llama.cpp's tools do not fsync).

llama.cpp's tools are built from the llama.cpp sources vendored in the llama-cpp-python sdist
(tests/oracles/llama_tools.py, cmake from PyPI, cached). Children are started by a small launcher process so
that each one's peak RSS (wait4's ru_maxrss) is its own, not inherited from this (large) process. One warm-up
round fills the page cache first. Figures are medians over the rounds with min-max; ratios are taken per
round (pair) because the machine is shared and noisy.

    python benches/bench_patch.py [--rounds 5] [--threads 2] [--mode base|naive] [--dir /tmp/ggml-lora-bench]
    python benches/bench_patch.py --quick          # 2 layers, 1 round: checks that everything runs
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
from typing import Any

import ggml_lora
import numpy as np
from ggml_lora import GGUFValueType, MetadataValue

ROOT = Path(__file__).resolve().parent.parent
SHAPE = {"n_embd": 2048, "n_ff": 5632, "n_layer": 22, "n_head": 32, "n_head_kv": 4, "n_vocab": 32000}
PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
RANK = 16
BLOCK = 8 << 20


# ---------------------------------------------------------------------------------------------- inputs


def tensor_shapes(n_layer: int) -> dict[str, tuple[int, ...]]:
    e, f, v = SHAPE["n_embd"], SHAPE["n_ff"], SHAPE["n_vocab"]
    kv = e * SHAPE["n_head_kv"] // SHAPE["n_head"]
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


def metadata(n_layer: int, file_type: int) -> dict[str, object]:
    """Enough llama hyper-parameters for llama.cpp's model loader (llama-quantize reads them)."""
    u32, f32 = GGUFValueType.UINT32, GGUFValueType.FLOAT32
    return {
        "general.architecture": "llama",
        "general.name": "synthetic TinyLlama-1.1B shape",
        "general.file_type": MetadataValue(file_type, u32),
        "llama.vocab_size": MetadataValue(SHAPE["n_vocab"], u32),
        "llama.context_length": MetadataValue(2048, u32),
        "llama.block_count": MetadataValue(n_layer, u32),
        "llama.embedding_length": MetadataValue(SHAPE["n_embd"], u32),
        "llama.feed_forward_length": MetadataValue(SHAPE["n_ff"], u32),
        "llama.attention.head_count": MetadataValue(SHAPE["n_head"], u32),
        "llama.attention.head_count_kv": MetadataValue(SHAPE["n_head_kv"], u32),
        "llama.rope.dimension_count": MetadataValue(SHAPE["n_embd"] // SHAPE["n_head"], u32),
        "llama.attention.layer_norm_rms_epsilon": MetadataValue(1e-5, f32),
    }


def generate(folder: Path, n_layer: int) -> tuple[Path, Path, Path]:
    """Writes (or reuses) the f16 model, the q4_0 model and the GGUF LoRA adapter for `n_layer` layers.

    The adapter is llama.cpp's GGUF LoRA format (general.type=adapter, adapter.type=lora, adapter.lora.alpha,
    `<tensor>.lora_a` of shape (rank, n_in) and `<tensor>.lora_b` of shape (n_out, rank), f32), which both
    ggml-lora and llama-export-lora read."""
    f16, q4, lora = (folder / f"tiny-{n_layer}L-{k}.gguf" for k in ("f16", "q4_0", "lora-r16"))
    stamp = folder / f"tiny-{n_layer}L.v2.done"
    if stamp.exists() and all(p.exists() for p in (f16, q4, lora)):
        return f16, q4, lora
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    shapes = tensor_shapes(n_layer)
    weights16: dict[str, Any] = {}
    weights_q4: dict[str, Any] = {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            w = (1 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
            weights16[name] = weights_q4[name] = w
        else:
            w = (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float16)
            weights16[name] = w
            weights_q4[name] = (ggml_lora.quantize(w, "q4_0"), "q4_0", shape)
    ggml_lora.write(f16, metadata(n_layer, 1), weights16, sync=False)
    ggml_lora.write(q4, metadata(n_layer, 2), weights_q4, sync=False)
    del weights16, weights_q4
    adapter: dict[str, Any] = {}
    for name, shape in shapes.items():
        if name.split(".")[-2] in PROJECTIONS:
            n_out, n_in = shape
            adapter[f"{name}.lora_a"] = 0.01 * rng.standard_normal((RANK, n_in), dtype=np.float32)
            adapter[f"{name}.lora_b"] = 0.01 * rng.standard_normal((n_out, RANK), dtype=np.float32)
    ggml_lora.write(
        lora,
        {
            "general.architecture": "llama",
            "general.type": "adapter",
            "adapter.type": "lora",
            "adapter.lora.alpha": MetadataValue(32.0, GGUFValueType.FLOAT32),
        },
        adapter,
        sync=False,
    )
    stamp.touch()
    return f16, q4, lora


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


# ---------------------------------------------------------------------------------------------- report


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp/ggml-lora-bench", help="where inputs and outputs go (cached inputs)")
    parser.add_argument("--rounds", type=int, default=5, help="paired rounds after the warm-up round (default 5)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="threads of every tool")
    parser.add_argument("--mode", choices=["base", "naive"], default="base",
                        help="base: --lora-base f16 (default); naive: patch the q4_0 tensors directly")
    parser.add_argument("--layers", type=int, default=SHAPE["n_layer"], help="number of layers (default 22)")
    parser.add_argument("--skip-llama", action="store_true", help="do not build or run llama.cpp's tools")
    parser.add_argument("--quick", action="store_true", help="2 layers, 1 round: a smoke run of the whole bench")
    parser.add_argument("--json", metavar="FILE", help="also write every measurement to FILE")
    args = parser.parse_args()
    if args.quick:
        args.layers, args.rounds = 2, 1
    if args.rounds < 1:
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
    f16, q4, lora = generate(folder, args.layers)
    print(f"inputs ready in {time.perf_counter() - t:.1f} s: f16 {f16.stat().st_size / 1e9:.3f} GB, "
          f"q4_0 {q4.stat().st_size / 1e9:.3f} GB, adapter {lora.stat().st_size / 1e6:.1f} MB ({args.layers} layers)")

    base = f16 if args.mode == "base" else None
    out = folder / "out-ggml-lora.gguf"
    cli = Path(sys.executable).parent / "ggml-lora"
    patch_cmd = [str(cli), "patch", "-m", str(q4), "--lora", str(lora)]
    patch_cmd += ["--lora-base", str(f16)] if base else []
    patch_cmd += ["-o", str(out), "-t", str(args.threads)]
    merged16, out_llama = folder / "out-llama-f16.gguf", folder / "out-llama-q4_0.gguf"
    export_cmd = quantize_cmd = None
    if tools is not None:
        # export-lora merges into the f16 model (base mode) or the q4_0 model (naive mode) and writes the merged
        # tensors as f16, which llama-quantize turns into q4_0. --pure: every tensor q4_0, like the model (by
        # default llama-quantize makes output.weight q6_k, which is slower); naive mode: --allow-requantize, as
        # the tensors export-lora copied are q4_0 already.
        export_cmd = [str(tools / "llama-export-lora"), "-m", str(f16 if base else q4), "--lora", str(lora),
                      "-o", str(merged16), "-t", str(args.threads)]
        quantize_cmd = [str(tools / "llama-quantize"), "--pure", *([] if base else ["--allow-requantize"]),
                        str(merged16), str(out_llama), "Q4_0", str(args.threads)]
    ranges = floor_ranges(q4, base, lora)
    read_bytes = sum(n for _, _, n in ranges)

    true_rss = launcher.run(["/bin/true"], "true")["rss_mb"]

    def measure_patch(tag: str, keep: bool = False) -> dict[str, Any]:
        r = launcher.run(patch_cmd, tag)
        r["bytes"] = out.stat().st_size
        if not keep:
            out.unlink()
        return r

    def measure_llama(tag: str, keep: bool = False) -> dict[str, float]:
        assert export_cmd and quantize_cmd
        e = launcher.run(export_cmd, tag + "-export")
        q = launcher.run(quantize_cmd, tag + "-quantize")
        merged16.unlink()
        result = {"export": e["wall"], "quantize": q["wall"], "wall": e["wall"] + q["wall"],
                  "export_rss": e["rss_mb"], "quantize_rss": q["rss_mb"], "rss_mb": max(e["rss_mb"], q["rss_mb"]),
                  "bytes": out_llama.stat().st_size}
        if not keep:
            out_llama.unlink()
        return result

    # Warm-up round (page cache, first-run costs); not counted.
    warm = measure_patch("warmup-patch", keep=True)
    out_bytes = int(warm["bytes"])
    same_layout = "not compared (no llama.cpp run)"
    if tools is not None:
        measure_llama("warmup-llama", keep=True)
        with ggml_lora.open(out) as a, ggml_lora.open(out_llama) as b:
            layout_a = {n: (t.type, t.shape) for n, t in a.tensors.items()}
            layout_b = {n: (t.type, t.shape) for n, t in b.tensors.items()}
        same_layout = "same tensor names, types and shapes" if layout_a == layout_b else "DIFFERENT tensor layouts"
        out_llama.unlink()
    out.unlink()
    io_floor(ranges, folder / "floor.bin", out_bytes)
    summary = next((ln for ln in warm["stdout"].splitlines() if "retained" in ln), "")

    rounds: list[dict[str, dict[str, float]]] = []
    for i in range(args.rounds):
        steps = ["patch", "llama", "floor"] if tools is not None else ["patch", "floor"]
        k = i % len(steps)
        order = steps[k:] + steps[:k]  # rotate which one goes first
        got: dict[str, dict[str, float]] = {}
        for step in order:
            if step == "patch":
                got["patch"] = measure_patch(f"r{i}-patch")
            elif step == "llama":
                got["llama"] = measure_llama(f"r{i}-llama")
            else:
                got["floor"] = {"wall": io_floor(ranges, folder / "floor.bin", out_bytes)}
        got["order"] = {s: j for j, s in enumerate(order)}  # type: ignore[misc]
        rounds.append(got)
        line = f"  round {i + 1}/{args.rounds} ({' -> '.join(order)}): ggml-lora {got['patch']['wall']:.2f} s " \
               f"{got['patch']['rss_mb']:.0f} MB, floor {got['floor']['wall']:.2f} s"
        if "llama" in got:
            line += f", llama.cpp {got['llama']['export']:.2f} + {got['llama']['quantize']:.2f} s " \
                    f"{got['llama']['export_rss']:.0f} / {got['llama']['quantize_rss']:.0f} MB"
        print(line, flush=True)
    launcher.close()

    def col(step: str, key: str) -> list[float]:
        return [r[step][key] for r in rounds]

    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print()
    print(f"ggml-lora {ggml_lora.__version__}, {when}, {platform.machine()} {os.cpu_count()} cores, "
          f"{args.threads} threads, {args.layers} layers, mode {args.mode}, warm page cache, "
          f"{args.rounds} paired rounds after 1 warm-up; median (min-max)")
    print(f"  ggml-lora   {shlex.join(patch_cmd)}")
    if export_cmd and quantize_cmd:
        print(f"  llama.cpp   {shlex.join(export_cmd)}")
        print(f"              {shlex.join(quantize_cmd)}")
    print(f"  I/O floor   read {read_bytes / 1e6:.1f} MB via mmap ({len(ranges)} ranges), write {out_bytes / 1e6:.1f} MB "
          "+ fsync + rename + fsync(folder), one thread")
    print(f"  peak RSS of /bin/true from the launcher (inherited floor of every RSS figure): {true_rss:.1f} MB")
    print(f"  ggml-lora quality report (warm-up run): {summary.strip()}")
    print(f"  outputs of the warm-up run (ggml-lora vs llama.cpp): {same_layout}")
    print()
    rows = [("ggml-lora patch (CLI)", col("patch", "wall"), col("patch", "rss_mb"))]
    if tools is not None:
        rows += [("llama-export-lora", col("llama", "export"), col("llama", "export_rss")),
                 ("llama-quantize", col("llama", "quantize"), col("llama", "quantize_rss")),
                 ("llama.cpp pipeline", col("llama", "wall"), col("llama", "rss_mb"))]
    rows.append(("I/O floor", col("floor", "wall"), []))
    print(f"  {'':<24}{'wall s':>22}{'peak RSS MB':>22}")
    for name, walls, rss in rows:
        print(f"  {name:<24}{spread(walls):>22}{spread(rss, '{:.0f}') if rss else '-':>22}")
    print()
    ratios = {"ggml-lora / I/O floor (time)": [r["patch"]["wall"] / r["floor"]["wall"] for r in rounds]}
    if tools is not None:
        ratios["llama.cpp / ggml-lora (time)"] = [r["llama"]["wall"] / r["patch"]["wall"] for r in rounds]
        ratios["llama.cpp / ggml-lora (peak RSS)"] = [r["llama"]["rss_mb"] / r["patch"]["rss_mb"] for r in rounds]
    for name, values in ratios.items():
        print(f"  {name:<34} median {spread(values)}x   per round: {', '.join(f'{v:.2f}' for v in values)}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "when": when, "version": ggml_lora.__version__, "threads": args.threads, "layers": args.layers,
            "mode": args.mode, "rounds": rounds, "true_rss_mb": true_rss, "read_bytes": read_bytes,
            "out_bytes": out_bytes, "commands": {"patch": patch_cmd, "export": export_cmd, "quantize": quantize_cmd},
        }, indent=1))
    for p in logs.iterdir():
        p.unlink()
    logs.rmdir()


if __name__ == "__main__":
    main()
