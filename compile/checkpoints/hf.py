"""Hugging Face checkpoints (`config.json`, `*.safetensors` — sharded ones through their index —
and `tokenizer.model`) of Gemma 1/2/3/4 text: `*ForCausalLM` checkpoints and the text model
(`model.language_model.*`) of multimodal `*ForConditionalGeneration` ones.

Gemma 4 states per-layer geometry as `per_layer_config` ({layer: {head_dim, num_key_value_heads}},
what transformers saves) or as `global_head_dim` / `num_global_key_value_heads`; both map onto
`global_head_dim` / `global_kv_heads`, and any other per-layer difference is refused. Its experts'
fused `gate_up_proj` [E, 2I, D] is split into our `experts_gate` / `experts_up` [E, D, I].

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
from ..model import param_shapes
from ..weights import Params, Tensor, safetensors
from . import Checkpoint, CheckpointError, check_params

MODEL_TYPES = {"gemma": 1, "gemma2": 2, "gemma3_text": 3, "gemma3": 3, "gemma4_text": 4,
               "gemma4": 4}
_MULTIMODAL = {"gemma3": "gemma3_text", "gemma4": "gemma4_text"}   # -> their text_config's type
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
    if mt in _MULTIMODAL and isinstance(d.get("text_config"), dict):
        mt = _MULTIMODAL[mt]
        d = {**d["text_config"], "model_type": mt}
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
        if stated.get("head_dim") is None:   # transformers' default in every Gemma config
            stated["head_dim"] = 256
        if isinstance(stated.get("query_pre_attn_scalar"), int):
            stated["query_pre_attn_scalar"] = float(stated["query_pre_attn_scalar"])
        if "layer_types" in d and family > 1:
            stated["layer_types"] = _layer_types(d["layer_types"], path)
        stated.update(_rope(d, family, path))
        if family == 4:
            stated.update(_gemma4_fields(d, stated, path))
        cfg = make_config("from-hf", family, **stated)
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: unusable config: {e}") from None
    return dataclasses.replace(cfg, name=match_variant(cfg))


def omitted_fields(d: dict) -> list[str]:
    """The architecture fields config.json leaves to transformers' defaults (which the loader
    applies as transformers does): named when the weights do not fit, since a default that is
    not the model's shows up as a tensor of the wrong shape, or none where one is expected."""
    mt = d.get("model_type")
    if mt in _MULTIMODAL and isinstance(d.get("text_config"), dict):
        d, mt = d["text_config"], _MULTIMODAL[mt]
    family = MODEL_TYPES.get(mt, 0)
    fields = ["head_dim", "num_key_value_heads"]
    if family >= 2:
        fields += ["layer_types", "sliding_window"]
    if family == 4:
        fields += ["num_kv_shared_layers", "hidden_size_per_layer_input",
                   "vocab_size_per_layer_input", "attention_k_eq_v", "use_double_wide_mlp"]
    out = [f for f in fields if d.get(f) is None]
    if family == 4 and d.get("global_head_dim") is None and d.get("per_layer_config") is None:
        out.append("global_head_dim")
    if d.get("rope_parameters") is None and d.get("rope_theta") is None:
        out.append("rope_parameters")
    return out


def _layer_types(types, path: Path) -> tuple:
    if not isinstance(types, list):
        raise CheckpointError(f"{path}: layer_types must be a list, got {types!r}")
    for i, t in enumerate(types):
        if t not in _LAYER_TYPES:
            raise CheckpointError(f"{path}: layer {i} has layer type {t!r}, which this compiler "
                                  f"does not know (known: {', '.join(_LAYER_TYPES)})")
    return tuple(_LAYER_TYPES[t] for t in types)


