"""GGUF (llama.cpp) checkpoints of Gemma, Gemma 2 and Gemma 3, dequantized with the `gguf` package.

llama.cpp's converter stores every Gemma RMSNorm weight with the +1 already added; we subtract it to
get Gemma's native scale (applied as 1 + w). Linear weights are stored [out, in] in numpy order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import tokenizer as tok
from ..config import GemmaConfig, VARIANTS, _pattern
from . import Checkpoint, CheckpointError, check_params

ARCHS = {"gemma": 1, "gemma2": 2, "gemma3": 3}

_LAYER_TENSORS = {   # GGUF name -> (our name, is a norm, is a linear [out, in] matrix)
    "attn_norm": ("attn_norm", True, False),
    "attn_q": ("q_proj", False, True),
    "attn_k": ("k_proj", False, True),
    "attn_v": ("v_proj", False, True),
    "attn_output": ("o_proj", False, True),
    "attn_q_norm": ("q_norm", True, False),
    "attn_k_norm": ("k_norm", True, False),
    "post_attention_norm": ("post_attn_norm", True, False),
    "ffn_norm": ("ffn_norm", True, False),
    "ffn_gate": ("gate_proj", False, True),
    "ffn_up": ("up_proj", False, True),
    "ffn_down": ("down_proj", False, True),
    "post_ffw_norm": ("post_ffn_norm", True, False),
}


class _Truncated(Exception):
    pass


def _reader_class():
    import gguf

    class CheckedReader(gguf.GGUFReader):
        """Checks every tensor's byte range against the file before mapping it, so a truncated
        file is reported with the tensor that runs past its end."""

        def _build_tensors(self, start_offs, fields):
            size = len(self.data)
            for field in fields:
                _, name, _, dims, raw_dtype, offset = field.parts
                block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(raw_dtype[0])]
                end = int(start_offs + offset[0]) + int(np.prod(dims)) * type_size // block
                if end > size:
                    raise _Truncated(f"truncated: tensor {bytes(name).decode()} ends at byte "
                                     f"{end} but the file has {size} bytes")
            super()._build_tensors(start_offs, fields)

    return CheckedReader


def _open(path: Path):
    try:
        return _reader_class()(path)
    except _Truncated as e:
        raise CheckpointError(f"{path}: {e}") from None
    except Exception as e:   # the reader raises assorted errors on short or garbled headers
        raise CheckpointError(f"{path}: not a readable GGUF file (truncated or corrupt?): "
                              f"{e}") from e


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def config_from_gguf(reader, path: Path) -> GemmaConfig:
    arch = _field(reader, "general.architecture")
    if arch not in ARCHS:
        raise CheckpointError(f"{path}: unsupported architecture {arch!r}; "
                              f"supported: {', '.join(ARCHS)}")
    family = ARCHS[arch]

    def need(key):
        v = _field(reader, f"{arch}.{key}")
        if v is None:
            raise CheckpointError(f"{path}: missing metadata {arch}.{key}")
        return v

    d, layers, heads = int(need("embedding_length")), int(need("block_count")), int(
        need("attention.head_count"))
    kv = int(_field(reader, f"{arch}.attention.head_count_kv", heads))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", d // heads))
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    common = dict(family=family, vocab_size=vocab, d_model=d, num_layers=layers, num_heads=heads,
                  num_kv_heads=kv, head_dim=head_dim, ffn_dim=int(need("feed_forward_length")),
                  norm_eps=float(f"{_field(reader, f'{arch}.attention.layer_norm_rms_epsilon', 1e-6):.6g}"))
    # GGUF does not store the query scale; like llama.cpp, the 27B models use d_model / heads.
    qpas = float(head_dim)
    for v in VARIANTS.values():
        if (v.family, v.d_model, v.num_layers, v.num_heads) == (family, d, layers, heads):
            qpas = v.query_pre_attn_scalar
    extra = {}
    if family >= 2:
        extra = dict(sliding_window=int(need("attention.sliding_window")),
                     layer_types=_pattern(family, layers), post_norms=True)
    if family == 2:
        extra.update(attn_softcap=float(_field(reader, "gemma2.attn_logit_softcapping", 50.0)),
                     final_softcap=float(_field(reader, "gemma2.final_logit_softcapping", 30.0)))
    if family == 3:
        extra.update(qk_norm=True, rope_base_local=10_000.0,
                     rope_base_global=float(_field(reader, "gemma3.rope.freq_base", 1e6)),
                     rope_scale_global=float(_field(reader, "gemma3.rope.scaling.factor", 1.0)))
    else:
        extra["rope_base_global"] = extra["rope_base_local"] = float(
            _field(reader, f"{arch}.rope.freq_base", 10_000.0))
    cfg = GemmaConfig(name="from-gguf", query_pre_attn_scalar=qpas, **common, **extra)
    from ..config import match_variant
    import dataclasses
    return dataclasses.replace(cfg, name=match_variant(cfg))


def load_gguf(path: Path, progress=None) -> Checkpoint:
    import gguf
    reader = _open(path)
    cfg = config_from_gguf(reader, path)
    params: dict[str, np.ndarray] = {}
    tensors = reader.tensors
    bar = progress(total=len(tensors), desc="load gguf", unit="tensor") if progress else None
    for t in tensors:
        try:
            w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot dequantize tensor {t.name} "
                                  f"({t.tensor_type.name}): {e}") from e
        name = t.name.removesuffix(".weight")
        if name == "token_embd":
            params["embed"] = w
        elif name == "output_norm":
            params["final_norm"] = w - 1.0
        elif name.startswith("blk."):
            _, i, kind = name.split(".", 2)
            if kind not in _LAYER_TENSORS:
                raise CheckpointError(f"{path}: unexpected tensor {t.name}")
            ours, is_norm, is_linear = _LAYER_TENSORS[kind]
            params[f"layers.{i}.{ours}"] = (w - 1.0) if is_norm else (w.T if is_linear else w)
        elif name != "output":   # an untied output matrix would be a different model
            raise CheckpointError(f"{path}: unexpected tensor {t.name}")
        else:
            raise CheckpointError(f"{path}: separate output.weight found; Gemma ties it to "
                                  f"token_embd")
        if bar:
            bar.update()
    if bar:
        bar.close()
    params = {k: np.ascontiguousarray(v) for k, v in params.items()}
    check_params(cfg, params, path)
    model_bytes, special = tok.sentencepiece_from_gguf(reader)
    return Checkpoint(cfg, params, model_bytes, special,
                      source={"format": "gguf", "path": str(path), "file_type":
                              int(_field(reader, "general.file_type", -1))})
