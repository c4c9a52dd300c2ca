"""Parsing untrusted JSON (``adapter_config.json``, ``config.json``, safetensors headers) with limits.

Every failure is a :class:`ConversionError` naming the file: invalid JSON, nesting deeper than
:data:`MAX_DEPTH`, a document larger than the caller's limit, an integer literal longer than
:data:`MAX_INT_DIGITS` digits, and a key that appears twice in one object (the last one would silently win).
Python's own limits (``RecursionError``, the 4300-digit integer conversion limit) never surface.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import json

from .errors import ConversionError

#: Deepest nesting accepted. Real configs and headers nest 3 or 4 levels.
MAX_DEPTH = 64
#: Longest integer literal accepted, in digits (well under Python's 4300-digit conversion limit).
MAX_INT_DIGITS = 1000
#: Largest ``adapter_config.json`` / ``config.json`` read (real ones are a few KiB).
MAX_CONFIG_BYTES = 16 * 1024 * 1024


def short_repr(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, without building the repr of a large or deep structure."""
    if isinstance(value, (list, tuple, dict)):
        return f"<a {type(value).__name__} of {len(value)} items>" if len(value) > 8 else _bounded(value, limit)
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        return f"<an integer of about {int(value.bit_length() * 0.30103) + 1} digits>"
    if isinstance(value, str) and len(value) > limit:
        return repr(value[:limit]) + "..."
    return _bounded(value, limit)


def _bounded(value: Any, limit: int) -> str:
    try:
        text = repr(value)
    except (RecursionError, ValueError):
        return f"<a deeply nested {type(value).__name__}>"
    return text if len(text) <= limit else text[:limit] + "..."


def _parse_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise _TooLong(f"an integer literal of {digits} digits (at most {MAX_INT_DIGITS} accepted)")
    return int(text)


class _TooLong(ValueError):
    pass


class _Duplicate(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Duplicate(f"key {short_repr(key)} appears twice in one object")
        out[key] = value
    return out


def _depth(value: Any) -> int:
    """The nesting depth of a parsed JSON value (a scalar is 0), without recursion."""
    deepest = 0
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            depth += 1
            deepest = max(deepest, depth)
            if depth > MAX_DEPTH:
                return depth
            stack.extend((v, depth) for v in item)
    return deepest


def loads(data: bytes, source: str | Path, what: str | None = None) -> Any:
    """Parse ``data`` (UTF-8 JSON from ``source``) within the limits above; ``what`` names it in messages when
    ``source`` alone does not (``"safetensors header"``)."""
    where = f"{source}: {what}" if what else str(source)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConversionError(f"{where} is not valid UTF-8: {exc}") from None
    try:
        value = json.loads(text, parse_int=_parse_int, object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise ConversionError(f"{where} is nested too deeply (at most {MAX_DEPTH} levels)") from None
    except (_TooLong, _Duplicate) as exc:
        raise ConversionError(f"{where}: {exc}") from None
    except ValueError as exc:  # json.JSONDecodeError and Python's own int conversion limit
        raise ConversionError(f"{where} is not valid JSON: {str(exc)[:200]}") from None
    if _depth(value) > MAX_DEPTH:
        raise ConversionError(f"{where} is nested too deeply (at most {MAX_DEPTH} levels)")
    return value


def load_file(path: Path, what: str | None = None, max_bytes: int = MAX_CONFIG_BYTES) -> Any:
    """Read and parse a JSON file of at most ``max_bytes`` bytes (OSError passes through)."""
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        where = f"{path}: {what}" if what else str(path)
        raise ConversionError(f"{where} is larger than {max_bytes} bytes; refusing to parse it")
    return loads(data, path, what)
