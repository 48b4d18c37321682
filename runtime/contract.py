"""The contract between the compiler and the runtime: signature names, tensor names, shapes and
dtypes, the KV-cache layout per layer, and the manifest schema with its one version.

This module is the only place that spells these. `compile` imports it (never the reverse); every
target and backend reads names, shapes and layouts from it. It needs only the standard library, so
any backend can read it without JAX.

Signatures: `prefill_{N}` for each static prompt length N, `decode` (one token), and optionally
`verify_{N}` (N tokens in, the logits of every one of them out: teacher-forced scoring, such as the
export's quality gate, and checking a draft model's N proposals in one pass). All share one
KV-cache shape per layer (max context S). The cache is external: every signature takes each cache
tensor as an input and returns it updated; the runtime owns it between calls.

Names and layouts follow LiteRT-LM's convention for prefill/decode models, so a TFLite file can be
handed to that engine unchanged:

  tokens            [1, T] int32      T = N for prefill_N, 1 for decode
  input_pos         [T] int32         absolute positions, contiguous: input_pos[t] = input_pos[0] + t
  kv_cache_k_{i}    [1, K, S, H] f32  (B, KV heads, position, head dim)
  kv_cache_v_{i}    [1, K, H, S] f32  V stored transposed: the attention contraction over S is then a
                                      plain matmul, and one token's write is a column update
  logits            [1, 1, V] f32     decode; [1, N, V] for verify_N; prefill returns just the caches

Cache slot s holds position s. A slot is read only by queries at positions >= s, and every slot is
written (by prefill or decode) before any query at its position runs, so padding a prefill chunk
writes only slots that are overwritten before they are read. The runtime must keep
input_pos[0] + T <= S (writes past the end would be clamped onto valid slots).
The attention mask is computed inside the graph from input_pos; there is no mask input.

Cache outputs come in one of two forms (`CACHE_OUTPUTS`), fixed per target and recorded in its
manifest entry (`cache_outputs`; absent means `full`):
  full   the updated caches under the input's names (above). Targets whose runtimes bind one buffer
         as both input and output (TFLite, XLA with donation) update them in place.
  rows   the cache inputs are the read-only past: `kv_cache_k_{i}` and `kv_cache_v_{i}` are both
         [1, K, P, H] (BKSH), the P slots just before input_pos[0], with P symbolic per layer
         (at least 1; slots that would precede position 0 are masked): all cached positions for
         global layers, at most `past_window` (sliding window - 1) for local ones. The outputs
         are only this call's new rows, `kv_cache_k_{i}_new` and `kv_cache_v_{i}_new`, both
         [1, K, T, H]; the runtime keeps full-length buffers, passes views of them and writes the
         rows at input_pos itself (`runtime.kv`). So nothing in the graph copies a cache, and
         attention reads only the filled part (and the window) of each cache. ONNX uses this: an
         ONNX graph cannot alias an output to an input, so a full-cache output is a copy of every
         layer's cache per call.

KV layout per layer (`LayerCache`): each cache-owning layer has its own KV-head count, head dim and
window, so layers of different head sizes fit (Gemma 4: 256 on local layers, 512 on global ones);
a layer that owns no cache (Gemma 4's KV-shared layers read a producer's) simply has no entry, so
cache names may have gaps, and `KVLayout.owner(i)` says whose cache it reads. `layer_specs`
states these rules once for the compiler and every backend.

LoRA slots (`lora_slots`): the q/k/v/o/gate/up/down matmuls a model computes, each with its input
and output widths, derived from the config alone like the KV layout; a slot takes A [in, R] and
B [R, out] (`LoraSlot.a_name`, `b_name`) and adds (x A) B to the matmul's output. A contract with
`lora_rank` R > 0 adds, after the base signatures, `lora_prefill_{N}` and `lora_decode`
(`lora_name`): the same inputs and outputs plus every slot of `lora_targets` (`lora_specs`);
zero slots are the base model. The base signatures never take a slot input (LiteRT-LM's engine
runs them, and leaves inputs it does not know unset).

Manifest (`manifest.json`, version `SCHEMA_VERSION`; versions `READABLE_VERSIONS` are read), checked
by `validate` with errors that name the bad field; unknown fields are ignored (version 1 artifacts
carried `kv_layout`, and onnx records `dynamic_length`, `past_window` and `output_names`, which this
runtime derives from the contract instead):
  schema_version  int
  model           {"variant": str, "config": {GemmaConfig fields}, "source": {...}}
  tokenizer       {"file": str, "sha256": str, and the ids "bos", "eos", "pad", "unk",
                   "start_of_turn", "end_of_turn" (Gemma 4: <|turn>, <turn|>); optional
                   "chat_template": the checkpoint's Jinja template (`runtime.chat.render`)}
  signatures      {"max_context": int, "prefill_lengths": [int], "kv_dtype": str,
                   optional "verify_lengths": [int], optional "lora": {"rank": R, "targets": [str]},
                   "entries": [{"name", "kind", "length", optional "lora": true,
                                "inputs": [TensorSpec], "outputs": [TensorSpec]}]}
                  (exactly what `Contract` derives)
  artifacts       {target: {"target", "dir", "files": {role: {"path", "sha256", "bytes"}},
                            "quantization", "parity": {...} or {"skipped": reason}, "created",
                            "export_s", ...target fields (onnx: cache_outputs, max_length;
                            xla-tpu: topology, mesh, shardings...)}}
  adapters        optional {name: {"path", "sha256", "bytes", "rank" (<= R), "targets" (within
                  the slots'), "modules", "source", "skipped", "created"}}: run-time LoRA
                  adapters (`runtime.adapters`; `compile.adapter` adds them)
  seal            optional {"alg": "hmac-sha256", "key_id": str, "value": hex}: an HMAC of the
                  rest of the manifest (canonical JSON) with the user's key
                  (`runtime.integrity`); required before pickle-based executables (xla-tpu) load
Paths are relative to the artifact directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

SCHEMA_VERSION = 3            # what the exporter writes
READABLE_VERSIONS = (1, 2, 3)  # 2 dropped fields nothing read (v1 had signatures.kv_layout and,
                               # for onnx, dynamic_length/past_window/output_names): a v1 runtime
                               # cannot run a v2 onnx artifact, so it must refuse v2 by its
                               # version; likewise 3's onnx graph takes `logit_index`, which a v2
                               # runtime would not feed (a v3 runtime runs v2 graphs as they are)
MANIFEST_FILE = "manifest.json"
SEAL = "seal"               # the manifest's optional HMAC record

# -- tensor and signature names --------------------------------------------------------------

TOKENS = "tokens"
INPUT_POS = "input_pos"
LOGITS = "logits"
LOGIT_INDEX = "logit_index"   # onnx's one graph: the positions [R] whose logits it returns
_CACHE_PREFIX = "kv_cache_"
_ROWS_SUFFIX = "_new"

PREFILL, DECODE = "prefill", "decode"          # signature kinds; `decode` is also its name
VERIFY = "verify"                              # signature kind: logits at every position
DEFAULT_PREFILL_LENGTHS = (32, 128, 512)
DEFAULT_VERIFY_LENGTHS = (8,)  # what `compile.export` adds unless told otherwise (a Contract
                               # built without verify_lengths has none)
DEFAULT_MAX_CONTEXT = 2048

FULL, ROWS = "full", "rows"
CACHE_OUTPUTS = (FULL, ROWS)

LOCAL = "local"      # sliding-window attention layer (manifest config `layer_types`)
GLOBAL = "global"    # full causal attention layer

K_LAYOUT = "BKSH"    # full form; the rows form keeps both K and V as BKSH
V_LAYOUT = "BKHS"


def k_name(layer: int) -> str:
    return f"{_CACHE_PREFIX}k_{layer}"


def v_name(layer: int) -> str:
    return f"{_CACHE_PREFIX}v_{layer}"


def rows_name(name: str) -> str:
    """The output carrying a cache's new rows (cache outputs `rows`)."""
    return name + _ROWS_SUFFIX