def _gemma4_fields(d: dict, stated: dict, path: Path) -> dict:
    """Gemma 4's switches from config.json, with transformers' defaults for what it omits."""
    if d.get("use_bidirectional_attention") == "all":
        raise CheckpointError(f"{path}: use_bidirectional_attention 'all' is an encoder, not a "
                              f"causal language model")
    if d.get("attention_bias"):
        raise CheckpointError(f"{path}: attention_bias is not supported (Gemma has none)")
    L = stated["num_layers"]
    types = stated.get("layer_types") or tuple(
        GLOBAL if (i + 1) % 6 == 0 or i == L - 1 else LOCAL for i in range(L))
    if types[-1] != GLOBAL:   # transformers forces this too
        types = types[:-1] + (GLOBAL,)
    out = {"layer_types": types,
           "k_eq_v": bool(d.get("attention_k_eq_v", False)),
           "kv_shared_layers": int(d.get("num_kv_shared_layers") or 0),
           "double_wide_mlp": bool(d.get("use_double_wide_mlp", False)),
           "sliding_window": d.get("sliding_window", 512)}
    ple = d.get("hidden_size_per_layer_input", 256) or 0
    if ple:
        out["ple_dim"] = int(ple)
        out["ple_vocab_size"] = int(d.get("vocab_size_per_layer_input", 262_144))
    if d.get("enable_moe_block"):
        out["num_experts"] = int(d.get("num_experts") or 0)
        out["top_k_experts"] = int(d.get("top_k_experts") or 0)
        out["moe_ffn_dim"] = int(d.get("moe_intermediate_size")
                                 or d.get("expert_intermediate_size") or 0)
    # per-layer geometry: global layers may differ in head dim and KV heads, nothing else
    head_dim, kv = stated["head_dim"], stated.get("num_kv_heads", stated["num_heads"])
    glob = {"head_dim": d.get("global_head_dim", 512)}
    if d.get("num_global_key_value_heads") is not None and out["k_eq_v"]:
        glob["num_key_value_heads"] = d["num_global_key_value_heads"]
    per_layer = d.get("per_layer_config")
    if per_layer is not None:
        gh, gkv = _per_layer_config(per_layer, types, head_dim, kv, path)
    else:
        gh, gkv = glob["head_dim"], glob.get("num_key_value_heads", kv)
    out["global_head_dim"] = None if gh == head_dim else int(gh)
    out["global_kv_heads"] = None if gkv == kv else int(gkv)
    return out


def _per_layer_config(per_layer, types: tuple, head_dim: int, kv: int, path: Path):
    """(head_dim, KV heads) of the global layers from per_layer_config's overrides, which may
    touch global layers only and must give them all one geometry."""
    if not isinstance(per_layer, dict):
        raise CheckpointError(f"{path}: per_layer_config must be an object")
    seen = {}
    for key, over in per_layer.items():
        try:
            i = int(key)
        except ValueError:
            raise CheckpointError(f"{path}: per_layer_config key {key!r} is not a layer "
                                  f"index") from None
        if not 0 <= i < len(types) or not isinstance(over, dict):
            raise CheckpointError(f"{path}: per_layer_config entry {key!r} is not a layer "
                                  f"override")
        if set(over) - {"head_dim", "num_key_value_heads"}:
            raise CheckpointError(f"{path}: per_layer_config of layer {i} overrides "
                                  f"{sorted(set(over) - {'head_dim', 'num_key_value_heads'})}"
                                  f", which this compiler does not support")
        if types[i] != GLOBAL:
            raise CheckpointError(f"{path}: per_layer_config overrides layer {i}, a "
                                  f"sliding layer; only global layers may differ")
        seen[i] = (over.get("head_dim", head_dim), over.get("num_key_value_heads", kv))
    want = {i for i, t in enumerate(types) if t == GLOBAL}
    values = {seen.get(i, (head_dim, kv)) for i in want}
    if len(values) > 1:
        raise CheckpointError(f"{path}: per_layer_config gives global layers different "
                              f"geometries {sorted(values)}; this compiler needs one")
    return values.pop() if values else (head_dim, kv)


