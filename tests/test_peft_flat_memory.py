"""A PEFT folder is patched in the same flat memory as the equivalent GGUF adapter, and gives the same bytes.

Inputs built here from seeded numpy arrays: a llama model of TinyLlama-shaped layers (n_embd 2048, n_ff 5632,
32 heads / 4 kv heads; a small vocabulary keeps the file small) in f16, written by gguf-py's ``GGUFWriter``; a
rank-128 PEFT adapter on all seven projections of every layer, written with the ``safetensors`` package's numpy
API: two layers (about 37 MB of f32 factors), then four (the adapter twice as large; the model too). Oracle of the equivalent GGUF adapter:
gguf-py's ``GGUFWriter`` with llama.cpp's layout (lora_a = A, lora_b = B, ``adapter.lora.alpha``) and q/k rows of
B permuted as llama.cpp's ``LlamaModel.permute`` permutes the base weights (restated in numpy,
``_helpers.hf_permute``). Neither file is made by the code under test.

Each patch runs in its own process, started by the small launcher of ``benches/bench_patch.py`` (posix_spawn,
then wait4's ``ru_maxrss``: the child's own peak, not inherited from this large pytest process). Both routes run
the same Python code around the patch (the same imports), so the difference is the adapter's handling. The
properties: PEFT and GGUF peak RSS equal within 15%; each route's peak within 15% when the adapter doubles
(factors are read per target, never the whole adapter: an adapter held in memory, as PEFT folders were before,
adds its 37 MB more); the two outputs byte-identical. (Doubling the rank instead doubles the one pair held while
its target is patched: +4 MB for the largest, legitimately.)
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from _helpers import hf_permute
from safetensors.numpy import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benches"))
from bench_patch import Launcher  # noqa: E402  (the measuring helper of the benchmarks)

N_EMBD, N_FF, N_HEAD, N_HEAD_KV, N_VOCAB, RANK = 2048, 5632, 32, 4, 256, 128
KV = N_EMBD * N_HEAD_KV // N_HEAD
#: HF module -> (GGUF name, n_out, n_in)
MODULES = {
    "self_attn.q_proj": ("attn_q", N_EMBD, N_EMBD),
    "self_attn.k_proj": ("attn_k", KV, N_EMBD),
    "self_attn.v_proj": ("attn_v", KV, N_EMBD),
    "self_attn.o_proj": ("attn_output", N_EMBD, N_EMBD),
    "mlp.gate_proj": ("ffn_gate", N_FF, N_EMBD),
    "mlp.up_proj": ("ffn_up", N_FF, N_EMBD),
    "mlp.down_proj": ("ffn_down", N_EMBD, N_FF),
}
ALPHA_PER_RANK = 2  # lora_alpha = 2 r: PEFT's scale 2, carried exactly by one adapter.lora.alpha
TOLERANCE = 0.15

#: The patch run in each measured process: the same imports and call for both routes.
CHILD = "import sys, gguf, ggml_lora; ggml_lora.patch(sys.argv[1], sys.argv[2], out=sys.argv[3], threads=2)"


def write_model(path: Path, n_layer: int) -> None:
    rng = np.random.default_rng(1)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(n_layer)
    w.add_embedding_length(N_EMBD)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_context_length(2048)
    w.add_rope_dimension_count(N_EMBD // N_HEAD)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(1)
    tile = (rng.standard_normal((512, N_FF)) * 0.02).astype(np.float16)  # rows repeated: cheap to make
    w.add_tensor("token_embd.weight", np.resize(tile, (N_VOCAB, N_EMBD)))
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(N_EMBD, np.float32))
        for gguf_name, n_out, n_in in MODULES.values():
            w.add_tensor(f"blk.{i}.{gguf_name}.weight", np.resize(tile[:, :n_in], (n_out, n_in)))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(N_EMBD, np.float32))
    w.add_tensor("output_norm.weight", np.ones(N_EMBD, np.float32))
    w.add_tensor("output.weight", np.resize(tile[:, :N_EMBD], (N_VOCAB, N_EMBD)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_adapters(folder: Path, n_layer: int, rank: int = RANK) -> tuple[Path, Path]:
    """The PEFT folder and the equivalent GGUF adapter, both named ``adapter`` (the output records the name)."""
    rng = np.random.default_rng(n_layer)
    peft_dir, gguf_path = folder / "peft" / "adapter", folder / "gguf" / "adapter"
    peft_dir.mkdir(parents=True)
    gguf_path.parent.mkdir()
    peft: dict[str, np.ndarray] = {}
    w = gguf.GGUFWriter(str(gguf_path), "llama")
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(ALPHA_PER_RANK * rank))
    for i in range(n_layer):
        for module, (gguf_name, n_out, n_in) in MODULES.items():
            a = (rng.standard_normal((rank, n_in)) / np.sqrt(n_in)).astype(np.float32)
            b = (rng.standard_normal((n_out, rank)) * 0.01).astype(np.float32)
            key = f"base_model.model.model.layers.{i}.{module}"
            peft[f"{key}.lora_A.weight"], peft[f"{key}.lora_B.weight"] = a, b
            heads = {"attn_q": N_HEAD, "attn_k": N_HEAD_KV}.get(gguf_name)
            b_gguf = np.ascontiguousarray(hf_permute(b, heads)) if heads else b
            w.add_tensor(f"blk.{i}.{gguf_name}.weight.lora_a", a)
            w.add_tensor(f"blk.{i}.{gguf_name}.weight.lora_b", b_gguf)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    save_file(peft, str(peft_dir / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": ALPHA_PER_RANK * rank,
              "target_modules": [m.split(".")[1] for m in MODULES], "bias": "none"}
    (peft_dir / "adapter_config.json").write_text(json.dumps(config))
    return peft_dir, gguf_path


@pytest.mark.slow
def test_peft_folder_patches_in_the_flat_memory_of_a_gguf_adapter(tmp_path: Path) -> None:
    launcher = Launcher(tmp_path)
    rss: dict[tuple[str, int], float] = {}
    try:
        for n_layer in (2, 4):
            folder = tmp_path / f"layers-{n_layer}"
            folder.mkdir()
            model = folder / "model.gguf"
            write_model(model, n_layer)
            peft_dir, gguf_path = write_adapters(folder, n_layer)
            factor_bytes = (peft_dir / "adapter_model.safetensors").stat().st_size
            assert factor_bytes > (16 << 20) * n_layer  # tens of MB of factors, doubling with the layers
            outputs = {}
            for route, adapter in (("gguf", gguf_path), ("peft", peft_dir)):
                out = folder / f"{route}.gguf"
                run = launcher.run([sys.executable, "-c", CHILD, str(model), str(adapter), str(out)],
                                   f"{route}-{n_layer}")
                rss[route, n_layer] = run["rss_mb"]
                outputs[route] = out.read_bytes()
                out.unlink()
            assert outputs["peft"] == outputs["gguf"], f"{n_layer} layers: the two routes wrote different bytes"
            shutil.rmtree(folder)
    finally:
        launcher.close()
    figures = ", ".join(f"{route} {n} layers: {mb:.0f} MB" for (route, n), mb in rss.items())
    print(f"peak RSS: {figures}")
    for n_layer in (2, 4):
        assert abs(rss["peft", n_layer] - rss["gguf", n_layer]) <= TOLERANCE * rss["gguf", n_layer], figures
    for route in ("gguf", "peft"):
        assert rss[route, 4] <= (1 + TOLERANCE) * rss[route, 2], figures
