"""ggml's own quantization code as a test oracle: ``ggml/src/ggml-quants.c`` compiled alone, called by ctypes.

This is the reference every kernel of ggml_lora must match byte for byte. The file is compiled exactly as the
issue tracker and the README state the reference: ``gcc -O2 -ffp-contract=off`` (no fused multiply-add, the x86
build without FMA), with four small stubs (``ggml_abort``, ``ggml_row_size``, ``ggml_type_size``,
``ggml_type_name``) whose size table comes from gguf-py's ``GGML_QUANT_SIZES``, never from ggml_lora. The library
is cached in the oracle cache folder, keyed by a hash of its sources and flags.

- :func:`quantize` calls ``quantize_<type>(src, dst, nrows, n_per_row, imatrix)``: what ``llama-quantize`` calls
  (the ``_ref`` row quantizer without an importance matrix, ``_impl`` with one).
- :func:`quantize_ref` calls ``quantize_row_<type>_ref`` directly.
- :func:`dequantize` calls ``dequantize_row_<type>``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES

from .sdist import cache_dir, llama_cpp_source

#: Compiler flags of the reference build. ``-DNDEBUG`` as in llama.cpp's release builds (what makes model files):
#: the k-quant searches call ``nearest_int`` on NaN or out-of-range values for finite inputs near f32's limits
#: (x² overflowing, f16 super-block scales overflowing to inf, subnormal blocks), where a debug build aborts on an
#: ``assert`` and a release build returns what the bit trick gives. Every other result is the same either way.
CFLAGS = ["-O2", "-ffp-contract=off", "-DNDEBUG", "-fPIC", "-shared"]

#: i-quant types whose quantizer needs a lookup table built first (``iq2xs_init_impl`` / ``iq3xs_init_impl``).
_IQ2_INIT = {"iq2_xxs", "iq2_xs", "iq2_s", "iq1_s", "iq1_m"}
_IQ3_INIT = {"iq3_xxs": 256, "iq3_s": 512}
#: Types whose ggml quantizer asserts that an importance matrix is given; :func:`quantize` passes ones.
_NEEDS_IMATRIX = {"iq2_xxs", "iq2_xs", "iq1_s", "iq1_m"}

#: Types of the reference sources that gguf-py 0.19.0 does not know yet: name -> (id, block size, bytes per block),
#: from ggml.h (``GGML_TYPE_Q2_0 = 42``) and ggml-common.h (``block_q2_0``: an f16 and ``QK2_0 / 4`` bytes,
#: ``QK2_0 = 64``). The compiled library reports ``sizeof`` of these blocks (:func:`block_bytes_in_c`).
EXTRA_TYPES: dict[str, tuple[int, int, int]] = {"q2_0": (42, 64, 18)}


def _sizes() -> dict[str, tuple[int, int, int]]:
    """name -> (id, block size, bytes per block) for every type the oracle knows."""
    table = {q.name.lower(): (int(q), block, size) for q, (block, size) in GGML_QUANT_SIZES.items()}
    return {**table, **EXTRA_TYPES}


def _stubs_source() -> str:
    rows = []
    for name, (tid, block, size) in sorted(_sizes().items(), key=lambda kv: kv[1][0]):
        rows.append(f'    [{tid}] = {{{block}, {size}, "{name}"}},')
    table = "\n".join(rows)
    sizeofs = "\n".join(f"size_t oracle_sizeof_block_{name}(void) {{ return sizeof(block_{name}); }}"
                        for name in EXTRA_TYPES)
    return f"""
#include <stdio.h>
#include <stdlib.h>
#include <stddef.h>
#include <stdint.h>
#define GGML_COMMON_DECL_C
#include "ggml-common.h"
struct info {{ int64_t block; size_t size; const char * name; }};
static const struct info TYPES[64] = {{
{table}
}};
void ggml_abort(const char * file, int line, const char * fmt, ...) {{
    fprintf(stderr, "ggml_abort at %s:%d\\n", file, line);
    abort();
}}
size_t ggml_type_size(int type) {{ return TYPES[type].size; }}
const char * ggml_type_name(int type) {{ return TYPES[type].name ? TYPES[type].name : "?"; }}
size_t ggml_row_size(int type, int64_t ne) {{ return TYPES[type].size * ne / TYPES[type].block; }}
{sizeofs}
"""


@lru_cache(maxsize=None)
def library(release: bool = False) -> ctypes.CDLL:
    """The compiled reference library (built on first use, then cached on disk). ``release`` adds ``-DNDEBUG``,
    as llama-quantize's release build has it: the same arithmetic, but ``nearest_int``'s range assertion (which
    aborts the process on the NaN/huge arguments that values with overflowing squares produce) is compiled out."""
    src_root = llama_cpp_source()
    ggml = src_root / "ggml"
    quants_c = ggml / "src" / "ggml-quants.c"
    stubs = _stubs_source()
    cflags = CFLAGS + ["-DNDEBUG"] if release else CFLAGS
    key = hashlib.sha256(quants_c.read_bytes() + stubs.encode() + " ".join(cflags).encode()).hexdigest()[:16]
    lib_path = cache_dir() / f"ggml-quants-{key}.so"
    if not lib_path.is_file():
        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            stub_c = Path(tmp) / "stubs.c"
            stub_c.write_text(stubs)
            out = Path(tmp) / "lib.so"
            includes = [f"-I{ggml / 'include'}", f"-I{ggml / 'src'}", f"-I{ggml / 'src' / 'ggml-cpu'}"]
            subprocess.run(["gcc", *cflags, *includes, str(quants_c), str(stub_c), "-lm", "-o", str(out)],
                           check=True)
            os.replace(out, lib_path)
    return ctypes.CDLL(str(lib_path))


def _c_name(name: str) -> str:
    """The spelling of a type in ggml's C function names ("q4_k" -> "q4_K")."""
    return name[:-2] + "_K" if name.endswith("_k") else name


