"""Merging LoRA adapters into a GGUF model: ``ggml_lora.patch``.

The work happens in the Rust engine in one streaming pass; this module turns the user's arguments into the
engine's (adapter loading, PEFT directories planned for the core, output naming, provenance metadata) and its
results into a :class:`PatchResult` with a per-tensor quality table.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, Union

import numpy as np
import numpy.typing as npt

from . import _native, _written
from .gguf import GGUFValueType, MetadataValue, PathLike, _typed_all, split_rule
from .imatrix import Imatrix, read_imatrix

AdapterSpec = Union[PathLike, "tuple[PathLike, float]", _native.Adapter, "tuple[_native.Adapter, float]"]

#: Below this share of the intended change surviving requantization, a tensor's LoRA counts as lost.
LOST_THRESHOLD = 0.5

#: Advice :func:`patch` appends to the engine's refusals, by the exception's ``kind``: the engine's messages name
#: no keyword argument and no command-line flag, so the argument (and flag) that does it is added here.
_ADVICE = {
    "cannot_dequantize": " (base=..., CLI: --lora-base)",
    "cannot_quantize": ": out_type sets the type of every patched tensor, e.g. out_type='q8_0' (CLI: --out-type q8_0)",
}


def _add_advice(exc: BaseException) -> None:
    """Appends this package's advice for the error's ``kind`` (see :data:`_ADVICE`) to its message, in place: the
    exception keeps its class and its attributes."""
    advice = _ADVICE.get(getattr(exc, "kind", None) or "")
    if advice and exc.args and isinstance(exc.args[0], str):
        exc.args = (exc.args[0] + advice, *exc.args[1:])


def _note_text(note: _native.PatchNote) -> str:
    """The note in words, as :meth:`PatchResult.summary` prints it (after ``note:``)."""
    if note.kind == "imatrix_missing_entries":
        return (f"the importance matrix {note.source} has no entry for {len(note.tensors)} patched tensor(s), "
                f"quantized without one: {', '.join(note.tensors)}")
    if note.kind == "model_imatrix_not_applied":
        return (f"the model was quantized with an importance matrix ({note.file or 'unknown file'}); the "
                f"{note.requantized} patched tensors are requantized with ggml's reference quantizer, without it "
                f"(untouched tensors keep theirs)")
    return note.kind.replace("_", " ")


#: Where a running patch is (tensors_done, tensors_total, tensor, bytes_done, bytes_total); made by the core.
PatchProgress = _native.PatchProgress


@dataclass(frozen=True)
class TensorQuality:
    """How one patched tensor came out.

    - ``relative_change``: ‖ΔW‖ / ‖W‖, the size of the intended change.
    - ``retained``: ⟨Q − W_model, ΔW⟩ / ‖ΔW‖², the share of the change present in the output Q compared with
      the model you had (1.0 = all of it; near 0 = lost in quantization noise).
    - ``cosine``: cos(Q − W_src, ΔW), whether the change points where the adapter wanted.
    - ``error_ratio``: ‖Q − W'‖ / ‖ΔW‖, requantization error relative to the change.
    - ``used_imatrix``: whether its quantizer used importance weights.
    - ``promoted_from`` / ``retained_before_promotion`` / ``extra_bytes``: when ``keep_lora`` moved it to a
      larger type, the type it would have had, what that type would have retained, and the bytes it costs.
    """

    name: str
    model_type: str
    out_type: str
    from_base: bool
    n_adapters: int
    relative_change: float
    retained: float
    cosine: float
    error_ratio: float
    used_imatrix: bool = False
    promoted_from: str | None = None
    retained_before_promotion: float | None = None
    extra_bytes: int = 0

    @classmethod
    def _from_native(cls, r: _native.TensorReport) -> TensorQuality:
        return cls(r.name, r.model_type, r.out_type, r.from_base, r.n_adapters, r.relative_change, r.retained,
                   r.cosine, r.error_ratio, r.used_imatrix, r.promoted_from, r.retained_before_promotion,
                   r.extra_bytes)

    @property
    def lost(self) -> bool:
        """True when most of the intended change did not survive requantization.

        Judged by ``retained`` alone: a low ``cosine`` with a high ``retained`` only means the requantization
        noise (present in the unpatched model too) is large next to the change, not that the change is gone.
        """
        return self.retained < LOST_THRESHOLD


@dataclass
class PatchResult:
    """What :func:`patch` produced: the output path, a quality row per patched tensor, and figures."""

    out: Path
    tensors: list[TensorQuality]
    copied: int
    bytes_written: int
    seconds: float
    used_base: bool = False
    suggestions: list[str] = field(default_factory=list)
    #: What the engine noted about the patch (not errors), as structured values; :meth:`summary` puts them in words.
    notes: list[_native.PatchNote] = field(default_factory=list)
    #: Every file written, in shard order (``[out]`` unless the output is split; ``out`` is the first shard).
    outputs: list[Path] = field(default_factory=list)

    @property
    def lost(self) -> list[TensorQuality]:
        """The tensors whose change was mostly lost."""
        return [t for t in self.tensors if t.lost]

    @property
    def promoted(self) -> list[TensorQuality]:
        """The tensors ``keep_lora`` wrote in a larger type than planned."""
        return [t for t in self.tensors if t.promoted_from is not None]

    def table(self) -> str:
        """The quality table as aligned text."""
        header = ("tensor", "type", "change", "retained", "cos", "err/change")
        rows = [
            (
                t.name,
                t.out_type if t.out_type == t.model_type else f"{t.model_type}->{t.out_type}",
                f"{t.relative_change:.2%}",
                f"{t.retained:.1%}",
                f"{t.cosine:.3f}",
                f"{t.error_ratio:.2f}",
            )
            for t in self.tensors
        ]
        widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
        lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        return "\n".join(lines)

    def _more_shards(self) -> str:
        return f" and {len(self.outputs) - 1} more shards" if len(self.outputs) > 1 else ""

    def summary(self) -> str:
        """A few lines: what was written, how much of the LoRA survived, and what to do if it did not."""
        n = len(self.tensors)
        retained = np.array([t.retained for t in self.tensors]) if n else np.zeros(0)
        lines = [
            f"wrote {self.out}{self._more_shards()} ({self.bytes_written / 2**20:.1f} MiB) in {self.seconds:.2f} s: "
            f"{n} tensors patched, {self.copied} copied untouched"
        ]
        if n:
            lines.append(
                f"LoRA change retained after requantization: median {np.median(retained):.1%}, "
                f"min {retained.min():.1%} ({self.tensors[int(retained.argmin())].name})"
            )
        lost = self.lost
        if lost:
            lines.append(
                f"warning: most of the LoRA change was lost in {len(lost)} of {n} tensors "
                f"(e.g. {lost[0].name}: {lost[0].retained:.1%} retained, cos {lost[0].cosine:.2f})"
            )
            lines += [f"  suggestion: {s}" for s in self.suggestions]
        promoted = self.promoted
        if promoted:
            cost = sum(t.extra_bytes for t in promoted)
            lines.append(
                f"kept the LoRA change by writing {len(promoted)} tensor(s) in a larger type (+{cost / 2**20:.2f} MiB):"
            )
            lines += [
                f"  {t.name}: {t.promoted_from} -> {t.out_type} (retained {t.retained_before_promotion:.1%} -> "
                f"{t.retained:.1%}, +{t.extra_bytes / 2**10:.1f} KiB)"
                for t in promoted
            ]
        lines += [f"note: {_note_text(n)}" for n in self.notes]
        return "\n".join(lines)


def load_adapter(adapter: PathLike | _native.Adapter, *, model: PathLike | None = None) -> _native.Adapter:
    """Load a LoRA adapter: a llama.cpp GGUF adapter, a legacy ggla file, or a PEFT directory (``model`` supplies
    the architecture and naming; DoRA adapters included, merged exactly). A PEFT directory's weights stay in
    their memory map, as a GGUF adapter's do: each pair is read when its target is patched."""
    if isinstance(adapter, _native.Adapter):
        return adapter
    path = Path(adapter)
    if path.is_dir():
        if model is None:
            raise ValueError(f"{path}: converting a PEFT adapter directory needs the model it applies to")
        from .convert.core import peft_adapter

        # DoRA is allowed here: the engine merges it exactly (llama.cpp's adapter format cannot hold it).
        native, _, _ = peft_adapter(path, base=model, allow_dora=True)
        return native
    return _native.Adapter.open(os.fspath(path))