def _rope(d: dict, family: int, path: Path) -> dict:
    """RoPE fields as transformers 5 (`rope_parameters`) or 4 (flat keys) states them."""
    rp = d.get("rope_parameters") or {}
    if family == 4 and not rp and "rope_theta" not in d:   # transformers' Gemma 4 default
        rp = {"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
              "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                 "rope_theta": 1_000_000.0}}
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
    if rtype not in ("default", "linear") + (("proportional",) if family == 4 else ()):
        raise CheckpointError(f"{path}: unsupported rope type {rtype!r}")
    if slide.get("rope_type", "default") != "default":
        raise CheckpointError(f"{path}: unsupported rope type {slide['rope_type']!r} on "
                              f"sliding layers")
    out = {}
    if "rope_theta" in full:
        out["rope_base_global"] = float(full["rope_theta"])
    if "rope_theta" in slide:
        out["rope_base_local"] = float(slide["rope_theta"])
    if rtype in ("linear", "proportional"):
        out["rope_scale_global"] = float(full.get("factor", 1.0))
    if family == 4:
        out["rope_fraction_global"] = float(full.get("partial_rotary_factor", 1.0)
                                            if rtype == "proportional" else 1.0)
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


# Gemma 4's additions: per-layer tensors (full name after `layers.{i}.`) and top-level ones
_GEMMA4_LAYER = {
    "layer_scalar": ("layer_scalar", "norm"),
    "per_layer_input_gate.weight": ("ple_gate", "linear"),
    "per_layer_projection.weight": ("ple_proj", "linear"),
    "post_per_layer_input_norm.weight": ("ple_norm", "norm"),
    "router.proj.weight": ("router", "linear"),
    "router.scale": ("router_scale", "norm"),
    "router.per_expert_scale": ("expert_scale", "norm"),
    "experts.gate_up_proj": ("experts_gate_up", "experts_gate_up"),
    "experts.down_proj": ("experts_down", "experts"),
    "post_feedforward_layernorm_1.weight": ("post_mlp_norm", "norm"),
    "post_feedforward_layernorm_2.weight": ("post_moe_norm", "norm"),
    "pre_feedforward_layernorm_2.weight": ("moe_norm", "norm"),
}
_GEMMA4_TOP = {"embed_tokens_per_layer.weight": ("ple_embed", "embed"),
               "per_layer_model_projection.weight": ("ple_model_proj", "linear"),
               "per_layer_projection_norm.weight": ("ple_proj_norm", "norm")}


def _strip_prefix(hf_name: str) -> str | None:
    for pre in _PREFIXES:
        if hf_name.startswith(pre):
            return hf_name[len(pre):]
    return None


def _hf_to_ours(cfg: GemmaConfig, hf_name: str) -> tuple[str, str] | None:
    """(our name, kind) where kind is 'linear', 'norm', 'embed', 'experts' or
    'experts_gate_up'; None for tensors we ignore."""
    name = _strip_prefix(hf_name)
    if name is None:
        return None
    if name == "embed_tokens.weight":
        return "embed", "embed"
    if name == "norm.weight":
        return "final_norm", "norm"
    if cfg.family == 4 and name in _GEMMA4_TOP:
        return _GEMMA4_TOP[name]
    parts = name.split(".")
    if parts[0] != "layers" or len(parts) < 3:
        return None
    i, rest = parts[1], ".".join(parts[2:])
    if cfg.family == 4 and rest in _GEMMA4_LAYER:
        ours, kind = _GEMMA4_LAYER[rest]
        return f"layers.{i}.{ours}", kind
    if parts[-1] != "weight":
        return None
    table = layer_names(cfg.family)
    if rest[:-len(".weight")] not in table:
        return None
    ours, kind = table[rest[:-len(".weight")]]
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
    """A lazy float32 tensor in our layout: linear weights [out, in] -> [in, out], expert stacks
    [E, out, in] -> [E, in, out]."""
    if kind == "experts":
        E, o, i = w.shape
        return Tensor(ours, (E, i, o), np.dtype(np.float32),
                      lambda: np.ascontiguousarray(w.load().astype(np.float32).transpose(0, 2, 1)),
                      origin, part=lambda e: np.ascontiguousarray(
                          _rows(w, e, 0, o).load().astype(np.float32).T))
    if kind == "linear":
        return Tensor(ours, tuple(w.shape[::-1]), np.dtype(np.float32),
                      lambda: np.ascontiguousarray(w.load().astype(np.float32).T), origin)
    rows = None
    if len(w.shape) == 2:   # a table: row ranges read alone (the per-layer embeddings)
        rows = lambda lo, hi: dataclasses.replace(
            w, offset=w.offset + lo * w.shape[1] * np.dtype(w.dtype).itemsize,
            shape=(hi - lo, w.shape[1])).load().astype(np.float32, copy=False)
    return Tensor(ours, tuple(w.shape), np.dtype(np.float32),
                  lambda: w.load().astype(np.float32, copy=False), origin, rows=rows)


def _split_gate_up(name: str, w: safetensors.Entry, origin: str) -> list[Tensor]:
    """Gemma 4's fused experts [E, 2I, D] (gate rows, then up rows) -> experts_gate and
    experts_up [E, D, I]; each half is read only when asked for."""
    if len(w.shape) != 3 or w.shape[1] % 2:
        raise CheckpointError(f"{origin}: expected [experts, 2 x width, d_model], got "
                              f"{list(w.shape)}")
    E, I2, D = w.shape
    I = I2 // 2
    prefix = name[:-len("experts_gate_up")]

    def half(lo):
        return lambda: np.ascontiguousarray(
            w.load()[:, lo:lo + I, :].astype(np.float32).transpose(0, 2, 1))

    def part(lo):   # one expert's half: contiguous rows of the file, read alone
        return lambda e: np.ascontiguousarray(_rows(w, e, lo, I).load().astype(np.float32).T)
    return [Tensor(prefix + "experts_gate", (E, D, I), np.dtype(np.float32), half(0), origin,
                   part=part(0)),
            Tensor(prefix + "experts_up", (E, D, I), np.dtype(np.float32), half(I), origin,
                   part=part(I))]


def _rows(w: safetensors.Entry, e: int, lo: int, n: int) -> safetensors.Entry:
    """Rows lo..lo+n of entry e of a 3-D safetensors tensor, as an entry of its own."""
    _, R, C = w.shape
    size = np.dtype(w.dtype).itemsize
    return dataclasses.replace(w, offset=w.offset + ((e * R + lo) * C) * size, shape=(n, C))


def load_hf(path: Path, progress=None) -> Checkpoint:
    """Reads the config and the tensors' headers; the weights stay in their files until a
    consumer reads them, one at a time (`weights.Params`)."""
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{path}: no config.json (not a Hugging Face model directory)")
    try:
        stated = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: invalid JSON: {e}") from e
    cfg = config_from_hf(stated, cfg_file)
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
            if kind == "experts_gate_up":
                parts = _split_gate_up(name, w, f"{f} ({hf_name})")
            else:
                parts = [_tensor(name, kind, w, f"{f} ({hf_name})")]
            for t in parts:
                if t.name in tensors:
                    raise CheckpointError(f"{f}: tensor {hf_name} ({t.name}) also appears in "
                                          f"{tensors[t.name].origin}")
                tensors[t.name] = t
    want = param_shapes(cfg)
    if not any(n in want for n in tensors):
        raise CheckpointError(
            f"{path}: no text-model weights found (looked for names under "
            f"{', '.join(repr(p) for p in _PREFIXES)}); a multimodal checkpoint must carry its "
            f"language model's weights")
    # KV-shared layers' k/v projections, which transformers also ignores, and anything else
    # the config has no place for
    params = Params({n: t for n, t in tensors.items() if n in want})
    try:
        check_params(cfg, params, path)
    except CheckpointError as e:
        omitted = omitted_fields(stated)
        if omitted:
            raise CheckpointError(f"{e} — {cfg_file} does not state {', '.join(omitted)}, so "
                                  f"transformers' defaults were used; state this model's values "
                                  f"there") from None
        raise
    tok_file = path / "tokenizer.model"
    if not tok_file.exists():
        raise CheckpointError(f"{path}: no tokenizer.model (SentencePiece) file")
    model_bytes = tok_file.read_bytes()
    special = _special_ids(model_bytes, tok_file)
    return Checkpoint(cfg, params, model_bytes, special, source={"format": "hf", "path": str(path)},
                      chat_template=chat_template(path))


def chat_template(path: Path) -> str | None:
    """The checkpoint's chat template, where transformers keeps it: chat_template.jinja, else
    tokenizer_config.json's "chat_template" (a string, or named templates: the "default" one),
    else a processor's chat_template.json. None when it has none."""
    jinja = path / "chat_template.jinja"
    if jinja.exists():
        try:
            return jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{jinja}: unreadable chat template: {e}") from None
    for name in ("tokenizer_config.json", "chat_template.json"):
        f = path / name
        if not f.exists():
            continue
        try:
            t = json.loads(f.read_text(encoding="utf-8")).get("chat_template")
        except (OSError, UnicodeDecodeError, ValueError, AttributeError) as e:
            raise CheckpointError(f"{f}: not a JSON object ({e})") from None
        if isinstance(t, list):   # [{"name": ..., "template": ...}]
            t = next((x.get("template") for x in t if isinstance(x, dict)
                      and x.get("name") == "default"), None)
        if t is not None and not isinstance(t, str):
            raise CheckpointError(f"{f}: chat_template must be a string, got "
                                  f"{type(t).__name__}")
        if t:
            return t
    return None


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
