"""Kernel throughput: ggml_lora's quantize/dequantize against gguf-py's numpy kernels, in the same run.

A benchmark, not a test. Prints MB/s of f32 (4096 x 4096 by default) per kernel for ggml_lora with 1 and 2
threads (RAYON_NUM_THREADS in a child process, so each measurement has a pool of that size) and for gguf-py
(single-threaded numpy), and the ratios. Also checks that both produce the same bytes.

    python benches/bench_kernels.py [--rows 4096] [--cols 4096] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

KERNELS = ("q4_0", "q8_0")

CHILD = r"""
import json, statistics, sys, time
import numpy as np
import ggml_lora
rows, cols, repeat = map(int, sys.argv[1:4])
x = np.random.default_rng(0).standard_normal((rows, cols), dtype=np.float32)
out = {}
for t in ("q4_0", "q8_0", "f16", "bf16"):
    q = ggml_lora.quantize(x, t)
    qt, dt, qo, do = [], [], [], []
    q_out, d_out = np.empty_like(q), np.empty_like(x)
    for _ in range(repeat):
        s = time.perf_counter(); ggml_lora.quantize(x, t); qt.append(time.perf_counter() - s)
        s = time.perf_counter(); ggml_lora.dequantize(q, t, x.shape); dt.append(time.perf_counter() - s)
        s = time.perf_counter(); ggml_lora.quantize(x, t, out=q_out); qo.append(time.perf_counter() - s)
        s = time.perf_counter(); ggml_lora.dequantize(q, t, x.shape, out=d_out); do.append(time.perf_counter() - s)
    rate = lambda ts: x.nbytes / statistics.median(ts) / 1e6
    out[t] = {"quantize": rate(qt), "dequantize": rate(dt), "quantize out=": rate(qo), "dequantize out=": rate(do)}
print(json.dumps(out))
"""


def ours(threads: int, rows: int, cols: int, repeat: int) -> dict[str, dict[str, float]]:
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    done = subprocess.run([sys.executable, "-c", CHILD, str(rows), str(cols), str(repeat)], env=env,
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def gguf_py(rows: int, cols: int, repeat: int) -> dict[str, dict[str, float]]:
    import gguf

    import ggml_lora

    x = np.random.default_rng(0).standard_normal((rows, cols), dtype=np.float32)
    out = {}
    for name in KERNELS:
        qtype = gguf.GGMLQuantizationType[name.upper()]
        q = gguf.quants.quantize(x, qtype)
        assert np.array_equal(q, ggml_lora.quantize(x, name)), f"{name}: bytes differ from gguf-py"
        qt, dt = [], []
        for _ in range(max(1, repeat // 2)):
            s = time.perf_counter()
            gguf.quants.quantize(x, qtype)
            qt.append(time.perf_counter() - s)
            s = time.perf_counter()
            gguf.quants.dequantize(q, qtype)
            dt.append(time.perf_counter() - s)
        out[name] = {"quantize": x.nbytes / statistics.median(qt) / 1e6,
                     "dequantize": x.nbytes / statistics.median(dt) / 1e6}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    one = ours(1, args.rows, args.cols, args.repeat)
    two = ours(2, args.rows, args.cols, args.repeat)
    ref = gguf_py(args.rows, args.cols, args.repeat)
    print(f"{args.rows}x{args.cols} f32, MB/s of f32 (median of {args.repeat}); same bytes as gguf-py: checked")
    print("('out=' reuses the output array: no fresh pages to fault in, the kernel's own speed)")
    print(f"{'kernel':<22}{'ours 1 thr':>12}{'ours 2 thr':>12}{'scaling':>9}{'gguf-py':>10}{'ours/gguf-py':>14}")
    for name in ("q4_0", "q8_0", "f16", "bf16"):
        for op in ("quantize", "dequantize", "quantize out=", "dequantize out="):
            a, b = one[name][op], two[name][op]
            r = ref.get(name, {}).get(op.split()[0])
            vs = f"{a / r:>13.1f}x" if r else f"{'-':>14}"
            rs = f"{r:>10.0f}" if r else f"{'-':>10}"
            print(f"{name + ' ' + op:<22}{a:>12.0f}{b:>12.0f}{b / a:>8.2f}x{rs}{vs}")


if __name__ == "__main__":
    main()
