"""Which outputs have been put in place, so that an interrupt handler can tell the truth.

An interrupt (Ctrl-C) is raised in Python at the next bytecode after its signal arrives, which can be after an
output has been renamed into place. The writers append each output's path to the list of the current
:func:`recording` as soon as it is in place (the native ones before any Python code runs again); the CLI reads
the list when it handles ``KeyboardInterrupt``.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator

_WRITTEN: ContextVar[list[str] | None] = ContextVar("ggml_lora_written", default=None)


def current() -> list[str] | None:
    """The list of the active :func:`recording`, if any."""
    return _WRITTEN.get()


@contextmanager
def recording() -> Iterator[list[str]]:
    """Collects the paths of the outputs put in place inside the ``with`` block."""
    written: list[str] = []
    token = _WRITTEN.set(written)
    try:
        yield written
    finally:
        _WRITTEN.reset(token)
