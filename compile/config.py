"""Gemma model configs, each family's rules, and the registry of named variants.

A `GemmaConfig` describes one decoder of the Gemma family completely: the model code reads nothing
else. `FAMILIES` holds what each Gemma generation fixes for all its sizes (norm placement, QK-norm,
softcaps, windows, layer pattern, RoPE bases, the query scale): `make_config` applies them, and
the registry and both checkpoint loaders build configs only through it, so the loaders merely map
their files' names onto fields and override a rule only with a value the file states.
Variant names are stable (they appear in artifact directory names and manifests). `tiny()`
derives a small random-weight config of the same architecture for tests, in the spirit of
litert-torch's `get_fake_model_config`: every architectural switch is kept, only sizes shrink.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Optional

from runtime.contract import GLOBAL, LOCAL   # layer types as the manifest spells them


@dataclass(frozen=True)
class Family:
    """What one Gemma generation fixes for all its sizes. Defaults are transformers' config
    defaults for the family (what a checkpoint that omits the field means)."""
    number: int
    post_norms: bool                 # norms after attention and after the FFN
    qk_norm: bool
    attn_softcap: Optional[float]
    final_softcap: Optional[float]
    sliding_window: Optional[int]    # None: every layer attends globally
    layer_pattern: Callable[[int], tuple]   # num_layers -> LOCAL/GLOBAL per layer
    rope_base_global: float
    rope_base_local: Optional[float]         # None: local layers use the global base
    norm_plus_one: bool = True       # RMSNorm scales by (1 + w); Gemma 4 by w
    v_norm: bool = False             # Gemma 4: values RMS-normalized without a scale
    layer_scalar: bool = False       # Gemma 4: a loaded scalar multiplies each layer's output
    query_scalar: Optional[float] = None     # fixed query_pre_attn_scalar (Gemma 4: 1, no scaling)
    rope_fraction_global: float = 1.0        # Gemma 4: "proportional" RoPE on global layers


def _no_pattern(num_layers: int) -> tuple:
    return ()


def _alternating(num_layers: int) -> tuple:   # Gemma 2: even layers slide, odd layers are global
    return tuple(LOCAL if i % 2 == 0 else GLOBAL for i in range(num_layers))


def _five_to_one(num_layers: int) -> tuple:   # Gemma 3: five local layers, then one global
    return tuple(GLOBAL if (i + 1) % 6 == 0 else LOCAL for i in range(num_layers))


def _five_to_one_last_global(num_layers: int) -> tuple:
    """Gemma 4's default (Gemma4TextConfig): 5 local : 1 global, and the last layer global."""
    return _five_to_one(num_layers)[:-1] + (GLOBAL,) if num_layers else ()


def every(n: int) -> Callable[[int], tuple]:
    """n - 1 local layers, then one global (Gemma 4 E2B: n = 5), the last layer global."""
    return lambda num_layers: tuple(
        GLOBAL if (i + 1) % n == 0 or i == num_layers - 1 else LOCAL for i in range(num_layers))


FAMILIES: dict[int, Family] = {
    1: Family(1, post_norms=False, qk_norm=False, attn_softcap=None, final_softcap=None,
              sliding_window=None, layer_pattern=_no_pattern, rope_base_global=10_000.0,
              rope_base_local=None),
    # transformers' Gemma2Config: softcaps 50 (attention) and 30 (final), window 4096
    2: Family(2, post_norms=True, qk_norm=False, attn_softcap=50.0, final_softcap=30.0,
              sliding_window=4096, layer_pattern=_alternating, rope_base_global=10_000.0,
              rope_base_local=None),
    # Gemma3TextConfig: no softcaps (QK-norm instead), RoPE 1M global / 10k local
    3: Family(3, post_norms=True, qk_norm=True, attn_softcap=None, final_softcap=None,
              sliding_window=4096, layer_pattern=_five_to_one, rope_base_global=1_000_000.0,
              rope_base_local=10_000.0),
    # Gemma4TextConfig: RMSNorm x w, V normed, attention scaling 1, window 512, proportional RoPE
    # (a quarter of the pairs rotate, theta 1M) on global layers; softcaps as the checkpoint says
    4: Family(4, post_norms=True, qk_norm=True, attn_softcap=None, final_softcap=None,
              sliding_window=512, layer_pattern=_five_to_one_last_global,
              rope_base_global=1_000_000.0, rope_base_local=10_000.0, norm_plus_one=False,
              v_norm=True, layer_scalar=True, query_scalar=1.0, rope_fraction_global=0.25),
}