def type_id(name: str) -> int:
    """The id of the type called ``name`` ("q4_k", "iq2_xxs", ...): gguf-py's, or :data:`EXTRA_TYPES`'."""
    return _sizes()[name.lower()][0]


def block_bytes_in_c(name: str) -> int:
    """``sizeof(block_<name>)`` in the compiled reference, for the :data:`EXTRA_TYPES`."""
    fn = getattr(library(), f"oracle_sizeof_block_{name}")
    fn.restype = ctypes.c_size_t
    return int(fn())


def row_bytes(name: str, n_per_row: int) -> int:
    _, block, size = _sizes()[name.lower()]
    if n_per_row % block:
        raise ValueError(f"{name}: row length {n_per_row} is not a multiple of {block}")
    return n_per_row // block * size


_initialised: set[tuple[str, bool]] = set()


def _init_tables(name: str, release: bool = False) -> None:
    if (name, release) in _initialised:
        return
    lib = library(release)
    if name in _IQ2_INIT:
        lib.iq2xs_init_impl(ctypes.c_int(type_id(name)))
    elif name in _IQ3_INIT:
        lib.iq3xs_init_impl(ctypes.c_int(_IQ3_INIT[name]))
    _initialised.add((name, release))


def _f32_rows(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x.reshape(1, -1) if x.ndim == 1 else x.reshape(-1, x.shape[-1])


def quantize(x: np.ndarray, name: str, imatrix: np.ndarray | None = None, *, release: bool = False) -> bytes:
    name = name.lower()
    """``quantize_<name>(x, dst, nrows, n_per_row, imatrix)``: the bytes llama-quantize writes for rows ``x``.

    Types whose quantizer requires an importance matrix (iq2_xxs, iq2_xs, iq1_s, iq1_m) get all-ones weights when
    ``imatrix`` is None (used only to make realistic blocks for dequantize tests). ``release``: use the
    ``-DNDEBUG`` build (see :func:`library`)."""
    rows = _f32_rows(x)
    nrows, n_per_row = rows.shape
    _init_tables(name, release)
    dst = ctypes.create_string_buffer(nrows * row_bytes(name, n_per_row))
    qw = None
    if imatrix is None and name in _NEEDS_IMATRIX:
        imatrix = np.ones(n_per_row, dtype=np.float32)
    if imatrix is not None:
        w = np.ascontiguousarray(imatrix, dtype=np.float32)
        if w.shape != (n_per_row,):
            raise ValueError(f"imatrix must have shape ({n_per_row},), got {w.shape}")
        qw = w.ctypes.data_as(ctypes.c_void_p)
    fn = getattr(library(release), f"quantize_{_c_name(name)}")
    fn.restype = ctypes.c_size_t
    fn(rows.ctypes.data_as(ctypes.c_void_p), dst, ctypes.c_int64(nrows), ctypes.c_int64(n_per_row), qw)
    return dst.raw


def quantize_ref(x: np.ndarray, name: str) -> bytes:
    """``quantize_row_<name>_ref`` over all of ``x`` (flattened)."""
    flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    dst = ctypes.create_string_buffer(row_bytes(name, flat.size))
    getattr(library(), f"quantize_row_{_c_name(name)}_ref")(flat.ctypes.data_as(ctypes.c_void_p), dst,
                                                   ctypes.c_int64(flat.size))
    return dst.raw


def dequantize(raw: bytes | np.ndarray, name: str, n: int) -> np.ndarray:
    """``dequantize_row_<name>`` of ``n`` elements stored in ``raw``; float32 array of length ``n``."""
    data = np.frombuffer(bytes(raw), dtype=np.uint8)
    if data.size != row_bytes(name, n):
        raise ValueError(f"{name}: {n} elements take {row_bytes(name, n)} bytes, got {data.size}")
    out = np.empty(n, dtype=np.float32)
    getattr(library(), f"dequantize_row_{_c_name(name)}")(data.ctypes.data_as(ctypes.c_void_p),
                                                 out.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(n))
    return out