def prefill_name(length: int) -> str:
    return f"{PREFILL}_{length}"


def verify_name(length: int) -> str:
    return f"{VERIFY}_{length}"


LORA_PREFIX = "lora_"


def lora_name(signature: str) -> str:
    """The signature that runs `signature` with run-time LoRA slots (`lora_prefill_N`,
    `lora_decode`). It must not start with `prefill`: LiteRT-LM's engine takes every such
    signature for a prefill length, and would feed slot inputs it does not know nothing."""
    return LORA_PREFIX + signature


# -- KV layout ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple
    dtype: str

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class LayerCache:
    """The K and V cache one layer owns."""
    layer: int
    kv_heads: int
    head_dim: int
    window: int | None       # sliding window of a local layer; None for a global one

    @property
    def k(self) -> str:
        return k_name(self.layer)

    @property
    def v(self) -> str:
        return v_name(self.layer)

    @property
    def names(self) -> tuple[str, str]:
        return self.k, self.v

    @property
    def past_window(self) -> int | None:
        """The most past slots this layer reads (cache outputs `rows`); None: all of them."""
        return None if self.window is None else self.window - 1

    def rows_shape(self, t) -> tuple:
        """Cache outputs `rows`: the past inputs (t = P) and the new rows (t = T)."""
        return (1, self.kv_heads, t, self.head_dim)                           # B K S H

    def shapes(self, slots, form: str = FULL) -> tuple[tuple, tuple]:
        """(K shape, V shape) of this layer's cache inputs over `slots` positions."""
        if form == ROWS:
            return self.rows_shape(slots), self.rows_shape(slots)
        return (1, self.kv_heads, slots, self.head_dim), (1, self.kv_heads, self.head_dim, slots)