def _with_initial(
    entries: list[tuple[PathLike | _native.Adapter, float]], initial: Path, model: PathLike
) -> list[tuple[_native.Adapter, float]]:
    """The trained adapter at its scale and the initial one at the opposite scale: together PEFT's conversion of
    an adapter trained from a base-changing initialisation, s·(B·A − B₀·A₀) (rank 2r, alpha doubled, the same
    scale per module)."""
    from .convert import ConversionError
    from .convert.core import peft_adapter
    from .convert.peft import residual_initialisation

    if len(entries) != 1 or not isinstance(entries[0][0], (str, os.PathLike)) or not Path(entries[0][0]).is_dir():
        raise ValueError("initial= needs exactly one adapter, a PEFT folder (the one trained from it)")
    trained_dir, scale = Path(entries[0][0]), entries[0][1]
    trained, peft, _ = peft_adapter(trained_dir, base=model, allow_dora=True, with_initial=True)
    init = residual_initialisation(peft.config.raw)
    if init is None:
        raise ConversionError(
            f"{trained_dir}: adapter_config.json: init_lora_weights = {peft.config.raw.get('init_lora_weights')!r}: "
            "initial= is for adapters trained from an OLoRA, PiSSA, CorDA or LoRA-GA initialisation; this one is "
            "already a delta on the original model"
        )
    if peft.config.use_rslora and (peft.config.rank_pattern or peft.config.alpha_pattern):
        raise ConversionError(  # as PEFT's own conversion refuses it (LoraModel._convert_state_dict_for_initial_model)
            f"{trained_dir}: rsLoRA together with rank_pattern/alpha_pattern cannot be converted from its {init} "
            "initialisation (PEFT refuses the same)"
        )
    if peft.config.use_dora:
        raise ConversionError(f"{trained_dir}: DoRA trained from an {init} initialisation: the magnitude rescaling "
                              "does not subtract, so the conversion is not a LoRA difference; refusing")
    start, _, _ = peft_adapter(initial, base=model, with_initial=True)
    trained_pairs = {p.target: p for p in trained.pairs()}
    start_pairs = {p.target: p for p in start.pairs()}
    if trained_pairs.keys() != start_pairs.keys():
        diff = sorted(trained_pairs.keys() ^ start_pairs.keys())
        raise ConversionError(f"{initial}: not the initial state of {trained_dir}: their targets differ ({diff[0]!r} "
                              "is in one only)")
    for target, p in trained_pairs.items():
        q = start_pairs[target]
        if (p.rows, p.cols, p.rank, p.scale, p.dora) != (q.rows, q.cols, q.rank, q.scale, q.dora):
            raise ConversionError(f"{initial}: not the initial state of {trained_dir}: {target!r} has rank {q.rank} "
                                  f"and scale {q.scale} there but rank {p.rank} and scale {p.scale} here")
    return [(trained, scale), (start, -scale)]


