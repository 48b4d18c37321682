"""GGUF (llama.cpp) checkpoints of Gemma 1-4, dequantized with the `gguf` package.

llama.cpp's converter stores every Gemma 1-3 RMSNorm weight with the +1 already added; we subtract
it to get Gemma's native scale (applied as 1 + w). Gemma 4's norms multiply by w and are stored as
they are. Linear weights are stored [out, in] in numpy order; expert stacks [E, out, in] (the
fused `ffn_gate_up_exps` holds the gate rows, then the up rows, as transformers' `gate_up_proj`).
The file stays memory-mapped; a tensor is dequantized only when read (`weights.Params`), an expert
or a row range of a table (Gemma 4's per-layer embeddings) without the rest.

Gemma 4 metadata (llama.cpp's `conversion/gemma.py`, `src/models/gemma4.cpp`): per-layer arrays
where layers differ (`attention.sliding_window_pattern`, true = sliding; `head_count_kv`;
`feed_forward_length` with the double-wide KV-shared layers), the global layers' head dim as
`key_length` and the sliding ones' as `key_length_swa`, and two facts only the tensors tell:
k_eq_v (a global layer with attn_k and no attn_v) and proportional RoPE (`rope_freqs`: factor 1 on
the pairs that rotate, 1e30 on the rest).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from .. import tokenizer as tok
from ..config import GLOBAL, LOCAL, GemmaConfig, make_config, match_variant
from ..weights import Params, Tensor, gguf_blocks
from . import Checkpoint, CheckpointError, check_params

ARCHS = {"gemma": 1, "gemma2": 2, "gemma3": 3, "gemma4": 4}

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


def matmul_name(layer: int, ours: str) -> str:
    """The GGUF tensor of one of our layer matmuls (`q_proj` -> `blk.N.attn_q.weight`), as
    llama.cpp names it; a LoRA GGUF names its pairs after it (`...weight.lora_a`)."""
    for g, (name, _, linear) in _LAYER_TENSORS.items():
        if name == ours and linear:
            return f"blk.{layer}.{g}.weight"
    raise KeyError(f"{ours} is not a layer matmul of a Gemma GGUF")


_GEMMA4_LAYER_TENSORS = {   # Gemma 4's additions (norms here are never shifted: x w)
    "inp_gate": ("ple_gate", False, True),
    "proj": ("ple_proj", False, True),
    "post_norm": ("ple_norm", True, False),
    "ffn_gate_inp": ("router", False, True),
    "ffn_gate_inp.scale": ("router_scale", False, False),
    "ffn_down_exps.scale": ("expert_scale", False, False),
    "pre_ffw_norm_2": ("moe_norm", True, False),
    "post_ffw_norm_1": ("post_mlp_norm", True, False),
    "post_ffw_norm_2": ("post_moe_norm", True, False),
    "layer_output_scale": ("layer_scalar", False, False),
}
_GEMMA4_TOP_TENSORS = {"per_layer_token_embd": ("ple_embed", False, False),
                       "per_layer_model_proj": ("ple_model_proj", False, True),
                       "per_layer_proj_norm": ("ple_proj_norm", True, False)}
# expert stacks: GGUF name -> ((our name, first row, rows as a fraction of the stored rows), ...)
_EXPERT_TENSORS = {"ffn_gate_up_exps": (("experts_gate", 0, 2), ("experts_up", 1, 2)),
                   "ffn_gate_exps": (("experts_gate", 0, 1),),
                   "ffn_up_exps": (("experts_up", 0, 1),),
                   "ffn_down_exps": (("experts_down", 0, 1),)}


class _Truncated(Exception):
    pass


def _reader_class():
    import gguf

    class CheckedReader(gguf.GGUFReader):
        """Checks every tensor's byte range against the file before mapping it, so a truncated
        file is reported with the tensor that runs past its end; and reads the metadata from a
        plain array over the mapped file. The reader makes a view per value read, over 3 million
        for a 262k-token vocabulary: views of `np.memmap` cost ~4 µs each (its __getitem__ and
        __array_finalize__), 10 s of the 270M's 10.2 s load, where a plain array's cost a tenth.
        The values, their dtypes and the fields' layout are the reader's own."""

        def _get(self, offset, dtype, count=1, override_order=None):
            plain = self.__dict__.get("_plain")
            if plain is None:
                plain = self._plain = self.data.view(np.ndarray)
            dtype = np.dtype(dtype)
            count = int(count)
            arr = plain[offset:offset + dtype.itemsize * count].view(dtype)[:count]
            order = self.byte_order if override_order is None else override_order
            return arr if order == "I" else arr.view(arr.dtype.newbyteorder(order))

        def _get_field_parts(self, orig_offs, raw_type):
            """An array of scalars or strings in one pass instead of a call per element (the
            same parts: a [1] view per scalar, a length and a bytes view per string)."""
            A = gguf.GGUFValueType
            if A(raw_type) != A.ARRAY or self.byte_order != "I":
                return super()._get_field_parts(orig_offs, raw_type)
            raw_itype = self._get(orig_offs, np.uint32)
            alen = self._get(orig_offs + 4, np.uint64)
            itype, n, offs = A(raw_itype[0]), int(alen[0]), orig_offs + 12
            parts, idxs = [raw_itype, alen], []
            nptype = self.gguf_scalar_to_np.get(itype)
            if nptype is not None:
                values = self._get(offs, nptype, n)
                if len(values) < n:
                    raise ValueError(f"array of {n} values runs past the end of the file")
                parts += [values[i:i + 1] for i in range(n)]
                idxs = list(range(2, 2 + n))
                offs += values.nbytes
            elif itype == A.STRING:
                plain, u64 = self._plain, np.dtype(np.uint64)
                for _ in range(n):
                    slen = plain[offs:offs + 8].view(u64)
                    size = int(slen[0])
                    parts += [slen, plain[offs + 8:offs + 8 + size]]
                    idxs.append(len(parts) - 1)
                    offs += 8 + size
                if offs > len(plain):
                    raise ValueError(f"array of {n} strings runs past the end of the file")
            else:   # arrays of arrays: the reader's own way
                return super()._get_field_parts(orig_offs, raw_type)
            return offs - orig_offs, parts, idxs, [A.ARRAY] + ([itype] if n else [])

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
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
        if family == 4:
            stated.update(_gemma4_stated(reader, arch, stated, vocab, path))
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
        cfg = make_config("from-gguf", family, vocab_size=vocab, **stated)
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: unusable metadata: {e}") from None
    if family == 4:
        ffn = _per_layer(reader, arch, "feed_forward_length", cfg.num_layers, path)
        wanted = [cfg.layer_ffn_dim(i) for i in range(cfg.num_layers)]
        if ffn != wanted:
            raise CheckpointError(
                f"{path}: {arch}.feed_forward_length {ffn} is not one width with the "
                f"{cfg.kv_shared_layers} KV-shared layers double-wide or all alike")
    return dataclasses.replace(cfg, name=match_variant(cfg))


def _per_layer(reader, arch: str, key: str, L: int, path: Path) -> list[int]:
    """A per-layer metadata value: one number for every layer, or an array of L."""
    v = _field(reader, f"{arch}.{key}")
    if isinstance(v, list):
        if len(v) != L:
            raise CheckpointError(f"{path}: {arch}.{key} has {len(v)} entries for {L} layers")
        return [int(x) for x in v]
    return [int(v)] * L


def _one_per_type(values: list[int], types: tuple, kind: str, what: str, path: Path) -> int | None:
    """The value all layers of `kind` share (None: no such layer); refuses layers that differ."""
    mine = {v for v, t in zip(values, types) if t == kind}
    if len(mine) > 1:
        raise CheckpointError(f"{path}: {what} differs between {kind} layers ({sorted(mine)}); "
                              f"Gemma 4 varies it only between sliding and global layers")
    return mine.pop() if mine else None


def _gemma4_stated(reader, arch: str, stated: dict, vocab: int, path: Path) -> dict:
    """Gemma 4's per-layer geometry and switches from llama.cpp's metadata and tensor table."""
    L = int(stated["num_layers"])
    pattern = _field(reader, f"{arch}.attention.sliding_window_pattern")
    if not isinstance(pattern, list) or len(pattern) != L:
        raise CheckpointError(f"{path}: {arch}.attention.sliding_window_pattern must list one "
                              f"bool per layer ({L}), got {pattern!r}")
    types = tuple(LOCAL if s else GLOBAL for s in pattern)
    out: dict = {"layer_types": types}
    heads = _per_layer(reader, arch, "attention.head_count", L, path)
    out["num_heads"] = heads[0]
    if len(set(heads)) > 1:
        raise CheckpointError(f"{path}: {arch}.attention.head_count differs between layers")
    kv = _per_layer(reader, arch, "attention.head_count_kv", L, path) \
        if _field(reader, f"{arch}.attention.head_count_kv") is not None else heads
    local_kv = _one_per_type(kv, types, LOCAL, "attention.head_count_kv", path)
    global_kv = _one_per_type(kv, types, GLOBAL, "attention.head_count_kv", path)
    out["num_kv_heads"] = local_kv if local_kv is not None else global_kv
    if global_kv is not None and global_kv != out["num_kv_heads"]:
        out["global_kv_heads"] = global_kv
    global_dim = _field(reader, f"{arch}.attention.key_length")
    local_dim = _field(reader, f"{arch}.attention.key_length_swa", global_dim)
    if local_dim is None:
        raise CheckpointError(f"{path}: missing metadata {arch}.attention.key_length")
    out["head_dim"] = int(local_dim)
    out["global_head_dim"] = int(global_dim if global_dim is not None else local_dim)
    ffn = _per_layer(reader, arch, "feed_forward_length", L, path)
    shared = int(_field(reader, f"{arch}.attention.shared_kv_layers", 0))
    out["kv_shared_layers"] = shared
    out["ffn_dim"] = ffn[0]
    out["double_wide_mlp"] = bool(shared) and ffn[-1] == 2 * ffn[0]
    base_swa = _field(reader, f"{arch}.rope.freq_base_swa")
    if base_swa is not None:
        out["rope_base_local"] = float(base_swa)
    tensors = {t.name: t for t in reader.tensors}
    ple = int(_field(reader, f"{arch}.embedding_length_per_layer_input", 0) or 0)
    out["ple_dim"] = ple
    if ple:   # llama.cpp states no per-layer vocabulary: its table has the token list's rows
        out["ple_vocab_size"] = vocab
    experts = int(_field(reader, f"{arch}.expert_count", 0) or 0)
    if experts:
        out["num_experts"] = experts
        out["top_k_experts"] = int(_field(reader, f"{arch}.expert_used_count", 0) or 0)
        out["moe_ffn_dim"] = int(_field(reader, f"{arch}.expert_feed_forward_length", 0) or 0)
    out["k_eq_v"] = _gemma4_k_eq_v(tensors, types, L - shared, path)
    out["rope_fraction_global"] = _gemma4_rope_fraction(tensors, out["global_head_dim"], path)
    return out


def _gemma4_k_eq_v(tensors: dict, types: tuple, producers: int, path: Path) -> bool:
    """k_eq_v: the global layers that compute K (have attn_k) have no V projection."""
    globals_ = [i for i in range(producers) if types[i] == GLOBAL]
    no_v = {i for i in globals_ if f"blk.{i}.attn_k.weight" in tensors
            and f"blk.{i}.attn_v.weight" not in tensors}
    if no_v and len(no_v) != len(globals_):
        raise CheckpointError(f"{path}: global layers {sorted(no_v)} have no attn_v but "
                              f"{sorted(set(globals_) - no_v)} do; Gemma 4 drops V on all or none")
    return bool(no_v)


def _gemma4_rope_fraction(tensors: dict, global_head_dim: int, path: Path) -> float:
    """Proportional RoPE on global layers: rope_freqs holds factor 1 on the rotating pairs, 1e30
    (no rotation) after them; the rotating fraction of the pairs."""
    freqs = tensors.get("rope_freqs.weight")
    if freqs is None:
        return 1.0
    f = np.asarray(freqs.data, np.float32).reshape(-1)
    rotating = int(np.sum(f == 1.0))
    if f.size != global_head_dim // 2 or not np.all(f[:rotating] == 1.0) \
            or not np.all(f[rotating:] >= 1e29):
        raise CheckpointError(f"{path}: rope_freqs holds factors other than 1 (rotate) then "
                              f"1e30 (do not) over {global_head_dim // 2} pairs: a "
                              f"scaled RoPE this compiler does not read")
    return rotating / f.size


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
    def rows(lo, hi):   # a table's rows alone (Gemma 4's per-layer embeddings: 9.4 GB float)
        w = _dequantize(t, (hi - lo,) + shape[1:], t.data[lo:hi])
        _release(mm, int(t.data_offset), int(t.n_bytes))
        return w - 1.0 if norm else w

    native = kind in gguf_blocks.SUPPORTED and len(shape) == 2
    return Tensor(ours, shape[::-1] if linear else shape, np.dtype(np.float32), read,
                  f"{path} ({t.name})", format=kind, blocks=blocks if native else None,
                  rows=rows if len(shape) == 2 and not linear else None)


def _expert_tensor(path: Path, t, ours: str, half: int, halves: int, mm) -> Tensor:
    """Experts [E, out, in] as stored (or one half of the rows of a fused gate_up stack) ->
    our [E, in, out], one expert readable alone."""
    E, rows, cols = (int(d) for d in reversed(t.shape))
    if rows % halves:
        raise CheckpointError(f"{path}: {t.name} has {rows} rows, not {halves} equal parts")
    n = rows // halves
    lo = half * n

    def part(e):
        try:
            w = _dequantize(t, (n, cols), t.data[e][lo:lo + n])          # [out, in]
        except Exception as ex:
            raise CheckpointError(f"{path}: cannot dequantize tensor {t.name} "
                                  f"({t.tensor_type.name}): {ex}") from ex
        return np.ascontiguousarray(w.T)

    def read():
        out = np.empty((E, cols, n), np.float32)
        for e in range(E):
            out[e] = part(e)
        _release(mm, int(t.data_offset), int(t.n_bytes))
        return out

    return Tensor(ours, (E, cols, n), np.dtype(np.float32), read, f"{path} ({t.name})",
                  format=t.tensor_type.name, part=part)


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


def _dequantize(t, shape: tuple, data=None) -> np.ndarray:
    """float32 [*shape] from the mapped blocks (`data`: whole rows of `t`, default all of it), a
    slice of rows at a time into one output array: gguf's dequantizers make several temporaries
    the size of their input, which for the whole 262144 x 640 embedding of Gemma 3 270M came to
    1.5 GB; by slices they stay ~16 MB."""
    import gguf
    data = t.data if data is None else data
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
    shift = cfg.norm_plus_one      # Gemma 1-3 norms are stored as 1 + w
    gemma4 = cfg.family == 4
    layer_tensors = {**_LAYER_TENSORS, **(_GEMMA4_LAYER_TENSORS if gemma4 else {})}
    for t in reader.tensors:
        name = t.name.removesuffix(".weight")
        if name == "token_embd":
            tensors["embed"] = _tensor(path, t, "embed", False, False, mm)
        elif name == "output_norm":
            tensors["final_norm"] = _tensor(path, t, "final_norm", shift, False, mm)
        elif gemma4 and name == "rope_freqs":
            continue   # read into the config (proportional RoPE's rotating fraction)
        elif gemma4 and name in _GEMMA4_TOP_TENSORS:
            ours, is_norm, is_linear = _GEMMA4_TOP_TENSORS[name]
            tensors[ours] = _tensor(path, t, ours, is_norm and shift, is_linear, mm)
        elif name.startswith("blk."):
            _, i, kind = name.split(".", 2)
            if gemma4 and kind in _EXPERT_TENSORS:
                for ours, half, halves in _EXPERT_TENSORS[kind]:
                    tensors[f"layers.{i}.{ours}"] = _expert_tensor(
                        path, t, f"layers.{i}.{ours}", half, halves, mm)
                continue
            if kind not in layer_tensors:
                raise CheckpointError(f"{path}: unexpected tensor {t.name}")
            ours, is_norm, is_linear = layer_tensors[kind]
            tensors[f"layers.{i}.{ours}"] = _tensor(path, t, f"layers.{i}.{ours}",
                                                    is_norm and shift, is_linear, mm)
        elif name != "output":   # an untied output matrix would be a different model
            raise CheckpointError(f"{path}: unexpected tensor {t.name}")
        else:
            raise CheckpointError(f"{path}: separate output.weight found; Gemma ties it to "
                                  f"token_embd")
    params = Params(tensors)
    check_params(cfg, params, path)
    vocab_kind = _field(reader, "tokenizer.ggml.model", "llama")
    if vocab_kind != "llama":   # Gemma 1-3 files: SentencePiece pieces and scores
        raise CheckpointError(
            f"{path}: tokenizer.ggml.model is {vocab_kind!r} (Gemma 4's BPE vocabulary with "
            f"merges); this compiler builds a SentencePiece tokenizer from 'llama' vocabularies "
            f"only (pieces and scores), and would tokenize this one wrongly")
    model_bytes, special = tok.sentencepiece_from_gguf(reader)
    template = _field(reader, "tokenizer.chat_template")
    return Checkpoint(cfg, params, model_bytes, special,
                      source={"format": "gguf", "path": str(path), "file_type":
                              int(_field(reader, "general.file_type", -1))},
                      chat_template=template if isinstance(template, str) and template else None)
