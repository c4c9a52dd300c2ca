"""The ``ggml-lora`` command line."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Sequence

from . import _native, _written
from ._format import human_bytes, summarize_value
from .gguf import GGUFFile


class _Float32:
    """A float shown with the shortest repr that round-trips through float32 (1e-05, not 9.99999974e-06)."""

    def __init__(self, value: float) -> None:
        import numpy as np

        self.text = repr(float(np.format_float_positional(np.float32(value), unique=True, trim="-"))) \
            if abs(value) < 1e16 else np.format_float_scientific(np.float32(value), unique=True, trim="-")

    def __repr__(self) -> str:
        return self.text


def _float32_repr(value: object) -> object:
    if isinstance(value, list):
        return [_float32_repr(v) for v in value]
    return _Float32(value) if isinstance(value, float) else value


def _cmd_info(args: argparse.Namespace) -> int:
    from .adapter_info import adapter_format, describe_adapter

    fmt = adapter_format(args.file)
    if fmt is not None:
        print("\n".join(describe_adapter(args.file).lines()))
        if fmt != "gguf":  # a GGUF adapter is listed as any GGUF file below
            return 0
        print()
    with GGUFFile(args.file) as f:
        alignment = f", alignment {f.alignment}" if not f.container.startswith("legacy") else ""
        print(f"{f.path}: {f.container}, {human_bytes(f.file_size)}{alignment}, "
              f"{len(f.fields)} metadata keys, {len(f.tensors)} tensors")
        if f.container.startswith("legacy"):
            print("  (read as the GGUF model convert_llama_ggml_to_gguf.py makes of it; "
                  "ggml-lora convert-model writes it)")
        if len(f.shards) > 1:
            total = len(f.tensors)
            print(f"  split: {len(f.shards)} shards, split.tensors.count {total} (split.* keys not listed below)")
            for k, (path, n) in enumerate(f.shards):
                size = sum(t.nbytes for t in f.tensors.values() if t.shard == k)
                print(f"    shard {k + 1}/{len(f.shards)}: {path.name}  {n} tensors, {human_bytes(size)} of data")
        print()
        print("metadata:")
        width = max((len(k) for k in f.fields), default=0)
        for key, field in f.fields.items():
            type_name = field.type.name + (f"[{field.sub_type.name}]" if field.sub_type is not None else "")
            value = field.value
            if field.type.name == "FLOAT32" or field.sub_type is not None and field.sub_type.name == "FLOAT32":
                value = _float32_repr(value)
            print(f"  {key:<{width}}  {type_name:<16} {summarize_value(value, max_items=args.max_items)}")
        print()
        counts: dict[str, int] = {}
        for t in f.tensors.values():
            counts[t.type] = counts.get(t.type, 0) + 1
        print("tensor types: " + ", ".join(f"{n} {ty}" for ty, n in sorted(counts.items(), key=lambda kv: -kv[1])))
        print()
        print("tensors:")
        rows = [(t.name, t.type, "x".join(map(str, t.shape)), human_bytes(t.nbytes)) for t in f.tensors.values()]
        header = ("name", "type", "shape", "size")
        widths = [max(len(r[i]) for r in rows + [header]) for i in range(4)]
        print("  " + "  ".join(h.ljust(w) for h, w in zip(header, widths)))
        for row in rows:
            print("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)))
    return 0


class _ProgressBar:
    """A one-line progress bar on a terminal (tensors, bytes, rate, ETA); silent elsewhere."""

    def __init__(self, stream=None) -> None:  # type: ignore[no-untyped-def]
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.monotonic()
        self.last_draw = 0.0

    def __call__(self, p) -> None:  # type: ignore[no-untyped-def]
        if not self.enabled:
            return
        now = time.monotonic()
        finished = p.tensors_done == p.tensors_total
        if now - self.last_draw < 0.1 and not finished:
            return
        self.last_draw = now
        elapsed = max(now - self.start, 1e-9)
        fraction = p.bytes_done / p.bytes_total if p.bytes_total else 1.0
        rate = p.bytes_done / elapsed
        eta = (p.bytes_total - p.bytes_done) / rate if rate > 0 else 0.0
        width = 24
        filled = int(width * fraction)
        bar = "#" * filled + "." * (width - filled)
        line = (
            f"\r[{bar}] {p.tensors_done}/{p.tensors_total} tensors  {human_bytes(p.bytes_done)}/"
            f"{human_bytes(p.bytes_total)}  {human_bytes(rate)}/s  ETA {eta:4.1f}s  {p.tensor[:40]:<40}"
        )
        self.stream.write(line)
        if finished:
            self.stream.write("\n")
        self.stream.flush()


def _parse_scaled(values: list[str]) -> tuple[str, float]:
    """``--lora-scaled FILE:SCALE`` or llama.cpp's ``--lora-scaled FILE SCALE``."""
    if len(values) == 2:
        path, scale = values
    elif len(values) == 1 and ":" in values[0]:
        path, scale = values[0].rsplit(":", 1)
    else:
        raise ValueError(f"--lora-scaled expects ADAPTER:SCALE (or ADAPTER SCALE), got {' '.join(values)!r}")
    try:
        return path, float(scale)
    except ValueError:
        raise ValueError(f"--lora-scaled {' '.join(values)}: scale {scale!r} is not a number") from None


