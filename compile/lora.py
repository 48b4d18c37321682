"""LoRA adapters as Hugging Face PEFT saves them, read, checked against a base, and merged.

A PEFT directory (`save_pretrained`) holds `adapter_config.json` and `adapter_model.safetensors`
with, per adapted matmul, `base_model.model.<module>.lora_A.weight` [r, in] and `.lora_B.weight`
[out, r] (torch's [out, in] convention). PEFT's forward adds `scaling * B @ A x` to the module's
output, with scaling = alpha / r (alpha / sqrt(r) under `use_rslora`), r and alpha per module from
`rank_pattern` / `alpha_pattern` (a key matches a module whose name ends with it), else `r` and
`lora_alpha`. Merged into our [in, out] weight that is W + s * scaling * (B @ A)^T, for a user's
extra scale s.

Module names are transformers' (the HF loader's map, `checkpoints.hf`), so one adapter applies to
a Hugging Face base and to a GGUF of the same model alike. Modules the base has no weight for
because its model computes none (Gemma 4's KV-shared layers' k/v projections, which transformers
also leaves unused) change nothing and are skipped; any other unknown module is an error.

What PEFT can express beyond plain LoRA on linear layers is refused by name before anything is
read: other adapter types, DoRA, biases, `modules_to_save`, LoRA on embeddings or the output
layer, trainable tokens, layer replication, activated LoRA, and the rest that changes the forward.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from runtime import contract as ct

from .config import GemmaConfig
from .weights import Params
from .weights.sources import Tensor

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."

# adapter_config.json keys that do not change the forward of a saved adapter (or are checked
# separately); any other key with a set value is refused by name
_HARMLESS = {
    "peft_type", "r", "lora_alpha", "target_modules", "use_rslora", "rank_pattern",
    "alpha_pattern", "layers_to_transform", "layers_pattern", "exclude_modules",
    "base_model_name_or_path", "revision", "task_type", "inference_mode", "init_lora_weights",
    "lora_dropout", "auto_mapping", "peft_version", "megatron_core", "qalora_group_size",
    "ensure_weight_tying", "bias", "fan_in_fan_out",
    # initialisation settings: those that rewrite the base weights are refused through
    # init_lora_weights (_REWRITES_BASE); the rest only chose the saved A and B
    "loftq_config", "eva_config", "corda_config", "lora_ga_config",
}
# init_lora_weights values whose initialisation also changed the base weights (PiSSA, OLoRA,
# CorDA, LoftQ, LoRA-GA): the saved A and B then belong to that changed base
_REWRITES_BASE = ("pissa", "olora", "corda", "loftq", "lora_ga")
# modules of a multimodal checkpoint outside its text model: an adapter on them (PEFT's
# "all-linear" adapts them too) changes no text output
_NOT_TEXT = ("vision_tower.", "audio_tower.", "multi_modal_projector.", "embed_vision.",
             "embed_audio.")
_WHY = {
    "use_dora": "DoRA (weight-decomposed LoRA) rescales each merged column by its norm",
    "modules_to_save": "modules_to_save replaces whole modules, not a low-rank update",
    "lora_bias": "LoRA biases add a bias term that Gemma's matmuls do not have",
    "trainable_token_indices": "trainable tokens change embedding rows",
    "layer_replication": "layer replication changes the number of layers",
    "alora_invocation_tokens": "activated LoRA applies only after its invocation tokens",
    "use_qalora": "QA-LoRA pools its inputs",
    "target_parameters": "LoRA on parameters (e.g. Gemma 4's expert stacks)",
}


class AdapterError(ValueError):
    pass


@dataclass(frozen=True)
class Module:
    """One adapted matmul: our parameter `name` ([in, out]) gets scaling * (b @ a)^T."""
    name: str
    peft_name: str            # the adapter's module name, for messages
    a: np.ndarray             # [r, in]
    b: np.ndarray             # [out, r]
    scaling: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def delta(self, scale: float = 1.0) -> np.ndarray:
        """The update of our [in, out] weight, float32."""
        return ((scale * self.scaling) * (self.b @ self.a)).T.astype(np.float32)


@dataclass(frozen=True)
class Adapter:
    path: Path
    modules: dict[str, Module]      # our parameter name -> module
    skipped: tuple[str, ...]        # PEFT modules with no effect on this base (see above)

    @property
    def rank(self) -> int:
        return max((m.rank for m in self.modules.values()), default=0)

    @property
    def targets(self) -> tuple[str, ...]:
        """Our short names of the adapted matmuls (q_proj, v_proj, ...)."""
        return tuple(sorted({n.rsplit(".", 1)[-1] for n in self.modules}))


def read_config(path: Path) -> dict:
    f = path / CONFIG_FILE
    if not f.exists():
        raise AdapterError(f"{path}: no {CONFIG_FILE} (not a PEFT adapter directory)")
    try:
        cfg = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{f}: invalid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{f}: not a JSON object")
    kind = cfg.get("peft_type")
    if kind != "LORA":
        raise AdapterError(f"{f}: peft_type {kind!r} is not supported; only LoRA adapters "
                           f"(peft_type LORA) are")
    for key, why in _WHY.items():
        if cfg.get(key):
            raise AdapterError(f"{f}: {key} is not supported ({why}); only plain LoRA on "
                               f"linear layers merges into the base's weights")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"{f}: bias {cfg['bias']!r} is not supported (Gemma's matmuls have "
                           f"no bias); only bias 'none'")
    if cfg.get("fan_in_fan_out"):
        raise AdapterError(f"{f}: fan_in_fan_out is not supported (no Gemma module stores "
                           f"[in, out] weights)")
    for key, value in cfg.items():
        if key not in _HARMLESS and key not in _WHY and value not in (None, False, {}, [], ""):
            raise AdapterError(f"{f}: {key} is not supported (it is not plain LoRA)")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_REWRITES_BASE):
        raise AdapterError(f"{f}: init_lora_weights {init!r} is not supported: that "
                           f"initialisation also rewrote the base weights, so the adapter is "
                           f"valid only on the rewritten base (save it with PEFT's "
                           f"path_initial_model_for_weight_conversion to make it a plain LoRA)")
    for key in ("r", "lora_alpha"):
        if not _positive(cfg.get(key, 8)):
            raise AdapterError(f"{f}: {key} must be a positive number, not {cfg.get(key)!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = cfg.get(key) or {}
        if not isinstance(pattern, dict):
            raise AdapterError(f"{f}: {key} must be an object (module pattern -> number), not "
                               f"{pattern!r}")
        for k, v in pattern.items():
            if not _positive(v):
                raise AdapterError(f"{f}: {key}[{k!r}] must be a positive number, not {v!r}")
            try:
                re.compile(k)
            except re.error as e:
                raise AdapterError(f"{f}: {key} key {k!r} is not a valid pattern ({e})") from None
    layers = cfg.get("layers_to_transform")
    if layers is not None and not (_whole(layers) or isinstance(layers, list)
                                   and all(_whole(i) for i in layers)):
        raise AdapterError(f"{f}: layers_to_transform must be a layer index or a list of them, "
                           f"not {layers!r}")
    return cfg


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0


def _whole(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that matches the end of the
    module's name (`peft.utils.other.get_pattern_key`)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read(path: str | Path, cfg: GemmaConfig, base: Params) -> Adapter:
    """The adapter at `path`, checked against the base (`cfg`, `base`'s names and shapes)."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"{path}: not a directory (a PEFT adapter is the directory "
                           f"save_pretrained writes)")
    conf = read_config(path)
    wfile = path / WEIGHTS_FILE
    pairs = _ab_pairs(wfile)
    specs = base.specs()
    # the matmuls the model computes (runtime.contract states which, e.g. none for k/v on
    # Gemma 4's KV-shared layers): a module outside them changes nothing and is skipped
    computed = {f"layers.{s.layer}.{s.target}" for s in ct.lora_slots(cfg)}
    layers = conf.get("layers_to_transform")
    layers = {layers} if isinstance(layers, int) else set(layers) if layers else None
    modules, skipped = {}, []
    for peft_name, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{wfile}: module {peft_name} has lora_{''.join(ab)} only")
        module = peft_name[len(PREFIX):] if peft_name.startswith(PREFIX) else peft_name
        ours = _base_weight(wfile, module, cfg, layers)
        if ours is not None and ours not in specs and ours in computed:
            raise AdapterError(f"{wfile}: module {module} has no weight in the base "
                               f"({cfg.name}): an adapter for another model?")
        if ours is None or ours not in specs:   # not text, or a matmul the model never runs
            skipped.append(module)
            continue
        modules[ours] = _module(wfile, module, ours, ab, specs[ours][0], conf)
    if not modules:
        raise AdapterError(f"{wfile}: no LoRA module applies to {cfg.name}")
    return Adapter(path, modules, tuple(skipped))


