"""Benchmark of the patch engine on a synthetic model of TinyLlama-1.1B shape (a benchmark, not a test).

Generates (once, cached in --dir) an f16 and a q4_0 model of TinyLlama-1.1B shape (n_embd 2048, n_ff 5632,
22 layers, 32 heads / 4 kv heads, vocab 32000) and a rank-16 f32 adapter on all seven projections, then
measures, paired in the same run:

- patch(q4_0 model, adapter, base=f16) -> q4_0: wall time and peak RSS (in a child process);
- the I/O floor: reading what the patch reads (the patched tensors from the f16 base, the rest of the q4_0
  model) and writing a file of the output's size, with the same buffered-write path and no compute;
- peak RSS at half the depth (11 layers) to show memory does not grow with the model.

Figures are printed as ratios against the floor measured in the same run (the machines are shared and noisy).

    python benches/bench_patch.py [--dir /tmp/ggml-lora-bench] [--repeat 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import ggml_lora
from ggml_lora import GGUFValueType, MetadataValue

SHAPE = dict(n_embd=2048, n_ff=5632, n_layer=22, n_head=32, n_head_kv=4, n_vocab=32000)
PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


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
    u32 = GGUFValueType.UINT32
    return {
        "general.architecture": "llama",
        "general.name": "synthetic TinyLlama-1.1B shape",
        "general.file_type": MetadataValue(file_type, u32),
        "llama.block_count": MetadataValue(n_layer, u32),
        "llama.embedding_length": MetadataValue(SHAPE["n_embd"], u32),
        "llama.feed_forward_length": MetadataValue(SHAPE["n_ff"], u32),
        "llama.attention.head_count": MetadataValue(SHAPE["n_head"], u32),
        "llama.attention.head_count_kv": MetadataValue(SHAPE["n_head_kv"], u32),
    }


def generate(folder: Path, n_layer: int) -> tuple[Path, Path, Path]:
    """Writes (or reuses) the f16 model, the q4_0 model and the adapter for `n_layer` layers."""
    f16, q4, lora = (folder / f"tiny-{n_layer}L-{k}.gguf" for k in ("f16", "q4_0", "lora-r16"))
    stamp = folder / f"tiny-{n_layer}L.done"
    if stamp.exists() and all(p.exists() for p in (f16, q4, lora)):
        return f16, q4, lora
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    shapes = tensor_shapes(n_layer)
    weights16: dict[str, object] = {}
    weights_q4: dict[str, object] = {}
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
    rank = 16
    adapter: dict[str, object] = {}
    for name, shape in shapes.items():
        if name.split(".")[-2] in PROJECTIONS:
            n_out, n_in = shape
            adapter[f"{name}.lora_a"] = (0.01 * rng.standard_normal((rank, n_in), dtype=np.float32))
            adapter[f"{name}.lora_b"] = (0.01 * rng.standard_normal((n_out, rank), dtype=np.float32))
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


CHILD = r"""
import json, sys, time
import ggml_lora

def peak_rss_mb():
    # VmHWM starts afresh at exec (ru_maxrss would include the parent's peak from before the exec).
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")

model, lora, base, out, threads = sys.argv[1:6]
t = time.perf_counter()
result = ggml_lora.patch(model, lora, base=base, out=out, threads=int(threads), sync=False)
wall = time.perf_counter() - t
print(json.dumps({"wall": wall, "engine": result.seconds, "bytes": result.bytes_written,
                  "rss_mb": peak_rss_mb(),
                  "median_retained": sorted(t.retained for t in result.tensors)[len(result.tensors) // 2]}))
"""


def run_patch(model: Path, lora: Path, base: Path, out: Path, threads: int) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(model), str(lora), str(base), str(out), str(threads)],
        capture_output=True, text=True, check=True,
    )
    return json.loads(done.stdout)


def io_floor(model: Path, base: Path, lora: Path, out: Path, out_bytes: int) -> float:
    """Read exactly what the patch reads and write a file of the output's size; no compute."""
    with ggml_lora.open(lora) as a:
        targets = {n[: -len(".lora_a")] for n in a.tensors if n.endswith(".lora_a")}
    with ggml_lora.open(model) as m, ggml_lora.open(base) as b:
        ranges = [(base, b.tensors[n].offset, b.tensors[n].nbytes) for n in m.tensors if n in targets]
        ranges += [(model, t.offset, t.nbytes) for n, t in m.tensors.items() if n not in targets]
    buffer = bytearray(8 << 20)
    view = memoryview(buffer)
    start = time.perf_counter()
    handles = {p: open(p, "rb", buffering=0) for p in (model, base)}
    with open(out, "wb") as sink:
        written = 0
        for path, offset, nbytes in ranges:
            f = handles[path]
            f.seek(offset)
            while nbytes:
                n = f.readinto(view[: min(len(buffer), nbytes)])
                nbytes -= n
        while written < out_bytes:
            n = min(len(buffer), out_bytes - written)
            sink.write(view[:n])
            written += n
    for f in handles.values():
        f.close()
    elapsed = time.perf_counter() - start
    os.remove(out)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp/ggml-lora-bench", help="where the synthetic files are cached")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    folder = Path(args.dir)

    t = time.perf_counter()
    f16, q4, lora = generate(folder, SHAPE["n_layer"])
    half = generate(folder, SHAPE["n_layer"] // 2)
    print(f"inputs ready in {time.perf_counter() - t:.1f} s: f16 {f16.stat().st_size / 1e9:.2f} GB, "
          f"q4_0 {q4.stat().st_size / 1e9:.2f} GB, adapter {lora.stat().st_size / 1e6:.0f} MB")
    out = folder / "merged-q4_0.gguf"
    # Warm the page cache once, like the figures in PERFORMANCE.md ("warm cache").
    run_patch(q4, lora, f16, out, args.threads)

    walls, floors, ratios, rss = [], [], [], []
    for _ in range(args.repeat):
        result = run_patch(q4, lora, f16, out, args.threads)
        floor = io_floor(q4, f16, lora, folder / "floor.bin", int(result["bytes"]))
        walls.append(result["wall"])
        floors.append(floor)
        ratios.append(result["wall"] / floor)
        rss.append(result["rss_mb"])
    half_rss = run_patch(half[1], half[2], half[0], folder / "merged-half.gguf", args.threads)["rss_mb"]
    os.remove(folder / "merged-half.gguf")

    print(f"patch(q4_0 model, rank-16 adapter, base=f16) -> q4_0, {args.threads} threads, warm cache, "
          f"{args.repeat} paired runs:")
    print(f"  wall time            median {statistics.median(walls):.2f} s  (runs: {', '.join(f'{w:.2f}' for w in walls)})")
    print(f"  I/O floor            median {statistics.median(floors):.2f} s  (read inputs + write output size)")
    print(f"  patch / floor        median {statistics.median(ratios):.2f}x  (per pair: {', '.join(f'{r:.2f}' for r in ratios)})")
    print(f"  peak RSS             {max(rss):.0f} MB at 22 layers, {half_rss:.0f} MB at 11 layers "
          f"(ratio {max(rss) / half_rss:.2f})")
    print(f"  median retained      {result['median_retained']:.1%} of the LoRA change per tensor")
    print("  reference (PERFORMANCE.md, same machine kind, not this run): llama-export-lora 12.9 s / 265 MB RSS "
          "and an f16 file; + llama-quantize to q4_0: 19.9 s")
    print(f"  => {19.9 / statistics.median(walls):.1f}x faster than export-lora + quantize (reference figure)")


if __name__ == "__main__":
    main()
