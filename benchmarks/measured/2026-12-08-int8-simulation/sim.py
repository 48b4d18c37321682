"""Simulate XNNPACK qd8 int8 (per-row weights, per-token asym int8 activations) on the real 270M
with recipe variants; top-1 / KL vs fp32 on eval and held-out windows of 1024."""
import sys, time, json, functools
import numpy as np, jax, jax.numpy as jnp
from compile import checkpoints, model, recipes, quality, trace
from compile.weights import quant as wq

t0 = time.time()
ck = checkpoints.load(None)
cfg = ck.config
P = {k: np.asarray(ck.params[k], np.float32) for k in ck.params}
encode, piece_id = quality.tokenizer_fns(ck.tokenizer_model)
BOS = ck.special_ids["bos"]
WINS = {n: quality.windows(quality.eval_ids(encode, piece_id, n), BOS, 1024)
        for n in ("eval", "heldout")}
print("loaded", time.time() - t0, {k: [len(w) for w in v] for k, v in WINS.items()}, flush=True)


def qd8(x):
    mn = jnp.minimum(x.min(-1, keepdims=True), 0.0)
    mx = jnp.maximum(x.max(-1, keepdims=True), 0.0)
    scale = (mx - mn) / 255.0
    scale = jnp.where(scale == 0, 1.0, scale)
    zp = jnp.clip(jnp.round(-128.0 - mn / scale), -128, 127)
    q = jnp.clip(jnp.round(x / scale) + zp, -128, 127)
    return (q - zp) * scale


