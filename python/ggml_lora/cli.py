"""The ``ggml-lora`` command line."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from . import _native
from ._format import human_bytes, summarize_value
from .gguf import GGUFFile


def _cmd_info(args: argparse.Namespace) -> int:
    with GGUFFile(args.file) as f:
        print(f"{f.path}: GGUF v{f.version}, {human_bytes(f.file_size)}, alignment {f.alignment}, "
              f"{len(f.fields)} metadata keys, {len(f.tensors)} tensors")
        print()
        print("metadata:")
        width = max((len(k) for k in f.fields), default=0)
        for key, field in f.fields.items():
            type_name = field.type.name + (f"[{field.sub_type.name}]" if field.sub_type is not None else "")
            print(f"  {key:<{width}}  {type_name:<16} {summarize_value(field.value, max_items=args.max_items)}")
        print()
        print("tensors:")
        rows = [(t.name, t.type, "x".join(map(str, t.shape)), human_bytes(t.nbytes)) for t in f.tensors.values()]
        header = ("name", "type", "shape", "size")
        widths = [max(len(r[i]) for r in rows + [header]) for i in range(4)]
        print("  " + "  ".join(h.ljust(w) for h, w in zip(header, widths)))
        for row in rows:
            print("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .example import write_example_model

    folder = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="ggml-lora-demo-"))
    folder.mkdir(parents=True, exist_ok=True)
    model = write_example_model(folder / "example-q4_0.gguf")
    print(f"wrote an example model: {model}\n")
    return _cmd_info(argparse.Namespace(file=model, max_items=args.max_items))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ggml-lora",
        description="Merge LoRA adapters into (quantized) llama.cpp GGUF models; inspect GGUF files.",
    )
    parser.add_argument("--version", action="version", version=f"ggml-lora {_native.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser("info", help="show a GGUF file's version, metadata and tensors")
    info.add_argument("file", help="GGUF file")
    info.add_argument("--max-items", type=int, default=8, help="array items shown per metadata value (default 8)")
    info.set_defaults(func=_cmd_info)

    demo = sub.add_parser("demo", help="write a small built-in example model and show it")
    demo.add_argument("--dir", help="folder for the example files (default: a new temporary folder)")
    demo.add_argument("--max-items", type=int, default=8, help=argparse.SUPPRESS)
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (OSError, ValueError, KeyError) as exc:
        print(f"ggml-lora: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ggml-lora: interrupted; no output was written", file=sys.stderr)
        return 130
