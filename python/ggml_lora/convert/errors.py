"""The converter's single exception type."""

from __future__ import annotations


class ConversionError(ValueError):
    """A PEFT adapter (or base model) that cannot be converted into an exact llama.cpp LoRA adapter.

    Raised for every refusal: unsupported PEFT types and options (DoRA, LoHa/LoKr/IA3, modules_to_save, bias
    training, ...), malformed or absurd configs, unknown architectures or tensors, tied output heads, and
    hostile or malformed weight files. The message names the offending key, tensor or pickle global.

    Like the core's exceptions it carries the facts as attributes, ``None`` where they do not apply: ``kind`` (a
    short slug), ``path``, ``offset`` (absolute byte offset in ``path``), ``tensor``, ``expected``, ``found``.
    """

    kind: str | None = None
    path: str | None = None
    offset: int | None = None
    tensor: str | None = None
    expected: str | None = None
    found: str | None = None

    def __init__(self, message: str, *, kind: str | None = None, path: str | None = None, offset: int | None = None,
                 tensor: str | None = None, expected: str | None = None, found: str | None = None) -> None:
        super().__init__(message)
        self.kind, self.path, self.offset = kind, path, offset
        self.tensor, self.expected, self.found = tensor, expected, found

    @classmethod
    def wrapping(cls, error: BaseException, message: str | None = None) -> ConversionError:
        """A ConversionError for ``error`` (raised by the core): its message (or ``message``) and its facts."""
        return cls(
            message if message is not None else str(error),
            **{name: getattr(error, name, None) for name in ("kind", "path", "offset", "tensor", "expected", "found")},
        )