def _get(config, key: str, default=None):
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


@dataclass(frozen=True)
class LayerSpec:
    """One layer's geometry, derived once from the model config (`layer_specs`): its attention
    from the cache's side, and the width of every matmul it computes."""
    layer: int
    kind: str                # LOCAL or GLOBAL
    kv_heads: int
    head_dim: int
    window: int | None       # sliding window of a local layer; None for a global one
    owner: int               # the layer whose cache it reads: itself, or (KV sharing) a producer
    ffn_dim: int = 0         # its FFN's width (Gemma 4's double-wide FFN on KV-shared layers)
    k_eq_v: bool = False     # its values are its keys' projection (no v_proj)
    matmuls: tuple[tuple[str, tuple[int, int]], ...] = ()   # (name, (in, out)) it computes

    @property
    def produces_kv(self) -> bool:
        """It computes its own K and V (False: a KV-shared layer reading its owner's)."""
        return self.owner == self.layer


LayerAttention = LayerSpec   # the name the KV layout's readers knew it by


def layer_specs(config) -> tuple[LayerSpec, ...]:
    """Each layer's geometry from a model config (compile's GemmaConfig or the manifest's config
    dict; fields absent in older manifests mean Gemma 1-3 behaviour). The one statement of these
    rules, which the model's parameter shapes, the KV layout, the LoRA slots and every backend
    share:
    - global layers use `global_head_dim` / `global_kv_heads` where set (Gemma 4: 512 and, with
      k_eq_v, fewer KV heads);
    - with `kv_shared_layers` = n > 0 (Gemma 4), the last n layers compute no K/V: each reads the
      cache of the last earlier layer of its own type, as transformers' `kv_sharing_modes` does;
      they own no cache tensors, and under `double_wide_mlp` their FFN is twice as wide;
    - with `k_eq_v`, a global layer's values are its keys' projection: it has no v_proj."""
    L = int(_get(config, "num_layers"))
    types = tuple(_get(config, "layer_types") or ()) or (GLOBAL,) * L
    window = _get(config, "sliding_window")
    shared = int(_get(config, "kv_shared_layers", 0) or 0)
    D, N = int(_get(config, "d_model")), int(_get(config, "num_heads"))
    F = int(_get(config, "ffn_dim"))
    wide, k_eq_v = bool(_get(config, "double_wide_mlp", False)), bool(_get(config, "k_eq_v", False))
    first_shared = L - shared
    if shared and not 0 < first_shared:
        raise ValueError(f"kv_shared_layers {shared} leaves no layer to produce a cache "
                         f"({L} layers)")
    out = []
    for i in range(L):
        kind = types[i]
        kv, hd = int(_get(config, "num_kv_heads")), int(_get(config, "head_dim"))
        if kind == GLOBAL:
            kv = int(_get(config, "global_kv_heads", None) or kv)
            hd = int(_get(config, "global_head_dim", None) or hd)
        owner = i
        if i >= first_shared:
            producers = [j for j in range(first_shared) if types[j] == kind]
            if not producers:
                raise ValueError(f"layer {i} ({kind}) shares the KV cache of an earlier {kind} "
                                 f"layer, and there is none")
            owner = producers[-1]
        f = F * (2 if wide and owner != i else 1)
        same_kv = k_eq_v and kind == GLOBAL
        dims = {"q_proj": (D, N * hd)}
        if owner == i:
            dims["k_proj"] = (D, kv * hd)
            if not same_kv:
                dims["v_proj"] = (D, kv * hd)
        dims.update({"o_proj": (N * hd, D), "gate_proj": (D, f), "up_proj": (D, f),
                     "down_proj": (f, D)})
        out.append(LayerSpec(i, kind, kv, hd, int(window) if kind == LOCAL else None, owner,
                             f, same_kv, tuple(dims.items())))
    return tuple(out)


