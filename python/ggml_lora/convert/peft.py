"""Reading a PEFT adapter directory: ``adapter_config.json`` (validated) and its weights.

Weights come from ``adapter_model.safetensors`` (parsed here: F32, F16, BF16 and F64 tensors, bf16 widened to
float32 exactly) or ``adapter_model.bin`` (a torch zip read by :mod:`.torch_pickle`, never by torch).
"""

from __future__ import annotations

import functools
import math
import os
import re
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import _native
from . import safejson
from .errors import ConversionError
from .safejson import short_repr
from .torch_pickle import load_torch_bin

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"

#: Ranks above this are refused as absurd (PEFT adapters use r <= a few thousand).
MAX_RANK = 1 << 16
_MAX_HEADER = 100 * 1024 * 1024

_SAFETENSORS_DTYPES: dict[str, np.dtype[Any]] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "F64": np.dtype("<f8"),
}


# ---------------------------------------------------------------------------------------------------------
# safetensors


def load_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Parse a safetensors file into numpy arrays (bf16 is returned as float32, exactly).

    Checked as the ``safetensors`` crate checks: a JSON header within limits (:mod:`.safejson`: depth, integer
    size, no duplicate tensor names), each entry a known dtype with a shape whose bytes equal its data range, and
    the ranges covering the data section exactly: from 0, each starting where the previous ends (no overlap, no
    gap), up to the end of the file. Every refusal is a :class:`ConversionError` naming the file and tensor.
    """
    path = Path(path)
    _native.check_input_path(path)  # a FIFO or device is refused before it is opened
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ConversionError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        size = os.fstat(f.fileno()).st_size
        if n > min(_MAX_HEADER, size - 8):
            raise ConversionError(f"{path}: not a safetensors file (header length {n} is implausible)")
        header = safejson.loads(f.read(n), path, "safetensors header")
        if not isinstance(header, dict):
            raise ConversionError(f"{path}: safetensors header is not a JSON object")
        data_start = 8 + n
        data_size = size - data_start
        entries = [(name, _safetensors_entry(path, name, info)) for name, info in header.items()
                   if name != "__metadata__"]
        _check_ranges(path, [(name, begin, end) for name, (_, _, begin, end) in entries], data_size)
        out: dict[str, np.ndarray] = {}
        for name, (dtype_name, shape, begin, end) in entries:
            f.seek(data_start + begin)
            array = np.frombuffer(f.read(end - begin), dtype=_SAFETENSORS_DTYPES[dtype_name]).reshape(shape)
            if dtype_name == "BF16":
                array = (array.astype(np.uint32) << 16).view(np.float32)
            out[name] = array
    return out


#: Most dimensions a safetensors tensor may have here (LoRA factors have 2; numpy's own limit is 64).
_MAX_DIMS = 8
_MAX_ARRAY_BYTES = 1 << 62


def _safetensors_entry(path: Path, name: str, info: Any) -> tuple[str, list[int], int, int]:
    """``(dtype, shape, begin, end)`` of one header entry, validated on its own."""
    where = f"{path}: tensor {short_repr(name)}"
    if not isinstance(info, dict):
        raise ConversionError(f"{where}: malformed safetensors entry {short_repr(info)} (expected an object)")
    dtype_name, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype_name, str) or dtype_name not in _SAFETENSORS_DTYPES:
        raise ConversionError(f"{where} has dtype {short_repr(dtype_name)}; LoRA factors must be one of "
                              f"{', '.join(_SAFETENSORS_DTYPES)}")
    if not isinstance(shape, list) or len(shape) > _MAX_DIMS or not all(_is_int(d) and d >= 0 for d in shape):
        raise ConversionError(f"{where}: shape {short_repr(shape)} is not a list of at most {_MAX_DIMS} "
                              "non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(v) and v >= 0 for v in offsets):
        raise ConversionError(f"{where}: data_offsets {short_repr(offsets)} is not a pair of non-negative "
                              "integers")
    itemsize = _SAFETENSORS_DTYPES[dtype_name].itemsize
    if math.prod(max(d, 1) for d in shape) * itemsize >= _MAX_ARRAY_BYTES:  # numpy refuses these even when empty
        raise ConversionError(f"{where}: shape {short_repr(shape)} is too large (its non-zero dimensions span "
                              f"2^62 bytes or more)")
    begin, end = offsets
    nbytes = math.prod(shape) * itemsize
    if begin > end or end - begin != nbytes:
        raise ConversionError(f"{where}: shape {short_repr(shape)} ({dtype_name}) needs {short_repr(nbytes)} bytes "
                              f"but data_offsets {short_repr(offsets)} give {short_repr(end - begin)}")
    return dtype_name, shape, begin, end


def _check_ranges(path: Path, ranges: list[tuple[str, int, int]], data_size: int) -> None:
    """The tensors' byte ranges must tile the data section exactly, as the ``safetensors`` crate requires."""
    expected, previous = 0, None
    for name, begin, end in sorted(ranges, key=lambda r: (r[1], r[2])):
        if begin != expected:
            what = "overlaps" if begin < expected else "leaves a gap after"
            after = f"tensor {short_repr(previous)}" if previous is not None else "the start of the data"
            raise ConversionError(f"{path}: tensor {short_repr(name)}: data_offsets [{begin}, {end}] {what} "
                                  f"{after} (which ends at {expected}); tensor data must be laid end to end")
        expected, previous = end, name
    if expected != data_size:
        raise ConversionError(f"{path}: the tensors' data ends at byte {expected} of the data section but the file "
                              f"holds {data_size} bytes of data (truncated, or bytes no tensor accounts for)")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# ---------------------------------------------------------------------------------------------------------
