"""`python -m compile.synthetic VARIANT OUT`: a full-size Hugging Face checkpoint with random
weights, to measure exports at the scale of real models without their weights.
`python -m compile.synthetic --from CHECKPOINT OUT` writes a real checkpoint's values the same way
(a GGUF's dequantized: the float source on which float-source quantization is measured).

The directory is what `save_pretrained` writes for the variant: `config.json`, sharded
`model-0000k-of-0000n.safetensors` with `model.safetensors.index.json`, and a SentencePiece
`tokenizer.model` of the variant's vocabulary size. Tensors are produced one at a time
(`weights.seeded`; for full-size variants the same values `random:VARIANT` gives) and written
straight into their shard, so writing a 12B checkpoint holds one tensor in memory. Free disk is
checked first. Random weights give nearly flat logits: the parity gate's margin rule is what keeps
its check meaningful on them (`compile.parity`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np

from runtime import contract as ct

from .checkpoints.hf import layer_names
from .config import GemmaConfig, get_variant
from .model import full_size_params, param_shapes
from .tokenizer import tiny_tokenizer
from .weights import safetensors

DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}
def hf_name(cfg: GemmaConfig, ours: str) -> tuple[str, bool]:
    """Our parameter name -> (the transformers state-dict name, whether it is a linear weight,
    stored [out, in] there): the HF loader's table, inverted."""
    if ours == "embed":
        return "model.embed_tokens.weight", False
    if ours == "final_norm":
        return "model.norm.weight", False
    _, i, short = ours.split(".", 2)
    hf, kind = {o: (h, k) for h, (o, k) in layer_names(cfg.family).items()}[short]
    return f"model.layers.{i}.{hf}.weight", kind == "linear"


def hf_config(cfg: GemmaConfig, dtype: str) -> dict:
    """config.json as transformers writes it for this config."""
    d = {"vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
         "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.num_layers,
         "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
         "head_dim": cfg.head_dim, "rms_norm_eps": cfg.norm_eps,
         "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 8192,
         "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "torch_dtype": dtype,
         "tie_word_embeddings": True}
    types = ["sliding_attention" if cfg.layer_type(i) == ct.LOCAL else "full_attention"
             for i in range(cfg.num_layers)]
    if cfg.family == 1:
        return {**d, "model_type": "gemma", "architectures": ["GemmaForCausalLM"],
                "rope_theta": cfg.rope_base_global}
    qpas = cfg.query_pre_attn_scalar   # transformers types it int (256, 144, 168 in real configs)
    d.update(query_pre_attn_scalar=int(qpas) if float(qpas).is_integer() else qpas,
             sliding_window=cfg.sliding_window,
             layer_types=types, attn_logit_softcapping=cfg.attn_softcap,
             final_logit_softcapping=cfg.final_softcap)
    if cfg.family == 2:
        return {**d, "model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"],
                "rope_theta": cfg.rope_base_global}
    full = {"rope_type": "default", "rope_theta": cfg.rope_base_global}
    if cfg.rope_scale_global != 1.0:
        full = {"rope_type": "linear", "factor": cfg.rope_scale_global,
                "rope_theta": cfg.rope_base_global}
    return {**d, "model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"],
            "rope_parameters": {"full_attention": full, "sliding_attention": {
                "rope_type": "default", "rope_theta": cfg.rope_base_local}}}


def write(variant: str, out: Path, seed: int = 0, dtype: str = "bfloat16",
          shard_bytes: int = 2 << 30, progress=None, log=print) -> Path:
    cfg = get_variant(variant)
    params = full_size_params(cfg, seed)
    return write_hf(cfg, params, tiny_tokenizer(cfg.vocab_size)[0], out, dtype, shard_bytes,
                    progress, log, what=f"{cfg.num_params() / 1e9:.2f}B random parameters")


