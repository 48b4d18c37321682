"""GGUF (llama.cpp) checkpoints of Gemma, Gemma 2 and Gemma 3, dequantized with the `gguf` package.

llama.cpp's converter stores every Gemma RMSNorm weight with the +1 already added; we subtract it to
get Gemma's native scale (applied as 1 + w). Linear weights are stored [out, in] in numpy order.
The file stays memory-mapped; a tensor is dequantized only when read (`weights.Params`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from .. import tokenizer as tok
from ..config import GemmaConfig, make_config, match_variant
from ..weights import Params, Tensor, gguf_blocks
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


# GGUF metadata key (after "{arch}.") -> GemmaConfig field
_METADATA = {"embedding_length": "d_model", "block_count": "num_layers",
             "attention.head_count": "num_heads", "attention.head_count_kv": "num_kv_heads",
             "attention.key_length": "head_dim", "feed_forward_length": "ffn_dim",
             "attention.layer_norm_rms_epsilon": "norm_eps",
             "attention.sliding_window": "sliding_window",
             "attn_logit_softcapping": "attn_softcap", "final_logit_softcapping": "final_softcap",
             "rope.freq_base": "rope_base_global", "rope.scaling.factor": "rope_scale_global"}
_REQUIRED = ("embedding_length", "block_count", "attention.head_count", "feed_forward_length")


def config_from_gguf(reader, path: Path) -> GemmaConfig:
    """Maps GGUF metadata onto GemmaConfig fields; everything it does not state (the query scale,
    Gemma 3's local RoPE base, the layer pattern) follows the family's rules (`config.FAMILIES`)."""
    arch = _field(reader, "general.architecture")
    if arch not in ARCHS:
        raise CheckpointError(f"{path}: unsupported architecture {arch!r}; "
                              f"supported: {', '.join(ARCHS)}")
    family = ARCHS[arch]
    for key in _REQUIRED:
        if _field(reader, f"{arch}.{key}") is None:
            raise CheckpointError(f"{path}: missing metadata {arch}.{key}")
    stated = {}
    for key, ours in _METADATA.items():
        v = _field(reader, f"{arch}.{key}")
        if v is not None:
            stated[ours] = v
    if family >= 2 and "sliding_window" not in stated:
        raise CheckpointError(f"{path}: missing metadata {arch}.attention.sliding_window")
    if family == 1:
        stated.pop("sliding_window", None)
    if family < 3:
        stated.pop("rope_scale_global", None)
    try:
        for f in ("norm_eps", "attn_softcap", "final_softcap", "rope_base_global",
                  "rope_scale_global"):
            if f in stated:
                stated[f] = float(stated[f])
        if "norm_eps" in stated:   # stored as float32: 1e-6 reads back as 9.99999997e-07
            stated["norm_eps"] = float(f"{stated['norm_eps']:.6g}")
        for f in ("d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "ffn_dim",
                  "sliding_window"):
            if f in stated:
                stated[f] = int(stated[f])
        stated.setdefault("num_kv_heads", stated["num_heads"])
        stated.setdefault("head_dim", stated["d_model"] // stated["num_heads"])
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
        cfg = make_config("from-gguf", family, vocab_size=vocab, **stated)
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: unusable metadata: {e}") from None
    return dataclasses.replace(cfg, name=match_variant(cfg))


def _tensor(path: Path, t, ours: str, norm: bool, linear: bool, mm) -> Tensor:
    """A lazy float32 tensor in our layout, dequantized from the memory-mapped file when read."""
    shape = tuple(int(d) for d in reversed(t.shape))          # numpy order: [out, in]

    def read():
        try:
            w = _dequantize(t, shape)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot dequantize tensor {t.name} "
                                  f"({t.tensor_type.name}): {e}") from e
        _release(mm, int(t.data_offset), int(t.n_bytes))
        if norm:
            return w - 1.0   # llama.cpp stores Gemma's RMSNorm weights with the +1 added
        return np.ascontiguousarray(w.T) if linear else w

    kind = t.tensor_type.name

    def blocks():
        try:
            b = gguf_blocks.decode(t.data, kind, shape)   # rows [out, in] as GGUF stores them
        except Exception as e:
            raise CheckpointError(f"{path}: cannot decode the blocks of tensor {t.name} "
                                  f"({kind}): {e}") from e
        _release(mm, int(t.data_offset), int(t.n_bytes))
        return b
    native = kind in gguf_blocks.SUPPORTED and len(shape) == 2
    return Tensor(ours, shape[::-1] if linear else shape, np.dtype(np.float32), read,
                  f"{path} ({t.name})", format=kind, blocks=blocks if native else None)


_CHUNK_BYTES = 16 << 20


def _release(mm, offset: int, length: int) -> None:
    """Drops a tensor's pages of the file mapping from this process (they stay in the page cache):
    otherwise every byte read stays counted in RSS for as long as the mapping lives."""
    import mmap
    if mm is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    start = offset - offset % mmap.PAGESIZE
    try:
        mm.madvise(mmap.MADV_DONTNEED, start, offset + length - start)
    except (OSError, ValueError):
        pass


def _dequantize(t, shape: tuple) -> np.ndarray:
    """float32 [*shape] from the mapped blocks, a slice of rows at a time into one output array:
    gguf's dequantizers make several temporaries the size of their input, which for the whole
    262144 x 640 embedding of Gemma 3 270M came to 1.5 GB; by slices they stay ~16 MB."""
    import gguf
    data = t.data
    out = np.empty(shape, np.float32)
    if data.ndim < 2 or len(shape) < 2:
        out[...] = np.asarray(gguf.quants.dequantize(data, t.tensor_type),
                              np.float32).reshape(shape)
        return out
    rows = out.reshape(-1, shape[-1])
    blocks = data.reshape(rows.shape[0], -1)
    step = max(1, _CHUNK_BYTES // max(1, rows.shape[1] * 4))
    for r in range(0, rows.shape[0], step):
        rows[r:r + step] = gguf.quants.dequantize(blocks[r:r + step], t.tensor_type)
    return out


def load_gguf(path: Path, progress=None) -> Checkpoint:
    """Reads the metadata and the tensor table; each tensor is dequantized from the memory map
    only when a consumer reads it (`weights.Params`)."""
    reader = _open(path)
    cfg = config_from_gguf(reader, path)
    mm = getattr(reader.data, "_mmap", None)
    tensors: dict[str, Tensor] = {}
    for t in reader.tensors:
        name = t.name.removesuffix(".weight")
        if name == "token_embd":
            tensors["embed"] = _tensor(path, t, "embed", False, False, mm)
        elif name == "output_norm":
            tensors["final_norm"] = _tensor(path, t, "final_norm", True, False, mm)
        elif name.startswith("blk."):
            _, i, kind = name.split(".", 2)
            if kind not in _LAYER_TENSORS:
                raise CheckpointError(f"{path}: unexpected tensor {t.name}")
            ours, is_norm, is_linear = _LAYER_TENSORS[kind]
            tensors[f"layers.{i}.{ours}"] = _tensor(path, t, f"layers.{i}.{ours}", is_norm,
                                                    is_linear, mm)
        elif name != "output":   # an untied output matrix would be a different model
            raise CheckpointError(f"{path}: unexpected tensor {t.name}")
        else:
            raise CheckpointError(f"{path}: separate output.weight found; Gemma ties it to "
                                  f"token_embd")
    params = Params(tensors)
    check_params(cfg, params, path)
    model_bytes, special = tok.sentencepiece_from_gguf(reader)
    return Checkpoint(cfg, params, model_bytes, special,
                      source={"format": "gguf", "path": str(path), "file_type":
                              int(_field(reader, "general.file_type", -1))})
