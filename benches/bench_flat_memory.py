"""Flat-memory benchmark: `ggml-lora patch` on models of 1B, 7B and 70B-layer shapes, peak RSS and throughput.

A benchmark, not a test. Three synthetic llama models, each a Q4_K_M mixture (the types llama-quantize's Q4_K_M
picks, bench_patch.q4_k_m_types: q4_K for most matrices, q6_K for output.weight and for attn_v / ffn_down in the
layers `use_more_bits` picks, f32 norms; general.file_type 15), generated once and cached in --dir:

  small   TinyLlama-1.1B shape (n_embd 2048, n_ff 5632, 22 layers, 32 heads / 4 kv heads, vocab 32000), the
          reference, as in bench_patch.py (about 0.67 GB);
  7b      LLaMA-7B shape (n_embd 4096, n_ff 11008, 32 layers, 32 heads, vocab 32000; about 4 GB);
  70b     a few layers (--layers-70b, default 4) of LLaMA-70B shape (n_embd 8192, n_ff 28672, 64 heads / 8 kv
          heads, vocab 32000): every tensor as large as in the real model (about 2.4 GB with 4 layers).

Each with a rank-16 f32 GGUF LoRA adapter on all seven projections of every layer (llama.cpp's layout:
`<tensor>.lora_a` ne [n_in, 16], `<tensor>.lora_b` ne [16, n_out], general.type adapter, adapter.lora.alpha 32).
The weights are cheap on purpose: each matrix repeats one tile of 512 random rows (0.02 N(0,1)) quantized once
per (type, row length) by ggml_lora.quantize; the adapter's factors are fresh random numbers (so every patched
row differs). Files are streamed with ggml_lora.GGUFStreamWriter, so generating them stays in flat memory too;
free disk is checked first.

Each round patches every model once, in a rotating order, with the command a user runs without an f16 base:

    ggml-lora patch -m MODEL --lora ADAPTER -o OUT -t T

started from bench_patch's small launcher, which reports the whole process's wall time, CPU time and peak RSS
(wait4's ru_maxrss); and runs bench_patch's I/O floor for each (read the model and adapter through memory maps,
write a file of the output's size, fsync, rename). One warm-up round fills the page cache first. Figures are medians
over the rounds with min-max; the ratios to the small model are taken per round, because the machine is shared
and noisy (the load average is printed with every round). Throughput is GB of model file per second of wall
time. Goals (issue 12): peak RSS under 300 MB for every model; throughput of the large models at least 80% of
the small model's.

    python benches/bench_flat_memory.py [--rounds 3] [--threads 2] [--layers-70b 4] [--models small,7b,70b]
                                        [--dir /tmp/ggml-lora-flat] [--json FILE]
    python benches/bench_flat_memory.py --quick   # 2 layers each (1 of 70B shape), 1 round: checks everything runs
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import ggml_lora
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_patch import (  # noqa: E402  (the measuring helpers are shared with the patch benchmark)
    ADAPTER_METADATA, MODELS, PROJECTIONS, RANK, Launcher, floor_ranges, io_floor, metadata, spread, tensor_shapes,
    type_counts)

Q4_K_M = MODELS["q4_k_m"]
TILE_ROWS = 512
CHUNK_BYTES = 16 << 20
RSS_GOAL_MB = 300
THROUGHPUT_GOAL = 0.8
GB = 1e9


class Shape(NamedTuple):
    """One synthetic model: its key (file names, --models), description and hyper-parameters."""

    key: str
    title: str
    dims: dict[str, int]


SHAPES = {
    "small": Shape("small", "TinyLlama-1.1B shape", {"n_embd": 2048, "n_ff": 5632, "n_layer": 22, "n_head": 32,
                                                     "n_head_kv": 4, "n_vocab": 32000}),
    "7b": Shape("7b", "LLaMA-7B shape", {"n_embd": 4096, "n_ff": 11008, "n_layer": 32, "n_head": 32,
                                         "n_head_kv": 32, "n_vocab": 32000}),
    "70b": Shape("70b", "LLaMA-70B layer shapes", {"n_embd": 8192, "n_ff": 28672, "n_layer": 4, "n_head": 64,
                                                   "n_head_kv": 8, "n_vocab": 32000}),
}


# ---------------------------------------------------------------------------------------------- inputs


def tensor_bytes(ggml_type: str, shape: tuple[int, ...]) -> int:
    info = ggml_lora.type_info(ggml_type)
    return int(np.prod(shape)) // info.block_size * info.type_size


def plan(shape: Shape, n_layer: int) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """The model's tensor shapes (file order) and the type of each: Q4_K_M's for matrices, f32 for norms."""
    shapes = tensor_shapes(n_layer, shape.dims)
    quantized = Q4_K_M.types(shapes, n_layer)
    return shapes, {name: quantized.get(name, "f32") for name in shapes}


def paths(folder: Path, shape: Shape, n_layer: int) -> tuple[Path, Path, Path]:
    stem = f"{shape.key}-{n_layer}L"
    return folder / f"{stem}-q4_k_m.gguf", folder / f"{stem}-lora-r16.gguf", folder / f"{stem}.v1.done"


def disk_needed(shape: Shape, n_layer: int) -> tuple[int, int]:
    """(bytes of the model and adapter files, bytes of one patched output)."""
    shapes, types = plan(shape, n_layer)
    model = sum(tensor_bytes(types[n], s) for n, s in shapes.items())
    adapter = sum(4 * RANK * sum(s) for n, s in shapes.items() if n.split(".")[-2] in PROJECTIONS)
    return model + adapter, model


def check_disk(folder: Path, wanted: list[tuple[Shape, int]]) -> None:
    """Refuses to start when the inputs still to generate plus the largest output do not fit (with 1 GB spare)."""
    to_make = sum(disk_needed(s, n)[0] for s, n in wanted if not paths(folder, s, n)[2].exists())
    largest_output = max(disk_needed(s, n)[1] for s, n in wanted)
    need = to_make + largest_output + int(1 * GB)
    free = shutil.disk_usage(folder).free
    if free < need:
        raise SystemExit(f"not enough free disk in {folder}: {free / GB:.1f} GB free, {need / GB:.1f} GB needed "
                         f"({to_make / GB:.1f} GB of inputs to generate, {largest_output / GB:.1f} GB for the largest "
                         f"output, 1 GB spare). Use --dir on a larger disk, fewer --layers-70b, or fewer --models.")


def quantized_tile(rng: np.random.Generator, ggml_type: str, n_in: int) -> np.ndarray:
    """TILE_ROWS random rows quantized to `ggml_type`, repeated to about CHUNK_BYTES (whole rows), as bytes."""
    rows = ggml_lora.quantize(0.02 * rng.standard_normal((TILE_ROWS, n_in), dtype=np.float32), ggml_type)
    rows = np.ascontiguousarray(rows).reshape(TILE_ROWS, -1)
    return np.tile(rows, (max(1, CHUNK_BYTES // rows.nbytes), 1))


def write_model(path: Path, shape: Shape, n_layer: int) -> None:
    """Streams the Q4_K_M model: every matrix the tile of its (type, row length) repeated, norms near 1."""
    shapes, types = plan(shape, n_layer)
    rng = np.random.default_rng(0)
    tiles: dict[tuple[str, int], np.ndarray] = {}
    meta = metadata(n_layer, Q4_K_M.file_type, shape.dims, f"synthetic {shape.title}")
    with ggml_lora.GGUFStreamWriter(path, meta, {n: (types[n], s) for n, s in shapes.items()}, sync=False) as w:
        for name, dims in shapes.items():
            if len(dims) == 1:
                w.write(1 + 0.1 * rng.standard_normal(dims, dtype=np.float32))
                continue
            n_out, n_in = dims
            key = (types[name], n_in)
            if key not in tiles:
                tiles[key] = quantized_tile(rng, *key)
            tile = tiles[key]
            done = 0
            while done < n_out:
                rows = min(n_out - done, len(tile))
                w.write(tile[:rows])
                done += rows


def write_adapter(path: Path, shape: Shape, n_layer: int) -> None:
    """Streams the rank-16 f32 adapter on the seven projections of every layer."""
    shapes = {n: s for n, s in tensor_shapes(n_layer, shape.dims).items() if n.split(".")[-2] in PROJECTIONS}
    spec: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, (n_out, n_in) in shapes.items():
        spec[f"{name}.lora_a"] = ("f32", (RANK, n_in))
        spec[f"{name}.lora_b"] = ("f32", (n_out, RANK))
    rng = np.random.default_rng(1)
    with ggml_lora.GGUFStreamWriter(path, ADAPTER_METADATA, spec, sync=False) as w:
        for _, dims in spec.values():
            w.write(0.01 * rng.standard_normal(dims, dtype=np.float32))


def generate(folder: Path, shape: Shape, n_layer: int) -> tuple[Path, Path]:
    """Writes (or reuses) the model and adapter of `shape` with `n_layer` layers."""
    model, adapter, stamp = paths(folder, shape, n_layer)
    if stamp.exists() and model.exists() and adapter.exists():
        return model, adapter
    t = time.perf_counter()
    write_model(model, shape, n_layer)
    write_adapter(adapter, shape, n_layer)
    stamp.touch()
    print(f"  generated {model.name} ({model.stat().st_size / GB:.2f} GB) and {adapter.name} "
          f"({adapter.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t:.0f} s", flush=True)
    return model, adapter


# ---------------------------------------------------------------------------------------------- measuring


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


class Subject:
    """One model: its files, the patch command, and the I/O floor of that patch."""

    def __init__(self, shape: Shape, n_layer: int, model: Path, adapter: Path, folder: Path, threads: int,
                 launcher: Launcher):
        self.shape, self.n_layer, self.model, self.adapter, self.launcher = shape, n_layer, model, adapter, launcher
        self.out = folder / f"out-{shape.key}.gguf"
        cli = Path(sys.executable).parent / "ggml-lora"
        self.cmd = [str(cli), "patch", "-m", str(model), "--lora", str(adapter), "-o", str(self.out), "-t",
                    str(threads)]
        self.model_bytes = model.stat().st_size
        self.ranges = floor_ranges(model, None, adapter)
        self.out_bytes = 0
        self.summary = ""

    def patch(self, tag: str) -> dict[str, Any]:
        r = self.launcher.run(self.cmd, tag)
        self.out_bytes = self.out.stat().st_size
        self.out.unlink()
        r["gbps"] = self.model_bytes / GB / r["wall"]
        return r

    def floor(self) -> float:
        return io_floor(self.ranges, self.out.with_name(f"floor-{self.shape.key}.bin"), self.out_bytes)

    def warm_up(self) -> None:
        r = self.patch(f"warmup-{self.shape.key}")
        self.summary = next((ln for ln in r["stdout"].splitlines() if "retained" in ln), "").strip()
        self.floor()
        print(f"  warm-up {self.shape.key}: {r['wall']:.1f} s, {r['rss_mb']:.0f} MB", flush=True)


def report(subjects: list[Subject], rounds: list[dict[str, dict[str, float]]], args: argparse.Namespace,
           true_rss: float, loads: list[str]) -> None:
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print()
    print(f"ggml-lora {ggml_lora.__version__}, {when}, {platform.machine()} {os.cpu_count()} cores, "
          f"{args.threads} threads, warm page cache, {args.rounds} paired rounds after 1 warm-up; median (min-max)")
    print(f"  load average (1, 5, 15 min) at the start of each round and at the end: {' | '.join(loads)}")
    print(f"  peak RSS of /bin/true from the launcher (inherited floor of every RSS figure): {true_rss:.1f} MB")
    print()
    for s in subjects:
        d = s.shape.dims
        print(f"  {s.shape.key}: {s.shape.title}, {s.n_layer} layers (n_embd {d['n_embd']}, n_ff {d['n_ff']}, "
              f"{d['n_head']}/{d['n_head_kv']} heads, vocab {d['n_vocab']}): {s.model_bytes / GB:.3f} GB, "
              f"{type_counts(s.model)}; adapter {s.adapter.stat().st_size / 1e6:.1f} MB")
        print(f"    {shlex.join(s.cmd)}")
        print(f"    quality report (warm-up run): {s.summary}")
    print()

    def col(key: str, field: str) -> list[float]:
        return [r[key][field] for r in rounds]

    print(f"  {'':<8}{'model GB':>10}{'wall s':>24}{'peak RSS MB':>16}{'GB/s':>26}{'CPU s':>24}"
          f"{'I/O floor s':>22}{'patch/floor':>22}")
    for s in subjects:
        k = s.shape.key
        ratio = [r[k]["wall"] / r[k]["floor"] for r in rounds]
        print(f"  {k:<8}{s.model_bytes / GB:>10.3f}{spread(col(k, 'wall')):>24}{spread(col(k, 'rss_mb'), '{:.0f}'):>16}"
              f"{spread(col(k, 'gbps'), '{:.4f}'):>26}{spread(col(k, 'cpu')):>24}{spread(col(k, 'floor')):>22}"
              f"{spread(ratio):>22}")
    print()

    small = "small" if any(s.shape.key == "small" for s in subjects) else None
    throughput_ratios: dict[str, list[float]] = {}
    if small:
        small_bytes = next(s.model_bytes for s in subjects if s.shape.key == small)
        for s in subjects:
            k = s.shape.key
            if k == small:
                continue
            throughput_ratios[k] = [r[k]["gbps"] / r[small]["gbps"] for r in rounds]
            rss = [r[k]["rss_mb"] / r[small]["rss_mb"] for r in rounds]
            per_cpu = [(s.model_bytes / r[k]["cpu"]) / (small_bytes / r[small]["cpu"]) for r in rounds]
            print(f"  {k:>3} / small, throughput   median {spread(throughput_ratios[k])}x   per round: "
                  f"{', '.join(f'{v:.2f}' for v in throughput_ratios[k])}")
            print(f"  {k:>3} / small, GB per CPU s median {spread(per_cpu)}x   per round: "
                  f"{', '.join(f'{v:.2f}' for v in per_cpu)}   (less sensitive to other jobs on the machine)")
            print(f"  {k:>3} / small, peak RSS     median {spread(rss)}x   per round: "
                  f"{', '.join(f'{v:.2f}' for v in rss)}")
        print()

    peak = max(max(col(s.shape.key, "rss_mb")) for s in subjects)
    print(f"  goal: peak RSS < {RSS_GOAL_MB} MB: {'yes' if peak < RSS_GOAL_MB else 'no'} (max {peak:.0f} MB)")
    if throughput_ratios:
        medians = {k: statistics.median(v) for k, v in throughput_ratios.items()}
        met = all(m >= THROUGHPUT_GOAL for m in medians.values())
        names = {"7b": "7B", "70b": "70B-layers"}
        print(f"  goal: throughput within {100 - THROUGHPUT_GOAL * 100:.0f}% of the small model's: "
              f"{'yes' if met else 'no'} ({', '.join(f'{names[k]}: {100 * m:.0f}%' for k, m in medians.items())} "
              "of the small model's GB/s, median of the per-round ratios)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp/ggml-lora-flat", help="where inputs (cached) and outputs go")
    parser.add_argument("--models", default="small,7b,70b", help="comma-separated subset of small,7b,70b")
    parser.add_argument("--rounds", type=int, default=3, help="paired rounds after the warm-up round")
    parser.add_argument("--threads", type=int, default=2, help="ggml-lora patch -t")
    parser.add_argument("--layers-70b", type=int, default=SHAPES["70b"].dims["n_layer"],
                        help="layers of the 70B-shape model (default 4)")
    parser.add_argument("--quick", action="store_true", help="2 layers each (1 of 70B shape), 1 round")
    parser.add_argument("--json", metavar="FILE", help="also write every measurement to FILE")
    args = parser.parse_args()
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    if not keys or any(k not in SHAPES for k in keys):
        parser.error(f"--models: choose from {', '.join(SHAPES)}")
    if args.rounds < 1 or args.layers_70b < 1:
        parser.error("--rounds and --layers-70b must be at least 1")
    if args.quick:
        args.rounds = 1
    layers = {k: (1 if k == "70b" else 2) if args.quick else
              (args.layers_70b if k == "70b" else SHAPES[k].dims["n_layer"]) for k in keys}
    wanted = [(SHAPES[k], layers[k]) for k in keys]

    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    check_disk(folder, wanted)
    logs = Path(tempfile.mkdtemp(prefix="logs-", dir=folder))
    launcher = Launcher(logs)  # before this process grows
    true_rss = launcher.run(["/bin/true"], "true")["rss_mb"]

    print(f"inputs in {folder} ({shutil.disk_usage(folder).free / GB:.1f} GB free), load average {load_average()}",
          flush=True)
    subjects = []
    for shape, n_layer in wanted:
        model, adapter = generate(folder, shape, n_layer)
        subjects.append(Subject(shape, n_layer, model, adapter, folder, args.threads, launcher))
    for s in subjects:
        s.warm_up()

    rounds: list[dict[str, dict[str, float]]] = []
    loads = []
    for i in range(args.rounds):
        loads.append(load_average())
        k = i % len(subjects)
        order = subjects[k:] + subjects[:k]  # rotate which one goes first
        got: dict[str, dict[str, float]] = {}
        for s in order:
            r = s.patch(f"r{i}-{s.shape.key}")
            got[s.shape.key] = {"wall": r["wall"], "rss_mb": r["rss_mb"], "cpu": r["cpu"], "gbps": r["gbps"],
                                "floor": s.floor()}
        rounds.append(got)
        print(f"  round {i + 1}/{args.rounds} (load {loads[-1]}; {' -> '.join(s.shape.key for s in order)}): "
              + ", ".join(f"{k} {g['wall']:.1f} s {g['rss_mb']:.0f} MB {g['gbps']:.4f} GB/s floor {g['floor']:.1f} s"
                          for k, g in got.items()), flush=True)
    loads.append(load_average())
    launcher.close()
    report(subjects, rounds, args, true_rss, loads)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "version": ggml_lora.__version__, "threads": args.threads, "true_rss_mb": true_rss, "loads": loads,
            "models": {s.shape.key: {"layers": s.n_layer, "model_bytes": s.model_bytes, "out_bytes": s.out_bytes,
                                     "command": s.cmd, "summary": s.summary} for s in subjects},
            "rounds": rounds}, indent=1))
    for p in logs.iterdir():
        p.unlink()
    logs.rmdir()


if __name__ == "__main__":
    main()
