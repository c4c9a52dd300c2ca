"""Hugging Face PEFT LoRA adapters -> llama.cpp LoRA adapters (GGUF, or the legacy 'ggla' file).

No torch and no network: ``adapter_model.safetensors`` is memory-mapped by the core through the ``safetensors``
crate (f32/f16/bf16/f64), ``adapter_model.bin`` is read by the core's restricted unpickler (:mod:`.torch_pickle`),
the core builds the adapter from a typed plan made here (:mod:`.core`), names come from gguf-py's ``TensorNameMap`` and the
base model's architecture and head counts from a GGUF file's metadata or an HF ``config.json``.

    lora = peft_to_lora("my-adapter/", base="model-q4_0.gguf")     # LoraTensors
    convert("my-adapter/", "adapter.gguf", base="model-q4_0.gguf", out_type="f16")
"""

from __future__ import annotations

import sys
import types
from typing import Any

from .core import DEFAULT_GGLA_NAME, DEFAULT_GGUF_NAME, LoraTensors, convert, peft_to_lora
from .errors import ConversionError
from .writers import write_ggla, write_gguf

__all__ = [
    "DEFAULT_GGLA_NAME",
    "DEFAULT_GGUF_NAME",
    "ConversionError",
    "LoraTensors",
    "convert",
    "peft_to_lora",
    "write_ggla",
    "write_gguf",
]


class _CallableModule(types.ModuleType):
    """Makes ``ggml_lora.convert(...)`` (the package) call :func:`convert`, so the subpackage and the function
    can share the name without one shadowing the other."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return convert(*args, **kwargs)


_CallableModule.__call__.__doc__ = convert.__doc__
sys.modules[__name__].__class__ = _CallableModule