def _adapter_list(
    adapter: AdapterSpec | Sequence[AdapterSpec], scale: float
) -> list[tuple[PathLike | _native.Adapter, float]]:
    if isinstance(adapter, (str, os.PathLike, _native.Adapter)):
        return [(adapter, scale)]
    if isinstance(adapter, tuple) and len(adapter) == 2 and isinstance(adapter[1], (int, float)):
        return [(adapter[0], float(adapter[1]))]
    items: list[tuple[PathLike | _native.Adapter, float]] = []
    for item in adapter:  # type: ignore[union-attr]
        if isinstance(item, tuple):
            if len(item) != 2:
                raise ValueError(f"adapter entries are paths or (path, scale) pairs, got {item!r}")
            items.append((item[0], float(item[1])))
        else:
            items.append((item, scale))
    if not items:
        raise ValueError("no adapter given")
    return items


_SHARD_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def default_output_path(model: PathLike, *, single_file: bool = False) -> Path:
    """``<folder>/<model stem>-lora.gguf``, next to the model. For a shard of a split model
    (``<prefix>-00001-of-00003.gguf``) the output prefix ``<prefix>-lora`` (its shards are named
    ``<prefix>-lora-00001-of-00003.gguf`` ...), or ``<prefix>-lora.gguf`` when the output is ``single_file``."""
    model = Path(model)
    shard = _SHARD_NAME.match(model.name)
    if shard is not None:
        prefix = model.with_name(f"{shard.group('prefix')}-lora")
        return prefix.with_name(prefix.name + ".gguf") if single_file else prefix
    return model.with_name(f"{model.stem}-lora.gguf")