attention_layers = layer_specs   # the name the KV layout's readers knew it by


# -- LoRA slots ---------------------------------------------------------------------------------

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraSlot:
    """One matmul that can take a low-rank update at run time: y = x W + (x A) B, with
    A [n_in, R] and B [R, n_out] (zero: the base model)."""
    layer: int
    target: str              # one of LORA_TARGETS
    n_in: int
    n_out: int

    @property
    def a_name(self) -> str:
        return f"lora_{self.target}_a_{self.layer}"

    @property
    def b_name(self) -> str:
        return f"lora_{self.target}_b_{self.layer}"


def lora_targets(text: str) -> tuple[str, ...]:
    """`q,v,down` or `q_proj,v_proj,down_proj` (or `all`) as LORA_TARGETS names, in their order."""
    names = [t.strip() for t in str(text).split(",") if t.strip()]
    if names == ["all"]:
        return LORA_TARGETS
    full = [t if t.endswith("_proj") else t + "_proj" for t in names]
    unknown = [n for n, f in zip(names, full) if f not in LORA_TARGETS]
    if unknown or not full:
        raise ValueError(f"unknown LoRA target(s) {', '.join(unknown) or repr(text)}; choose "
                         f"from {', '.join(t[:-5] for t in LORA_TARGETS)} (or all)")
    return tuple(t for t in LORA_TARGETS if t in full)


def lora_slots(config, targets=LORA_TARGETS) -> tuple[LoraSlot, ...]:
    """The matmuls of `targets` that the model computes, layer by layer, with their widths (from
    `layer_specs`): a KV-shared layer computes no k/v projection, a k_eq_v global layer no
    v projection, and a KV-shared layer's FFN is twice as wide under `double_wide_mlp`."""
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(LORA_TARGETS)}")
    out = []
    for a in layer_specs(config):
        dims = dict(a.matmuls)
        out += [LoraSlot(a.layer, t, *dims[t]) for t in LORA_TARGETS if t in targets and t in dims]
    return tuple(out)


