"""The base model: architecture, block and head counts, tied output head, and HF -> GGUF tensor names.

Names come from gguf-py's :class:`gguf.TensorNameMap` for the architecture (the table llama.cpp's own
converters use); this module holds no tensor-name tables. It does hold, per supported GGUF architecture, which
llama.cpp model converter produced it and therefore which weight transforms apply (the core applies them:
``rust/core/src/peft.rs``), and, for Hugging Face ``config.json`` bases, which GGUF architecture each HF model class converts to.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import _native
from . import safejson
from .errors import ConversionError
from .safejson import short_repr

#: Most blocks (layers) a base model may have; real models have at most a few hundred.
MAX_BLOCKS = 1 << 16

#: GGUF architectures this converter supports, with the llama.cpp converter behaviour that matters for LoRA:
#: ``permute_qk`` = LlamaModel.permute of attn_q/attn_k rows (llama-family rope layout).
SUPPORTED_ARCHS: dict[str, dict[str, bool]] = {
    "llama": {"permute_qk": True},
    "gemma": {"permute_qk": False},
    "gemma2": {"permute_qk": False},
    "gemma3": {"permute_qk": False},
    "qwen2": {"permute_qk": False},
    "qwen3": {"permute_qk": False},
    "phi3": {"permute_qk": False},
    "gpt2": {"permute_qk": False},
}

#: Hugging Face model classes (config.json "architectures") -> the GGUF architecture llama.cpp converts them to.
HF_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "LLaMAForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "GemmaForCausalLM": "gemma",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
    "Gemma3ForConditionalGeneration": "gemma3",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Phi3ForCausalLM": "phi3",
    "GPT2LMHeadModel": "gpt2",
}


@dataclass
class BaseInfo:
    """What the converter needs to know about the base model."""

    architecture: str                      # GGUF general.architecture
    n_blocks: int
    n_head: list[int]                      # per block
    n_head_kv: list[int]                   # per block
    tied_embeddings: bool                  # no separate output.weight
    tensor_shapes: dict[str, tuple[int, ...]] | None = None  # numpy shapes, when the base is a GGUF file
    source: str = ""
    name: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def permute_qk(self) -> bool:
        return SUPPORTED_ARCHS[self.architecture]["permute_qk"]


def _per_block(value: Any, n_blocks: int, what: str, source: str) -> list[int]:
    if isinstance(value, list):
        if len(value) != n_blocks or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ConversionError(f"{source}: {what} {short_repr(value, 80)} is not one integer per block")
        return [int(v) for v in value]
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConversionError(f"{source}: {what} must be an integer, got {short_repr(value, 60)}")
    return [int(value)] * n_blocks


def _check_arch(arch: Any, source: str) -> str:
    import gguf

    if not isinstance(arch, str):
        raise ConversionError(f"{source}: general.architecture is missing or not a string")
    known = set(gguf.MODEL_ARCH_NAMES.values())
    if arch not in SUPPORTED_ARCHS:
        hint = "" if arch in known else " (gguf-py does not know it either)"
        raise ConversionError(
            f"{source}: architecture {arch!r} is not supported by the LoRA converter{hint}; supported: "
            f"{', '.join(SUPPORTED_ARCHS)}"
        )
    if arch not in known:
        raise ConversionError(f"{source}: the installed gguf-py does not know architecture {arch!r}")
    return arch


def base_from_gguf(path: Path) -> BaseInfo:
    from ..gguf import open as gguf_open

    try:
        with gguf_open(path) as f:
            meta = f.metadata
            shapes = {name: info.shape for name, info in f.tensors.items()}
    except ConversionError:
        raise
    except Exception as exc:
        raise ConversionError(f"{path}: cannot read the base GGUF: {exc}") from None
    source = str(path)
    arch = _check_arch(meta.get("general.architecture"), source)
    n_blocks = meta.get(f"{arch}.block_count")
    if not isinstance(n_blocks, int) or not 0 < n_blocks <= MAX_BLOCKS:
        raise ConversionError(f"{source}: {arch}.block_count is missing or invalid (1 to {MAX_BLOCKS}), got "
                              f"{short_repr(n_blocks)}")
    n_head = _per_block(meta.get(f"{arch}.attention.head_count", 0), n_blocks, "head_count", source)
    n_head_kv = _per_block(meta.get(f"{arch}.attention.head_count_kv", n_head), n_blocks, "head_count_kv", source)
    name = meta.get("general.name")
    return BaseInfo(
        architecture=arch,
        n_blocks=n_blocks,
        n_head=n_head,
        n_head_kv=n_head_kv,
        tied_embeddings="output.weight" not in shapes,
        tensor_shapes=shapes,
        source=source,
        name=name if isinstance(name, str) else None,
    )


def base_from_hf(config_path: Path) -> BaseInfo:
    source = str(config_path)
    try:
        config = safejson.load_file(config_path)
    except OSError as exc:
        raise ConversionError(f"{source}: cannot read the HF config: {exc}") from None
    if not isinstance(config, dict):
        raise ConversionError(f"{source}: not a JSON object")
    classes = config.get("architectures")
    if not isinstance(classes, list) or not classes or not isinstance(classes[0], str):
        raise ConversionError(f"{source}: no 'architectures' list naming the model class")
    hf_class = classes[0]
    if hf_class not in HF_ARCHITECTURES:
        raise ConversionError(
            f"{source}: model class {hf_class!r} is not supported by the LoRA converter; supported: "
            f"{', '.join(HF_ARCHITECTURES)} (or pass the converted GGUF model as the base)"
        )
    arch = _check_arch(HF_ARCHITECTURES[hf_class], source)
    text_config = config.get("text_config")
    text: dict[str, Any] = text_config if isinstance(text_config, dict) else {}
    merged = {**config, **text}

    def first(*keys: str, default: Any = None) -> Any:
        for k in keys:
            if merged.get(k) is not None:
                return merged[k]
        return default

    n_blocks = first("num_hidden_layers", "n_layer", "n_layers", "num_layers")
    if not isinstance(n_blocks, int) or isinstance(n_blocks, bool) or not 0 < n_blocks <= MAX_BLOCKS:
        raise ConversionError(f"{source}: the number of layers (num_hidden_layers / n_layer) is missing or invalid "
                              f"(1 to {MAX_BLOCKS}), got {short_repr(n_blocks)}")
    n_head_raw = first("num_attention_heads", "n_head", default=0)
    n_head = _per_block(n_head_raw, n_blocks, "num_attention_heads", source)
    n_head_kv = _per_block(first("num_key_value_heads", "n_head_kv", default=n_head_raw), n_blocks,
                           "num_key_value_heads", source)
    # transformers' PretrainedConfig defaults tie_word_embeddings to True; assume tied when it is absent
    # (only lm_head / embedding LoRA depend on it, and those are then refused rather than guessed).
    tied = config.get("tie_word_embeddings", text.get("tie_word_embeddings", True))
    return BaseInfo(
        architecture=arch,
        n_blocks=n_blocks,
        n_head=n_head,
        n_head_kv=n_head_kv,
        tied_embeddings=bool(tied),
        tensor_shapes=None,
        source=source,
        extra={"hf_class": hf_class},
    )


def read_base(base: Any) -> BaseInfo:
    """``base`` is a GGUF model file, a Hugging Face model folder with config.json, or that config.json."""
    if isinstance(base, BaseInfo):
        return base
    if base is None:
        raise ConversionError("base is required: a GGUF model file or a Hugging Face model folder with config.json")
    path = Path(os.fspath(base))
    _native.check_input_path(path if not path.is_dir() else path / "config.json")  # never open a FIFO or device
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConversionError(f"{path}: folder has no config.json (pass a GGUF model file or an HF model folder)")
        return base_from_hf(path / "config.json")
    if not path.is_file():
        raise ConversionError(f"{path}: base model not found")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return base_from_gguf(path)
    if path.suffix == ".json":
        return base_from_hf(path)
    raise ConversionError(f"{path}: base is neither a GGUF file nor an HF config.json / model folder")


class NameMapper:
    """HF module name (without ``base_model.model.``) -> GGUF tensor name (with ``.weight``)."""

    def __init__(self, base: BaseInfo) -> None:
        import gguf

        arch_enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[base.architecture]
        self.base = base
        self.map = gguf.TensorNameMap(arch_enum, base.n_blocks)

    def gguf_name(self, module: str) -> str | None:
        candidates = [module]
        # multimodal wrappers keep the text model under language_model (llama.cpp strips it the same way)
        if "language_model." in module:
            candidates += [module.replace("model.language_model.", "model."),
                           module.replace("language_model.model.", "model."),
                           module.replace("language_model.", "")]
        for cand in candidates:
            name = self.map.get_name(cand)
            if name is not None:
                return name + ".weight"
        return None

    def is_output_head(self, module: str) -> bool:
        """Whether ``module`` is an output head (lm_head) in gguf-py's mapping of any architecture."""
        import gguf

        cfg = getattr(gguf.TensorNameMap, "mappings_cfg", {})
        return module in cfg.get(gguf.MODEL_TENSOR.OUTPUT, ())