def _suggestions(result: PatchResult, base: PathLike | None, out_type: str | None) -> list[str]:
    """Advice when tensors lost most of the change, from the structured results: the lost tensors' output types
    and the engine's notes."""
    if not result.lost:
        return []
    tips = []
    if base is None:
        tips.append(
            "give the unquantized model as base (Python: base='model-f16.gguf'; CLI: --lora-base model-f16.gguf): "
            "patched tensors then start from full precision"
        )
    if all(t.out_type in ("q4_0", "q4_1", "q5_0", "q5_1") for t in result.lost) and out_type is None:
        tips.append("write the patched tensors at higher precision (out_type='q8_0'; CLI: --out-type q8_0)")
    if any(n.kind == "model_imatrix_not_applied" for n in result.notes):
        tips.append("give the importance matrix the model was quantized with (imatrix=...; CLI: --imatrix FILE)")
    if not tips:
        tips.append("use a larger scale or a higher-precision output type (out_type='f16')")
    return tips


def _imatrix_entries(
    imatrix: PathLike | Mapping[str, npt.ArrayLike] | None,
) -> tuple[str, list[tuple[str, list[float]]]] | None:
    """``(source, [(tensor, weights)])`` for the engine, from a file or a mapping."""
    if imatrix is None:
        return None
    matrix = imatrix if isinstance(imatrix, Mapping) else read_imatrix(imatrix)
    source = matrix.source if isinstance(matrix, Imatrix) else "<in-memory importance matrix>"
    return (source, [(str(k), np.asarray(v, dtype=np.float32).reshape(-1).tolist()) for k, v in matrix.items()])


