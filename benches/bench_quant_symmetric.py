"""Speed of the symmetric types (q6_K, q5_0, q3_K, q4_0 with an importance matrix) against ggml's C reference.

A benchmark, not a test. One thread (RAYON_NUM_THREADS=1, set before ggml_lora loads), in one process: the C
reference is ``tests/oracles/ggml_quants.py`` (``ggml-quants.c`` compiled ``-O2 -ffp-contract=off``), called on
the same matrix. C and ggml_lora runs alternate and the best of ``--repeat`` runs counts, which keeps the ratio
meaningful on a busy machine. Prints MB/s of f32 and the ratio for quantize without and with an importance
matrix (``quantize_<type>``, the path llama-quantize takes) and for dequantize, after checking the bytes agree.

    python benches/bench_quant_symmetric.py [--types q6_k,q5_0,q3_k,q4_0] [--rows 256] [--cols 4096] [--repeat 9]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Callable

os.environ["RAYON_NUM_THREADS"] = "1"
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import numpy as np  # noqa: E402

import ggml_lora  # noqa: E402
from oracles import ggml_quants  # noqa: E402


def best_of(repeat: int, c: Callable[[], object], ours: Callable[[], object]) -> tuple[float, float]:
    """Best times of `c` and `ours`, run alternately."""
    tc = to = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        c()
        tc = min(tc, time.perf_counter() - start)
        start = time.perf_counter()
        ours()
        to = min(to, time.perf_counter() - start)
    return tc, to


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default="q6_k,q5_0,q3_k,q4_0")
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=9)
    args = parser.parse_args()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((args.rows, args.cols)).astype(np.float32)
    weights = (rng.random(args.cols) ** 2).astype(np.float32)
    mb = x.nbytes / 1e6
    print(f"{args.rows}x{args.cols} f32 ({mb:.1f} MB), 1 thread, best of {args.repeat}")
    for t in args.types.split(","):
        for label, w in (("quantize", None), ("quantize+imatrix", weights)):
            ours = ggml_lora.quantize(x, t, imatrix=w)
            assert ours.tobytes() == ggml_quants.quantize(x, t, imatrix=w), f"{t} {label}: bytes differ"
            tc, to = best_of(args.repeat, lambda: ggml_quants.quantize(x, t, imatrix=w),
                             lambda: ggml_lora.quantize(x, t, imatrix=w))
            print(f"{t:5} {label:17} C {mb / tc:9.1f} MB/s   ggml_lora {mb / to:9.1f} MB/s   x{tc / to:5.2f}")
        q = ggml_lora.quantize(x, t)
        tc, to = best_of(args.repeat, lambda: ggml_quants.dequantize(q, t, x.size),
                         lambda: ggml_lora.dequantize(q, t, x.shape))
        print(f"{t:5} {'dequantize':17} C {mb / tc:9.1f} MB/s   ggml_lora {mb / to:9.1f} MB/s   x{tc / to:5.2f}")


if __name__ == "__main__":
    main()
