"""Hugging Face checkpoints (`config.json`, `*.safetensors` — sharded ones through their index —
and `tokenizer.model`) of Gemma 1/2/3 text.

Safetensors headers are read up front (`weights.safetensors`: a bad file is named with its tensor);
each tensor is read from the file and converted to float32 in our layout only when asked for. HF stores linear weights [out, in].
Gemma 1's `post_attention_layernorm` is its pre-FFN norm; in Gemma 2/3 it normalizes the attention
output and `pre_feedforward_layernorm` is the pre-FFN norm.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from ..config import GLOBAL, LOCAL, GemmaConfig, make_config, match_variant
from ..weights import Params, Tensor, safetensors
from . import Checkpoint, CheckpointError, check_params

MODEL_TYPES = {"gemma": 1, "gemma2": 2, "gemma3_text": 3, "gemma3": 3}
_PREFIXES = ("model.language_model.", "language_model.model.", "model.")


# config.json key -> GemmaConfig field, where the value maps as it is
_CONFIG_FIELDS = {"vocab_size": "vocab_size", "hidden_size": "d_model",
                  "num_hidden_layers": "num_layers", "num_attention_heads": "num_heads",
                  "num_key_value_heads": "num_kv_heads", "head_dim": "head_dim",
                  "intermediate_size": "ffn_dim", "rms_norm_eps": "norm_eps",
                  "query_pre_attn_scalar": "query_pre_attn_scalar",
                  "sliding_window": "sliding_window", "attn_logit_softcapping": "attn_softcap",
                  "final_logit_softcapping": "final_softcap"}
_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
             "intermediate_size")
_LAYER_TYPES = {"sliding_attention": LOCAL, "full_attention": GLOBAL}


def config_from_hf(d: dict, path: Path) -> GemmaConfig:
    """Maps config.json onto GemmaConfig fields; everything it does not state follows the
    family's rules (`config.FAMILIES`)."""
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: config.json must be a JSON object")
    mt = d.get("model_type")
    if mt == "gemma3" and isinstance(d.get("text_config"), dict):
        d = {**d["text_config"], "model_type": "gemma3_text"}
        mt = "gemma3_text"
    if mt not in MODEL_TYPES:
        raise CheckpointError(f"{path}: unsupported architecture {mt!r}; "
                              f"supported: {', '.join(MODEL_TYPES)}")
    family = MODEL_TYPES[mt]
    for key in _REQUIRED:
        if key not in d:
            raise CheckpointError(f"{path}: config.json lacks {key}")
    stated = {ours: d[key] for key, ours in _CONFIG_FIELDS.items() if key in d}
    if family == 1:   # Gemma 1 has no sliding window, softcaps or query scale in its config
        for f in ("sliding_window", "attn_softcap", "final_softcap", "query_pre_attn_scalar"):
            stated.pop(f, None)
    stated.setdefault("num_kv_heads", stated["num_heads"])
    try:
        if stated.get("head_dim") is None:
            stated["head_dim"] = stated["d_model"] // stated["num_heads"]
        if isinstance(stated.get("query_pre_attn_scalar"), int):
            stated["query_pre_attn_scalar"] = float(stated["query_pre_attn_scalar"])
        if "layer_types" in d and family > 1:
            stated["layer_types"] = tuple(_LAYER_TYPES[t] for t in d["layer_types"])
        stated.update(_rope(d, family, path))
        cfg = make_config("from-hf", family, **stated)
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: unusable config: {e}") from None
    return dataclasses.replace(cfg, name=match_variant(cfg))


def _rope(d: dict, family: int, path: Path) -> dict:
    """RoPE fields as transformers 5 (`rope_parameters`) or 4 (flat keys) states them."""
    rp = d.get("rope_parameters") or {}
    if family < 3:
        theta = d.get("rope_theta", rp.get("rope_theta"))
        return {} if theta is None else {"rope_base_global": float(theta)}
    if "full_attention" in rp:   # transformers >= 5
        full, slide = rp["full_attention"], rp.get("sliding_attention", {})
    else:                         # transformers 4: flat keys
        full = {**({"rope_theta": d["rope_theta"]} if "rope_theta" in d else {}),
                **(d.get("rope_scaling") or {})}
        slide = {"rope_theta": d["rope_local_base_freq"]} if "rope_local_base_freq" in d else {}
    rtype = full.get("rope_type", full.get("type", "default"))
    if rtype not in ("default", "linear"):
        raise CheckpointError(f"{path}: unsupported rope type {rtype!r}")
    out = {}
    if "rope_theta" in full:
        out["rope_base_global"] = float(full["rope_theta"])
    if "rope_theta" in slide:
        out["rope_base_local"] = float(slide["rope_theta"])
    if rtype == "linear":
        out["rope_scale_global"] = float(full.get("factor", 1.0))
    return out