@dataclass(frozen=True)
class KVLayout:
    """Every cache tensor of a model, layer by layer, for a cache of `max_context` slots (None:
    names and windows only). `owners[i]` is the layer whose cache layer i reads."""
    caches: tuple[LayerCache, ...]
    max_context: int | None = None
    dtype: str = "float32"
    owners: tuple[int, ...] = ()

    @classmethod
    def of(cls, config, max_context: int | None = None, dtype: str = "float32") -> "KVLayout":
        """From a model config: compile's GemmaConfig or the manifest's config dict. Only layers
        that produce K/V own cache tensors, so names may have gaps and head dims may differ."""
        layers = attention_layers(config)
        caches = tuple(LayerCache(a.layer, a.kv_heads, a.head_dim, a.window)
                       for a in layers if a.owner == a.layer)
        return cls(caches, None if max_context is None else int(max_context), dtype,
                   tuple(a.owner for a in layers))

    def owner(self, layer: int) -> LayerCache:
        """The cache layer `layer` reads: its own, or a producer's under KV sharing."""
        target = self.owners[layer] if layer < len(self.owners) else layer
        for c in self.caches:
            if c.layer == target:
                return c
        raise KeyError(f"layer {layer} reads no cache")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for c in self.caches for n in c.names)

    def is_cache(self, name: str) -> bool:
        return name in self.names

    def specs(self, form: str = FULL, slots=None) -> tuple[TensorSpec, ...]:
        """The cache tensors, in signature order (k_0, v_0, k_1, ...), over `slots` positions
        (default: the whole cache)."""
        slots = self.max_context if slots is None else slots
        out = []
        for c in self.caches:
            ks, vs = c.shapes(slots, form)
            out += [TensorSpec(c.k, ks, self.dtype), TensorSpec(c.v, vs, self.dtype)]
        return tuple(out)

    def nbytes(self) -> int:
        import math
        size = {"float32": 4, "float16": 2, "bfloat16": 2}[self.dtype]
        return sum(math.prod(t.shape) * size for t in self.specs())


# -- signatures -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Signature:
    name: str
    kind: str            # PREFILL, DECODE or VERIFY
    length: int          # tokens per call
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    lora: bool = False   # takes the run-time LoRA slots (`Contract.lora_specs`) as inputs too

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "length": self.length,
                **({"lora": True} if self.lora else {}),
                "inputs": [t.to_dict() for t in self.inputs],
                "outputs": [t.to_dict() for t in self.outputs]}