def patch(
    model: PathLike,
    adapter: AdapterSpec | Sequence[AdapterSpec],
    base: PathLike | None = None,
    out: PathLike | None = None,
    *,
    scale: float = 1.0,
    threads: int | None = None,
    out_type: str | None = None,
    intermediate: str | None = None,
    progress: Callable[[PatchProgress], object] | None = None,
    sync: bool = True,
    tensor_types: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
    imatrix: PathLike | Mapping[str, npt.ArrayLike] | None = None,
    keep_lora: float | None = None,
    merge_shards: bool = False,
    split_max_size: int | str | None = None,
    split_max_tensors: int | None = None,
    initial: PathLike | None = None,
) -> PatchResult:
    """Merge LoRA adapters into a GGUF model and write one GGUF of the same quantization.

    ``adapter``: a path (llama.cpp GGUF adapter, legacy ggla file, or PEFT directory), or a list of paths and
    ``(path, scale)`` pairs; ``scale`` applies to entries without their own. Each tensor becomes
    W' = W + Σ s·(B @ A) with llama.cpp's s = scale·alpha/rank (scale alone when alpha is 0).

    ``base``: a higher-precision GGUF of the same model (llama.cpp's ``--lora-base``): patched tensors start
    from it and are requantized to the model's type; all other tensors are copied from ``model`` byte for byte.
    ``out_type`` overrides the type of every patched tensor ("q8_0", "f16", ...). ``intermediate="f16"``
    rounds W' to f16 before quantizing, reproducing PEFT merge → convert_hf_to_gguf → llama-quantize exactly.
    ``tensor_types`` (like llama-quantize's ``--tensor-type``): ``{pattern: type}`` or pairs; the first regular
    expression found (case-insensitively) in a patched tensor's name sets its type, before ``out_type``.
    ``imatrix``: an importance matrix (a llama-imatrix file, GGUF or legacy ``.dat``, or a mapping of tensor name
    to per-column weights) used to quantize the patched tensors as ``llama-quantize --imatrix`` would.
    ``keep_lora``: a share (0..1); a patched tensor that would retain less of the LoRA change than this is written
    in the next larger type of its family (q4_K → q5_K → q6_K → q8_0, q4_0 → q5_0 → q8_0), see
    :attr:`PatchResult.promoted`.
    ``model`` and ``base`` may be any shard of a split model (the whole set is read and checked) or a legacy
    GGML/GGJT file. A split model gives a split output by default: as many shards, each tensor in the same shard,
    the same ``split.*`` keys. ``out`` then names the first shard (``x-00001-of-00003.gguf``) or is a prefix
    without ``.gguf`` (``x`` → ``x-00001-of-00003.gguf`` ...); a plain ``x.gguf`` is refused as ambiguous.
    ``merge_shards=True`` writes one file instead; ``split_max_size`` (bytes, or "4G"/"500M" as
    ``llama-gguf-split`` takes them) or ``split_max_tensors`` re-split the output exactly as
    ``llama-gguf-split --split`` would divide it. All shards appear together, only when all are complete.
    ``out`` defaults to ``<model stem>-lora.gguf`` next to the model (``<prefix>-lora`` for a shard); it appears
    only when complete and is never one of the inputs. It must be a regular file or a new name: a device, FIFO or socket raises
    ``SpecialFileError`` (a ``ValueError``), a directory ``IsADirectoryError``, before any work. Inputs must be
    regular files (a FIFO or device raises ``SpecialFileError`` without being opened). ``progress`` is called
    with a :class:`PatchProgress` as the work advances; an exception from it (or Ctrl-C) cancels the patch and
    writes nothing. (A Ctrl-C that arrives after the output was renamed into place is raised once the call
    returns; the output is then complete.)
    ``initial``: for one PEFT adapter trained from an OLoRA, PiSSA, CorDA or LoRA-GA initialisation (which
    changed the base weights), the adapter folder PEFT saved before training. The merge is then PEFT's
    conversion to a plain LoRA on the original model, ΔW = s·(B·A − B₀·A₀)
    (``save_pretrained(path_initial_model_for_weight_conversion=...)``).
    """
    rule = split_rule(merge_shards, split_max_size, split_max_tensors)
    out_path = Path(out) if out is not None else default_output_path(model, single_file=rule == _native.SplitRule.merge())
    _native.check_output_path(os.fspath(out_path))
    for given in (model, base):  # refused here, before any adapter is loaded, rather than when opened
        if given is not None:
            _native.check_input_path(os.fspath(given))
    entries = _adapter_list(adapter, scale)
    if initial is None:
        loaded = [(load_adapter(a, model=model), s) for a, s in entries]
    else:
        loaded = _with_initial(entries, Path(initial), model)

    names = [Path(a.source).name for a, _ in loaded]
    extra = {
        "ggml_lora.version": _native.__version__,
        "ggml_lora.adapters": MetadataValue(names, GGUFValueType.ARRAY, GGUFValueType.STRING),
        "ggml_lora.adapter_scales": MetadataValue([s for _, s in loaded], GGUFValueType.ARRAY, GGUFValueType.FLOAT32),
    }
    if base is not None:
        extra["ggml_lora.base"] = Path(base).name
    if intermediate is not None:
        extra["ggml_lora.intermediate"] = intermediate
    weights = _imatrix_entries(imatrix)
    if weights is not None:
        extra["ggml_lora.imatrix"] = Path(weights[0]).name
    try:
        outcome = _native.patch(
            os.fspath(model),
            loaded,
            os.fspath(base) if base is not None else None,
            os.fspath(out_path),
            out_type=out_type,
            intermediate=intermediate,
            threads=threads,
            sync=sync,
            extra_metadata=_typed_all(extra),
            progress=progress,
            tensor_types=list(tensor_types.items() if isinstance(tensor_types, Mapping) else tensor_types or []),
            imatrix=weights,
            keep_lora=keep_lora,
            split=rule,
            written=_written.current(),
        )
    except _native.PatchError as exc:
        _add_advice(exc)
        raise
    result = PatchResult(
        out=Path(outcome.outputs[0]),
        outputs=[Path(p) for p in outcome.outputs],
        tensors=[TensorQuality._from_native(row) for row in outcome.tensors],
        copied=outcome.copied,
        bytes_written=outcome.bytes_written,
        seconds=outcome.seconds,
        used_base=base is not None,
        notes=outcome.notes,
    )
    result.suggestions = _suggestions(result, base, out_type)
    return result
