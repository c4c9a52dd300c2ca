"""PEFT LoRA -> llama.cpp LoRA adapters: the module checks and the typed plan the core builds the adapter from."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import _native
from .errors import ConversionError
from .mapping import BaseInfo, NameMapper, read_base
from .peft import DORA_REFUSAL, PeftAdapter, read_peft_dir
from .writers import GGLA_OUTTYPES, GGUF_OUTTYPES, write_ggla, write_gguf

PREFIX = "base_model.model."
_SUFFIXES = {
    ".lora_A.weight": ("linear", "A"),
    ".lora_B.weight": ("linear", "B"),
    ".lora_embedding_A": ("embedding", "A"),
    ".lora_embedding_B": ("embedding", "B"),
}
#: PEFT's saved key of a DoRA magnitude vector (PEFT versions differ; with or without the adapter name).
_MAGNITUDE_SUFFIXES = (
    ".lora_magnitude_vector.default.weight",
    ".lora_magnitude_vector.weight",
    ".lora_magnitude_vector.default",
    ".lora_magnitude_vector",
)
DEFAULT_GGUF_NAME = "ggml-adapter-model.gguf"
DEFAULT_GGLA_NAME = "ggml-adapter-model.bin"


@dataclass
class LoraTensors:
    """A LoRA adapter in llama.cpp's GGUF naming and layout.

    ``tensors`` maps ``"<model tensor>.lora_a"`` / ``".lora_b"`` to float32 arrays (numpy layout):
    linear ``lora_a`` (r, n_in) [ggml ne (n_in, r)], ``lora_b`` (n_out, r); ``token_embd``: ``lora_a``
    (n_vocab, r) [ne (r, n_vocab)], ``lora_b`` (n_embd, r). The delta llama.cpp applies to a tensor is
    ``s * lora_b @ lora_a`` (``s * lora_a @ lora_b.T`` for token_embd) with ``s = alpha / r`` (r = the
    tensor's rank), or ``s = 1`` when ``alpha == 0`` (then the PEFT scale is already folded into ``lora_b``).

    DoRA (only from ``peft_to_lora(..., allow_dora=True)``; then ``dora`` is True and ``alpha`` is 0): each DoRA
    tensor also has ``"<model tensor>.dora_m"``, the float32 magnitude vector (n_out,) in the GGUF row order, and
    the merged weight is ``(m / ||W + s*B@A||_row) * (W + s*B@A)`` with ``s`` the user's adapter scale alone
    (PEFT's scale is folded into ``lora_b``; the norm is over each row of the (n_out, n_in) weight).
    """

    architecture: str
    alpha: float
    tensors: dict[str, np.ndarray]
    metadata: dict[str, Any] = field(default_factory=dict)
    dora: bool = False

    def scale(self, name: str) -> float:
        """The scale llama.cpp applies to the tensor ``name`` (``"blk.0.attn_q.weight"``), at adapter scale 1."""
        return _native.llama_scale(self.alpha, self.tensors[name + ".lora_b"].shape[1], 1.0)


@dataclass(frozen=True)
class TargetPlan:
    """One model tensor's part of the plan the core builds a PEFT adapter from (``rust/core/src/peft.rs``).

    ``a``/``b``/``magnitude`` name tensors of the weights file; ``r``/``alpha`` are PEFT's for the module (after
    the patterns); ``permute`` is ``(n_head, n_head_kv)`` when llama.cpp permuted the base tensor's rotary rows
    (q: ``n_head_kv == n_head``); ``embedding`` for ``lora_embedding_A/B`` on token_embd.
    """

    target: str
    a: str
    b: str
    magnitude: str | None
    embedding: bool
    r: int
    alpha: float
    permute: tuple[int, int] | None


@dataclass(frozen=True)
class PeftPlan:
    """The typed plan handed to :meth:`_native.Adapter.from_peft`: the targets in pair order."""

    source: str
    architecture: str
    use_rslora: bool
    targets: list[TargetPlan]


@dataclass
class _Module:
    module: str
    kind: str | None
    a: _native.WeightInfo | None = None
    b: _native.WeightInfo | None = None
    m: _native.WeightInfo | None = None  # DoRA magnitude vector


def _group(tensors: list[_native.WeightInfo], source: object = "the adapter") -> list[_Module]:
    modules: dict[str, _Module] = {}
    for info in sorted(tensors, key=lambda t: t.name):
        key = info.name
        if "lora_magnitude_vector" in key:
            for suffix in _MAGNITUDE_SUFFIXES:
                if key.endswith(suffix):
                    break
            else:
                raise ConversionError(f"tensor {key!r}: not a DoRA magnitude vector key PEFT writes")
            if not key.startswith(PREFIX):
                raise ConversionError(f"tensor {key!r}: expected PEFT's {PREFIX!r} prefix")
            module = key[len(PREFIX): -len(suffix)]
            entry = modules.setdefault(module, _Module(module, None))
            if entry.m is not None:
                raise ConversionError(f"module {module!r}: duplicate DoRA magnitude vector ({entry.m.name!r} and "
                                      f"{key!r})")
            entry.m = info
            continue
        for suffix, (kind, which) in _SUFFIXES.items():
            if key.endswith(suffix):
                break
        else:
            if key.endswith(".lora_B.bias") or key.endswith(".bias"):
                raise ConversionError(f"tensor {key!r}: trained biases cannot be represented in a LoRA adapter")
            raise ConversionError(
                f"tensor {key!r} is not a LoRA factor (lora_A/lora_B/lora_embedding_A/B): full weights "
                "(modules_to_save), trainable tokens and other PEFT extras cannot be represented in a LoRA adapter"
            )
        if not key.startswith(PREFIX):
            raise ConversionError(f"tensor {key!r}: expected PEFT's {PREFIX!r} prefix")
        module = key[len(PREFIX): -len(suffix)]
        entry = modules.setdefault(module, _Module(module, kind))
        if entry.kind is None:
            entry.kind = kind
        if entry.kind != kind:
            raise ConversionError(f"module {module!r} has both linear and embedding LoRA factors")
        if getattr(entry, which.lower()) is not None:
            raise ConversionError(f"module {module!r}: duplicate lora_{which} tensor")
        setattr(entry, which.lower(), info)
    for entry in modules.values():
        if entry.a is None or entry.b is None:
            missing = "A" if entry.a is None else "B"
            raise ConversionError(f"module {entry.module!r}: lora_{missing} factor is missing")
    if not modules:
        raise ConversionError(f"{source}: the adapter holds no LoRA tensors")
    return list(modules.values())


def _block_of(name: str) -> int | None:
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "blk" and parts[1].isdigit():
        return int(parts[1])
    return None


def _core(call: Any, *args: Any) -> Any:
    """A core call whose refusals (ValueError subclasses) become :class:`ConversionError` with their facts."""
    try:
        return call(*args)
    except OSError:
        raise
    except ValueError as exc:
        raise ConversionError.wrapping(exc) from None


def _refuse_resized_vocabulary(tensors: list[_native.WeightInfo], mapper: NameMapper, info: BaseInfo) -> None:
    """A saved embedding or head (``….base_layer.weight``, PEFT's ``save_embedding_layers``) with another number
    of rows than the model's tensor means the vocabulary was resized in training: new tokens, whose strings the
    model's tokenizer metadata does not have (and this tool does not invent)."""
    if info.tensor_shapes is None:
        return
    for weight in tensors:
        if not weight.name.startswith(PREFIX) or not weight.name.endswith(".base_layer.weight"):
            continue
        module = weight.name[len(PREFIX): -len(".base_layer.weight")]
        name = mapper.gguf_name(module)
        shape = info.tensor_shapes.get(name) if name is not None else None
        if shape is not None and len(weight.shape) == 2 and tuple(weight.shape)[1:] == tuple(shape)[1:] \
                and weight.shape[0] != shape[0]:
            raise ConversionError(
                f"tensor {weight.name!r}: the adapter's {module} has {weight.shape[0]} rows but the model's {name} "
                f"has {shape[0]}: the vocabulary was resized from {shape[0]} to {weight.shape[0]} tokens in "
                "training. The tokenizer metadata would have to change too, and this tool does not invent token "
                "strings; convert the fine-tuned model (with its tokenizer) instead"
            )


def peft_adapter(peft_dir: str | os.PathLike[str], base: Any, *, allow_dora: bool = False,
                 with_initial: bool = False) -> tuple[_native.Adapter, PeftAdapter, BaseInfo]:
    """Read a PEFT folder's config and weights header, check every module against the base model, and have the
    core build the adapter from the plan. Its factors stay in the weights file (mapped) until they are used:
    patching reads each pair when its target comes up; :func:`peft_to_lora` reads them all."""
    adapter = read_peft_dir(peft_dir, allow_dora=allow_dora, with_initial=with_initial)
    info: BaseInfo = read_base(base)
    mapper = NameMapper(info)
    config = adapter.config
    import gguf

    q_k = {gguf.MODEL_TENSOR.ATTN_Q: "q", gguf.MODEL_TENSOR.ATTN_K: "k"}
    seen: dict[str, str] = {}
    targets: list[TargetPlan] = []
    _refuse_resized_vocabulary(adapter.weights.tensors, mapper, info)
    modules = _group(adapter.weights.tensors, adapter.weights_file)
    for m in modules:
        if m.m is not None and not config.use_dora:
            if not allow_dora:
                raise ConversionError(f"tensor {m.m.name!r}: DoRA magnitude vector: " + DORA_REFUSAL)
            raise ConversionError(f"tensor {m.m.name!r}: a DoRA magnitude vector, but adapter_config.json does "
                                  "not set use_dora; refusing the inconsistent adapter")
        if config.use_dora and m.kind == "embedding":
            raise ConversionError(f"module {m.module!r}: DoRA on an embedding (lora_embedding_A/B) is not supported")
        if config.use_dora and m.m is None:
            raise ConversionError(f"module {m.module!r}: adapter_config.json sets use_dora but the module has no "
                                  "DoRA magnitude vector (lora_magnitude_vector)")
    for m in modules:
        a, b = m.a, m.b
        assert a is not None and b is not None  # _group guarantees both
        a_shape, b_shape = tuple(a.shape), tuple(b.shape)
        if len(a_shape) != 2 or len(b_shape) != 2:
            raise ConversionError(f"module {m.module!r}: LoRA factors must be 2-D, got {a_shape} and {b_shape} "
                                  "(convolution LoRA is not supported)")
        if a_shape[0] != b_shape[1]:
            raise ConversionError(f"module {m.module!r}: lora_A {a_shape} and lora_B {b_shape} disagree on the "
                                  "rank")
        rank = a_shape[0]
        if m.m is not None and tuple(m.m.shape) != (b_shape[0],):
            raise ConversionError(f"module {m.module!r}: DoRA magnitude vector has shape {tuple(m.m.shape)}, "
                                  f"expected ({b_shape[0]},) (one value per output feature, as lora_B's rows)")
        r_cfg, alpha = config.module_rank_alpha(m.module)
        if rank != r_cfg:
            raise ConversionError(f"module {m.module!r}: factors have rank {rank} but adapter_config.json gives "
                                  f"r = {r_cfg} for it (r / rank_pattern)")
        name = mapper.gguf_name(m.module)
        if name is None and mapper.is_output_head(m.module):
            raise ConversionError(
                f"module {m.module!r}: the adapter has an lm_head LoRA, but architecture {info.architecture!r} has "
                "no separate output tensor (its output head is tied to token_embd); llama.cpp cannot apply it"
            )
        if name is None:
            raise ConversionError(f"module {m.module!r} has no GGUF tensor in architecture {info.architecture!r} "
                                  "(gguf-py TensorNameMap knows no such tensor)")
        if name in seen:
            raise ConversionError(f"modules {seen[name]!r} and {m.module!r} both map to {name!r}")
        seen[name] = m.module
        if "_exps" in name or "_shexp" in name:
            raise ConversionError(f"module {m.module!r} -> {name!r}: LoRA on MoE expert tensors is not supported")
        is_embd = name == "token_embd.weight"
        if name == "output.weight" and info.tied_embeddings:
            raise ConversionError(
                f"module {m.module!r}: the adapter has an lm_head LoRA, but the base model's output head is tied to "
                "token_embd (no output.weight); llama.cpp cannot apply it (llama.cpp issue #9065)"
            )
        permute = None
        if m.kind == "embedding":
            if not is_embd:
                raise ConversionError(f"module {m.module!r}: embedding LoRA maps to {name!r}, not token_embd.weight")
            if info.tied_embeddings:
                raise ConversionError(
                    f"module {m.module!r}: embedding LoRA on a model whose output head is tied to token_embd: "
                    "PEFT's merge changes the output head too while its unmerged forward (and llama.cpp's runtime) "
                    "does not, so no single adapter file is right; refusing"
                )
        else:
            if is_embd:
                raise ConversionError(f"module {m.module!r}: a linear LoRA on token_embd is not representable")
            blk = _block_of(name)
            which = None
            if blk is not None:
                for tensor, tag in q_k.items():
                    if name == gguf.TENSOR_NAMES[tensor].format(bid=blk) + ".weight":
                        which = tag
            if info.permute_qk and which is not None:
                if blk is None or blk >= info.n_blocks:
                    raise ConversionError(f"{name!r}: cannot find its block's head counts")
                n_head = info.n_head[blk]
                permute = (n_head, n_head if which == "q" else info.n_head_kv[blk])
        targets.append(TargetPlan(name, a.name, b.name, m.m.name if m.m is not None else None,
                                  m.kind == "embedding", rank, alpha, permute))
    plan = PeftPlan(str(adapter.path), info.architecture, config.use_rslora, targets)
    native = _core(_native.Adapter.from_peft, adapter.weights, plan)
    if info.tensor_shapes is not None:
        modules_of = {t.target: m.module for t, m in zip(targets, modules)}
        for pair in native.pairs():
            target, rows, cols = pair.target, pair.rows, pair.cols
            shape = info.tensor_shapes.get(target)
            if shape is None:
                raise ConversionError(f"module {modules_of[target]!r} -> {target!r}: the base model has no such "
                                      "tensor")
            if tuple(shape) != (rows, cols):
                raise ConversionError(f"module {modules_of[target]!r} -> {target!r}: the LoRA product has shape "
                                      f"{(rows, cols)} but the base tensor is {tuple(shape)} (numpy order)")
    return native, adapter, info


def peft_to_lora(peft_dir: str | os.PathLike[str], base: Any, *, allow_dora: bool = False) -> LoraTensors:
    """Read a PEFT LoRA adapter folder and return its tensors in llama.cpp's GGUF naming and layout.

    ``base`` is the model the adapter applies to: a GGUF model file (only its metadata and tensor shapes are
    read) or a Hugging Face model folder with ``config.json``. No torch, no network. Raises
    :class:`ConversionError` for anything that cannot be converted exactly.

    DoRA adapters (``use_dora``) are refused unless ``allow_dora``; with it, every linear module's magnitude
    vector is returned as ``"<tensor>.dora_m"`` (rows in GGUF order, the same row transforms as ``lora_b``),
    PEFT's scale is folded into every ``lora_b``, ``alpha`` is 0 and ``dora`` is True (see :class:`LoraTensors`).
    Only the patch engine can apply the result; llama.cpp's adapter files cannot represent it.

    The core builds every tensor from the weights file once (transform and scale in the same pass, see
    ``rust/core/src/peft.rs``): one header alpha when it reproduces PEFT's scale for every module, otherwise
    (and for DoRA) alpha 0 with each module's scale folded into its ``lora_b``.
    """
    native, adapter, info = peft_adapter(peft_dir, base, allow_dora=allow_dora)
    tensors = dict(_core(native.gguf_tensors))
    config = adapter.config
    metadata: dict[str, Any] = {"general.name": adapter.path.resolve().name or "adapter"}
    if config.base_model_name_or_path:
        metadata["general.base_model.count"] = _u32(1)
        metadata["general.base_model.0.name"] = config.base_model_name_or_path
    return LoraTensors(
        architecture=info.architecture,
        alpha=float(native.alpha),
        tensors=tensors,
        metadata=metadata,
        dora=any(name.endswith(".dora_m") for name in tensors),
    )


def _u32(v: int) -> Any:
    from ..gguf import GGUFValueType, MetadataValue

    return MetadataValue(v, GGUFValueType.UINT32)


def convert(
    peft_dir: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    base: Any,
    out_type: str = "f32",
    format: str = "gguf",  # noqa: A002 - public keyword
) -> Path:
    """Convert a PEFT LoRA adapter folder into a llama.cpp adapter file and return its path.

    ``format="gguf"`` (default) writes llama.cpp's LoRA adapter GGUF with tensors in ``out_type`` f32 (default),
    f16, bf16 or q8_0 (q8_0 rows that are not a multiple of 32 long - lora_b with r < 32 - fall back to f16, as
    in llama.cpp). ``format="ggla"`` writes the legacy pre-GGUF adapter file (f32 or f16). ``out`` defaults to
    ``<peft_dir>/ggml-adapter-model.gguf`` (``.bin`` for ggla); an existing folder gets that file name inside it.
    """
    fmt = str(format).lower()
    kind = str(out_type).lower()
    if fmt not in ("gguf", "ggla"):
        raise ConversionError(f"unknown format {format!r}; choose gguf or ggla")
    allowed = GGUF_OUTTYPES if fmt == "gguf" else GGLA_OUTTYPES
    if kind not in allowed:
        raise ConversionError(f"out_type {out_type!r} is not available for {fmt}; choose one of {', '.join(allowed)}")
    default = DEFAULT_GGUF_NAME if fmt == "gguf" else DEFAULT_GGLA_NAME
    if out is None:
        path = Path(peft_dir) / default
    else:
        path = Path(out)
        if path.is_dir():
            path = path / default
    # A device, FIFO or socket (or a folder at PEFT_DIR/<default name>) is refused before any work.
    _native.check_output_path(os.fspath(path))
    lora = peft_to_lora(peft_dir, base)
    _refuse_input_as_output(path, peft_dir, base)
    if fmt == "gguf":
        return write_gguf(lora, path, kind)
    return write_ggla(lora, path, kind)


def _refuse_input_as_output(out: Path, peft_dir: str | os.PathLike[str], base: Any) -> None:
    """Writing over the adapter's own files or the base model would destroy an input: refused by the core's one
    check (``paths::refuse_output_onto_inputs``)."""
    if not out.exists():
        return
    inputs = [p for p in Path(peft_dir).iterdir() if p.is_file()]
    if isinstance(base, (str, os.PathLike)):
        base_path = Path(base)
        inputs += [p for p in base_path.iterdir() if p.is_file()] if base_path.is_dir() else [base_path]
    _core(_native.refuse_output_onto_inputs, out, inputs)