# config


@dataclass
class AdapterConfig:
    """The parts of a PEFT LoRA config that determine the product, validated."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    use_dora: bool = False
    fan_in_fan_out: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    base_model_name_or_path: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    def module_rank_alpha(self, module: str) -> tuple[int, float]:
        """PEFT's per-module (r, alpha): rank_pattern / alpha_pattern via ``get_pattern_key``."""
        r = self.r
        key = _get_pattern_key(self.rank_pattern, module)
        if key is not None:
            r = self.rank_pattern[key]
        alpha = self.lora_alpha
        key = _get_pattern_key(self.alpha_pattern, module)
        if key is not None:
            alpha = self.alpha_pattern[key]
        return r, alpha

    def module_scale(self, module: str) -> tuple[int, float, float]:
        """(r, alpha, scaling) for one module, exactly as PEFT computes ``scaling``."""
        r, alpha = self.module_rank_alpha(module)
        scale = alpha / math.sqrt(r) if self.use_rslora else alpha / r
        return r, alpha, scale


def _get_pattern_key(patterns: dict[str, Any], module: str) -> str | None:
    # peft.utils.other.get_pattern_key: the first key (dict order) with re.match(rf"(.*\.)?({key})$", name);
    # PEFT then falls back to the module name itself as the key (an exact-name entry). Matched by the core's
    # linear-time engine (Python's re backtracks: "(.*.*)*x" never finishes).
    if not patterns:
        return None
    keys = tuple(patterns)
    index = _pattern_keys(keys).first_match(module)
    return None if index is None else keys[index]


@functools.lru_cache(maxsize=64)
def _pattern_keys(keys: tuple[str, ...]) -> _native.PatternKeys:
    """The keys compiled by the core; each must first be a valid Python regex (PEFT's engine would refuse it)."""
    for key in keys:
        try:
            with warnings.catch_warnings():  # "possible nested set" FutureWarnings: the core refuses those
                warnings.simplefilter("ignore")
                re.compile(rf"(.*\.)?({key})$")  # compiling never matches, so it cannot backtrack
        except (re.error, RecursionError, OverflowError) as exc:
            raise ConversionError(f"adapter_config.json: pattern key {short_repr(key)} is not a valid regex: "
                                  f"{exc}") from None
    try:
        return _native.PatternKeys(list(keys))
    except ValueError as exc:
        raise ConversionError(f"adapter_config.json: {exc}") from None


