"""ggml-lora: merge LoRA adapters into quantized llama.cpp (GGUF) models, with a Rust core.

Reading and writing GGUF::

    import ggml_lora
    with ggml_lora.open("model.gguf") as f:
        print(f.metadata["general.architecture"], f.tensors["token_embd.weight"].shape)
        w = f.to_numpy("blk.0.attn_q.weight")       # float32, dequantized
    ggml_lora.write("out.gguf", {"general.architecture": "llama"}, {"w": w})

Bit-exact ggml quantization of numpy arrays::

    q = ggml_lora.quantize(w, "q4_0")                # same bytes as llama-quantize
    w2 = ggml_lora.dequantize(q, "q4_0", w.shape)

Merging a LoRA adapter into a quantized model (requantized from an f16 base)::

    result = ggml_lora.patch("model-q4_0.gguf", "adapter.gguf", base="model-f16.gguf", out="merged-q4_0.gguf")
    print(result.summary())
"""

from __future__ import annotations

from ._native import GGUFError, PatchError, PatchNote, SpecialFileError, __version__
from ._types import GGML_QUANT_SIZES, GGML_TYPES, TypeInfo, type_info
from .gguf import GGUFFile, GGUFStreamWriter, GGUFValueType, MetadataValue, TensorInfo, convert_model, open, write
from .imatrix import Imatrix, read_imatrix
from . import convert
from .convert import ConversionError, LoraTensors, peft_to_lora
from .patch import PatchProgress, PatchResult, TensorQuality, load_adapter, patch
from .adapter_info import AdapterSummary, describe_adapter
from .quants import dequantize, quantize

__all__ = [
    "AdapterSummary",
    "ConversionError",
    "LoraTensors",
    "convert",
    "convert_model",
    "peft_to_lora",
    "GGML_QUANT_SIZES",
    "GGML_TYPES",
    "GGUFError",
    "GGUFFile",
    "GGUFStreamWriter",
    "GGUFValueType",
    "Imatrix",
    "MetadataValue",
    "PatchError",
    "PatchNote",
    "PatchProgress",
    "PatchResult",
    "SpecialFileError",
    "TensorInfo",
    "TensorQuality",
    "TypeInfo",
    "__version__",
    "dequantize",
    "describe_adapter",
    "load_adapter",
    "open",
    "patch",
    "quantize",
    "read_imatrix",
    "type_info",
    "write",
]