@dataclass(frozen=True)
class Contract:
    """The signature set of one artifact directory. `config` is compile's GemmaConfig or the
    manifest's config dict (the same fields)."""
    config: Any
    prefill_lengths: tuple[int, ...] = DEFAULT_PREFILL_LENGTHS
    max_context: int = DEFAULT_MAX_CONTEXT
    kv_dtype: str = "float32"
    lora_rank: int = 0                    # R > 0: LoRA signatures beside the base ones
    lora_targets: tuple[str, ...] = LORA_TARGETS   # the matmuls with slots (when lora_rank > 0)
    verify_lengths: tuple[int, ...] = ()  # verify_N signatures (none unless asked for)
    batch: int = field(default=1, init=False)

    def __post_init__(self):
        try:
            lengths = tuple(sorted(set(int(n) for n in self.prefill_lengths)))
        except (TypeError, ValueError):
            lengths = ()
        if not lengths or lengths[0] < 1:
            raise ValueError(f"prefill lengths must be positive integers, got {self.prefill_lengths}")
        if isinstance(self.max_context, bool) or not isinstance(self.max_context, int) \
                or self.max_context < 2:
            raise ValueError(f"max context must be an integer of at least 2 (a prompt token and "
                             f"one to generate), got {self.max_context!r}")
        if lengths[-1] > self.max_context:
            raise ValueError(f"prefill length {lengths[-1]} exceeds max context {self.max_context}")
        object.__setattr__(self, "prefill_lengths", lengths)
        try:
            verify = tuple(sorted(set(int(n) for n in self.verify_lengths)))
        except (TypeError, ValueError):
            verify = (0,)
        if verify and (verify[0] < 1 or verify[-1] > self.max_context):
            raise ValueError(f"verify lengths must be integers from 1 to the max context "
                             f"{self.max_context}, got {self.verify_lengths}")
        object.__setattr__(self, "verify_lengths", verify)
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) \
                or self.lora_rank < 0:
            raise ValueError(f"LoRA rank must be a non-negative integer, got {self.lora_rank!r}")
        targets = tuple(self.lora_targets) if self.lora_rank else ()
        if self.lora_rank:
            unknown = [t for t in targets if t not in LORA_TARGETS]
            if unknown or not targets:
                raise ValueError(f"unknown LoRA target(s) {', '.join(unknown) or '(none)'}; "
                                 f"choose from {', '.join(LORA_TARGETS)}")
            targets = tuple(t for t in LORA_TARGETS if t in targets)
        object.__setattr__(self, "lora_targets", targets)
        if self.lora_rank and not self.lora_slots():
            raise ValueError(f"this model computes none of the LoRA targets "
                             f"{', '.join(targets)}")

    @property
    def kv(self) -> KVLayout:
        return KVLayout.of(self.config, self.max_context, self.kv_dtype)

    @property
    def vocab_size(self) -> int:
        return int(_get(self.config, "vocab_size"))

    def kv_specs(self) -> tuple[TensorSpec, ...]:
        return self.kv.specs()

    def signature(self, name: str) -> Signature:
        for s in self.signatures():
            if s.name == name:
                return s
        raise KeyError(f"no signature {name!r}; have {[s.name for s in self.signatures()]}")

    def lora_slots(self) -> tuple[LoraSlot, ...]:
        """The matmuls that take a run-time low-rank update (none when lora_rank is 0)."""
        return lora_slots(self.config, self.lora_targets) if self.lora_rank else ()

    def lora_specs(self) -> tuple[TensorSpec, ...]:
        """The LoRA signatures' extra inputs, slot by slot: A [in, R], then B [R, out]."""
        R = self.lora_rank
        return tuple(t for s in self.lora_slots()
                     for t in (TensorSpec(s.a_name, (s.n_in, R), "float32"),
                               TensorSpec(s.b_name, (R, s.n_out), "float32")))

    def signatures(self) -> list[Signature]:
        """prefill_N, decode and verify_N; with lora_rank, also lora_prefill_N, lora_decode and
        lora_verify_N, the same with the slots' inputs appended."""
        base = self._signatures()
        lora = self.lora_specs()
        return base + [Signature(lora_name(s.name), s.kind, s.length, s.inputs + lora,
                                 s.outputs, lora=True) for s in base if lora]

    def _signatures(self) -> list[Signature]:
        kv = self.kv_specs()

        def inputs(n):
            return (TensorSpec(TOKENS, (self.batch, n), "int32"),
                    TensorSpec(INPUT_POS, (n,), "int32")) + kv

        sigs = [Signature(prefill_name(n), PREFILL, n, inputs(n), kv)
                for n in self.prefill_lengths]
        sigs.append(Signature(
            DECODE, DECODE, 1, inputs(1),
            (TensorSpec(LOGITS, (self.batch, 1, self.vocab_size), "float32"),) + kv))
        sigs += [Signature(verify_name(n), VERIFY, n, inputs(n),
                           (TensorSpec(LOGITS, (self.batch, n, self.vocab_size), "float32"),) + kv)
                 for n in self.verify_lengths]
        return sigs

    def to_manifest(self) -> dict:
        return {
            "max_context": self.max_context,
            "prefill_lengths": list(self.prefill_lengths),
            "kv_dtype": self.kv_dtype,
            **({"verify_lengths": list(self.verify_lengths)} if self.verify_lengths else {}),
            **({"lora": {"rank": self.lora_rank, "targets": list(self.lora_targets)}}
               if self.lora_rank else {}),
            "entries": [s.to_dict() for s in self.signatures()],
        }

    @classmethod
    def from_manifest(cls, data: dict) -> "Contract":
        s = data["signatures"]
        lora = s.get("lora") or {}
        return cls(data["model"]["config"], tuple(s["prefill_lengths"]), int(s["max_context"]),
                   s.get("kv_dtype", "float32"), lora.get("rank", 0),
                   tuple(lora.get("targets", LORA_TARGETS)), tuple(s.get("verify_lengths", ())))


# -- manifest schema ----------------------------------------------------------------------------

TOKENIZER_IDS = ("bos", "eos", "pad", "unk", "start_of_turn", "end_of_turn")
CONFIG_FIELDS = ("vocab_size", "num_layers", "num_kv_heads", "head_dim")   # what the runtime reads


class ManifestError(ValueError):
    pass


ADAPTERS = "adapters"    # the manifest's run-time LoRA adapters (`compile.adapter` adds them)
ADAPTER_DIR = "adapters"  # where their files live in the artifact directory