def blockrot(x, R):
    k = x.shape[-1]
    if isinstance(R, dict):
        return jnp.matmul(x, jnp.asarray(R[k]))
    b = R.shape[0]
    if k % b:
        b2 = recipes.block_of(k)
        assert b2 == b, (k, b)
    lead = x.shape[:-1]
    return jnp.matmul(x.reshape(*lead, k // b, b), R).reshape(*lead, k)


class Sim(model.Forms):
    def __init__(self, R, act=True, head_scale=None, head_act=True, float_names=()):
        self.R, self.act, self.head_scale, self.head_act = R, act, head_scale, head_act
        self.float_names = set(float_names)

    def project(self, x, p, name, layer):
        if self.R is not None and name in p.get("__rot__", ()):
            pass
        R = self.R
        if R is not None:
            x = blockrot(x, R if isinstance(R, dict) else jnp.asarray(R))
        if self.act and name not in self.float_names:
            x = qd8(x)
        return model.linear(x, p[name])

    def logits(self, x, table):
        if self.R is not None:
            x = blockrot(x, self.R if isinstance(self.R, dict) else jnp.asarray(self.R))
        if self.head_act:
            x = qd8(x)
        return model.linear(x, table.T)

    def embed_rows(self, params, tokens):
        rows = params["embed"][tokens]
        if self.R is not None:
            rows = blockrot(rows, {k: v.T for k, v in self.R.items()} if isinstance(self.R, dict) else jnp.asarray(self.R).T)
        if self.head_scale is not None:
            rows = rows / self.head_scale
        return rows


def forward_fn(forms):
    @jax.jit
    def f(params, tokens):
        pos = jnp.arange(tokens.shape[1], dtype=jnp.int32)
        return model.forward(cfg, params, tokens, pos, forms=forms)[0][0]
    return f


REF = {}


def log_softmax(x):
    m = x.max(-1, keepdims=True)
    y = x - m
    return y - np.log(np.exp(y).sum(-1, keepdims=True))


def reference():
    f = forward_fn(model.REFERENCE)
    jp = {k: jnp.asarray(v) for k, v in P.items()}
    for n, ws in WINS.items():
        for i, w in enumerate(ws):
            lg = np.asarray(f(jp, jnp.asarray(w)[None]), np.float32)
            REF[n, i] = (lg.argmax(-1), log_softmax(lg).astype(np.float32))
    print("reference", time.time() - t0, flush=True)


def score(params, forms, texts=("eval", "heldout")):
    f = forward_fn(forms)
    jp = {k: jnp.asarray(v) for k, v in params.items()}
    out = {}
    for n in texts:
        agree = kl = cnt = 0
        va = vk = vc = 0
        for i, w in enumerate(WINS[n]):
            lg = np.asarray(f(jp, jnp.asarray(w)[None]), np.float32)
            am, lp = REF[n, i]
            ag = lg.argmax(-1) == am
            lq = log_softmax(lg)
            k = (np.exp(lp) * (lp - lq)).sum(-1)
            agree += int(ag.sum()); kl += float(k.sum()); cnt += len(w)
            # validation rows of the eval text: outside the calibration ids 512..1534
            idx = i * 1023 + np.arange(len(w)) - 1
            m = (idx < 512) | (idx >= 1534)
            va += int(ag[m].sum()); vk += float(k[m].sum()); vc += int(m.sum())
        out[n] = (round(agree / cnt, 4), round(kl / cnt, 5))
        if n == "eval":
            out["eval-val"] = (round(va / vc, 4), round(vk / vc, 5))
    return out


# ---------------------------------------------------------------- recipe construction
QUANTIZED = {n for n in P if model.is_linear(n) and not model.keeps_float(n)} | {"embed"}


def build(R, alpha=0.5, stats=None):
    """Transformed float params (rotation R blockwise, smoothing alpha) and the recipe."""
    Rn = (R if isinstance(R, dict) else np.asarray(R, np.float32)) if R is not None else None
    saved = recipes.rotate_rows
    if Rn is not None:
        def rr(w):
            n, k = w.shape
            if isinstance(Rn, dict):
                return np.asarray(w, np.float32) @ Rn[k]
            b = Rn.shape[0]
            return (np.asarray(w, np.float32).reshape(n, k // b, b) @ Rn).reshape(n, k)
        recipes.rotate_rows = rr
    saved_alpha = recipes.ALPHA
    recipes.ALPHA = alpha
    try:
        name = "rotate-smooth" if alpha else "rotate"
        if R is None:
            name = "plain" if not alpha else "smooth-only"
        if name == "smooth-only":
            rec = recipes.plan("rotate-smooth", cfg, QUANTIZED, P, ck.tokenizer_model, BOS,
                               stats=stats)
            rec.rotated = frozenset()
        else:
            rec = recipes.plan(name, cfg, QUANTIZED, P, ck.tokenizer_model, BOS, stats=stats)
        T = {n: np.asarray(rec.transform(n, P[n]), np.float32) for n in P}
    finally:
        recipes.rotate_rows = saved
        recipes.ALPHA = saved_alpha
    return T, rec


def quantize(T, skip=(), fn=None):
    """Per-row int8 of every quantized matmul (rows = output channels)."""
    Q = dict(T)
    for n in QUANTIZED:
        if n in skip:
            continue
        rows = T[n] if n == "embed" else T[n].T
        if fn is not None:
            d = fn(n, rows)
        else:
            q, s = wq.int8_rows(rows)
            d = q.astype(np.float32) * s[:, None]
        Q[n] = d if n == "embed" else np.ascontiguousarray(d.T)
    return Q


STATS = {}


def get_stats():
    if "s" not in STATS:
        STATS["s"], _ = recipes.calibrate(cfg, P, ck.tokenizer_model, BOS)
    return STATS["s"]


H128 = recipes.hadamard(128)


def hessians(T, R, head_scale, act=False):
    """X^T X of every quantized matmul's (rotated) input over the calibration windows, from the
    transformed float model (eager)."""
    wins, _ = recipes.calibration_windows(ck.tokenizer_model, BOS)
    H = {}

    def add(name, x):
        x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
        H[name] = H.get(name, 0) + x.T @ x

    class Rec(Sim):
        def project(self, x, p, name, layer):
            if self.R is not None:
                x = blockrot(x, self.R if isinstance(self.R, dict) else jnp.asarray(self.R))
            if act:
                x = qd8(x)
            add(f"layers.{layer}.{name}", x)
            return model.linear(x, p[name])

        def logits(self, x, table):
            if self.R is not None:
                x = blockrot(x, self.R if isinstance(self.R, dict) else jnp.asarray(self.R))
            if act:
                x = qd8(x)
            add("embed", x)
            return model.linear(x[:, -1:], table.T)

    forms = Rec(R, head_scale=head_scale)
    jp = {k: jnp.asarray(v) for k, v in T.items()}
    for w in wins:
        pos = jnp.arange(len(w), dtype=jnp.int32)
        model.forward(cfg, jp, jnp.asarray(w)[None], pos, forms=forms)
    return H


def gptq_rows(W, H, blocksize=128, percdamp=0.01, scale=None, order=False):
    """GPTQ of W [rows, cols] to per-row symmetric int8 given H [cols, cols]; returns dequantized."""
    W = np.array(W, np.float64)
    rows, cols = W.shape
    H = np.array(H, np.float64)
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if scale is None:
        scale = np.abs(W).max(1) / 127.0
        scale = np.where(scale == 0, 1.0, scale)
    perm = None
    if order:
        perm = np.argsort(-np.diag(H))
        W = W[:, perm]
        H = H[perm][:, perm]
    H[np.diag_indices(cols)] += percdamp * np.mean(np.diag(H))
    Hinv = np.linalg.cholesky(np.linalg.inv(H)).T          # upper
    Q = np.zeros_like(W)
    s = scale[:, None]
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].copy()
        Err1 = np.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w = W1[:, i]
            q = np.clip(np.rint(w / scale), -127, 127) * scale
            Q[:, i1 + i] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= np.outer(err, Hinv1[i, i:])
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if perm is not None:
        inv = np.argsort(perm)
        Q = Q[:, inv]
    return Q.astype(np.float32)
