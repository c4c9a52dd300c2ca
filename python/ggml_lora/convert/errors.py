"""The converter's single exception type."""

from __future__ import annotations


class ConversionError(ValueError):
    """A PEFT adapter (or base model) that cannot be converted into an exact llama.cpp LoRA adapter.

    Raised for every refusal: unsupported PEFT types and options (DoRA, LoHa/LoKr/IA3, modules_to_save, bias
    training, ...), malformed or absurd configs, unknown architectures or tensors, tied output heads, and
    hostile or malformed weight files. The message names the offending key, tensor or pickle global.
    """