def adapter_name_error(name) -> str | None:
    """Why `name` cannot name an adapter, or None. A server names it `<base>:<adapter>`, and it is
    a file name: letters, digits, `.`, `_`, `-`, starting with a letter or digit."""
    import re
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name):
        return (f"adapter name {name!r} must be 1-64 letters, digits, '.', '_' or '-', starting "
                f"with a letter or digit")
    return None


def _need(d, key: str, types, where: str, what: str):
    if not isinstance(d, dict) or key not in d:
        raise ManifestError(f"missing field '{where}{key}'")
    v = d[key]
    if isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)) \
            or not isinstance(v, types):
        raise ManifestError(f"field '{where}{key}' must be {what}, got {_short(v)}")
    return v


def _inside(d, key: str, where: str) -> str:
    """A path field: relative, in '/' form, without '..', so that it names a file inside the
    artifact directory (a manifest must not make the runtime read /etc/... or a sibling)."""
    v = _need(d, key, str, where, "a string")
    parts = v.split("/")
    if not v or v.startswith("/") or "\\" in v or ":" in parts[0] or ".." in parts \
            or "" in parts:
        raise ManifestError(f"field '{where}{key}' must be a relative path inside the artifact "
                            f"directory, got {_short(v)}")
    return v


def _short(v) -> str:
    import json
    try:
        text = json.dumps(v)
    except (TypeError, ValueError):
        text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def new_manifest(variant: str, config: dict, source: dict, tokenizer: dict,
                 contract: Contract) -> dict:
    """A manifest with no artifacts yet. tokenizer: {"file", "sha256", and TOKENIZER_IDS}."""
    return validate({
        "schema_version": SCHEMA_VERSION,
        "model": {"variant": variant, "config": config, "source": source},
        "tokenizer": dict(tokenizer),
        "signatures": contract.to_manifest(),
        "artifacts": {},
    })


def validate(data) -> dict:
    """Checks a parsed manifest against the schema; raises ManifestError naming the first bad
    field. Returns data unchanged."""
    if not isinstance(data, dict):
        raise ManifestError(f"must be a JSON object, got {_short(data)}")
    version = data.get("schema_version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise ManifestError(f"schema version {version!r}, this runtime reads versions "
                            f"{', '.join(map(str, READABLE_VERSIONS))}")
    config = _check_model(data)
    _check_tokenizer(data)
    sigs = _check_signatures(data, config)
    _check_seal(data)
    _check_adapters(data, sigs)
    _check_artifacts(data)
    return data


def _check_model(data) -> dict:
    model = _need(data, "model", dict, "", "an object")
    _need(model, "variant", str, "model.", "a string")
    config = _need(model, "config", dict, "model.", "an object")
    for key in CONFIG_FIELDS:
        n = _need(config, key, int, "model.config.", "an integer")
        if n < 1:
            raise ManifestError(f"field 'model.config.{key}' must be positive, got {n}")
    return config


def _check_tokenizer(data) -> None:
    tok = _need(data, "tokenizer", dict, "", "an object")
    _inside(tok, "file", "tokenizer.")
    _need(tok, "sha256", str, "tokenizer.", "a string")
    for key in TOKENIZER_IDS:
        _need(tok, key, int, "tokenizer.", "an integer token id")
    if "chat_template" in tok:
        _need(tok, "chat_template", str, "tokenizer.", "a string")


