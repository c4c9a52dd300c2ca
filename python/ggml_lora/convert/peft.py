"""Reading a PEFT adapter directory: ``adapter_config.json`` (validated) and its weights file.

The weights are opened by the core (``rust/core/src/peft_weights.rs``): ``adapter_model.safetensors`` is
memory-mapped and validated by the ``safetensors`` crate (F32, F16, BF16 and F64 tensors; only the header is read
here), ``adapter_model.bin`` is a torch zip read by :mod:`.torch_pickle`, never by torch. Either way Python sees
the tensors' names, dtypes and shapes; their values are read by the core when the adapter is built or applied.
"""

from __future__ import annotations

import functools
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from .. import _native
from . import safejson
from .errors import ConversionError
from .safejson import short_repr
from .torch_pickle import open_torch_bin

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"

#: Ranks above this are refused as absurd (PEFT adapters use r <= a few thousand).
MAX_RANK = 1 << 16


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
        """(r, alpha, scaling) for one module, exactly as PEFT computes ``scaling`` (the core's one scale rule)."""
        r, alpha = self.module_rank_alpha(module)
        return r, alpha, _native.peft_scale(alpha, r, self.use_rslora)


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


def residual_initialisation(config: dict[str, Any]) -> str | None:
    """The display name of the config's base-changing initialisation (OLoRA, PiSSA, ...), or None."""
    init = config.get("init_lora_weights", True)
    return _residual_family(init.lower()) if isinstance(init, str) else None


def _residual_family(name: str) -> str | None:
    """The display name of a base-changing initialisation given its lower-case name (``pissa_niter_N`` is PiSSA)."""
    return RESIDUAL_INITIALISATIONS.get("pissa" if name.startswith("pissa_niter_") else name)


def _check_initialisation(init: Any, *, with_initial: bool = False) -> None:
    """Refuse an adapter that is not a delta on the original model (PEFT's ``init_lora_weights``); with
    ``with_initial`` (the adapter saved before training is given) a base-changing initialisation is accepted."""
    if isinstance(init, bool) or init is None:
        return
    if not isinstance(init, str):
        raise ConversionError(f"adapter_config.json: init_lora_weights must be true, false or a name, got "
                              f"{short_repr(init, 60)}")
    name = init.lower()
    if name in DELTA_INITIALISATIONS:
        return
    residual = _residual_family(name)
    if residual is not None:
        if with_initial:
            return
        raise ConversionError(
            f"adapter_config.json: init_lora_weights = {short_repr(init)}: the adapter was trained from a "
            f"{residual} initialisation, which changed the base weights it was trained on, "
            "so it is not a delta on the original model; give the adapter saved before training (patch: initial=DIR, "
            "CLI: --initial DIR), or convert it to a plain LoRA (rank 2r) first with PEFT's "
            "save_pretrained(..., path_initial_model_for_weight_conversion=<the adapter saved before training>)"
        )
    if name == "loftq":
        raise ConversionError(
            "adapter_config.json: init_lora_weights = 'loftq': a LoftQ adapter was trained on LoftQ's quantized "
            "residual of the base weights, not on the original model, so adding it to the original weights is wrong"
        )
    raise ConversionError(f"adapter_config.json: init_lora_weights = {short_repr(init)} is not a PEFT "
                          "initialisation this converter knows, so it cannot tell whether it changed the base weights")


def parse_config(config: Any, *, allow_dora: bool = False, with_initial: bool = False) -> AdapterConfig:
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
    _check_initialisation(config.get("init_lora_weights", True), with_initial=with_initial)
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
    """A PEFT folder: its validated config and its weights file, open in the core (tensor values not read)."""

    path: Path
    config: AdapterConfig
    weights: _native.PeftWeights
    weights_file: Path


def open_safetensors(path: Path) -> _native.PeftWeights:
    """Map and validate ``adapter_model.safetensors`` in the core; every refusal is a :class:`ConversionError`
    naming the file (and the tensor, when there is one)."""
    _native.check_input_path(path)  # a FIFO or device is refused before it is opened
    try:
        return _native.PeftWeights.open_safetensors(path)
    except OSError:
        raise
    except ValueError as exc:  # the core's refusals
        raise ConversionError.wrapping(exc) from None


def read_folder_config(path: Path) -> Any:
    """A PEFT folder's ``adapter_config.json``, parsed but not validated. Refuses a path that is not a folder,
    and a FIFO or device in the folder's places (never opened)."""
    if not path.is_dir():
        raise ConversionError(f"{path}: not a directory (expected a PEFT adapter folder with {CONFIG_NAME})")
    for name in (CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME):
        _native.check_input_path(path / name)
    if not (path / CONFIG_NAME).is_file():
        raise ConversionError(f"{path}: no {CONFIG_NAME}")
    return safejson.load_file(path / CONFIG_NAME)


def open_folder_weights(path: Path) -> tuple[Path, _native.PeftWeights]:
    """A PEFT folder's weights file (``adapter_model.safetensors``, else ``adapter_model.bin``), open in the core."""
    if (path / SAFETENSORS_NAME).is_file():
        return path / SAFETENSORS_NAME, open_safetensors(path / SAFETENSORS_NAME)
    if (path / BIN_NAME).is_file():
        return path / BIN_NAME, open_torch_bin(path / BIN_NAME)
    raise ConversionError(f"{path}: no {SAFETENSORS_NAME} or {BIN_NAME}")


def read_peft_dir(peft_dir: str | os.PathLike[str], *, allow_dora: bool = False,
                  with_initial: bool = False) -> PeftAdapter:
    """Read and validate a PEFT adapter directory (no torch, no network). DoRA (``use_dora``) is refused unless
    ``allow_dora``; an OLoRA/PiSSA/CorDA/LoRA-GA initialisation unless ``with_initial``."""
    path = Path(peft_dir)
    config = parse_config(read_folder_config(path), allow_dora=allow_dora, with_initial=with_initial)
    weights_file, weights = open_folder_weights(path)
    return PeftAdapter(path, config, weights, weights_file)
