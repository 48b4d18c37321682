"""Quantization recipes for kernels that quantize activations on the fly: Hadamard rotation and
SmoothQuant scales, folded into the weights and the norms before they are quantized.

Why: LiteRT's int8 and int4 FULLY_CONNECTED (XNNPACK's `qd8` kernels) quantize each token's
activations to int8 with one scale and zero point per row. Gemma's activations have outlier
channels, so one scale spends the grid on a few channels and rounds the rest coarsely: the real
270M's int8 TFLite agreed 88-89 % top-1 with fp32 where llama.cpp's Q4_K_M agrees ~95 %. Both
transforms change what the kernel sees, never the float model's function:

  rotate  x W = (x H)(H^T W) for an orthogonal H: a block-diagonal Hadamard matrix (blocks of
          `ROTATE_BLOCK` inputs, normalized, symmetric, its own inverse) spreads an outlier over
          its block. The weights are stored rotated (rows [out, in] times H); the graph rotates
          each matmul's input with one small float matmul per block row (`Forms.project`).
  smooth  x W = (x / s)(s W) per input channel j, s_j = max|x_j|^alpha / max|W_j|^(1 - alpha)
          (SmoothQuant): the activation's range moves into the weights. 1/s is folded where the
          input is made, so it costs nothing at run time:
            q/k/v_proj   into attn_norm (RMSNorm x (1 + w) -> (1 + w) / s)
            gate/up_proj into ffn_norm
            down_proj    into up_proj's output columns (the GeGLU product is linear in up)
            o_proj       into v_proj's output columns, one scale per (KV head, dim) shared by the
                         query heads of a group; only where the values are plain v_proj outputs
                         (no V norm, no k_eq_v, no KV sharing)
            the head     into final_norm; the tied table's lookup undoes s (and the rotation) on
                         the rows it gathers: one [D] multiply and one rotation per token
          max|x_j| comes from the fp32 reference on calibration text (`calibrate`): tokens of
          the evaluation text after the quality gate's slice, never the held-out text.

  gptq    (rotate-smooth-gptq, int8's default) the rotated, smoothed projections are rounded
          to int8_rows' grid by GPTQ (`weights.quant.int8_rows_gptq`) rather than to nearest:
          each input's rounding error is carried into the inputs not yet rounded, weighted by
          the second moments X^T X of the inputs the stored weight sees (the calibration's, in
          the stored form: `Recipe.input_moments`), with a large damping (GPTQ_DAMP x the mean
          of the diagonal) so that 1,022 calibration tokens do not fit it to their text. The
          head stays rounded to nearest: GPTQ there measured worse (its table is the lookup's
          too). `Recipe.rounded` holds the results for the target; calibration runs a layer at
          a time over all windows (`trace.run_windows`), so one layer's moments are held.

A run-time LoRA slot reads the matmul's original input and adds to its original output: the
graph multiplies its input by s and divides its output by the folded output scale.

`Recipe` holds the decisions (which matmuls, the scales) and transforms each tensor by name as
the target reads it (`transform`), so the weights stream through one tensor at a time as before.
The manifest records `Recipe.record()`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from .weights import quant as wq

NAMES = ("plain", "rotate", "rotate-smooth", "rotate-smooth-gptq")
GPTQ = "rotate-smooth-gptq"   # rotate-smooth, int8 values rounded by GPTQ (`weights.quant`)
DEFAULT = {"int8": GPTQ, "int4": "rotate-smooth"}   # per stored quantization
GPTQ_DAMP = 3.0        # chosen on the evaluation text's rows outside the calibration (1 / 3 / 10)
ROTATE_BLOCK = 128
ALPHA = 0.5            # chosen on the evaluation text (0.35 / 0.5 / 0.65 measured)
CALIBRATION_START = 512        # the quality gate measures the first 512 tokens: calibrate after
CALIBRATION_TOKENS = 1022       # two windows of <bos> + 511 tokens
CALIBRATION_WINDOW = 512
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))   # one input each
HEAD = "embed"         # the output projection's name among the scales


def hadamard(n: int) -> np.ndarray:
    """The normalized Sylvester Hadamard matrix [n, n] (n a power of two): symmetric, H H = I."""
    h = np.ones((1, 1), np.float64)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return (h / np.sqrt(n)).astype(np.float32)


def block_of(k: int) -> int:
    """The rotation's block for k inputs: the largest power of two <= ROTATE_BLOCK dividing k."""
    b = ROTATE_BLOCK
    while k % b:
        b //= 2
    return b


