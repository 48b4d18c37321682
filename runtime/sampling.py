"""Host-side sampling over one logits vector (numpy). temperature 0 is greedy."""

from __future__ import annotations

import math

import numpy as np


def validate(temperature, top_k, top_p) -> None:
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) \
            or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                              or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


SEED_LIMIT = 2 ** 64


def check_seed(seed):
    """seed as an int in [0, 2**64), or None; anything else is a ValueError saying it is the
    seed (numpy's own message does not)."""
    if seed is None:
        return None
    import numbers
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) \
            or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    return int(seed)


class NonFiniteLogits(RuntimeError):
    """The model gave NaN or infinite logits: no token can be chosen from them (argmax would
    pick token 0, sampling fails on NaN probabilities)."""


def _non_finite(logits: np.ndarray):
    nan = int(np.isnan(logits).sum())
    inf = int(np.isinf(logits).sum())
    raise NonFiniteLogits(
        f"the model produced non-finite logits ({nan} NaN and {inf} infinite of {logits.size}): "
        f"its weights, or an adapter at this scale, overflow float32; no token was chosen from "
        f"them")


def sample(logits: np.ndarray, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None, rng: np.random.Generator | None = None) -> int:
    """A token id from one logits vector. NaN or +inf logits raise NonFiniteLogits, checked at
    no cost per token: argmax stops at the first NaN and +inf wins it; the max that sampling
    subtracts is NaN or +inf when any logit is."""
    if temperature == 0:
        token = int(np.argmax(logits))
        if not math.isfinite(float(logits[token])):
            _non_finite(logits)
        return token
    p = probabilities(logits, temperature, top_k, top_p)
    rng = rng if rng is not None else np.random.default_rng()
    return int(rng.choice(p.size, p=p))


def probabilities(logits: np.ndarray, temperature: float, top_k: int | None = None,
                  top_p: float | None = None) -> np.ndarray:
    """The distribution `sample` draws from at temperature > 0: float64 [V], summing to 1."""
    z = logits.astype(np.float64) / temperature
    top = z.max()
    if not math.isfinite(top):
        _non_finite(logits)
    if top_k:   # the largest logit stays, so `top` is still the max
        k = min(top_k, z.size)
        kth = np.partition(z, -k)[-k]
        z = np.where(z >= kth, z, -np.inf)
    p = np.exp(z - top)
    p /= p.sum()
    if top_p is not None and top_p < 1:
        order = np.argsort(-p)
        cum = np.cumsum(p[order])
        keep = order[: int(np.searchsorted(cum, top_p)) + 1]   # smallest set with mass >= top_p
        mask = np.zeros_like(p)
        mask[keep] = p[keep]
        p = mask / mask.sum()
    return p