def write_hf(cfg: GemmaConfig, params, tokenizer_model: bytes, out: Path,
             dtype: str = "bfloat16", shard_bytes: int = 2 << 30, progress=None, log=print,
             what: str = "") -> Path:
    """Writes `params` (ours: a mapping name -> array, read one at a time) as a Hugging Face
    directory, one tensor at a time."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty")
    shapes = param_shapes(cfg)
    item = np.dtype(DTYPES[dtype]).itemsize
    sizes = {k: int(np.prod(s, dtype=np.int64)) * item for k, s in shapes.items()}
    need = sum(sizes.values())
    out.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out).free
    if need + (64 << 20) > free:
        raise OSError(f"{cfg.name} at {dtype} needs {need / 1e9:.2f} GB in {out}; "
                      f"{free / 1e9:.2f} GB are free")
    # shards in name order, each up to shard_bytes (a tensor larger than that gets its own)
    shards: list[list[str]] = [[]]
    used = 0
    hf = {k: hf_name(cfg, k) for k in shapes}                 # ours -> (HF name, linear)
    for name in sorted(shapes, key=lambda k: hf[k][0]):
        if shards[-1] and used + sizes[name] > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += sizes[name]
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    bar = progress(total=len(shapes), desc=f"write {cfg.name}", unit="tensor") if progress else None
    weight_map = {}
    t0 = time.perf_counter()
    for names, fname in zip(shards, files):
        specs = {}
        for k in names:
            shape = shapes[k][::-1] if hf[k][1] else shapes[k]                    # HF [out, in]
            specs[hf[k][0]] = (tuple(shape), np.dtype(DTYPES[dtype]))
            weight_map[hf[k][0]] = fname
        by_hf = {hf[k][0]: k for k in names}

        def get(name, by_hf=by_hf):
            k = by_hf[name]
            a = params[k]
            return np.ascontiguousarray(a.T if hf[k][1] else a).astype(DTYPES[dtype])

        safetensors.write(out / fname, specs, get, metadata={"format": "pt"},
                          tick=bar.update if bar else None)
    if bar:
        bar.close()
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": need}, "weight_map": dict(sorted(weight_map.items()))},
        indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(hf_config(cfg, dtype), indent=2) + "\n")
    (out / "tokenizer.model").write_bytes(tokenizer_model)
    log(f"wrote {cfg.name} ({what or 'its parameters'}, {dtype}) to {out}/ "
        f"in {time.perf_counter() - t0:.0f}s: {len(files)} shards, {need / 1e9:.2f} GB")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m compile.synthetic",
                                description="Write a full-size Gemma checkpoint (HF directory) "
                                            "with random weights, tensor by tensor.")
    p.add_argument("variant", help="a registry variant, e.g. gemma3-1b, gemma2-2b, gemma3-12b; "
                                   "or a checkpoint to rewrite with --from")
    p.add_argument("out", help="the directory to write (must be new or empty)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--shard-gb", type=float, default=2.0, help="largest shard (default 2 GB)")
    p.add_argument("--from", dest="source", action="store_true",
                   help="VARIANT is a checkpoint (GGUF file or HF directory; 'default' for the "
                        "embedded Gemma 3 270M): write its values (a GGUF's dequantized) and its "
                        "tokenizer instead of random ones, e.g. to measure float-source "
                        "quantization on real weights")
    args = p.parse_args(argv)
    from tqdm import tqdm
    try:
        if args.source:
            from .checkpoints import load         # its CheckpointError is a ValueError
            ck = load(None if args.variant == "default" else args.variant, progress=tqdm)
            write_hf(ck.config, ck.params, ck.tokenizer_model, Path(args.out), args.dtype,
                     int(args.shard_gb * (1 << 30)), progress=tqdm,
                     what=f"the values of {ck.source.get('path', args.variant)}")
        else:
            write(args.variant, Path(args.out), args.seed, args.dtype,
                  int(args.shard_gb * (1 << 30)), progress=tqdm)
    except (KeyError, ValueError, OSError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