def rotate_rows(w: np.ndarray) -> np.ndarray:
    """w [N, K] (rows: a matmul's [out, in], or table rows) times the block-diagonal H."""
    n, k = w.shape
    b = block_of(k)
    if b == 1:
        return np.asarray(w, np.float32)
    h = hadamard(b)
    out = np.empty((n, k), np.float32)
    step = max(1, (64 << 20) // max(1, 4 * k))
    for r in range(0, n, step):
        # one [rows * k / b, b] x [b, b] product (a batched [k / b, b] one is a loop of small
        # ones, 5x slower)
        out[r:r + step] = (np.asarray(w[r:r + step], np.float32).reshape(-1, b) @ h
                           ).reshape(-1, k)
    return out


def rotate(x, h: np.ndarray | None = None):
    """x [..., K] (a traced array) times the block-diagonal H: one [b, b] float matmul."""
    import jax.numpy as jnp
    k = x.shape[-1]
    b = block_of(k)
    if b == 1:
        return x
    h = hadamard(b) if h is None else h
    lead = x.shape[:-1]
    return jnp.matmul(x.reshape(*lead, k // b, b), jnp.asarray(h, x.dtype)).reshape(*lead, k)


@dataclass
class Recipe:
    """What one export does to its quantized matmuls (see the module doc).

    name        one of NAMES
    rotated     full names of the matmuls whose inputs are rotated ("layers.3.q_proj", "embed")
    scales      full matmul name -> s over its inputs (float32 [in]); matmuls sharing an input
                share one array
    out_scales  full matmul name -> the scale its output columns were divided by (up_proj:
                down_proj's s; v_proj: o_proj's s per KV head)
    norms       full norm name -> the s folded into it
    calibration what the scales were measured on (for the manifest)
    rounded     full matmul name -> its int8 form (q [out, in], scale [out]) rounded by GPTQ
                (rotate-smooth-gptq): the target stores these instead of rounding to nearest
    """
    name: str = "plain"
    plus_one: bool = True
    rotated: frozenset = frozenset()
    scales: dict = field(default_factory=dict)
    out_scales: dict = field(default_factory=dict)
    norms: dict = field(default_factory=dict)
    alpha: float | None = None
    calibration: dict | None = None
    rounded: dict = field(default_factory=dict)

    def record(self) -> dict:
        out = {"name": self.name}
        if self.rotated:
            out["rotation"] = {"kind": "hadamard", "block": ROTATE_BLOCK,
                               "matmuls": len(self.rotated)}
        if self.scales:
            out["smoothing"] = {"alpha": self.alpha, "matmuls": len(self.scales),
                                "calibration": self.calibration}
        if self.name == GPTQ:
            out["rounding"] = {"kind": "gptq", "damp": GPTQ_DAMP, "block": wq.GPTQ_BLOCK,
                               "matmuls": len(self.rounded), "calibration": self.calibration}
        return out

    def int8(self, name: str):
        """The int8 form (q [out, in], scale [out]) this recipe rounded for matmul `name`, or
        None where the target rounds to nearest (`weights.quant.int8_rows`)."""
        return self.rounded.get(name)

    def transform(self, name: str, w: np.ndarray) -> np.ndarray:
        """The tensor `name` as this recipe stores it before quantization: linear weights in the
        params' [in, out] form, the embedding table [V, D], norms [D]; others unchanged."""
        if name in self.norms:
            s = self.norms[name]
            w = np.asarray(w, np.float32)
            return ((1.0 + w) / s - 1.0 if self.plus_one else w / s).astype(np.float32)
        if name not in self.rotated and name not in self.scales and name not in self.out_scales:
            return w
        rows = w if name == HEAD else np.asarray(w).T                            # [out, in]
        n, k = rows.shape
        out = np.empty((n, k), np.float32)
        s_out, s_in = self.out_scales.get(name), self.scales.get(name)
        step = max(1, (64 << 20) // max(1, 4 * k))    # a chunk of rows at a time: a 262k-row
        for r in range(0, n, step):                   # table is never copied whole in float
            c = np.asarray(rows[r:r + step], np.float32)
            if s_out is not None:
                c = c / s_out[r:r + step, None]
            if s_in is not None:
                c = c * s_in[None, :]
            out[r:r + step] = rotate_rows(c) if name in self.rotated else c
        return out if name == HEAD else np.ascontiguousarray(out.T)

    def input_moments(self, name: str, moments: np.ndarray) -> np.ndarray:
        """X^T X [in, in] of matmul `name`'s original inputs -> that of the inputs its stored
        weight sees, x' = rotate(x / s): R^T (X^T X / s s^T) R (R symmetric)."""
        h = np.asarray(moments, np.float32)
        if name in self.scales:
            s = self.scales[name]
            h = h / np.outer(s, s)
        if name in self.rotated:
            h = rotate_rows(rotate_rows(h).T)
        return h

    # ------------------------------------------------------------------ the graph's side
    def project(self, x, p: dict, name: str, layer: int):
        """`model.project` for a matmul of this recipe: x arrives divided by its s (folded
        upstream); the weight is rotated, so the input is too; a LoRA slot reads x times s and
        its output is divided by the output scale folded into the weight."""
        from . import model
        full = f"layers.{layer}.{name}"
        y = model.linear(rotate(x) if full in self.rotated else x, p[name])
        if name + model.LORA_A in p:
            xs = x * self.scales[full] if full in self.scales else x
            d = model.linear(model.linear(xs, p[name + model.LORA_A]), p[name + model.LORA_B])
            y = y + (d / self.out_scales[full] if full in self.out_scales else d)
        return y

    def logits(self, x, table):
        from . import model
        return model.linear(rotate(x) if HEAD in self.rotated else x, table.T)

    def lookup(self, rows):
        """Rows gathered from the stored table -> the embedding's rows: H is its own inverse."""
        if HEAD in self.rotated:
            rows = rotate(rows)
        if HEAD in self.scales:
            rows = rows / self.scales[HEAD]
        return rows

    def covers(self, layer: int, name: str) -> bool:
        full = f"layers.{layer}.{name}"
        return full in self.rotated or full in self.scales or full in self.out_scales


def plan(name: str, cfg, quantized: set[str], params=None, tokenizer_model: bytes | None = None,
         bos: int | None = None, progress=None, stats: dict | None = None) -> Recipe:
    """The recipe `name` for the matmuls in `quantized` (full names; HEAD when the output
    projection is quantized). rotate-smooth calibrates on the fp32 reference (`params`, read a
    layer at a time) with the checkpoint's tokenizer, unless given the maxima as `stats` (full
    matmul name -> max|x| per input channel); rotate-smooth-gptq always calibrates, and rounds
    each layer's projections as soon as the layer has seen the calibration windows."""
    if name not in NAMES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(NAMES)}")
    if name == "plain":
        return Recipe("plain", cfg.norm_plus_one)
    mats = {n for n in quantized if n == HEAD or n.rsplit(".", 1)[-1] in PROJECTIONS}
    rotated = frozenset(n for n in mats if block_of(_inputs(cfg, n)) > 1)
    if name == "rotate":
        return Recipe(name, cfg.norm_plus_one, rotated)
    rounded: dict = {}
    if name == GPTQ and stats is not None:
        raise ValueError(f"recipe {GPTQ} rounds with the calibration's input moments: it "
                         f"calibrates itself (no given maxima)")

    def gptq(layer: int, stats: dict, moments: dict) -> None:
        # the layer's smoothing (what `smoothing` below gives it again), its weights in
        # their stored form, rounded for their stored inputs' moments; matmuls that read
        # one input (q/k/v, gate/up) are rounded as one matrix: GPTQ treats rows alike and
        # apart, so that is the same rounding for one factorization of H
        pre = f"layers.{layer}."
        mine = {n for n in mats if n.startswith(pre) and n in moments}
        # the layer's projections read (a GGUF's dequantized) once for smoothing and rounding;
        # up/v_proj are where down/o_proj's scales fold
        own = {n: np.asarray(params[n], np.float32) for n in
               mine | {n for n in (pre + "up_proj", pre + "v_proj") if n in params}}
        part = Recipe(name, cfg.norm_plus_one, rotated, *smoothing(cfg, own, stats, mine, ALPHA))
        groups = [[pre + n for n in g if pre + n in mine] for g in SHARED_INPUTS]
        groups += [[n] for n in sorted(mine - {n for g in groups for n in g})]
        for group in filter(None, groups):
            rows = [np.asarray(part.transform(n, own[n]), np.float32).T        # [out, in]
                    for n in group]
            q, scale = wq.int8_rows_gptq(np.concatenate(rows), part.input_moments(
                group[0], moments[group[0]]), GPTQ_DAMP)
            at = np.cumsum([0] + [len(r) for r in rows])
            for n, lo, hi in zip(group, at[:-1], at[1:]):
                rounded[n] = (q[lo:hi], scale[lo:hi])
    if stats is None:
        stats, record = calibrate(cfg, params, tokenizer_model, bos, progress,
                                  gptq if name == GPTQ else None)
    else:
        record = {"given": True}
    scales, out_scales, norms = smoothing(cfg, params, stats, mats, ALPHA)
    return Recipe(name, cfg.norm_plus_one, rotated, scales, out_scales, norms, ALPHA, record,
                  rounded)


def _inputs(cfg, full: str) -> int:
    if full == HEAD:
        return cfg.d_model
    layer, short = full.split(".")[1:]
    a = cfg.attention()[int(layer)]
    return {"o_proj": cfg.num_heads * a.head_dim, "down_proj": a.ffn_dim}.get(short, cfg.d_model)


def _s(ax: np.ndarray, aw: np.ndarray, alpha: float) -> np.ndarray:
    s = np.maximum(ax, 1e-5) ** alpha / np.maximum(aw, 1e-5) ** (1.0 - alpha)
    return np.clip(s, 1e-4, 1e4).astype(np.float32)


def smoothing(cfg, params, stats: dict, mats: set[str], alpha: float):
    """(scales, out_scales, norms) for the groups of matmuls in `mats` that share one input
    (module doc), from the calibration maxima `stats` (full matmul name -> max|x| [in])."""
    scales, out_scales, norms = {}, {}, {}

    def col_max(full):        # max |W| per input channel of the params' [in, out] weight
        return np.abs(np.asarray(params[full], np.float32)).max(axis=1)

    for a in cfg.attention():
        pre = f"layers.{a.layer}."
        qkv = [pre + n for n in ("q_proj", "k_proj", "v_proj") if pre + n in mats]
        if qkv and all(n in stats for n in qkv):
            s = _s(stats[qkv[0]], np.max([col_max(n) for n in qkv], axis=0), alpha)
            scales.update({n: s for n in qkv})
            norms[pre + "attn_norm"] = s
        gu = [pre + n for n in ("gate_proj", "up_proj") if pre + n in mats]
        if len(gu) == 2 and all(n in stats for n in gu):
            s = _s(stats[gu[0]], np.max([col_max(n) for n in gu], axis=0), alpha)
            scales.update({n: s for n in gu})
            norms[pre + "ffn_norm"] = s
        down, up = pre + "down_proj", pre + "up_proj"
        if down in mats and down in stats and up in params:
            s = _s(stats[down], col_max(down), alpha)
            scales[down], out_scales[up] = s, s
        o, v = pre + "o_proj", pre + "v_proj"
        sharing = any(b.owner == a.layer and b.layer != a.layer for b in cfg.attention())
        if (o in mats and o in stats and v in params and not cfg.v_norm and not a.k_eq_v
                and a.owner == a.layer and not sharing):
            K, H = a.kv_heads, a.head_dim
            G = cfg.num_heads // K
            ax = stats[o].reshape(K, G, H).max(axis=1)                             # [K, H]
            aw = col_max(o).reshape(K, G, H).max(axis=1)
            s_kv = _s(ax, aw, alpha)                                               # [K, H]
            scales[o] = np.ascontiguousarray(np.broadcast_to(s_kv[:, None], (K, G, H))
                                             ).reshape(-1)
            out_scales[v] = s_kv.reshape(-1)
    if HEAD in mats and HEAD in stats:
        table_max = np.zeros(cfg.d_model, np.float32)
        from .weights.sources import row_chunks
        for _, rows in row_chunks(params, HEAD):
            table_max = np.maximum(table_max, np.abs(np.asarray(rows, np.float32)).max(axis=0))
        s = _s(stats[HEAD], table_max, alpha)
        scales[HEAD], norms["final_norm"] = s, s
    return scales, out_scales, norms


def calibration_windows(tokenizer_model: bytes, bos: int) -> tuple[list[np.ndarray], dict]:
    """Windows of the evaluation text after the quality gate's slice, and their record."""
    from . import quality
    from .parity import QUALITY_TOKENS
    encode, piece_id = quality.tokenizer_fns(tokenizer_model)
    ids = quality.eval_ids(encode, piece_id)
    start = min(CALIBRATION_START, max(0, len(ids) - CALIBRATION_TOKENS))
    assert CALIBRATION_START >= QUALITY_TOKENS
    part = ids[start:start + CALIBRATION_TOKENS]
    wins = quality.windows(part, bos, CALIBRATION_WINDOW)
    return wins, {"text": "eval", "text_sha256": quality.eval_sha256(), "tokens": [start,
                  start + len(part)], "window": CALIBRATION_WINDOW}


def calibrate(cfg, params, tokenizer_model: bytes, bos: int, progress=None, on_layer=None
              ) -> tuple[dict[str, np.ndarray], dict]:
    """max |x| per input channel of every projection and of the head, over the calibration
    windows, from the fp32 reference run a layer at a time (its weights read just before use).
    With `on_layer(layer, stats, moments)`, also X^T X of each projection's input (full name ->
    float64 [in, in]), handed over once the layer has seen every window (with the maxima so
    far) and dropped after: one layer's moments are held at a time."""
    from . import model, trace
    wins, record = calibration_windows(tokenizer_model, bos)
    stats: dict[str, np.ndarray] = {}
    moments: dict[str, np.ndarray] = {}

    def seen(full, a):
        a = np.asarray(a, np.float32)
        stats[full] = a if full not in stats else np.maximum(stats[full], a)

    bar = progress(total=len(wins) * cfg.num_layers, desc="calibrate", unit="layer") \
        if progress else None

    def block(cfg, layer, p, x, positions, shared, ple):
        x, segments, maxima, moms = _recording_block(cfg, trace.program_layer(cfg, layer), p,
                                                     x, positions, shared, ple,
                                                     on_layer is not None)
        for name, a in maxima.items():
            seen(f"layers.{layer}.{name}", a)
        for name, m in moms.items():
            full = f"layers.{layer}.{name}"
            moments[full] = moments.get(full, 0.0) + np.asarray(m, np.float64)
        if bar:
            bar.update()
        return x, segments

    def after_layer(layer):
        if on_layer:
            on_layer(layer, stats, dict(moments))
            moments.clear()

    xs = trace.run_windows(cfg, params, [np.asarray(w, np.int32)[None] for w in wins], block,
                           after_layer)                                        # [1, T, D] each
    for x in xs:
        seen(HEAD, _channel_max(model.norm(cfg, x, jnp.asarray(params["final_norm"]))))
    if bar:
        bar.close()
    return stats, record


def _channel_max(x):
    """max |x| per channel (the last axis) over every other axis."""
    return jnp.abs(x).reshape(-1, x.shape[-1]).max(axis=0)


@functools.partial(jax.jit, static_argnums=(0, 1, 7))
def _recording_block(cfg, layer, p, x, positions, shared, ple, moments: bool):
    """The reference's layer `layer` (`trace.program_layer`'s representative: the index chooses
    no computation) and, per matmul name, max |input| per channel and (with `moments`) the
    input's X^T X: (x, segments, {name: [in]}, {name: [in, in]})."""
    from . import model
    maxima, moms = {}, {}

    class Recorder(model.Forms):
        def project(self, x, p, name, layer):
            a = _channel_max(x)
            maxima[name] = a if name not in maxima else jnp.maximum(maxima[name], a)
            if moments:
                x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)               # [T, in]
                m = jnp.matmul(x2.T, x2)                                          # [in, in]
                moms[name] = m if name not in moms else moms[name] + m
            return super().project(x, p, name, layer)

    x, _, segments = model.block(cfg, p, layer, x, positions, forms=Recorder(), shared=shared,
                                 ple=ple)
    return x, segments, maxima, moms
