"""``ggml-lora convert``: PEFT LoRA adapter folder -> llama.cpp adapter file."""

from __future__ import annotations

import argparse
from typing import Any

from .core import DEFAULT_GGLA_NAME, DEFAULT_GGUF_NAME, convert, peft_to_lora
from .writers import GGUF_OUTTYPES


def _cmd_convert(args: argparse.Namespace) -> int:
    from ..gguf import open as gguf_open

    out = convert(args.peft_dir, args.out, base=args.base, out_type=args.out_type, format=args.format)
    size = out.stat().st_size
    if args.format == "gguf":
        with gguf_open(out) as f:
            n = len(f.tensors) // 2
            alpha = f.metadata.get("adapter.lora.alpha")
            arch = f.metadata.get("general.architecture")
            types = sorted({t.type for t in f.tensors.values()})
        how = (f"adapter.lora.alpha = {alpha:g} (llama.cpp scale alpha/r is PEFT's for every tensor)" if alpha
               else "adapter.lora.alpha = 0 (each tensor's PEFT scale is folded into lora_b)")
        print(f"wrote {out} ({size} bytes): GGUF LoRA adapter, arch {arch}, {n} tensor pairs "
              f"({', '.join(types)}), {how}")
    else:
        print(f"wrote {out} ({size} bytes): legacy ggla LoRA adapter ({args.out_type})")
    return 0


def add_convert_subcommand(subparsers: Any) -> None:
    """Register ``convert PEFT_DIR --base MODEL [-o OUT] [--outtype|--out-type T] [--format gguf|ggla]``."""
    p = subparsers.add_parser(
        "convert",
        help="convert a Hugging Face PEFT LoRA adapter into a llama.cpp LoRA adapter (no torch, no network)",
        description=(
            "Convert a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors or .bin) into "
            "llama.cpp's GGUF LoRA adapter, or the legacy ggla file. The scale is exact for every tensor "
            "(rslora, rank_pattern, alpha_pattern); DoRA, LoHa/LoKr/IA3, modules_to_save and bias are refused."
        ),
    )
    p.add_argument("peft_dir", metavar="PEFT_DIR", help="PEFT adapter folder")
    p.add_argument("--base", required=True, metavar="MODEL",
                   help="the base model: a GGUF file (only metadata is read) or an HF folder with config.json")
    p.add_argument("-o", "--out", metavar="OUT",
                   help=f"output file or folder (default: PEFT_DIR/{DEFAULT_GGUF_NAME}, or {DEFAULT_GGLA_NAME} "
                        "for --format ggla)")
    p.add_argument("--outtype", "--out-type", dest="out_type", default="f32", choices=list(GGUF_OUTTYPES),
                   help="tensor type (default f32; ggla: f32 or f16); --outtype is llama.cpp's spelling, --out-type "
                        "the one of this tool's patch command")
    p.add_argument("--format", default="gguf", choices=["gguf", "ggla"],
                   help="gguf: llama.cpp's adapter GGUF (default); ggla: the legacy pre-GGUF adapter file")
    p.set_defaults(func=_cmd_convert)


__all__ = ["add_convert_subcommand", "peft_to_lora"]
