"""ggml tensor types as this package knows them (names as gguf-py spells them, lower-case)."""

from __future__ import annotations

from . import _native

#: One ggml type: ``name`` (lower-case), ``id`` (on disk), ``block_size`` (elements per block), ``type_size``
#: (bytes per block), and what this package can do with it (``can_quantize``, ``can_dequantize``).
TypeInfo = _native.TypeInfo

#: Every ggml type llama.cpp defines, by lower-case name ("f32", "q4_0", "q6_k", "iq2_xxs", ...).
GGML_TYPES: dict[str, TypeInfo] = {t.name: t for t in _native.type_table()}

#: name -> (block size, bytes per block), like gguf-py's ``GGML_QUANT_SIZES``.
GGML_QUANT_SIZES: dict[str, tuple[int, int]] = {t.name: (t.block_size, t.type_size) for t in GGML_TYPES.values()}

_BY_ID = {t.id: t for t in GGML_TYPES.values()}


def type_info(ggml_type: object) -> TypeInfo:
    """Look up a type by name ("q4_0", "Q4_0"), id, or a gguf-py ``GGMLQuantizationType`` member."""
    if isinstance(ggml_type, TypeInfo):
        return ggml_type
    name = getattr(ggml_type, "name", None)
    if isinstance(name, str) and not isinstance(ggml_type, str):
        ggml_type = name
    if isinstance(ggml_type, str):
        info = GGML_TYPES.get(ggml_type.lower())
    elif isinstance(ggml_type, int) and not isinstance(ggml_type, bool):
        info = _BY_ID.get(ggml_type)
    else:
        info = None
    if info is None:
        raise ValueError(f"unknown ggml type {ggml_type!r}; known: {', '.join(GGML_TYPES)}")
    return info