def _is_number(v: Any) -> bool:
    """A finite int or float that converts to a float (an int beyond float range does not)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False


def _check_rank(v: Any, where: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise ConversionError(f"adapter_config.json: {where} must be an integer, got {short_repr(v, 60)}")
    if v <= 0:
        raise ConversionError(f"adapter_config.json: {where} must be positive, got {short_repr(v)}")
    if v > MAX_RANK:
        raise ConversionError(f"adapter_config.json: {where} = {short_repr(v)} is absurdly large (limit {MAX_RANK})")
    return v


def _check_alpha(v: Any, where: str) -> float:
    if not _is_number(v):
        raise ConversionError(f"adapter_config.json: {where} must be a finite number, got {short_repr(v, 60)}")
    if v < 0:
        raise ConversionError(f"adapter_config.json: {where} must not be negative, got {short_repr(v)}")
    return float(v)


def _truthy(config: dict[str, Any], key: str) -> bool:
    v = config.get(key)
    return v not in (None, False, {}, [], "", 0)


#: Why a DoRA adapter cannot become a llama.cpp adapter file, and what merges it instead.
DORA_REFUSAL = (
    "llama.cpp's adapter format cannot represent DoRA (each output row is rescaled by a magnitude vector divided "
    "by the row norm of the merged weight, which needs the base weights). `ggml-lora patch --lora PEFT_DIR` "
    "(Python: `ggml_lora.patch(model, PEFT_DIR)`) merges it exactly"
)


#: PEFT initialisations that leave the base weights as they were (the adapter is a delta on the original model).
DELTA_INITIALISATIONS = ("gaussian", "eva", "orthogonal", "mica")
#: PEFT initialisations that subtract the initial adapter from the base weights (W_res = W - s·B0·A0), with
#: their display names; PEFT's `save_pretrained(path_initial_model_for_weight_conversion=...)` turns an adapter
#: trained from one into a plain LoRA of rank 2r on the original model.
RESIDUAL_INITIALISATIONS = {"olora": "OLoRA", "pissa": "PiSSA", "corda": "CorDA", "lora_ga": "LoRA-GA"}


def _check_initialisation(init: Any) -> None:
    """Refuse an adapter that is not a delta on the original model (PEFT's ``init_lora_weights``)."""
    if isinstance(init, bool) or init is None:
        return
    if not isinstance(init, str):
        raise ConversionError(f"adapter_config.json: init_lora_weights must be true, false or a name, got "
                              f"{short_repr(init, 60)}")
    name = init.lower()
    if name in DELTA_INITIALISATIONS:
        return
    family = "pissa" if name.startswith("pissa_niter_") else name
    if family in RESIDUAL_INITIALISATIONS:
        raise ConversionError(
            f"adapter_config.json: init_lora_weights = {short_repr(init)}: the adapter was trained from a "
            f"{RESIDUAL_INITIALISATIONS[family]} initialisation, which changed the base weights it was trained on, "
            "so it is not a delta on the original model; convert it to a plain LoRA (rank 2r) first with PEFT's "
            "save_pretrained(..., path_initial_model_for_weight_conversion=<the adapter saved before training>)"
        )
    if name == "loftq":
        raise ConversionError(
            "adapter_config.json: init_lora_weights = 'loftq': a LoftQ adapter was trained on LoftQ's quantized "
            "residual of the base weights, not on the original model, so adding it to the original weights is wrong"
        )
    raise ConversionError(f"adapter_config.json: init_lora_weights = {short_repr(init)} is not a PEFT "
                          "initialisation this converter knows, so it cannot tell whether it changed the base weights")


def parse_config(config: Any, *, allow_dora: bool = False) -> AdapterConfig:
    """Validate a parsed ``adapter_config.json`` and refuse everything that is not a plain LoRA product
    (DoRA is accepted only with ``allow_dora``; then :attr:`AdapterConfig.use_dora` says whether it is set)."""
    if not isinstance(config, dict):
        raise ConversionError("adapter_config.json: expected a JSON object")
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str):
        raise ConversionError(f"adapter_config.json: peft_type must be a string, got {short_repr(peft_type, 60)}")
    if peft_type.upper() != "LORA":
        raise ConversionError(
            f"adapter_config.json: peft_type {short_repr(peft_type)} is not supported: only plain LoRA "
            "(peft_type 'LORA') can be written as a llama.cpp LoRA adapter (LoHa, LoKr, IA3, AdaLoRA, OFT, ... are "
            "different products)"
        )
    use_dora = _truthy(config, "use_dora")
    if use_dora and not allow_dora:
        raise ConversionError("adapter_config.json: use_dora is set: " + DORA_REFUSAL)
    if use_dora and config["use_dora"] is not True:
        raise ConversionError("adapter_config.json: use_dora must be true or false, got "
                              f"{short_repr(config['use_dora'], 60)}")
    if _truthy(config, "modules_to_save"):
        raise ConversionError(
            f"adapter_config.json: modules_to_save = {short_repr(config['modules_to_save'], 120)}: the adapter "
            "carries fully trained copies of those modules, which a LoRA adapter cannot represent (llama.cpp: PR #9948)"
        )
    bias = config.get("bias", "none")
    if bias != "none":
        raise ConversionError(f"adapter_config.json: bias = {short_repr(bias, 60)}: trained biases cannot be "
                              "represented in a LoRA adapter (only bias='none' is supported)")
    if _truthy(config, "lora_bias"):
        raise ConversionError("adapter_config.json: lora_bias is set: lora_B biases cannot be represented in a LoRA "
                              "adapter")
    for key, what in [
        ("use_qalora", "QA-LoRA"),
        ("use_bdlora", "block-diagonal LoRA"),
        ("layer_replication", "layer replication"),
        ("target_parameters", "LoRA on nn.Parameter targets (target_parameters)"),
        ("trainable_token_indices", "trainable tokens"),
        ("alora_invocation_tokens", "activated LoRA (aLoRA)"),
        ("invocation_string", "activated LoRA (aLoRA)"),
    ]:
        if _truthy(config, key):
            raise ConversionError(f"adapter_config.json: {key} is set: {what} is not supported by this converter")
    _check_initialisation(config.get("init_lora_weights", True))
    r = _check_rank(config.get("r", 8), "r")
    alpha = _check_alpha(config.get("lora_alpha", 8), "lora_alpha")
    flags = {}
    for key in ("use_rslora", "fan_in_fan_out"):
        v = config.get(key, False)
        if v is None:
            v = False
        if not isinstance(v, bool):
            raise ConversionError(f"adapter_config.json: {key} must be true or false, got {short_repr(v, 60)}")
        flags[key] = v
    patterns: dict[str, dict[str, Any]] = {}
    for key, check in (("rank_pattern", _check_rank), ("alpha_pattern", _check_alpha)):
        v = config.get(key) or {}
        if not isinstance(v, dict):
            raise ConversionError(f"adapter_config.json: {key} must be an object, got {short_repr(v, 60)}")
        patterns[key] = {str(k): check(val, f"{key}[{short_repr(k)}]") for k, val in v.items()}
        if patterns[key]:
            _pattern_keys(tuple(patterns[key]))  # refuse a key that cannot be matched before any work
    base = config.get("base_model_name_or_path")
    return AdapterConfig(
        r=r,
        lora_alpha=alpha,
        use_rslora=flags["use_rslora"],
        use_dora=use_dora,
        fan_in_fan_out=flags["fan_in_fan_out"],
        rank_pattern=patterns["rank_pattern"],
        alpha_pattern=patterns["alpha_pattern"],
        base_model_name_or_path=base if isinstance(base, str) else None,
        raw=config,
    )