@dataclass(frozen=True)
class GemmaConfig:
    name: str
    family: int                      # 1, 2, 3 or 4
    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_dim: int
    query_pre_attn_scalar: float     # queries are scaled by query_pre_attn_scalar ** -0.5
    norm_eps: float = 1e-6
    sliding_window: Optional[int] = None
    layer_types: tuple[str, ...] = ()  # LOCAL / GLOBAL per layer; empty means all GLOBAL
    attn_softcap: Optional[float] = None
    final_softcap: Optional[float] = None
    post_norms: bool = False         # Gemma 2/3: norms after attention and after the FFN
    qk_norm: bool = False            # Gemma 3
    rope_base_global: float = 10_000.0
    rope_base_local: float = 10_000.0
    rope_scale_global: float = 1.0   # linear position scaling of global layers (Gemma 3 4B+: 8)
    # Gemma 4 (defaults: off, i.e. Gemma 1-3). Per-layer geometry is `runtime.contract`'s
    # `layer_specs`; `attention()` and `layer_*` below read it.
    norm_plus_one: bool = True       # RMSNorm x (1 + w); False: x w
    v_norm: bool = False             # values RMS-normalized (no scale)
    layer_scalar: bool = False       # each layer's output x a loaded scalar
    rope_fraction_global: float = 1.0  # global layers rotate only this fraction of the pairs
                                       # (i, i + H/2), frequencies over the full H
    global_head_dim: Optional[int] = None   # head dim of global layers (None: head_dim)
    global_kv_heads: Optional[int] = None   # KV heads of global layers (None: num_kv_heads)
    k_eq_v: bool = False             # global layers: V = norm(k_proj x) unscaled, no v_proj
    kv_shared_layers: int = 0        # the last n layers read an earlier layer's cache
    double_wide_mlp: bool = False    # KV-shared layers have a 2x wide FFN
    ple_dim: int = 0                 # per-layer embeddings: P per layer (0: none)
    ple_vocab_size: int = 0          # rows of the per-layer table
    num_experts: int = 0             # mixture of experts beside the dense FFN (0: none)
    top_k_experts: int = 0
    moe_ffn_dim: int = 0             # each expert's FFN width

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"{self.name}: unknown Gemma family {self.family}")
        for f in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                  "ffn_dim"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{self.name}: {f} must be a positive integer, got {v!r}")
        for f in ("query_pre_attn_scalar", "norm_eps", "rope_base_global", "rope_base_local",
                  "rope_scale_global", "attn_softcap", "final_softcap"):
            v = getattr(self, f)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                                  or not v > 0):
                raise ValueError(f"{self.name}: {f} must be a positive number, got {v!r}")
        w = self.sliding_window
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 1):
            raise ValueError(f"{self.name}: sliding_window must be a positive integer or "
                             f"null, got {w!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.name}: num_heads {self.num_heads} is not a multiple of "
                             f"num_kv_heads {self.num_kv_heads}")
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise ValueError(f"{self.name}: {len(self.layer_types)} layer types for "
                             f"{self.num_layers} layers")
        if LOCAL in self.layer_types and not self.sliding_window:
            raise ValueError(f"{self.name}: local layers need a sliding_window")
        for f in ("global_head_dim", "global_kv_heads"):
            v = getattr(self, f)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{self.name}: {f} must be a positive integer or null, got {v!r}")
        for f in ("kv_shared_layers", "ple_dim", "ple_vocab_size", "num_experts",
                  "top_k_experts", "moe_ffn_dim"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{self.name}: {f} must be a non-negative integer, got {v!r}")
        if not 0 < self.rope_fraction_global <= 1:
            raise ValueError(f"{self.name}: rope_fraction_global must be in (0, 1], got "
                             f"{self.rope_fraction_global!r}")
        if self.num_experts and not (0 < self.top_k_experts <= self.num_experts
                                     and self.moe_ffn_dim > 0):
            raise ValueError(f"{self.name}: {self.num_experts} experts need 1 <= top_k_experts "
                             f"<= num_experts (got {self.top_k_experts}) and a moe_ffn_dim "
                             f"(got {self.moe_ffn_dim})")
        if self.ple_dim and not self.ple_vocab_size:
            raise ValueError(f"{self.name}: per-layer embeddings (ple_dim {self.ple_dim}) need "
                             f"ple_vocab_size")
        if self.kv_shared_layers >= self.num_layers:
            raise ValueError(f"{self.name}: kv_shared_layers {self.kv_shared_layers} leaves no "
                             f"layer to produce a cache ({self.num_layers} layers)")
        for a in self.attention():   # raises on a sharing pattern without a producer
            if self.num_heads % a.kv_heads:
                raise ValueError(f"{self.name}: layer {a.layer}: num_heads {self.num_heads} is "
                                 f"not a multiple of its {a.kv_heads} KV heads")

    def attention(self):
        """Each layer's geometry: its KV heads and head dim, the cache it reads, its matmuls'
        widths (`runtime.contract.layer_specs`, the one statement of these rules)."""
        from runtime.contract import layer_specs
        try:
            return layer_specs(self)
        except ValueError as e:
            raise ValueError(f"{self.name}: {e}") from None

    def kv_producer(self, i: int) -> bool:
        """Layer i computes its own K and V (False: a KV-shared layer reading a producer's)."""
        return self.attention()[i].produces_kv

    def layer_ffn_dim(self, i: int) -> int:
        return self.attention()[i].ffn_dim

    def layer_k_eq_v(self, i: int) -> bool:
        return self.attention()[i].k_eq_v

    def layer_type(self, i: int) -> str:
        return self.layer_types[i] if self.layer_types else GLOBAL

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.d_model)

    @property
    def query_scale(self) -> float:
        return self.query_pre_attn_scalar ** -0.5

    def num_params(self) -> int:
        from .model import param_shapes
        return sum(math.prod(s) for s in param_shapes(self).values())

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["layer_types"] = list(self.layer_types)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "GemmaConfig":
        d = dict(d)
        d["layer_types"] = tuple(d.get("layer_types", ()))
        return cls(**d)

    def tiny(self) -> "GemmaConfig":
        """A small config of the same architecture (same switches, same layer pattern shape)."""
        heads = 4
        kv = 1 if self.num_kv_heads == 1 else (heads if self.num_kv_heads == self.num_heads else 2)
        if self.family == 4:
            return self._tiny4(heads, kv)
        layers = {1: 2, 2: 4, 3: 7}[self.family]   # Gemma 3: 6 layers + 1 to see the 5:1 pattern
        return dataclasses.replace(
            self,
            name=f"{self.name}-tiny",
            vocab_size=512,
            d_model=64,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv,
            head_dim=16,
            ffn_dim=128,
            # keep "query scale differs from head_dim" (the 27B models) visible in the tiny config
            query_pre_attn_scalar=16.0 if self.query_pre_attn_scalar == self.head_dim else 24.0,
            sliding_window=8 if self.sliding_window else None,
            layer_types=FAMILIES[self.family].layer_pattern(layers),
        )


    def _tiny4(self, heads: int, kv: int) -> "GemmaConfig":
        """Gemma 4: every switch kept (PLE, KV sharing of both layer types, double-wide FFN,
        k_eq_v with fewer global KV heads, experts), with 2 local layers per global one, so a
        shared layer of each type has a producer."""
        layers = 6 + (3 if self.kv_shared_layers else 0)
        types = tuple(GLOBAL if (i + 1) % 3 == 0 else LOCAL for i in range(layers))
        return dataclasses.replace(
            self, name=f"{self.name}-tiny", vocab_size=512, d_model=64, num_layers=layers,
            num_heads=heads, num_kv_heads=kv, head_dim=16, ffn_dim=96,
            sliding_window=8, layer_types=types,
            global_head_dim=32 if self.global_head_dim else None,
            global_kv_heads=1 if self.global_kv_heads else None,
            kv_shared_layers=3 if self.kv_shared_layers else 0,
            ple_dim=8 if self.ple_dim else 0, ple_vocab_size=512 if self.ple_dim else 0,
            num_experts=4 if self.num_experts else 0, top_k_experts=2 if self.num_experts else 0,
            moe_ffn_dim=32 if self.num_experts else 0)