def _check_signatures(data, config: dict) -> dict:
    sigs = _need(data, "signatures", dict, "", "an object")
    _need(sigs, "max_context", int, "signatures.", "an integer")
    lengths = _need(sigs, "prefill_lengths", list, "signatures.", "a list of integers")
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in lengths):
        raise ManifestError(f"field 'signatures.prefill_lengths' must be a list of integers, "
                            f"got {_short(lengths)}")
    verify = sigs.get("verify_lengths", [])
    if not isinstance(verify, list) or \
            not all(isinstance(n, int) and not isinstance(n, bool) for n in verify):
        raise ManifestError(f"field 'signatures.verify_lengths' must be a list of integers, "
                            f"got {_short(verify)}")
    entries = _need(sigs, "entries", list, "signatures.", "a list")
    if sigs.get("kv_dtype", "float32") not in ("float32", "float16", "bfloat16"):
        raise ManifestError(f"field 'signatures.kv_dtype' must be float32, float16 or bfloat16, "
                            f"got {_short(sigs['kv_dtype'])}")
    types = config.get("layer_types") or []
    if not isinstance(types, list) or types and len(types) != config["num_layers"] or \
            any(t not in (LOCAL, GLOBAL) for t in types):
        raise ManifestError(f"field 'model.config.layer_types' must list {LOCAL!r} or {GLOBAL!r} "
                            f"for each of the {config['num_layers']} layers")
    if "lora" in sigs:
        lora = _need(sigs, "lora", dict, "signatures.", "an object")
        r = _need(lora, "rank", int, "signatures.lora.", "an integer")
        targets = _need(lora, "targets", list, "signatures.lora.", "a list of matmul names")
        if r < 1 or not targets or any(t not in LORA_TARGETS for t in targets):
            raise ManifestError(f"field 'signatures.lora' must have a positive rank and targets "
                                f"among {', '.join(LORA_TARGETS)}, got {_short(lora)}")
    try:
        want = Contract.from_manifest(data).to_manifest()["entries"]
    except (ValueError, TypeError, LookupError) as e:
        raise ManifestError(f"field 'signatures': {e}") from None
    if len(entries) != len(want):
        raise ManifestError(f"field 'signatures.entries' lists {len(entries)} signatures, the "
                            f"contract defines {len(want)}")
    for i, w in enumerate(want):
        if entries[i] != w:
            raise ManifestError(f"field 'signatures.entries[{i}]' is not the {w['name']!r} "
                                f"signature this model's contract defines")
    return sigs


def _check_seal(data) -> None:
    if SEAL in data:
        seal = _need(data, SEAL, dict, "", "an object")
        for key in ("alg", "key_id", "value"):
            _need(seal, key, str, f"{SEAL}.", "a string")


def _check_adapters(data, sigs: dict) -> None:
    adapters = data.get(ADAPTERS, {})
    if not isinstance(adapters, dict):
        raise ManifestError(f"field '{ADAPTERS}' must be an object, got {_short(adapters)}")
    lora = sigs.get("lora") or {}
    for name, rec in adapters.items():
        where = f"{ADAPTERS}.{name}."
        why = adapter_name_error(name)
        if why:
            raise ManifestError(f"field '{ADAPTERS}': {why}")
        if not isinstance(rec, dict):
            raise ManifestError(f"field '{ADAPTERS}.{name}' must be an object, got {_short(rec)}")
        _inside(rec, "path", where)
        _need(rec, "sha256", str, where, "a string")
        _need(rec, "bytes", int, where, "an integer")
        r = _need(rec, "rank", int, where, "an integer")
        targets = _need(rec, "targets", list, where, "a list of matmul names")
        if not 1 <= r <= lora.get("rank", 0) or \
                any(t not in lora.get("targets", ()) for t in targets):
            raise ManifestError(f"field '{ADAPTERS}.{name}': rank {r} and targets {targets} do "
                                f"not fit the artifact's LoRA slots ({_short(lora or None)})")


def _check_artifacts(data) -> None:
    arts = _need(data, "artifacts", dict, "", "an object")
    for target, rec in arts.items():
        where = f"artifacts.{target}."
        if not isinstance(rec, dict):
            raise ManifestError(f"field 'artifacts.{target}' must be an object, got {_short(rec)}")
        _inside(rec, "dir", where)
        files = _need(rec, "files", dict, where, "an object")
        for role, f in files.items():
            fw = f"{where}files.{role}."
            if not isinstance(f, dict):
                raise ManifestError(f"field '{where}files.{role}' must be an object")
            _inside(f, "path", fw)
            _need(f, "sha256", str, fw, "a string")
            _need(f, "bytes", int, fw, "an integer")
        form = rec.get("cache_outputs", FULL)
        if form not in CACHE_OUTPUTS:
            raise ManifestError(f"field '{where}cache_outputs' must be one of "
                                f"{', '.join(CACHE_OUTPUTS)}, got {_short(form)}")
