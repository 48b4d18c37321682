"""The streaming quantizer: numpy, one tensor at a time, and the weight transforms that go with it.

Formats (symmetric, zero point 0; a tensor is quantized along its rows, [out, in], as the matmul
kernels read it):

  int8_rows    int8, one float32 scale per row (per output channel): max|row| / 127
  int8_rows_gptq  the same grid and scales, each row's values rounded by GPTQ (Frantar et al.
               2022) instead of to nearest: the inputs in turn, each rounding error spread over
               the inputs not yet rounded through the inverse of H = X^T X of calibration inputs
               X, which minimises |X W^T - X Q^T| rather than |W - Q|
  int_blocks   int4 or int8 values, one scale per block of `block` consecutive inputs of a row:
               max|block| / 7 (or / 127; with `search`, the least-error of max / 127 ... max /
               112, so a coarser grid the values already lie on is kept); float32 scales
               (ONNX Runtime's MatMulNBits), or rounded
               to float16 with a 7-bit mantissa before the values are rounded (`int4_blocks`,
               LiteRT's blockwise int4), so the stored scale is the one they were quantized with
  int_blocks_asym  int4 or int8 values with a scale and a bias per block (min and max on the grid)
  pack_int4    two int4 values per byte, the even element in the low nibble

The tied embedding is both a lookup table and the output projection. A quantizing target gives
the lookup an int8 table (`embed_q` with `embed_scale`, read by `targets.forms.Lookups`): per row on tflite
(`int8_rows`, one table shared with its int8 projection), int8 blocks of 32 on onnx (the
projection's own when it is int8), and quantizes `embed` as the projection.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

INT4_BLOCK = 32


@dataclass(frozen=True)
class Blocks:
    """A matrix [N, K] (a matmul weight as [out, in], or the embedding table) in blocks of `block`
    consecutive inputs of a row: w = scale * q + bias, per block.

    bits    how many bits the integers need (q in [-2^(bits-1), 2^(bits-1)))
    q       int8 [N, K]
    scale   float32 [N, K / block]
    bias    float32 [N, K / block], or None for symmetric blocks
    source  what the blocks are: a GGUF type kept as it was ("Q4_K"), or our quantizer's ("int4")
    """
    bits: int
    block: int
    q: np.ndarray
    scale: np.ndarray
    bias: np.ndarray | None = None
    source: str = ""

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def dequantize(self) -> np.ndarray:
        """float32 [N, K]."""
        N, K = self.q.shape
        w = self.q.reshape(N, K // self.block, self.block).astype(np.float32)
        w *= self.scale.astype(np.float32)[..., None]
        if self.bias is not None:
            w += self.bias[..., None]
        return w.reshape(N, K)


CHUNK_BYTES = 64 << 20   # rows are quantized this many float32 bytes at a time


def _row_chunks(rows: int, cols: int):
    step = max(1, CHUNK_BYTES // max(1, cols * 4))
    for r in range(0, rows, step):
        yield slice(r, min(rows, r + step))


def int8_rows(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8: table ~= q * scale[:, None]. Works through the rows a chunk at a
    time, so its temporaries stay small however large the table (a 12B embedding is 4 GB)."""
    table = np.asarray(table)
    q = np.empty(table.shape, np.int8)
    scale = np.empty(table.shape[0], np.float32)
    for r in _row_chunks(*table.shape):
        t = table[r].astype(np.float32)
        s = _row_scales(t)
        q[r] = np.clip(np.rint(t / s[:, None]), -127, 127)
        scale[r] = s
    return q, scale


def _row_scales(rows: np.ndarray) -> np.ndarray:
    """int8_rows' grid: max|row| / 127 per row (1 for an all-zero row)."""
    s = np.abs(rows).max(axis=1) / 127.0
    return np.where(s == 0, 1.0, s).astype(np.float32)


GPTQ_BLOCK = 128   # inputs whose rounding errors are spread lazily, a block at a time


def int8_rows_gptq(rows: np.ndarray, hessian: np.ndarray, damp: float
                   ) -> tuple[np.ndarray, np.ndarray]:
    # one BLAS thread: GPTQ makes many small BLAS calls between Python steps, and OpenBLAS's
    # threads spin between calls, taking a core from whatever runs beside it (alone it is no
    # slower: 1.4-1.7 s per 270M layer either way; beside a busy process 0.8-1.4 s against 2-2.5)
    from threadpoolctl import threadpool_limits
    with threadpool_limits(1, user_api="blas"):
        return _int8_rows_gptq(rows, hessian, damp)