def make_config(name: str, family: int, *, vocab_size: int, d_model: int, num_layers: int,
                num_heads: int, num_kv_heads: int, head_dim: int, ffn_dim: int,
                **stated) -> GemmaConfig:
    """A config of `family` with the given dimensions: every field the caller does not state
    (`stated` holds only what a checkpoint or the registry actually says, a None included)
    follows the family's rules. Raises ValueError naming a bad field."""
    if family not in FAMILIES:
        raise ValueError(f"{name}: unknown Gemma family {family!r}")
    rules = FAMILIES[family]
    unknown = set(stated) - {f.name for f in dataclasses.fields(GemmaConfig)}
    if unknown:
        raise TypeError(f"make_config: unknown fields {sorted(unknown)}")
    fields = dict(
        post_norms=rules.post_norms, qk_norm=rules.qk_norm, attn_softcap=rules.attn_softcap,
        final_softcap=rules.final_softcap, sliding_window=rules.sliding_window,
        rope_base_global=rules.rope_base_global, norm_plus_one=rules.norm_plus_one,
        v_norm=rules.v_norm, layer_scalar=rules.layer_scalar,
        rope_fraction_global=rules.rope_fraction_global)
    fields.update(stated)
    if not isinstance(num_layers, int):
        raise ValueError(f"{name}: num_layers must be a positive integer, got {num_layers!r}")
    if "layer_types" not in stated:
        fields["layer_types"] = rules.layer_pattern(num_layers) if fields["sliding_window"] \
            else ()
    if "rope_base_local" not in stated:
        fields["rope_base_local"] = rules.rope_base_local or fields["rope_base_global"]
    if "query_pre_attn_scalar" not in stated and rules.query_scalar is not None:
        fields["query_pre_attn_scalar"] = rules.query_scalar
    elif "query_pre_attn_scalar" not in stated:
        fields["query_pre_attn_scalar"] = default_query_scalar(family, d_model, num_layers,
                                                               num_heads, head_dim)
    fields["layer_types"] = tuple(fields["layer_types"])
    return GemmaConfig(name=name, family=family, vocab_size=vocab_size, d_model=d_model,
                       num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
                       head_dim=head_dim, ffn_dim=ffn_dim, **fields)


