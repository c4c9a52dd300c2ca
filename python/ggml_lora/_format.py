"""Small text-formatting helpers shared by the command line."""

from __future__ import annotations

from typing import Any


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def summarize_value(value: Any, max_items: int = 8, max_chars: int = 120) -> str:
    """A one-line rendering of a metadata value; long arrays and strings are abbreviated."""
    if isinstance(value, list):
        head = ", ".join(summarize_value(v, max_items, 40) for v in value[:max_items])
        more = f", ... ({len(value)} items)" if len(value) > max_items else ""
        return f"[{head}{more}]"
    text = repr(value)
    if len(text) > max_chars:
        text = text[: max_chars - 20] + f"... ({len(text)} chars)"
    return text
