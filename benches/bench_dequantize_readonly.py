"""Dequantize throughput of the read-only types against ggml's C reference, one thread, in the same run.

A benchmark, not a test. For each type (iq1_s … q2_0): the C oracle (``tests/oracles``: ggml-quants.c compiled
``gcc -O2 -ffp-contract=off``) quantizes a random matrix once, then ``dequantize_row_<type>`` (C, via ctypes on the
whole buffer) and ``ggml_lora.dequantize(..., out=)`` run alternately on the same bytes; it prints the best MB/s of
f32 output of each (the best of the repeats: the least disturbed by other work on the machine) and the ratio, and
checks the values are bit-identical. The process runs with ``RAYON_NUM_THREADS=1`` (a child process is started with
it when it is not set), so ggml_lora uses one thread like the C code.

    python benches/bench_dequantize_readonly.py [--rows 1024] [--cols 4096] [--repeat 15] [--types iq2_xs,mxfp4]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

TYPES = ["iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s", "iq4_nl", "iq4_xs", "tq1_0", "tq2_0",
         "mxfp4", "nvfp4", "q1_0", "q2_0"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--types", default=",".join(TYPES))
    args = parser.parse_args()
    if os.environ.get("RAYON_NUM_THREADS") != "1":
        env = {**os.environ, "RAYON_NUM_THREADS": "1"}
        return subprocess.run([sys.executable, *sys.argv], env=env).returncode

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import ggml_lora
    from oracles import ggml_quants as oracle

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((args.rows, args.cols)) * 0.02).astype(np.float32)
    print(f"{args.rows} x {args.cols} f32 ({x.nbytes / 1e6:.0f} MB), 1 thread, best of {args.repeat}; MB/s of f32")
    print(f"{'type':8} {'C ref':>9} {'ggml_lora':>10} {'ratio':>7}")
    for t in args.types.split(","):
        raw = np.frombuffer(oracle.quantize(x, t), dtype=np.uint8)
        n = x.size
        c_fn = getattr(oracle.library(), f"dequantize_row_{t}")
        c_out = np.empty(n, dtype=np.float32)
        ours = np.empty(n, dtype=np.float32)
        src, dst = raw.ctypes.data_as(ctypes.c_void_p), c_out.ctypes.data_as(ctypes.c_void_p)
        c_times, our_times = [], []
        for _ in range(args.repeat):
            s = time.perf_counter()
            c_fn(src, dst, ctypes.c_int64(n))
            c_times.append(time.perf_counter() - s)
            s = time.perf_counter()
            ggml_lora.dequantize(raw, t, (n,), out=ours)
            our_times.append(time.perf_counter() - s)
        if not np.array_equal(c_out.view(np.uint32), ours.view(np.uint32)):
            print(f"{t}: VALUES DIFFER from the C reference", file=sys.stderr)
            return 1
        c_rate = x.nbytes / min(c_times) / 1e6
        our_rate = x.nbytes / min(our_times) / 1e6
        print(f"{t:8} {c_rate:9.0f} {our_rate:10.0f} {our_rate / c_rate:6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
