"""Reading a PEFT adapter directory: ``adapter_config.json`` (validated) and its weights.

Weights come from ``adapter_model.safetensors`` (parsed here: F32, F16, BF16 and F64 tensors, bf16 widened to
float32 exactly) or ``adapter_model.bin`` (a torch zip read by :mod:`.torch_pickle`, never by torch).
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import _native
from .errors import ConversionError
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
    """Parse a safetensors file into numpy arrays (bf16 is returned as float32, exactly)."""
    path = Path(path)
    _native.check_input_path(path)  # a FIFO or device is refused before it is opened
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ConversionError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        size = path.stat().st_size
        if n > min(_MAX_HEADER, size - 8):
            raise ConversionError(f"{path}: not a safetensors file (header length {n} is implausible)")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConversionError(f"{path}: safetensors header is not valid JSON: {exc}") from None
        if not isinstance(header, dict):
            raise ConversionError(f"{path}: safetensors header is not a JSON object")
        data_start = 8 + n
        data_size = size - data_start
        out: dict[str, np.ndarray] = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype_name, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            except (TypeError, KeyError, ValueError):
                raise ConversionError(f"{path}: malformed safetensors entry for {name!r}") from None
            if dtype_name not in _SAFETENSORS_DTYPES:
                raise ConversionError(f"{path}: tensor {name!r} has dtype {dtype_name}; LoRA factors must be "
                                      f"one of {', '.join(_SAFETENSORS_DTYPES)}")
            ok = (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape)
                  and all(isinstance(v, int) and not isinstance(v, bool) for v in (begin, end))
                  and 0 <= begin <= end <= data_size)
            dtype = _SAFETENSORS_DTYPES[dtype_name]
            if not ok or math.prod(shape) * dtype.itemsize != end - begin:
                raise ConversionError(f"{path}: tensor {name!r}: shape {shape!r:.80}/offsets "
                                      f"{info.get('data_offsets')!r:.80} do not fit the file")
            f.seek(data_start + begin)
            array = np.frombuffer(f.read(end - begin), dtype=dtype).reshape(shape)
            if dtype_name == "BF16":
                array = (array.astype(np.uint32) << 16).view(np.float32)
            out[name] = array
    return out


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
    # PEFT then falls back to the module name itself as the key (an exact-name entry).
    for key in patterns:
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return key
        except re.error as exc:
            raise ConversionError(f"adapter_config.json: pattern key {key!r} is not a valid regex: {exc}") from None
    return module if module in patterns else None


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_rank(v: Any, where: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise ConversionError(f"adapter_config.json: {where} must be an integer, got {v!r:.60}")
    if v <= 0:
        raise ConversionError(f"adapter_config.json: {where} must be positive, got {v}")
    if v > MAX_RANK:
        raise ConversionError(f"adapter_config.json: {where} = {v} is absurdly large (limit {MAX_RANK})")
    return v


def _check_alpha(v: Any, where: str) -> float:
    if not _is_number(v):
        raise ConversionError(f"adapter_config.json: {where} must be a finite number, got {v!r:.60}")
    if v < 0:
        raise ConversionError(f"adapter_config.json: {where} must not be negative, got {v}")
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


def parse_config(config: Any, *, allow_dora: bool = False) -> AdapterConfig:
    """Validate a parsed ``adapter_config.json`` and refuse everything that is not a plain LoRA product
    (DoRA is accepted only with ``allow_dora``; then :attr:`AdapterConfig.use_dora` says whether it is set)."""
    if not isinstance(config, dict):
        raise ConversionError("adapter_config.json: expected a JSON object")
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str):
        raise ConversionError(f"adapter_config.json: peft_type must be a string, got {peft_type!r:.60}")
    if peft_type.upper() != "LORA":
        raise ConversionError(
            f"adapter_config.json: peft_type {peft_type!r} is not supported: only plain LoRA (peft_type 'LORA') can "
            "be written as a llama.cpp LoRA adapter (LoHa, LoKr, IA3, AdaLoRA, OFT, ... are different products)"
        )
    use_dora = _truthy(config, "use_dora")
    if use_dora and not allow_dora:
        raise ConversionError("adapter_config.json: use_dora is set: " + DORA_REFUSAL)
    if use_dora and config["use_dora"] is not True:
        raise ConversionError(f"adapter_config.json: use_dora must be true or false, got {config['use_dora']!r:.60}")
    if _truthy(config, "modules_to_save"):
        raise ConversionError(
            f"adapter_config.json: modules_to_save = {config['modules_to_save']!r:.120}: the adapter carries fully "
            "trained copies of those modules, which a LoRA adapter cannot represent (llama.cpp: PR #9948)"
        )
    bias = config.get("bias", "none")
    if bias != "none":
        raise ConversionError(f"adapter_config.json: bias = {bias!r:.60}: trained biases cannot be represented in a "
                              "LoRA adapter (only bias='none' is supported)")
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
    r = _check_rank(config.get("r", 8), "r")
    alpha = _check_alpha(config.get("lora_alpha", 8), "lora_alpha")
    flags = {}
    for key in ("use_rslora", "fan_in_fan_out"):
        v = config.get(key, False)
        if v is None:
            v = False
        if not isinstance(v, bool):
            raise ConversionError(f"adapter_config.json: {key} must be true or false, got {v!r:.60}")
        flags[key] = v
    patterns: dict[str, dict[str, Any]] = {}
    for key, check in (("rank_pattern", _check_rank), ("alpha_pattern", _check_alpha)):
        v = config.get(key) or {}
        if not isinstance(v, dict):
            raise ConversionError(f"adapter_config.json: {key} must be an object, got {v!r:.60}")
        patterns[key] = {str(k): check(val, f"{key}[{k!r}]") for k, val in v.items()}
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
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConversionError(f"{cfg_path}: not valid JSON: {exc}") from None
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