def layer_names(family: int) -> dict[str, tuple[str, str]]:
    """transformers' per-layer module name -> (our short name, kind: 'linear' or 'norm')."""
    return {
        "self_attn.q_proj": ("q_proj", "linear"), "self_attn.k_proj": ("k_proj", "linear"),
        "self_attn.v_proj": ("v_proj", "linear"), "self_attn.o_proj": ("o_proj", "linear"),
        "mlp.gate_proj": ("gate_proj", "linear"), "mlp.up_proj": ("up_proj", "linear"),
        "mlp.down_proj": ("down_proj", "linear"), "input_layernorm": ("attn_norm", "norm"),
        "self_attn.q_norm": ("q_norm", "norm"), "self_attn.k_norm": ("k_norm", "norm"),
        "post_feedforward_layernorm": ("post_ffn_norm", "norm"),
        # Gemma 1's post_attention_layernorm is its pre-FFN norm; Gemma 2/3 have both
        **({"post_attention_layernorm": ("ffn_norm", "norm")} if family == 1 else
           {"post_attention_layernorm": ("post_attn_norm", "norm"),
            "pre_feedforward_layernorm": ("ffn_norm", "norm")}),
    }


def _hf_to_ours(cfg: GemmaConfig, hf_name: str) -> tuple[str, str] | None:
    """(our name, kind) where kind is 'linear', 'norm' or 'embed'; None for tensors we ignore."""
    for pre in _PREFIXES:
        if hf_name.startswith(pre):
            name = hf_name[len(pre):]
            break
    else:
        return None
    if name == "embed_tokens.weight":
        return "embed", "embed"
    if name == "norm.weight":
        return "final_norm", "norm"
    parts = name.split(".")
    if parts[0] != "layers" or parts[-1] != "weight":
        return None
    i, rest = parts[1], ".".join(parts[2:-1])
    table = layer_names(cfg.family)
    if rest not in table:
        return None
    ours, kind = table[rest]
    return f"layers.{i}.{ours}", kind


def _weight_files(path: Path) -> list[Path]:
    """The safetensors files: those a sharded checkpoint's index names (each must exist), else
    every *.safetensors in the directory."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
        missing = [n for n in names if not (path / n).exists()]
        if missing:
            raise CheckpointError(f"{index}: lists shards that are missing: {', '.join(missing)}")
        return [path / n for n in names]
    return sorted(path.glob("*.safetensors"))


def _tensor(ours: str, kind: str, w: safetensors.Entry, origin: str) -> Tensor:
    """A lazy float32 tensor in our layout: linear weights [out, in] -> [in, out]."""
    if kind == "linear":
        return Tensor(ours, tuple(w.shape[::-1]), np.dtype(np.float32),
                      lambda: np.ascontiguousarray(w.load().astype(np.float32).T), origin)
    return Tensor(ours, tuple(w.shape), np.dtype(np.float32),
                  lambda: w.load().astype(np.float32, copy=False), origin)


def load_hf(path: Path, progress=None) -> Checkpoint:
    """Reads the config and the tensors' headers; the weights stay in their files until a
    consumer reads them, one at a time (`weights.Params`)."""
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{path}: no config.json (not a Hugging Face model directory)")
    try:
        cfg = config_from_hf(json.loads(cfg_file.read_text()), cfg_file)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: invalid JSON: {e}") from e
    files = _weight_files(path)
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors weight files")
    tensors: dict[str, Tensor] = {}
    for f in files:
        try:
            mapped = safetensors.read(f)
        except safetensors.SafetensorsError as e:
            raise CheckpointError(str(e)) from None
        for hf_name, w in mapped.items():
            ours = _hf_to_ours(cfg, hf_name)
            if ours is None:
                continue
            name, kind = ours
            if name in tensors:
                raise CheckpointError(f"{f}: tensor {hf_name} ({name}) also appears in "
                                      f"{tensors[name].origin}")
            tensors[name] = _tensor(name, kind, w, f"{f} ({hf_name})")
    params = Params(tensors)
    check_params(cfg, params, path)
    tok_file = path / "tokenizer.model"
    if not tok_file.exists():
        raise CheckpointError(f"{path}: no tokenizer.model (SentencePiece) file")
    model_bytes = tok_file.read_bytes()
    special = _special_ids(model_bytes, tok_file)
    return Checkpoint(cfg, params, model_bytes, special, source={"format": "hf", "path": str(path)})


def _special_ids(model_bytes: bytes, tok_file: Path) -> dict[str, int]:
    from sentencepiece import sentencepiece_model_pb2 as spm
    from .. import tokenizer as tok
    m = spm.ModelProto()
    try:
        m.ParseFromString(model_bytes)
    except Exception as e:
        raise CheckpointError(f"{tok_file}: not a SentencePiece model: {e}") from e
    t = m.trainer_spec
    try:
        return tok.special_ids([p.piece for p in m.pieces], bos_id=t.bos_id, eos_id=t.eos_id,
                               pad_id=t.pad_id, unk_id=t.unk_id)
    except ValueError as e:
        raise CheckpointError(f"{tok_file}: {e}") from e