# ---------------------------------------------------------------------------------------------------------
# the directory


@dataclass
class PeftAdapter:
    path: Path
    config: AdapterConfig
    tensors: dict[str, np.ndarray]
    weights_file: Path


def read_peft_dir(peft_dir: str | os.PathLike[str], *, allow_dora: bool = False) -> PeftAdapter:
    """Read and validate a PEFT adapter directory (no torch, no network). DoRA (``use_dora``) is refused unless
    ``allow_dora``."""
    path = Path(peft_dir)
    if not path.is_dir():
        raise ConversionError(f"{path}: not a directory (expected a PEFT adapter folder with {CONFIG_NAME})")
    cfg_path = path / CONFIG_NAME
    for name in (CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME):  # a FIFO or device there is refused, not opened
        _native.check_input_path(path / name)
    if not cfg_path.is_file():
        raise ConversionError(f"{path}: no {CONFIG_NAME}")
    raw = safejson.load_file(cfg_path)
    config = parse_config(raw, allow_dora=allow_dora)
    if (path / SAFETENSORS_NAME).is_file():
        weights = path / SAFETENSORS_NAME
        tensors = load_safetensors(weights)
    elif (path / BIN_NAME).is_file():
        weights = path / BIN_NAME
        tensors = load_torch_bin(weights)
    else:
        raise ConversionError(f"{path}: no {SAFETENSORS_NAME} or {BIN_NAME}")
    return PeftAdapter(path, config, tensors, weights)
