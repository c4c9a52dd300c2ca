"""Kernel benchmark: ggml_lora's quantize/dequantize against ggml's own C code, like for like, in one process.

A benchmark, not a test. On one 4096 x 4096 float32 array (standard normal, seed 0), for each type, each of N
rounds measures, in this one process:

- ggml's C reference: ``quantize_<type>`` / ``dequantize_row_<type>`` from ``ggml/src/ggml-quants.c`` of the
  llama.cpp sources in the llama-cpp-python sdist, compiled alone ``-O2 -ffp-contract=off -DNDEBUG`` (asserts off, as in llama.cpp's release builds)
  (tests/oracles/ggml_quants.py), called through ctypes on the whole array: once into a new output array per
  call ("new"), once into a reused output array ("out=");
- ggml_lora.quantize / ggml_lora.dequantize, "new" (a new array per call) and "out=" (the ``out=`` argument);
- gguf-py's numpy kernels (gguf.quants.quantize / dequantize, always a new array), as an extra column;
- with an importance matrix (one weight per column, seed 1, ``rng.uniform(0, 4)``), for the types whose ggml
  quantizer takes one: ggml's ``quantize_<type>(..., imatrix)`` and ggml_lora.quantize(..., imatrix=, out=);
- the memory ceiling: numpy filling (``out.fill``, write only) and copying (``np.copyto``, read and write) a
  reused f32 array of the output's size. When a dequantizer runs at the fill's speed, it is bound by memory
  writes, not by its code, and so is the C reference at that size (``--rows 64`` keeps the arrays in cache).

Ratios compare new with new and out= with out=, on one core for all of them (the C reference and gguf-py are
single-threaded). Thread scaling: the Python API has no per-call thread count (the kernels run on rayon's
global pool, sized once per process), so the process's CPU affinity (every thread of it) alternates between
one core and two cores, round by round in the same loop; the ratio is taken per pair. Each figure is MB/s of
float32 (input of quantize, output of dequantize), the median of --inner calls per round; tables give the
median over rounds with min-max. Bytes are checked equal to the C reference (or gguf-py where ggml-quants.c
has no such function) before timing. Types ggml_lora cannot quantize yet are reported as n/a.

    python benches/bench_kernels.py [--rounds 5] [--inner 3] [--types q4_0,q8_0,f16,bf16] [--rows 4096] [--cols 4096]
        [--no-gguf-py] [--no-imatrix]
    python benches/bench_kernels.py --quick
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import ggml_lora
import gguf
import numpy as np
from ggml_lora._types import GGML_TYPES

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.oracles import ggml_quants
from tests.oracles.sdist import LLAMA_CPP_PYTHON_VERSION

NA = "n/a"
#: Types whose ggml quantizer uses an importance matrix (`quantize_<type>` ignores it for q8_0 and the floats).
TAKES_IMATRIX = {"q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k"}


def default_types() -> list[str]:
    """Every type ggml_lora can quantize now, except the f32 copy."""
    return [t.name for t in GGML_TYPES.values() if t.can_quantize and t.name != "f32"]


def set_cores(cpus: set[int]) -> None:
    """Pins every thread of this process (rayon's workers included) to `cpus`."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except ProcessLookupError:  # a thread that just ended
            pass


class CRef:
    """ggml's C functions for one type, called on the whole array (None where ggml-quants.c has none)."""

    def __init__(self, name: str, rows: int, cols: int):
        self.name, self.rows, self.cols = name, rows, cols
        lib = ggml_quants.library(release=True)  # -DNDEBUG, as llama.cpp's release builds
        c = ggml_quants._c_name(name)
        self.q = getattr(lib, f"quantize_{c}", None) if name not in ggml_quants._NEEDS_IMATRIX else None
        self.d = getattr(lib, f"dequantize_row_{c}", None)
        if self.q is not None:
            self.q.restype = ctypes.c_size_t
            ggml_quants._init_tables(name, release=True)
        self.nbytes = rows * ggml_quants.row_bytes(name, cols) if (self.q or self.d) else 0

    def quantize(self, x: np.ndarray, out: np.ndarray | None = None, imatrix: np.ndarray | None = None) -> np.ndarray:
        dst = np.empty(self.nbytes, dtype=np.uint8) if out is None else out
        assert self.q is not None
        w = None if imatrix is None else ctypes.c_void_p(imatrix.ctypes.data)
        self.q(ctypes.c_void_p(x.ctypes.data), ctypes.c_void_p(dst.ctypes.data), ctypes.c_int64(self.rows),
               ctypes.c_int64(self.cols), w)
        return dst

    def dequantize(self, q: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        dst = np.empty(self.rows * self.cols, dtype=np.float32) if out is None else out
        assert self.d is not None
        self.d(ctypes.c_void_p(q.ctypes.data), ctypes.c_void_p(dst.ctypes.data), ctypes.c_int64(self.rows * self.cols))
        return dst


def gguf_py(name: str):
    try:
        import gguf

        qtype = gguf.GGMLQuantizationType[name.upper()]
        return (lambda x: gguf.quants.quantize(x, qtype)), (lambda q: gguf.quants.dequantize(q, qtype))
    except (ImportError, KeyError):
        return None, None


Job = tuple[str, Callable[[], object]]


def jobs(x: np.ndarray, name: str, e: dict, who: tuple[str, ...], prefix: str = "") -> list[Job]:
    """The timed calls for one type: (column name, call)."""
    q, qo, do, shape = e["q"], e["q_out"], e["d_out"], x.shape
    out: list[Job] = []
    if "ours" in who:
        out += [
            (f"ours{prefix} q new", lambda: ggml_lora.quantize(x, name)),
            (f"ours{prefix} q out", lambda: ggml_lora.quantize(x, name, out=qo)),
            (f"ours{prefix} d new", lambda: ggml_lora.dequantize(q, name, shape)),
            (f"ours{prefix} d out", lambda: ggml_lora.dequantize(q, name, shape, out=do)),
        ]
    if "c" in who and "c_q_out" in e:
        c, cqo, cdo = e["c"], e["c_q_out"], e["c_d_out"]
        out += [
            ("c q new", lambda: c.quantize(x)),
            ("c q out", lambda: c.quantize(x, cqo)),
            ("c d new", lambda: c.dequantize(q)),
            ("c d out", lambda: c.dequantize(q, cdo)),
        ]
    if "ours" in who and "imatrix" in e:
        w = e["imatrix"]
        out.append((f"ours{prefix} qi out", lambda: ggml_lora.quantize(x, name, imatrix=w, out=qo)))
    if "c" in who and "imatrix" in e and "c_q_out" in e:
        c, cqo, w = e["c"], e["c_q_out"], e["imatrix"]
        out.append(("c qi out", lambda: c.quantize(x, cqo, w)))
    if "mem" in who:
        do = e["d_out"]
        out += [("mem fill", lambda: do.fill(0.5)), ("mem copy", lambda: np.copyto(do, x))]
    if "gguf" in who and e["gguf_q"] is not None:
        gq, gd, graw = e["gguf_q"], e["gguf_d"], e["gguf_raw"]
        out += [("gguf q new", lambda: gq(x)), ("gguf d new", lambda: gd(graw))]
    return out


def timed(fn: Callable[[], object], inner: int) -> float:
    times = []
    for _ in range(inner):
        s = time.perf_counter()
        fn()
        times.append(time.perf_counter() - s)
    return statistics.median(times)


def fmt(values: list[float] | None, scale: float = 1.0, digits: int = 0) -> str:
    if not values:
        return NA
    m, lo, hi = (v * scale for v in (statistics.median(values), min(values), max(values)))
    return f"{m:,.{digits}f} ({lo:,.{digits}f}-{hi:,.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=5, help="paired rounds (default 5)")
    parser.add_argument("--inner", type=int, default=3, help="calls per figure per round; their median (default 3)")
    parser.add_argument("--types", default=",".join(default_types()),
                        help="comma-separated ggml types (default: every type ggml_lora can quantize now)")
    parser.add_argument("--no-gguf-py", action="store_true", help="skip the gguf-py column (slow)")
    parser.add_argument("--no-imatrix", action="store_true", help="skip quantize with an importance matrix")
    parser.add_argument("--quick", action="store_true", help="512 x 4096, 1 round, 1 call: checks that it runs")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.rounds, args.inner = 512, 1, 1
    types = [t.strip().lower() for t in args.types.split(",") if t.strip()]
    all_cpus = os.sched_getaffinity(0)
    one_core = {min(all_cpus)}
    two_cores = set(sorted(all_cpus)[:2])

    x = np.random.default_rng(0).standard_normal((args.rows, args.cols), dtype=np.float32)
    imatrix = np.random.default_rng(1).uniform(0.0, 4.0, args.cols).astype(np.float32)
    mb = x.nbytes / 1e6
    ggml_lora.quantize(x[:64], "q8_0")  # starts rayon's global pool while every core is allowed

    # Per type: what can run, and checks that the bytes agree.
    setup: dict[str, dict] = {}
    for name in types:
        info = GGML_TYPES.get(name)
        entry: dict = {"ours": bool(info and info.can_quantize and info.can_dequantize), "check": NA}
        c = CRef(name, args.rows, args.cols) if name in {n.name.lower() for n in gguf.GGMLQuantizationType} else None
        gq, gd = gguf_py(name) if not args.no_gguf_py else (None, None)
        entry["c"], entry["gguf_q"], entry["gguf_d"] = c, gq, gd
        if entry["ours"]:
            q = ggml_lora.quantize(x, name)
            entry["q"] = q.reshape(-1)
            entry["q_out"] = np.empty_like(q)
            entry["d_out"] = np.empty_like(x)
            back = ggml_lora.dequantize(q, name, x.shape).reshape(-1)
            if gq is not None:
                try:
                    entry["gguf_raw"] = np.asarray(gq(x))
                except Exception:  # gguf-py may not implement every type
                    entry["gguf_q"] = entry["gguf_d"] = None
            if c is not None and c.q is not None and c.d is not None:
                same = np.array_equal(c.quantize(x), entry["q"]) and np.array_equal(c.dequantize(entry["q"]), back)
                entry["check"] = "same bytes as ggml C" if same else "DIFFERENT from ggml C"
                entry["c_q_out"] = np.empty(c.nbytes, dtype=np.uint8)
                entry["c_d_out"] = np.empty(x.size, dtype=np.float32)
                if not args.no_imatrix and name in TAKES_IMATRIX:
                    entry["imatrix"] = imatrix
                    same = np.array_equal(c.quantize(x, imatrix=imatrix),
                                          ggml_lora.quantize(x, name, imatrix=imatrix).reshape(-1))
                    entry["check"] += ("; with imatrix: same bytes" if same else "; with imatrix: DIFFERENT")
            elif "gguf_raw" in entry:
                same = np.array_equal(entry["gguf_raw"].reshape(-1).view(np.uint8), entry["q"])
                entry["check"] = "same bytes as gguf-py" if same else "DIFFERENT from gguf-py"
        setup[name] = entry

    # results[name][column] -> list of seconds per round
    results: dict[str, dict[str, list[float]]] = {n: {} for n in types}

    def add(name: str, col: str, seconds: float) -> None:
        results[name].setdefault(col, []).append(seconds)

    for r in range(args.rounds):
        for name in types:
            e = setup[name]
            if not e["ours"]:
                continue
            one = jobs(x, name, e, ("ours", "c", "gguf", "mem"))  # one core: ggml_lora, C, gguf-py, numpy
            k = r % len(one)
            one = one[k:] + one[:k]  # rotate the order per round
            two = jobs(x, name, e, ("ours",), prefix="2")
            blocks = [(one_core, one), (two_cores, two)]
            if r % 2:
                blocks.reverse()  # alternate which core count goes first
            for cpus, calls in blocks:
                set_cores(cpus)
                for col, fn in calls:
                    fn()  # warm (first-call costs, caches) outside the timing
                    add(name, col, timed(fn, args.inner))
            set_cores(all_cpus)
        print(f"  round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)

    def rate(name: str, col: str) -> list[float] | None:
        ts = results[name].get(col)
        return [mb / t for t in ts] if ts else None

    def ratio(name: str, slow: str, fast: str) -> list[float] | None:
        a, b = results[name].get(slow), results[name].get(fast)
        return [s / f for s, f in zip(a, b)] if a and b else None  # per round: time_slow / time_fast

    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"ggml-lora {ggml_lora.__version__}, {when}, {platform.machine()}, cores allowed {sorted(all_cpus)}; "
          f"{args.rows}x{args.cols} f32 ({mb:.1f} MB); {args.rounds} rounds x median of {args.inner} calls; "
          "MB/s of f32, median (min-max) over rounds; ratios per round")
    print(f"ggml C: ggml-quants.c from llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist, gcc {' '.join(ggml_quants.CFLAGS[:2])}, ctypes, one call over the whole array")
    print()
    checks = ", ".join(f"{n}: {setup[n]['check'] if setup[n]['ours'] else 'ggml_lora cannot quantize it'}" for n in types)
    print(f"bytes checked before timing: {checks}")

    def table(title: str, columns: list[tuple[str, Callable[[str, str], str]]]) -> None:
        print()
        print(title)
        print(f"{'kernel':<18}" + "".join(f" {h:>23}" for h, _ in columns))
        for name in types:
            for op, short in (("quantize", "q"), ("dequantize", "d")):
                cells = [f(name, short) if setup[name]["ours"] else NA for _, f in columns]
                print(f"{name + ' ' + op:<18}" + "".join(f" {c:>23}" for c in cells))

    def r_(col: str) -> Callable[[str, str], str]:
        return lambda name, short: fmt(rate(name, col.format(short)))

    def x_(slow: str, fast: str, digits: int = 2) -> Callable[[str, str], str]:
        return lambda name, short: fmt(ratio(name, slow.format(short), fast.format(short)), digits=digits)

    table("One core, a new output array per call (ggml C and gguf-py are single-threaded; all pinned to one core):",
          [("ggml C", r_("c {} new")), ("ggml_lora", r_("ours {} new")), ("ggml_lora / C", x_("c {} new", "ours {} new")),
           ("gguf-py", r_("gguf {} new")), ("ggml_lora / gguf-py", x_("gguf {} new", "ours {} new", 1))])
    table("One core, into a reused output array (out=):",
          [("ggml C", r_("c {} out")), ("ggml_lora", r_("ours {} out")), ("ggml_lora / C", x_("c {} out", "ours {} out"))])
    print()
    print("Memory ceiling, one core, an f32 array of the output's size: numpy fill (write only) and copy (read and "
          "write); dequantize out= over the fill's speed, per round (1.0: bound by memory writes):")
    print(f"{'kernel':<18}" + "".join(f" {h:>23}" for h in ("numpy fill", "numpy copy", "ggml_lora / fill",
                                                             "ggml C / fill")))
    for name in types:
        if setup[name]["ours"]:
            cells = [fmt(rate(name, "mem fill")), fmt(rate(name, "mem copy")),
                     fmt(ratio(name, "mem fill", "ours d out"), digits=2), fmt(ratio(name, "mem fill", "c d out"), digits=2)]
            print(f"{name + ' dequantize':<18}" + "".join(f" {c:>23}" for c in cells))
    if any("imatrix" in setup[n] for n in types):
        print()
        print("Quantize with an importance matrix, one core, out= (types whose ggml quantizer takes one):")
        print(f"{'kernel':<18}" + "".join(f" {h:>23}" for h in ("ggml C", "ggml_lora", "ggml_lora / C")))
        for name in types:
            if "imatrix" in setup[name]:
                cells = [fmt(rate(name, "c qi out")), fmt(rate(name, "ours qi out")),
                         fmt(ratio(name, "c qi out", "ours qi out"), digits=2)]
                print(f"{name + ' quantize':<18}" + "".join(f" {c:>23}" for c in cells))
    table(f"Thread scaling of ggml_lora in this process: CPU affinity {sorted(one_core)} vs {sorted(two_cores)}, "
          "alternated each round; ratio 2 cores / 1 core per round:",
          [("out= 1 core", r_("ours {} out")), ("out= 2 cores", r_("ours2 {} out")),
           ("scaling out=", x_("ours {} out", "ours2 {} out")),
           ("new, 1 core", r_("ours {} new")), ("new, 2 cores", r_("ours2 {} new")),
           ("scaling new", x_("ours {} new", "ours2 {} new"))])
    if len(two_cores) < 2:
        print("(only one core is allowed to this process: the scaling figures compare one core with itself)")


if __name__ == "__main__":
    main()
