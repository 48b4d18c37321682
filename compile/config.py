"""Gemma model configs and the registry of named variants.

A `GemmaConfig` describes one decoder of the Gemma family completely: the model code reads nothing
else. Variant names are stable (they appear in artifact directory names and manifests). `tiny()`
derives a small random-weight config of the same architecture for tests, in the spirit of
litert-torch's `get_fake_model_config`: every architectural switch is kept, only sizes shrink.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

LOCAL = "local"    # sliding-window attention layer
GLOBAL = "global"  # full causal attention layer


@dataclass(frozen=True)
class GemmaConfig:
    name: str
    family: int                      # 1, 2 or 3
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

    def __post_init__(self):
        if self.family not in (1, 2, 3):
            raise ValueError(f"{self.name}: unknown Gemma family {self.family}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.name}: num_heads {self.num_heads} is not a multiple of "
                             f"num_kv_heads {self.num_kv_heads}")
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise ValueError(f"{self.name}: {len(self.layer_types)} layer types for "
                             f"{self.num_layers} layers")
        if LOCAL in self.layer_types and not self.sliding_window:
            raise ValueError(f"{self.name}: local layers need a sliding_window")

    def layer_type(self, i: int) -> str:
        return self.layer_types[i] if self.layer_types else GLOBAL

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.d_model)

    @property
    def query_scale(self) -> float:
        return self.query_pre_attn_scalar ** -0.5

    def num_params(self) -> int:
        D, N, K, H, F = self.d_model, self.num_heads, self.num_kv_heads, self.head_dim, self.ffn_dim
        per_layer = D * (N * H + 2 * K * H) + N * H * D + 3 * D * F
        per_layer += D * (4 if self.post_norms else 2) + (2 * H if self.qk_norm else 0)
        return self.vocab_size * D + D + self.num_layers * per_layer

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
            layer_types=_pattern(self.family, layers),
        )


def _pattern(family: int, num_layers: int) -> tuple[str, ...]:
    if family == 1:
        return ()
    if family == 2:   # even layers slide, odd layers are global
        return tuple(LOCAL if i % 2 == 0 else GLOBAL for i in range(num_layers))
    # Gemma 3: five local layers, then one global
    return tuple(GLOBAL if (i + 1) % 6 == 0 else LOCAL for i in range(num_layers))


def _gemma1(name, d, layers, heads, kv, ffn):
    return GemmaConfig(name=name, family=1, vocab_size=256_000, d_model=d, num_layers=layers,
                       num_heads=heads, num_kv_heads=kv, head_dim=256, ffn_dim=ffn,
                       query_pre_attn_scalar=256.0)


def _gemma2(name, d, layers, heads, kv, head_dim, ffn, qpas):
    return GemmaConfig(name=name, family=2, vocab_size=256_000, d_model=d, num_layers=layers,
                       num_heads=heads, num_kv_heads=kv, head_dim=head_dim, ffn_dim=ffn,
                       query_pre_attn_scalar=qpas, sliding_window=4096,
                       layer_types=_pattern(2, layers), attn_softcap=50.0, final_softcap=30.0,
                       post_norms=True)


def _gemma3(name, d, layers, heads, kv, head_dim, ffn, qpas, window, scale):
    return GemmaConfig(name=name, family=3, vocab_size=262_144, d_model=d, num_layers=layers,
                       num_heads=heads, num_kv_heads=kv, head_dim=head_dim, ffn_dim=ffn,
                       query_pre_attn_scalar=qpas, sliding_window=window,
                       layer_types=_pattern(3, layers), post_norms=True, qk_norm=True,
                       rope_base_global=1_000_000.0, rope_base_local=10_000.0,
                       rope_scale_global=scale)


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