def default_query_scalar(family: int, d_model: int, num_layers: int, num_heads: int,
                         head_dim: int) -> float:
    """Queries are scaled by head_dim ** -0.5, except where a released model says otherwise (the
    27B models of Gemma 2 and 3 use d_model / heads, as llama.cpp does too): a checkpoint format
    that does not store the scale (GGUF) gets the registry variant's value."""
    for v in VARIANTS.values():
        if (v.family, v.d_model, v.num_layers, v.num_heads) == (family, d_model, num_layers,
                                                                 num_heads):
            return v.query_pre_attn_scalar
    return float(head_dim)


def _gemma1(name, d, layers, heads, kv, ffn):
    return make_config(name, 1, vocab_size=256_000, d_model=d, num_layers=layers,
                       num_heads=heads, num_kv_heads=kv, head_dim=256, ffn_dim=ffn,
                       query_pre_attn_scalar=256.0)


def _gemma2(name, d, layers, heads, kv, head_dim, ffn, qpas):
    return make_config(name, 2, vocab_size=256_000, d_model=d, num_layers=layers,
                       num_heads=heads, num_kv_heads=kv, head_dim=head_dim, ffn_dim=ffn,
                       query_pre_attn_scalar=qpas)


def _gemma3(name, d, layers, heads, kv, head_dim, ffn, qpas, window, scale):
    return make_config(name, 3, vocab_size=262_144, d_model=d, num_layers=layers,
                       num_heads=heads, num_kv_heads=kv, head_dim=head_dim, ffn_dim=ffn,
                       query_pre_attn_scalar=qpas, sliding_window=window,
                       rope_scale_global=scale)