def _int8_rows_gptq(rows: np.ndarray, hessian: np.ndarray, damp: float
                    ) -> tuple[np.ndarray, np.ndarray]:
    """`int8_rows`' grid (the same per-row scales, max|row| / 127), values rounded by GPTQ for
    the inputs whose second moments are `hessian` [in, in] (X^T X over calibration tokens, in
    the inputs' stored form). `damp` adds damp * mean(diag H) to the diagonal: with fewer
    calibration tokens than inputs H is singular, and a large damping keeps the rounding from
    fitting the calibration text (damp -> inf is round-to-nearest). Inputs never seen (a zero
    diagonal) are rounded to nearest. rows [out, in] -> (q int8 [out, in], scale float32 [out])."""
    w = np.array(rows, np.float32)                                                 # [N, K]
    N, K = w.shape
    scale = _row_scales(w)
    h = np.array(hessian, np.float32)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    h[np.diag_indices(K)] += damp * float(np.mean(np.diag(h)))
    # U, the upper Cholesky factor of H^-1 (row i: how input i's error moves inputs > i), as the
    # inverse of the upper factor of H = A A^T, got by reversing the inputs around a lower
    # Cholesky factorization: one factorization and one triangular inverse, no inverse of H
    from scipy.linalg import cholesky, lapack
    a = cholesky(h[::-1, ::-1], lower=True, check_finite=False)[::-1, ::-1]        # upper
    u, info = lapack.strtri(np.ascontiguousarray(a), lower=0)
    if info:
        raise ValueError(f"GPTQ: the damped input moments are singular (LAPACK info {info})")
    u = np.ascontiguousarray(u, np.float32)
    u[dead] = 0.0
    u[dead, dead] = 1.0
    # inputs as rows ([in, out]): each step reads and updates whole contiguous rows
    wt = np.ascontiguousarray(w.T)                                                 # [K, N]
    del w
    qt = np.empty((K, N), np.int8)
    for b0 in range(0, K, GPTQ_BLOCK):
        b1 = min(b0 + GPTQ_BLOCK, K)
        err = np.empty((b1 - b0, N), np.float32)
        for j in range(b0, b1):
            col = np.clip(np.rint(wt[j] / scale), -127, 127)
            qt[j] = col
            e = err[j - b0]
            np.subtract(wt[j], col * scale, out=e)
            e /= u[j, j]
            wt[j + 1:b1] -= u[j, j + 1:b1, None] * e[None, :]
        wt[b1:] -= u[b0:b1, b1:].T @ err
    return np.ascontiguousarray(qt.T), scale


SEARCH = 16   # int_blocks(search=True): how many grids per block (max -> top, top-1, ...)


def _least_error_scale(v: np.ndarray, span: np.ndarray, top: int) -> np.ndarray:
    """Per block of v [..., block], the scale span / m, m = top, top - 1, ..., top - SEARCH + 1
    (none of them clips: |v| <= span), under which rounding v loses least."""
    best_s = best = None
    for m in range(top, max(0, top - SEARCH), -1):
        c = (span / m).astype(np.float32)
        err = np.sum((v - np.rint(v / c[..., None]) * c[..., None]) ** 2, axis=-1)
        better = np.ones(err.shape, bool) if best is None else err < best
        best_s = c if best_s is None else np.where(better, c, best_s)
        best = err if best is None else np.where(better, err, best)
    return best_s


