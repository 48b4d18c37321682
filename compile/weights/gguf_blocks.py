"""GGUF's quantized blocks, decoded into `quant.Blocks` without changing a single value.

Every type here is, per block of `block` consecutive inputs of a row, small integers times a scale,
plus (for the asymmetric types) an offset:

  type   bits  block  GGUF dequantization          as Blocks (w = scale * q + bias)
  Q8_0    8     32    d * q                        q = q,       scale = d
  Q5_0    5     32    d * (u - 16)                 q = u - 16,  scale = d
  Q4_0    4     32    d * (u - 8)                  q = u - 8,   scale = d
  Q6_K    6     16    d * sc_j * (u - 32)          q = u - 32,  scale = d * sc_j
  Q5_1    5     32    d * u + m                    q = u - 16,  scale = d,  bias = 16 d + m
  Q4_1    4     32    d * u + m                    q = u - 8,   scale = d,  bias = 8 d + m
  Q4_K    4     32    d * sc_j * u - dmin * m_j    q = u - 8,   scale = d sc_j,  bias = 8 scale - dmin m_j
  Q5_K    5     32    d * sc_j * u - dmin * m_j    q = u - 16,  scale = d sc_j,  bias = 16 scale - dmin m_j

Scales are float16 times small integers (exact in float32); biases are one float32 rounding away
from GGUF's own arithmetic. Types not listed (Q2_K, Q3_K, the IQ types, ...) have no decoder:
`SUPPORTED` says which do.
"""

from __future__ import annotations

import numpy as np

from .quant import Blocks

QK_K = 256
_CHUNK_ROWS_BYTES = 16 << 20


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray, group: int) -> np.ndarray:
    """Low nibbles of each `group` bytes, then their high nibbles (ggml's order) -> uint8."""
    n = qs.shape[0]
    q = qs.reshape(n, -1, 1, group) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return (q & np.uint8(0x0F)).reshape(n, -1)


def _high_bits32(qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1: bit i of a little-endian uint32 is the fifth bit of element i."""
    n = qh.shape[0]
    bits = np.ascontiguousarray(qh).view(np.uint32).reshape(n, 1) >> \
        np.arange(32, dtype=np.uint32).reshape(1, 32)
    return (bits & np.uint32(1)).astype(np.uint8)


def _k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: the eight 6-bit scales and mins packed in 12 bytes."""
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _q8_0(b):
    return b[:, 2:].view(np.int8), _f16(b[:, :2]), None


def _q4_0(b):
    return _nibbles(b[:, 2:], 16).astype(np.int8) - 8, _f16(b[:, :2]), None


def _q4_1(b):
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    return _nibbles(b[:, 4:], 16).astype(np.int8) - 8, d, 8 * d + m


def _q5_0(b):
    u = _nibbles(b[:, 6:], 16) | (_high_bits32(b[:, 2:6]) << 4)
    return u.astype(np.int8) - 16, _f16(b[:, :2]), None


def _q5_1(b):
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    u = _nibbles(b[:, 8:], 16) | (_high_bits32(b[:, 4:8]) << 4)
    return u.astype(np.int8) - 16, d, 16 * d + m


def _q4_k(b):
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    scale = d * sc                                                # [n, 8]
    u = _nibbles(b[:, 16:], 32).reshape(n, 8 * 32)
    return u.astype(np.int8) - 8, scale, 8 * scale - dmin * mn


def _q5_k(b):
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    scale = d * sc
    qh, qs = b[:, 16:16 + QK_K // 8], b[:, 16 + QK_K // 8:]
    low = _nibbles(qs, 32).reshape(n, 8, 32)
    high = ((qh.reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1)
    u = (low | (high << 4)).reshape(n, QK_K)
    return u.astype(np.int8) - 16, scale, 16 * scale - dmin * mn


def _q6_k(b):
    n = b.shape[0]
    ql, qh = b[:, :QK_K // 2], b[:, QK_K // 2:QK_K // 2 + QK_K // 4]
    sc = b[:, QK_K // 2 + QK_K // 4:QK_K // 2 + QK_K // 4 + QK_K // 16].view(np.int8)
    d = _f16(b[:, -2:])
    low = _nibbles(ql, 64).reshape(n, -1, 32)
    high = ((qh.reshape(n, -1, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1))
            & np.uint8(3)).reshape(n, -1, 32)
    u = (low | (high << 4)).reshape(n, QK_K)
    return u.astype(np.int8) - 32, d * sc.astype(np.float32), None


# type name -> (bits, block, elements per GGUF block, decoder of [n, bytes] GGUF blocks ->
# (q int8 [n, elements], scale [n, elements / block], bias or None))
_DECODERS = {
    "Q8_0": (8, 32, 32, _q8_0), "Q5_0": (5, 32, 32, _q5_0), "Q4_0": (4, 32, 32, _q4_0),
    "Q5_1": (5, 32, 32, _q5_1), "Q4_1": (4, 32, 32, _q4_1),
    "Q4_K": (4, 32, QK_K, _q4_k), "Q5_K": (5, 32, QK_K, _q5_k), "Q6_K": (6, 16, QK_K, _q6_k),
}
SUPPORTED = tuple(_DECODERS)


def layout(type_name: str) -> tuple[int, int, bool] | None:
    """(bits, block, has a bias) of a decodable GGUF type, from its name alone; None otherwise."""
    if type_name not in _DECODERS:
        return None
    bits, block, _, _ = _DECODERS[type_name]
    return bits, block, type_name in ("Q4_1", "Q5_1", "Q4_K", "Q5_K")


def decode(raw: np.ndarray, type_name: str, shape: tuple[int, int]) -> Blocks:
    """The bytes of a GGUF tensor (uint8, any shape whose rows are the tensor's rows) of the
    numpy shape [N, K] -> Blocks over its rows, a slice of rows at a time."""
    if type_name not in _DECODERS:
        raise ValueError(f"no block decoder for GGUF type {type_name}; decodable: "
                         f"{', '.join(SUPPORTED)}")
    bits, block, per, fn = _DECODERS[type_name]
    N, K = shape
    if K % per:
        raise ValueError(f"a row of {K} values is not a whole number of {type_name} blocks")
    rows = np.asarray(raw).reshape(N, -1)
    q = np.empty((N, K), np.int8)
    scale = np.empty((N, K // block), np.float32)
    bias = None
    step = max(1, _CHUNK_ROWS_BYTES // max(1, rows.shape[1]))
    for r in range(0, N, step):
        chunk = rows[r:r + step]
        n = chunk.shape[0]
        qq, s, b = fn(np.ascontiguousarray(chunk).reshape(n * K // per, -1))
        q[r:r + n] = qq.reshape(n, K)
        scale[r:r + n] = s.reshape(n, K // block)
        if b is not None:
            if bias is None:
                bias = np.empty((N, K // block), np.float32)
            bias[r:r + n] = b.reshape(n, K // block)
    return Blocks(bits, block, q, scale, bias, source=type_name)