def _parse_tensor_type(value: str) -> tuple[str, str]:
    """``--tensor-type PATTERN=TYPE`` as llama-quantize spells it."""
    pattern, sep, type_name = value.partition("=")
    if not sep or not pattern or not type_name:
        raise ValueError(f"--tensor-type expects PATTERN=TYPE (e.g. attn_v=q8_0), got {value!r}")
    return pattern, type_name


def _cmd_patch(args: argparse.Namespace) -> int:
    from .patch import patch

    adapters: list[tuple[str, float]] = [(a, 1.0) for a in args.lora or []]
    adapters += [_parse_scaled(v) for v in args.lora_scaled or []]
    if not adapters:
        raise ValueError("give at least one adapter with --lora ADAPTER or --lora-scaled ADAPTER:SCALE")
    bar = _ProgressBar() if not args.quiet else None
    result = patch(
        args.model,
        adapters,
        base=args.lora_base,
        out=args.output,
        threads=args.threads,
        out_type=args.out_type,
        intermediate=args.intermediate,
        progress=bar,
        tensor_types=[_parse_tensor_type(v) for v in args.tensor_type or []],
        imatrix=args.imatrix,
        keep_lora=args.keep_lora,
        merge_shards=args.merge_shards,
        split_max_size=args.split_max_size,
        split_max_tensors=args.split_max_tensors,
        initial=args.initial,
    )
    if args.table:
        print(result.table())
        print()
    print(result.summary())
    return 0


