"""What an adapter holds (``ggml-lora info ADAPTER``, :func:`describe_adapter`): a PEFT folder, a llama.cpp GGUF
adapter or a legacy ggla file.

Unlike the converter, nothing here refuses: an adapter the converter cannot take is described too, with what is
in it and what llama.cpp's own converter (``convert_lora_to_gguf.py``) would do with it. Only the config and the
weights file's header are read, never a tensor's values.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import _native
from .convert.core import _MAGNITUDE_SUFFIXES, _SUFFIXES, PREFIX
from .convert.peft import (
    CONFIG_NAME,
    AdapterConfig,
    open_folder_weights,
    read_folder_config,
    residual_initialisation,
)
from .gguf import GGUFFile

#: PEFT's saved key of trainable-token rows (``trainable_token_indices``).
_TRAINABLE_TOKENS_SUFFIX = ".token_adapter.trainable_tokens_delta"
#: PEFT's saved key of an embedding or head's full weights (``save_embedding_layers``).
_BASE_LAYER_SUFFIX = ".base_layer.weight"
#: The first four bytes of a legacy ggla adapter file ("ggla" as a little-endian uint32, as llama.cpp wrote it).
_GGLA_MAGIC = b"algg"


@dataclass(frozen=True)
class ModuleInfo:
    """One LoRA module: its name (PEFT's module path, or the GGUF tensor), kind, rank, alpha and PEFT's scale."""

    name: str
    kind: str  # "linear" or "embedding"
    rank: int
    alpha: float | None
    scale: float


@dataclass
class AdapterSummary:
    """What an adapter holds. ``caveats``: what llama.cpp's own converter would get wrong with it."""

    path: Path
    format: str  # "peft", "gguf" or "ggla"
    peft_type: str | None = None
    base_model: str | None = None
    architecture: str | None = None
    initialisation: str | None = None
    use_rslora: bool = False
    use_dora: bool = False
    modules: list[ModuleInfo] = field(default_factory=list)
    saved_base_layers: list[str] = field(default_factory=list)
    modules_to_save: list[str] = field(default_factory=list)
    trainable_tokens: dict[str, list[int]] = field(default_factory=dict)
    other_tensors: list[str] = field(default_factory=list)
    caveats: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """The summary as ``ggml-lora info`` prints it."""
        out = [f"{self.path}: {self.format} adapter" + (f" ({self.peft_type})" if self.peft_type else "")]
        for label, value in (("base model", self.base_model), ("architecture", self.architecture),
                             ("initialisation", self.initialisation)):
            if value is not None:
                out.append(f"  {label}: {value}")
        flags = [name for name, on in (("rsLoRA", self.use_rslora), ("DoRA", self.use_dora)) if on]
        if flags:
            out.append(f"  variants: {', '.join(flags)}")
        if self.modules:
            ranks = sorted({m.rank for m in self.modules})
            out.append(f"  LoRA modules: {len(self.modules)}, ranks {', '.join(map(str, ranks))}")
            by_kind = [m for m in self.modules if m.kind == "embedding"]
            if by_kind:
                out.append(f"  embedding LoRA: {', '.join(m.name for m in by_kind)}")
            width = max(len(m.name) for m in self.modules)
            for m in self.modules:
                alpha = "" if m.alpha is None else f"  alpha {m.alpha:g}"
                out.append(f"    {m.name:<{width}}  {m.kind:<9} r {m.rank}{alpha}  scale {m.scale:g}")
        for label, names in (("saved base layers", self.saved_base_layers),
                             ("modules_to_save (full tensors)", self.modules_to_save),
                             ("other tensors", self.other_tensors)):
            if names:
                out.append(f"  {label}: {', '.join(names)}")
        for module, rows in self.trainable_tokens.items():
            out.append(f"  trainable tokens on {module}: rows {rows}")
        if self.caveats:
            out.append("  llama.cpp's convert_lora_to_gguf.py with this adapter:")
            out += [f"    - {c}" for c in self.caveats]
        return out


def adapter_format(path: str | os.PathLike[str]) -> str | None:
    """``"peft"`` (a folder), ``"gguf"`` (a GGUF file whose ``general.type`` is ``adapter``) or ``"ggla"`` (by its
    magic) when ``path`` is an adapter :func:`describe_adapter` describes, else None. Non-regular files are refused
    without being opened."""
    path = Path(path)
    if path.is_dir():
        return "peft"
    _native.check_input_path(os.fspath(path))
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        with GGUFFile(path) as g:
            kind = g.fields.get("general.type")
            return "gguf" if kind is not None and kind.value == "adapter" else None
    return "ggla" if magic == _GGLA_MAGIC else None


def describe_adapter(path: str | os.PathLike[str]) -> AdapterSummary:
    """Describe the adapter at ``path``: a PEFT folder, a GGUF adapter or a ggla file."""
    path = Path(path)
    fmt = adapter_format(path)
    if fmt == "peft":
        return _describe_peft(path)
    if fmt == "gguf":
        return _describe_gguf(path)
    if fmt == "ggla":
        return _describe_native(path, "ggla", None)
    raise ValueError(f"{path}: not an adapter (a PEFT folder, a GGUF file whose general.type is adapter, or a "
                     "ggla file); for a model, ggml-lora info lists it")


def _describe_native(path: Path, fmt: str, architecture: str | None) -> AdapterSummary:
    adapter = _native.Adapter.open(os.fspath(path))
    alpha = float(adapter.alpha) if adapter.alpha else None
    modules = [ModuleInfo(p.target, "linear", p.rank, alpha, p.scale) for p in adapter.pairs()]
    return AdapterSummary(path, fmt, architecture=architecture or adapter.architecture, modules=modules,
                          other_tensors=list(adapter.skipped))


def _describe_gguf(path: Path) -> AdapterSummary:
    with GGUFFile(path) as f:
        architecture = f.fields.get("general.architecture")
    return _describe_native(path, "gguf", architecture.value if architecture is not None else None)


def _describe_peft(path: Path) -> AdapterSummary:
    raw: dict[str, Any] = read_folder_config(path)
    if not isinstance(raw, dict):
        raise ValueError(f"{path / CONFIG_NAME}: expected a JSON object")
    summary = AdapterSummary(path, "peft", peft_type=str(raw.get("peft_type")),
                             base_model=raw.get("base_model_name_or_path"),
                             use_rslora=raw.get("use_rslora") is True, use_dora=raw.get("use_dora") is True)
    init = raw.get("init_lora_weights", True)
    summary.initialisation = {True: "default (B = 0)", False: "random (init_lora_weights=False)"}.get(init, str(init))
    _, weights = open_folder_weights(path)
    config = AdapterConfig(r=int(raw.get("r", 8)), lora_alpha=float(raw.get("lora_alpha", 8)),
                           use_rslora=summary.use_rslora, rank_pattern=dict(raw.get("rank_pattern") or {}),
                           alpha_pattern=dict(raw.get("alpha_pattern") or {}))
    for info in weights.tensors:
        name = info.name[len(PREFIX):] if info.name.startswith(PREFIX) else info.name
        suffix = next((s for s in _SUFFIXES if name.endswith(s)), None)
        if suffix is not None:
            kind, which = _SUFFIXES[suffix]
            if which == "A":
                module = name[: -len(suffix)]
                _, alpha, scale = config.module_scale(module)
                summary.modules.append(ModuleInfo(module, kind, int(info.shape[0]), alpha, scale))
        elif any(name.endswith(s) for s in _MAGNITUDE_SUFFIXES):
            continue
        elif name.endswith(_BASE_LAYER_SUFFIX):
            summary.saved_base_layers.append(name[: -len(_BASE_LAYER_SUFFIX)])
        elif name.endswith(_TRAINABLE_TOKENS_SUFFIX):
            summary.trainable_tokens[name[: -len(_TRAINABLE_TOKENS_SUFFIX)]] = []
        elif _is_module_to_save(name, raw.get("modules_to_save")):
            summary.modules_to_save.append(name)
        else:
            summary.other_tensors.append(name)
    indices = raw.get("trainable_token_indices")
    for module in summary.trainable_tokens:
        if isinstance(indices, list):
            summary.trainable_tokens[module] = indices
        elif isinstance(indices, dict):
            summary.trainable_tokens[module] = next((v for k, v in indices.items() if module.endswith(k)), [])
    summary.caveats = _llama_cpp_caveats(summary, raw)
    return summary


def _is_module_to_save(name: str, modules_to_save: Any) -> bool:
    """PEFT's rule for a saved module: the module path ends with one of the config's names."""
    module = name.rsplit(".", 1)[0]
    return isinstance(modules_to_save, list) and any(module.endswith(str(m)) for m in modules_to_save)


def _llama_cpp_caveats(summary: AdapterSummary, raw: dict[str, Any]) -> list[str]:
    """What llama.cpp's convert_lora_to_gguf.py (vendored in llama-cpp-python 0.3.36) does with this adapter that
    differs from PEFT: it writes one ``adapter.lora.alpha`` (the config's ``lora_alpha``), which llama.cpp divides
    by each pair's rank; it skips ``.base_layer.weight`` tensors; it keeps only norm tensors among full weights."""
    caveats = []
    if summary.peft_type and summary.peft_type.upper() != "LORA":
        caveats.append(f"peft_type {summary.peft_type}: not a LoRA; it cannot be converted at all")
        return caveats
    if summary.use_rslora:
        caveats.append("rsLoRA: it writes alpha for the scale alpha/r, but PEFT's is alpha/sqrt(r); every delta is "
                       "off by a factor sqrt(r)")
    if raw.get("alpha_pattern"):
        caveats.append("alpha_pattern: it writes the one lora_alpha, so the modules with their own alpha get the "
                       "wrong scale")
    if raw.get("fan_in_fan_out") is True:
        caveats.append("fan_in_fan_out (GPT-2 Conv1D): it transposes each factor, so its file holds the transpose "
                       "of the change (llama.cpp then refuses it)")
    if summary.use_dora:
        caveats.append("DoRA: llama.cpp's adapter format cannot hold it (the merge needs the base weights)")
    if summary.saved_base_layers:
        caveats.append("saved base layers: it skips them without comparing; if they differ from the model's (the "
                       "embeddings were trained or resized) the result is silently wrong")
    if any(m.name.endswith("lm_head") for m in summary.modules):
        caveats.append("lm_head LoRA: on a model whose head is tied to the embeddings it stops with an error (there "
                       "is no output.weight to apply it to)")
    full = [n for n in summary.modules_to_save if "norm" not in n]
    if full:
        caveats.append(f"modules_to_save ({len(full)} full tensors that are not norms): it stops with 'Unexpected "
                       "name'")
    if summary.trainable_tokens:
        caveats.append("trainable tokens: it stops with 'Unexpected name'")
    init = residual_initialisation(raw)
    if init is not None:
        caveats.append(f"{init} initialisation: it converts the adapter as a delta on the original model, which it "
                       "is not (silently wrong); PEFT's conversion or ggml-lora patch --initial gives the right one")
    elif isinstance(raw.get("init_lora_weights"), str) and raw["init_lora_weights"].lower() == "loftq":
        caveats.append("LoftQ: trained on a quantized residual of the base weights, not the original model")
    return caveats
