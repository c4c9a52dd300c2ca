"""Importance matrices (llama-imatrix output), read from either file format and normalised as llama-quantize does."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping

import numpy as np
import numpy.typing as npt

from . import _native


class Imatrix(Mapping[str, npt.NDArray[np.float32]]):
    """An importance matrix: a read-only mapping from weight tensor name to its float32 weights.

    The weights are what ``llama-quantize --imatrix`` hands to ggml: one per column (``row_len``) of a 2-D
    weight, ``n_expert * row_len`` for stacked experts (``m[name].reshape(n_expert, -1)`` gives a row each), so
    ``ggml_lora.quantize(w, "q4_K", imatrix=m[name])`` quantizes a 2-D tensor as llama-quantize would.

    Attributes: ``source`` (the path read), ``datasets`` (the dataset names the file records), ``chunk_count``
    (chunks it was computed on, 0 when the file does not say) and ``legacy`` (True for a ``.dat`` file).
    ``read_imatrix`` makes one from a file; ``Imatrix(entries, ...)`` makes one from arrays (copied as float32).
    """

    __slots__ = ("source", "datasets", "chunk_count", "legacy", "_entries")

    source: str
    datasets: list[str]
    chunk_count: int
    legacy: bool

    def __init__(
        self,
        entries: Mapping[str, npt.ArrayLike],
        *,
        source: str = "",
        datasets: list[str] | None = None,
        chunk_count: int = 0,
        legacy: bool = False,
    ) -> None:
        self._entries: dict[str, npt.NDArray[np.float32]] = {
            name: np.array(entries[name], dtype=np.float32).reshape(-1) for name in sorted(entries)
        }
        for array in self._entries.values():
            array.setflags(write=False)
        self.source = source
        self.datasets = list(datasets or [])
        self.chunk_count = chunk_count
        self.legacy = legacy

    def __getitem__(self, name: str) -> npt.NDArray[np.float32]:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        kind = "legacy .dat" if self.legacy else "GGUF"
        return (
            f"<Imatrix {self.source!r} ({kind}): {len(self)} entries, {self.chunk_count} chunks, "
            f"datasets={self.datasets!r}>"
        )


def read_imatrix(path: str | os.PathLike[str]) -> Imatrix:
    """Read the importance matrix at ``path`` as llama-quantize's ``--imatrix`` does.

    Both formats llama-imatrix writes are read: GGUF (``general.type = "imatrix"``, tensors ``<name>.in_sum2`` and
    ``<name>.counts``; weights ``in_sum2 / round(count)`` per expert, 1 where the count is 0) and the legacy
    ``.dat`` (weights ``sums / ncall``). A malformed file raises ``GGUFError`` (a ``ValueError``) naming the file,
    the entry or key, and for ``.dat`` files the byte offset; a missing file ``FileNotFoundError``.
    """
    data = _native.read_imatrix(path)
    imatrix = Imatrix({}, source=data.source, datasets=data.datasets, chunk_count=data.chunk_count,
                      legacy=data.legacy)
    for name, array in data.entries.items():  # fresh arrays from the reader: taken as they are, not copied
        array.setflags(write=False)
        imatrix._entries[name] = array
    return imatrix