def _cmd_convert_model(args: argparse.Namespace) -> int:
    from .gguf import convert_model

    out = args.output if args.output is not None else str(Path(args.model).with_suffix(".gguf"))
    paths = convert_model(args.model, out, context_length=args.context_length, rms_eps=args.eps,
                          split_max_size=args.split_max_size, split_max_tensors=args.split_max_tensors)
    with GGUFFile(paths[0]) as f:
        print(f"wrote {paths[0]}{f' and {len(paths) - 1} more shards' if len(paths) > 1 else ''}: "
              f"{len(f.tensors)} tensors copied as they are, {human_bytes(f.file_size)}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .example import write_example_adapter, write_example_model
    from .patch import patch

    folder = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="ggml-lora-demo-"))
    folder.mkdir(parents=True, exist_ok=True)
    f16 = write_example_model(folder / "example-f16.gguf", "f16")
    q4 = write_example_model(folder / "example-q4_0.gguf", "q4_0")
    adapter = write_example_adapter(folder / "example-lora.gguf")
    print(f"example files in {folder}: {f16.name}, {q4.name}, {adapter.name}\n")

    print(f"$ ggml-lora patch -m {q4.name} --lora {adapter.name} -o example-merged-naive.gguf")
    naive = patch(q4, adapter, out=folder / "example-merged-naive.gguf")
    print(naive.summary(), "\n")
    print(f"$ ggml-lora patch -m {q4.name} --lora {adapter.name} --lora-base {f16.name} -o example-merged-q4_0.gguf")
    merged = patch(q4, adapter, base=f16, out=folder / "example-merged-q4_0.gguf")
    print(merged.summary())
    if args.table:
        print()
        print(merged.table())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ggml-lora",
        description="Merge LoRA adapters into (quantized) llama.cpp GGUF models; inspect GGUF files.",
        epilog="exit codes: 0 done; 1 an error in the input (one line on stderr); 2 usage; 3 an internal error "
        "(a bug; --debug shows the traceback); 130 interrupted",
    )
    parser.add_argument("--version", action="version", version=f"ggml-lora {_native.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser("info", help="show a GGUF file's version, metadata and tensors (split and legacy too)")
    info.add_argument("file", help="GGUF file, any shard of a split model, a legacy GGML/GGJT model, or an adapter "
                                   "(PEFT folder, GGUF adapter, ggla file)")
    info.add_argument("--max-items", type=int, default=8, help="array items shown per metadata value (default 8)")
    info.set_defaults(func=_cmd_info)

    patch = sub.add_parser(
        "patch",
        help="merge LoRA adapters into a (quantized) GGUF model",
        description="Merge LoRA adapters into a GGUF model, keeping its quantization. Patched tensors are "
        "requantized bit-exactly as ggml would; untouched tensors are copied byte for byte. The output appears "
        "only when complete.",
    )
    patch.add_argument("-m", "--model", required=True,
                       help="the model to patch (GGUF of any quantization, any shard of a split model, or a legacy "
                       "GGML/GGJT file)")
    patch.add_argument("--lora", action="append", metavar="ADAPTER",
                       help="adapter (llama.cpp GGUF, legacy ggla, or PEFT directory), scale 1; repeatable")
    patch.add_argument("--lora-scaled", action="append", nargs="+", metavar="ADAPTER:SCALE",
                       help="adapter with a scale (ADAPTER:SCALE or ADAPTER SCALE); repeatable")
    patch.add_argument("--lora-base", metavar="BASE",
                       help="higher-precision GGUF of the same model (f16/f32/bf16; split or legacy too): patched "
                       "tensors start from it")
    patch.add_argument("-o", "--output", metavar="OUT",
                       help="output GGUF (default: <model>-lora.gguf beside the model). A split output: the first "
                       "shard's name (out-00001-of-00003.gguf) or a prefix without .gguf (out)")
    patch.add_argument("-t", "--threads", type=int, help="worker threads (default: all cores)")
    patch.add_argument("--out-type", metavar="TYPE",
                       help="type of every patched tensor (e.g. q4_k, q6_k, q8_0, f16; default: each as in the model)")
    patch.add_argument("--intermediate", choices=["f16", "bf16"],
                       help="round W' to this type before quantizing, exactly like PEFT merge -> "
                       "convert_hf_to_gguf -> llama-quantize (default: quantize from f32, most accurate)")
    patch.add_argument("--tensor-type", action="append", metavar="PATTERN=TYPE",
                       help="type of the patched tensors whose name matches PATTERN (a regular expression, as "
                       "llama-quantize's --tensor-type); first match wins, before --out-type; repeatable")
    patch.add_argument("--imatrix", metavar="FILE",
                       help="importance matrix (llama-imatrix output, GGUF or legacy .dat): patched tensors are "
                       "quantized with it, as llama-quantize --imatrix does")
    patch.add_argument("--initial", metavar="DIR",
                       help="the PEFT adapter saved before training, for an adapter trained from an OLoRA/PiSSA/"
                            "CorDA/LoRA-GA initialisation (merged as PEFT converts it: s*(B*A - B0*A0))")
    patch.add_argument("--keep-lora", type=float, metavar="FRACTION",
                       help="write a patched tensor in the next larger type of its family (q4_K->q5_K->q6_K->q8_0, "
                       "q4_0->q5_0->q8_0) when its type would keep less than FRACTION of the LoRA change")
    shards = patch.add_mutually_exclusive_group()
    shards.add_argument("--merge-shards", action="store_true",
                        help="write a split model's output as one file (default: the same shards as the model)")
    shards.add_argument("--split-max-size", metavar="SIZE",
                        help="split the output like llama-gguf-split --split-max-size (e.g. 4G, 500M, or bytes)")
    shards.add_argument("--split-max-tensors", type=int, metavar="N",
                        help="split the output like llama-gguf-split --split-max-tensors (N tensors per shard)")
    patch.add_argument("--table", action="store_true", help="print the per-tensor quality table")
    patch.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    patch.set_defaults(func=_cmd_patch)

    conv = sub.add_parser(
        "convert-model",
        help="convert a legacy GGML/GGMF/GGJT model (.bin) to GGUF, tensors copied without requantization",
        description="Write a legacy llama model file (ggml, ggmf v1, ggjt v1-v3) as a GGUF that llama.cpp loads, "
        "as llama.cpp's convert_llama_ggml_to_gguf.py does: tensors renamed and copied as they are, hyperparameters "
        "as llama.* keys, the vocabulary as tokenizer.ggml.*. Also merges or re-splits a split GGUF model.",
    )
    conv.add_argument("model", metavar="MODEL", help="legacy model file (or any shard of a split GGUF model)")
    conv.add_argument("-o", "--output", metavar="OUT", help="output GGUF (default: MODEL with the .gguf suffix)")
    conv.add_argument("--context-length", type=int, metavar="N",
                      help="llama.context_length to record (default 2048, as the llama.cpp script)")
    conv.add_argument("--eps", type=float, metavar="EPS",
                      help="RMS norm epsilon to record (default 5e-06, as the llama.cpp script; LLaMA-2 uses 1e-5)")
    conv_split = conv.add_mutually_exclusive_group()
    conv_split.add_argument("--split-max-size", metavar="SIZE", help="split the output (e.g. 4G)")
    conv_split.add_argument("--split-max-tensors", type=int, metavar="N", help="split the output (N tensors per shard)")
    conv.set_defaults(func=_cmd_convert_model)

    demo = sub.add_parser("demo", help="patch a small built-in example model (with and without --lora-base) and show the quality report")
    demo.add_argument("--dir", help="folder for the example files (default: a new temporary folder)")
    demo.add_argument("--table", action="store_true", help="print the per-tensor quality table")
    demo.set_defaults(func=_cmd_demo)

    from .convert.cli import add_convert_subcommand

    add_convert_subcommand(sub)
    for p in [parser, *sub.choices.values()]:
        _add_debug_flag(p)
    return parser


#: Exit codes: 0 done; 1 an error in the input or the environment (one line on stderr); 2 a usage error (from
#: argparse, with the usage); 3 an internal error, which is a bug (one line; ``--debug`` prints the traceback);
#: 130 interrupted.
EXIT_ERROR = 1
EXIT_INTERNAL = 3
#: Longest error message printed (a message quoting hostile input stays readable).
_MAX_MESSAGE = 2000


def _one_line(exc: BaseException) -> str:
    """The exception's message on one line (KeyError's quotes removed), cut to a readable length."""
    text = exc.args[0] if isinstance(exc, KeyError) and len(exc.args) == 1 else str(exc)
    text = " ".join(str(text).split()) or type(exc).__name__
    return text if len(text) <= _MAX_MESSAGE else text[:_MAX_MESSAGE] + " ..."


def _add_debug_flag(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: given before or after the subcommand, one does not reset the other.
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="on an error, print the Python traceback too")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code.

    Every error is one line ``ggml-lora: error: ...`` on stderr: the API's documented exceptions for bad input
    (``ValueError`` subclasses such as ``GGUFError``, ``PatchError``, ``ConversionError``; ``OSError``) and running
    out of memory give exit 1; anything else is a bug in ggml-lora and gives exit 3 with a line that says so.
    ``--debug`` adds the traceback.
    """
    args = build_parser().parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    with _written.recording() as written:
        try:
            return int(args.func(args))
        except (OSError, ValueError, KeyError, MemoryError) as exc:
            if debug:
                traceback.print_exc()
            message = _one_line(exc) if not isinstance(exc, MemoryError) else f"out of memory ({_one_line(exc)})"
            print(f"ggml-lora: error: {message}", file=sys.stderr)
            return EXIT_ERROR
        except KeyboardInterrupt:
            # The writers record each output once it is in place; an interrupt that arrives later must say so.
            if written:
                print(f"ggml-lora: interrupted after the output was complete: {', '.join(written)}", file=sys.stderr)
            else:
                print("ggml-lora: interrupted; no output was written", file=sys.stderr)
            return 130
        except Exception as exc:  # noqa: BLE001 - the last resort: one line, never a bare traceback
            if debug:
                traceback.print_exc()
            print(f"ggml-lora: internal error (a bug in ggml-lora; run with --debug for the traceback and please "
                  f"report it): {type(exc).__name__}: {_one_line(exc)}", file=sys.stderr)
            return EXIT_INTERNAL