def _ab_pairs(wfile: Path) -> dict[str, dict[str, object]]:
    """PEFT module name -> {"A": entry, "B": entry} of the adapter's safetensors file."""
    from .weights import safetensors
    if not wfile.exists():
        raise AdapterError(f"{wfile.parent}: no {WEIGHTS_FILE} (PEFT's .bin adapters are not "
                           f"read: save with safe_serialization=True)")
    try:
        entries = safetensors.read(wfile)
    except safetensors.SafetensorsError as e:
        raise AdapterError(str(e)) from None
    pairs: dict[str, dict[str, object]] = {}
    for key, entry in entries.items():
        if "lora_embedding_" in key:
            raise AdapterError(f"{wfile}: {key}: LoRA on embeddings is not supported")
        m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if not m:
            raise AdapterError(f"{wfile}: tensor {key} is not a LoRA A/B matrix (only plain "
                               f"LoRA adapters are supported)")
        ab = pairs.setdefault(m.group(1), {})
        if m.group(2) in ab:
            raise AdapterError(f"{wfile}: module {m.group(1)} has more than one lora_{m.group(2)} "
                               f"(several adapters in one file); save one adapter per directory")
        ab[m.group(2)] = entry
    return pairs


def _base_weight(wfile: Path, module: str, cfg: GemmaConfig, layers: set | None) -> str | None:
    """Our name of the linear weight a PEFT module adapts; None for a module outside the text
    model (vision tower, ...)."""
    from .checkpoints import hf
    if any(part in module + "." for part in _NOT_TEXT):
        return None
    if module.split(".")[-1] in ("embed_tokens", "lm_head"):
        raise AdapterError(f"{wfile}: module {module}: LoRA on the embedding/output layer "
                           f"is not supported")
    mapped = hf._hf_to_ours(cfg, module + ".weight")
    if mapped is None or mapped[1] != "linear":
        raise AdapterError(f"{wfile}: module {module} is not a linear layer of a "
                           f"{cfg.name} model")
    ours = mapped[0]
    layer = int(ours.split(".")[1]) if ours.startswith("layers.") else None
    if layers is not None and layer is not None and layer not in layers:
        raise AdapterError(f"{wfile}: module {module} is in layer {layer}, which "
                           f"layers_to_transform {sorted(layers)} leaves out")
    return ours


