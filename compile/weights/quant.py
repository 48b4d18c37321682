"""Weight transforms shared by the targets that quantize (tflite, onnx).

The tied embedding is both a lookup table and the output projection. Quantizers only handle the
projection (a matmul); left shared, the table stays float (671 MB of Gemma 3 270M's 1 GB) or gets
duplicated per signature. So the lookup gets its own per-row int8 copy (`embed_q`, `embed_scale`,
read by `model.forward`) and `embed` is left to the quantizer as the projection.
"""

from __future__ import annotations

import numpy as np


def int8_rows(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8: table ~= q * scale[:, None]."""
    scale = np.abs(table).max(axis=1) / 127.0
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
    q = np.clip(np.rint(table / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


def split_embedding(params: dict, quant: str, float_embedding: bool) -> dict:
    """The weights a quantizing target builds its graph on: unchanged for `none` or when the
    embedding stays float, else with the int8 lookup table added."""
    if quant == "none" or float_embedding:
        return dict(params)
    q, scale = int8_rows(params["embed"])
    return {**params, "embed_q": q, "embed_scale": scale}