def int_blocks(w: np.ndarray, bits: int, block: int, fp16_scales: bool = False,
               search: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric blockwise quantization of w [out, in] to `bits` (4 or 8): (q int8 [out, in] with
    values in [-2^(bits-1), 2^(bits-1) - 1], scales [out, in / block]); w ~= q * repeat(scales,
    block, axis=1). A block's scale is max|block| / (2^(bits-1) - 1); with `fp16_scales` it is
    rounded to float16 with a 7-bit mantissa (what LiteRT's blockwise kernels read) *before* the
    values are rounded, so the stored scale is the one they were quantized with. With `search`,
    each block takes the scale max|block| / m, m in top, top-1, ..., top-SEARCH+1, whose
    rounding error is least (no value is clipped by any of them; a block whose values lie on a
    coarser grid, e.g. a dequantized 5-bit one, comes back exactly)."""
    w = np.asarray(w)
    out, n = w.shape
    if n % block:
        raise ValueError(f"int{bits}: a row of {n} values does not split into blocks of {block}")
    top = (1 << (bits - 1)) - 1
    q = np.empty((out, n), np.int8)
    scale = np.empty((out, n // block), np.float16 if fp16_scales else np.float32)
    for r in _row_chunks(out, n):        # a chunk of rows at a time: small temporaries
        blocks = w[r].astype(np.float32).reshape(-1, n // block, block)
        amax = np.maximum(np.abs(blocks).max(axis=2), 1e-9)
        s = _least_error_scale(blocks, amax, top) if search else (amax / top).astype(np.float32)
        if fp16_scales:
            s = s.astype(ml_dtypes.bfloat16).astype(np.float16)              # 7-bit mantissa
            s = np.where(s == 0, np.float16(2.0 ** -24), s)                  # bf16 underflow
        q[r] = np.clip(np.rint(blocks / s.astype(np.float32)[..., None]), -top - 1, top
                       ).reshape(-1, n)
        scale[r] = s
    return q, scale


def int_blocks_asym(w: np.ndarray, bits: int, block: int, source: str = "",
                    search: bool = False) -> Blocks:
    """Asymmetric blockwise quantization of w [out, in]: w ~= scale * q + bias per block of
    `block` inputs of a row, q in [-2^(bits-1), 2^(bits-1) - 1]. Each block's min and max are on
    its grid (scale = (max - min) / (2^bits - 1), bias = min + 2^(bits-1) scale): llama.cpp's
    Q4_1 form, as `Blocks` with a bias. With `search`, each block takes the least-error of
    (max - min) / m, m = 2^bits - 1 down to 2^bits - SEARCH (its min stays on the grid; no value
    is clipped)."""
    w = np.asarray(w)
    out, n = w.shape
    if n % block:
        raise ValueError(f"int{bits}: a row of {n} values does not split into blocks of {block}")
    levels, half = (1 << bits) - 1, 1 << (bits - 1)
    q = np.empty((out, n), np.int8)
    scale = np.empty((out, n // block), np.float32)
    bias = np.empty((out, n // block), np.float32)
    for r in _row_chunks(out, n):
        blocks = w[r].astype(np.float32).reshape(-1, n // block, block)
        lo, hi = blocks.min(axis=2), blocks.max(axis=2)
        span = np.maximum(hi - lo, 1e-12 * levels)
        s = _least_error_scale(blocks - lo[..., None], span, levels) if search else \
            (span / levels).astype(np.float32)
        u = np.clip(np.rint((blocks - lo[..., None]) / s[..., None]), 0, levels)
        q[r] = (u - half).astype(np.int8).reshape(-1, n)
        scale[r] = s
        bias[r] = lo + half * s
    return Blocks(bits, block, q, scale, bias, source or f"int{bits}-asym")


def int4_blocks(w: np.ndarray, block: int = INT4_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Blockwise int4 with float16 scales (LiteRT's format); see `int_blocks`."""
    return int_blocks(w, 4, block, fp16_scales=True)


def pack_int4(q: np.ndarray) -> np.ndarray:
    """int4 values (int8 holding [-8, 7]) -> bytes, two per byte, element 2i in the low nibble."""
    flat = np.ascontiguousarray(q).reshape(-1).view(np.uint8)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    out = np.empty(flat.size // 2, np.uint8)
    step = CHUNK_BYTES
    for i in range(0, out.size, step):
        lo, hi = flat[2 * i:2 * (i + step):2], flat[2 * i + 1:2 * (i + step):2]
        out[i:i + step] = (lo & 0x0F) | ((hi & 0x0F) << 4)
    return out


def unpack_int4(packed: np.ndarray, count: int) -> np.ndarray:
    """The inverse of `pack_int4`: int8 values in [-8, 7]."""
    low = (packed & 0x0F).astype(np.int8)
    high = (packed >> 4).astype(np.int8)
    both = np.stack([low, high], axis=1).reshape(-1)[:count]
    return np.where(both > 7, both - 16, both).astype(np.int8)


def int8_table(params, name: str, block: int) -> tuple[np.ndarray, np.ndarray]:
    """A lookup table [V, K] as symmetric int8 blocks of `block` (or the largest power of two
    below it that divides K: a tiny model's rows are short) (q int8 [V, K], scales float32
    [V, K / block]), quantized `sources.ROW_CHUNK` rows at a time, so the float table is never
    whole in memory (Gemma 4's per-layer embeddings: 9.4 GB in float32 for E2B)."""
    [(q, scale)] = int8_table_parts(params, name, block)
    return q, scale


def int8_table_parts(params, name: str, block: int, max_elements: int | None = None
                     ) -> list[tuple[np.ndarray, np.ndarray]]:
    """`int8_table` as column parts [V, K_c] (each a whole number of blocks) of at most
    `max_elements` values each, filled as the row chunks are quantized (no copy of the whole).
    TFLite's gather kernels count a tensor's elements in int32: E2B's per-layer table (2.35e9
    values) made every lookup "index out of bounds"; concatenated along K, the parts are the
    table."""
    from .sources import row_chunks, specs_of
    (V, K), _ = specs_of(params)[name]
    block = table_block(K, block)
    per_part = K if max_elements is None else max(block, (max_elements // V) // block * block)
    bounds = [(lo, min(lo + per_part, K)) for lo in range(0, K, per_part)]
    parts = [(np.empty((V, hi - lo), np.int8), np.empty((V, (hi - lo) // block), np.float32))
             for lo, hi in bounds]
    for r, rows in row_chunks(params, name):
        q, scale = int_blocks(rows, 8, block)                    # [n, K], [n, K / block]
        for (lo, hi), (pq, ps) in zip(bounds, parts):
            pq[r:r + len(rows)] = q[:, lo:hi]
            ps[r:r + len(rows)] = scale[:, lo // block:hi // block]
    return parts


def table_block(K: int, block: int) -> int:
    """`block`, halved until it divides K."""
    while K % block:
        block //= 2
    return block
