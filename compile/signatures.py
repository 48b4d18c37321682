"""The signature contract: names, shapes, dtypes and KV-cache layout of every traced signature.

Every target reads this module; nothing else decides a tensor name or shape.

Signatures: `prefill_{N}` for each static prompt length N, and `decode` (one token). All share one
KV-cache shape (max context S). The cache is external: every signature takes each layer's K and V
cache as inputs and returns the updated ones as outputs; the runtime owns it between calls.

Names and layouts follow LiteRT-LM's convention for prefill/decode models so a TFLite file can be
handed to that engine unchanged:

  tokens            [1, T] int32      T = N for prefill_N, 1 for decode
  input_pos         [T] int32         absolute positions, contiguous: input_pos[t] = input_pos[0] + t
  kv_cache_k_{i}    [1, K, S, H] f32  (B, KV heads, position, head dim)
  kv_cache_v_{i}    [1, K, H, S] f32  V stored transposed: the attention contraction over S is then a
                                      plain matmul, and one token's write is a column update
  logits            [1, 1, V] f32     decode only; prefill returns just the caches

Cache slot s holds position s. A slot is read only by queries at positions >= s, and every slot is
written (by prefill or decode) before any query at its position runs, so padding a prefill chunk
writes only slots that are overwritten before they are read. The runtime must keep
input_pos[0] + T <= S (writes past the end would be clamped onto valid slots).
The attention mask is computed inside the graph from input_pos; there is no mask input.

Cache outputs come in one of two forms (`CACHE_OUTPUTS`), fixed per target and recorded in its
manifest entry:
  full   the updated caches under the input's names (above). Targets whose runtimes bind one buffer
         as both input and output (TFLite, XLA with donation) update them in place.
  rows   the cache inputs are the read-only past: `kv_cache_k_{i}` and `kv_cache_v_{i}` are both
         [1, K, P, H] (BKSH), the P slots just before input_pos[0], with P symbolic per layer
         (at least 1; slots that would precede position 0 are masked): all cached positions for
         global layers, at most `past_window` (sliding window - 1) for local ones. The outputs
         are only this call's new rows, `kv_cache_k_{i}_new` and `kv_cache_v_{i}_new`, both
         [1, K, T, H]; the runtime keeps full-length buffers, passes views of them and writes the
         rows at input_pos itself. So nothing in the graph copies a cache, and attention reads
         only the filled part (and the window) of each cache. ONNX uses this: an ONNX graph
         cannot alias an output to an input, so a full-cache output is a copy of every layer's
         cache per call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import LOCAL, GemmaConfig

DEFAULT_PREFILL_LENGTHS = (32, 128, 512)
DEFAULT_MAX_CONTEXT = 2048

TOKENS = "tokens"
INPUT_POS = "input_pos"
LOGITS = "logits"
KV_LAYOUT = {"k": "BKSH", "v": "BKHS"}


def k_name(layer: int) -> str:
    return f"kv_cache_k_{layer}"


def v_name(layer: int) -> str:
    return f"kv_cache_v_{layer}"


CACHE_OUTPUTS = ("full", "rows")


def rows_name(name: str) -> str:
    """The output carrying a cache's new rows (cache outputs `rows`)."""
    return name + "_new"


def rows_shape(config: GemmaConfig, t) -> tuple:
    """Cache outputs `rows`: the shape of the past inputs (t = P) and the new rows (t = T)."""
    return (1, config.num_kv_heads, t, config.head_dim)     # B K S H


def past_window(config: GemmaConfig, layer: int) -> int | None:
    """The most past slots layer `layer` reads (cache outputs `rows`); None: all of them."""
    return config.sliding_window - 1 if config.layer_type(layer) == LOCAL else None


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class Signature:
    name: str
    kind: str            # "prefill" or "decode"
    length: int          # tokens per call
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "length": self.length,
                "inputs": [t.to_dict() for t in self.inputs],
                "outputs": [t.to_dict() for t in self.outputs]}


@dataclass(frozen=True)
class Contract:
    config: GemmaConfig
    prefill_lengths: tuple[int, ...] = DEFAULT_PREFILL_LENGTHS
    max_context: int = DEFAULT_MAX_CONTEXT
    kv_dtype: str = "float32"
    batch: int = field(default=1, init=False)

    def __post_init__(self):
        lengths = tuple(sorted(set(int(n) for n in self.prefill_lengths)))
        if not lengths or lengths[0] < 1:
            raise ValueError(f"prefill lengths must be positive integers, got {self.prefill_lengths}")
        if lengths[-1] > self.max_context:
            raise ValueError(f"prefill length {lengths[-1]} exceeds max context {self.max_context}")
        object.__setattr__(self, "prefill_lengths", lengths)

    def k_shape(self) -> tuple[int, ...]:
        c = self.config
        return (self.batch, c.num_kv_heads, self.max_context, c.head_dim)  # B K S H

    def v_shape(self) -> tuple[int, ...]:
        c = self.config
        return (self.batch, c.num_kv_heads, c.head_dim, self.max_context)  # B K H S

    def kv_specs(self) -> tuple[TensorSpec, ...]:
        specs = []
        for i in range(self.config.num_layers):
            specs.append(TensorSpec(k_name(i), self.k_shape(), self.kv_dtype))
            specs.append(TensorSpec(v_name(i), self.v_shape(), self.kv_dtype))
        return tuple(specs)

    def signature(self, name: str) -> Signature:
        for s in self.signatures():
            if s.name == name:
                return s
        raise KeyError(f"no signature {name!r}; have {[s.name for s in self.signatures()]}")

    def signatures(self) -> list[Signature]:
        kv = self.kv_specs()
        sigs = []
        for n in self.prefill_lengths:
            sigs.append(Signature(
                name=f"prefill_{n}", kind="prefill", length=n,
                inputs=(TensorSpec(TOKENS, (self.batch, n), "int32"),
                        TensorSpec(INPUT_POS, (n,), "int32")) + kv,
                outputs=kv))
        sigs.append(Signature(
            name="decode", kind="decode", length=1,
            inputs=(TensorSpec(TOKENS, (self.batch, 1), "int32"),
                    TensorSpec(INPUT_POS, (1,), "int32")) + kv,
            outputs=(TensorSpec(LOGITS, (self.batch, 1, self.config.vocab_size), "float32"),) + kv))
        return sigs

    def to_manifest(self) -> dict:
        return {
            "max_context": self.max_context,
            "prefill_lengths": list(self.prefill_lengths),
            "kv_layout": dict(KV_LAYOUT),
            "kv_dtype": self.kv_dtype,
            "entries": [s.to_dict() for s in self.signatures()],
        }