def _gemma4(name, d, layers, heads, kv, ffn, every_n, window, **switches):
    """Gemma 4 as transformers' convert_gemma4_weights.py defines its sizes: vocabulary 262144,
    head dims 256 (local) / 512 (global), final softcap 30, the last layer global."""
    return make_config(name, 4, vocab_size=262_144, d_model=d, num_layers=layers,
                       num_heads=heads, num_kv_heads=kv, head_dim=256, ffn_dim=ffn,
                       sliding_window=window, layer_types=every(every_n)(layers),
                       final_softcap=30.0, global_head_dim=512, **switches)


VARIANTS: dict[str, GemmaConfig] = {c.name: c for c in [
    _gemma1("gemma-2b", 2048, 18, 8, 1, 16_384),
    _gemma1("gemma-7b", 3072, 28, 16, 16, 24_576),
    _gemma2("gemma2-2b", 2304, 26, 8, 4, 256, 9216, 256.0),
    _gemma2("gemma2-9b", 3584, 42, 16, 8, 256, 14_336, 256.0),
    _gemma2("gemma2-27b", 4608, 46, 32, 16, 128, 36_864, 144.0),   # 27B scales by d_model/heads
    _gemma3("gemma3-270m", 640, 18, 4, 1, 256, 2048, 256.0, 512, 1.0),
    _gemma3("gemma3-1b", 1152, 26, 4, 1, 256, 6912, 256.0, 512, 1.0),
    _gemma3("gemma3-4b", 2560, 34, 8, 4, 256, 10_240, 256.0, 1024, 8.0),
    _gemma3("gemma3-12b", 3840, 48, 16, 8, 256, 15_360, 256.0, 1024, 8.0),
    _gemma3("gemma3-27b", 5376, 62, 32, 16, 128, 21_504, 168.0, 1024, 8.0),
    # E2B/E4B: per-layer embeddings (256 per layer), the last 20/18 layers share KV caches
    _gemma4("gemma4-e2b", 1536, 35, 8, 1, 6144, 5, 512, kv_shared_layers=20,
            double_wide_mlp=True, ple_dim=256, ple_vocab_size=262_144),
    _gemma4("gemma4-e4b", 2560, 42, 8, 2, 10_240, 6, 512, kv_shared_layers=18,
            ple_dim=256, ple_vocab_size=262_144),
    # 26B-A4B: 128 experts of 704, top 8, beside a dense FFN of 2112; k_eq_v on global layers
    _gemma4("gemma4-26b-a4b", 2816, 30, 16, 8, 2112, 6, 1024, global_kv_heads=2, k_eq_v=True,
            num_experts=128, top_k_experts=8, moe_ffn_dim=704),
    _gemma4("gemma4-31b", 5376, 60, 32, 16, 21_504, 6, 1024, global_kv_heads=4, k_eq_v=True),
]}


def get_variant(name: str) -> GemmaConfig:
    if name.endswith("-tiny") and name[:-5] in VARIANTS:
        return VARIANTS[name[:-5]].tiny()
    try:
        return VARIANTS[name]
    except KeyError:
        raise KeyError(f"unknown Gemma variant {name!r}; known: {', '.join(VARIANTS)}") from None


def match_variant(cfg: GemmaConfig) -> str:
    """The registry name whose dimensions equal cfg's, else a descriptive custom name."""
    for name, v in VARIANTS.items():
        if dataclasses.replace(v, name=cfg.name) == cfg:
            return name
    return f"gemma{cfg.family if cfg.family > 1 else ''}-custom-{cfg.num_layers}l{cfg.d_model}d"