def _module(wfile: Path, module: str, ours: str, ab: dict, shape: tuple, conf: dict) -> Module:
    """The checked A, B and scaling of one module (`shape`: the base weight's (in, out))."""
    n_in, n_out = shape
    a, b = ab["A"], ab["B"]
    r = a.shape[0] if len(a.shape) == 2 else None
    if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[1] != n_in or \
            b.shape != (n_out, r):
        raise AdapterError(
            f"{wfile}: module {module}: lora_A {list(a.shape)} and lora_B {list(b.shape)} "
            f"do not fit the base's {ours} ({n_in} inputs, {n_out} outputs; A must be "
            f"[r, {n_in}], B [{n_out}, r]): an adapter for another model?")
    want_r = _pattern_value(conf.get("rank_pattern"), module, conf.get("r", 8))
    if want_r != r:
        raise AdapterError(f"{wfile}: module {module} has rank {r}, but "
                           f"{CONFIG_FILE} says {want_r}")
    alpha = _pattern_value(conf.get("alpha_pattern"), module, conf.get("lora_alpha", 8))
    scaling = alpha / (math.sqrt(r) if conf.get("use_rslora") else r)
    return Module(ours, module, _load(a, wfile, module, "A"), _load(b, wfile, module, "B"),
                  float(scaling))


def _load(entry, wfile: Path, module: str, which: str) -> np.ndarray:
    a = entry.load().astype(np.float32)
    if not np.isfinite(a).all():
        raise AdapterError(f"{wfile}: module {module}: lora_{which} has non-finite values")
    return a


def merge(params: Params, adapter: Adapter, scale: float = 1.0) -> Params:
    """The base's params with every adapted weight replaced by its merge, read lazily (one
    tensor at a time, like the base). A merged weight is float32 whatever the base stored, so
    quantizing targets quantize it with their float recipe; `merged` maps each to the format its
    checkpoint stored it in (onnx `native` re-quantizes only those that were blocks)."""
    if not math.isfinite(scale):
        raise AdapterError(f"--lora-scale must be a finite number, not {scale}")
    tensors = dict(params.tensors)
    for name, m in adapter.modules.items():
        t = tensors[name]
        tensors[name] = replace(
            t, read=(lambda t=t, m=m: (t.get() + m.delta(scale)).astype(np.float32)),
            origin=f"{t.origin or name} + LoRA {m.peft_name}", format="F32", blocks=None)
    out = Params(tensors)
    out.merged = {**params.merged, **{n: params.tensors[n].format for n in adapter.modules}}
    return out


def apply(ck, path: str | Path, scale: float = 1.0, log=None):
    """The checkpoint `ck` with the PEFT adapter at `path` merged (times `scale`); its source
    record names the adapter (path, sha256 of its weights, scale, rank, targets)."""
    import dataclasses
    from runtime.manifest import sha256_file
    adapter = read(path, ck.config, ck.params)
    if log and adapter.skipped:
        log(f"LoRA: {len(adapter.skipped)} module(s) skipped, the text model computes no output "
            f"from them: {', '.join(adapter.skipped[:4])}{' ...' if len(adapter.skipped) > 4 else ''}")
    params = merge(ck.params, adapter, scale)
    source = {**ck.source, "lora": {
        "path": str(adapter.path), "sha256": sha256_file(adapter.path / WEIGHTS_FILE),
        "config_sha256": sha256_file(adapter.path / CONFIG_FILE),
        "scale": scale, "rank": adapter.rank, "targets": list(adapter.targets),
        "modules": len(adapter.modules)}}
    if log:
        log(f"LoRA: merged {len(adapter.modules)} matmuls (rank <= {adapter.rank}, "
            f"{', '.join(adapter.targets)}) from {adapter.path}, scale {scale:g}")
    return dataclasses.replace(ck, params=params, source=source)
