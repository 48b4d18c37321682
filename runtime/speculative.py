"""Speculative decoding: a draft model proposes k tokens, and the target checks them in one call
of its verify signature (`runtime.contract`, verify_N): the last accepted token and the k
proposals go in, the target's logits at each of those k + 1 positions come out.

- Greedy: a proposal is kept while it is the target's argmax there; at the first that is not,
  the target's argmax is taken instead; when all k are kept, the (k+1)-th logits give one more.
  So the text is the target's own greedy text (computed through its verify signature, whose
  logits equal decode's on an fp32 artifact; on a quantized one the two paths round
  differently, as `docs/quality.md` measures).
- Sampling (temperature > 0, with top_k / top_p applied to both models alike): the standard
  acceptance rule (Leviathan et al. 2023, Chen et al. 2023). A proposal d drawn from the draft's
  q is kept with probability min(1, p(d) / q(d)); at the first rejection the token is drawn from
  norm(max(0, p - q)); when all are kept, one more is drawn from p. Every emitted token follows
  the target's distribution p exactly.

Caches: both models keep theirs as plain values, slot s holding position s. Nothing is rolled
back: a rejected proposal's slots are written again before any query reads them (the contract's
rule), in the target by the next verify call (it starts at the first position not accepted), in
the draft by catching it up on the accepted tokens it has not seen (`filled` marks how far its
cache holds the real sequence).

k (`draft_tokens`): at most N - 1 for a verify_N signature (shorter calls are padded), any
number for a target that takes any length (onnx; default 4). Near the end of the context, and
for a last token, the target decodes one token at a time.
"""

from __future__ import annotations

import time

import numpy as np

from . import sampling

DEFAULT_ANY_LENGTH_TOKENS = 4   # k for a target whose verify takes any length (onnx)


class DraftError(ValueError):
    pass


def check_pair(target, draft) -> int:
    """Why the two Generators cannot run together (DraftError), else the default k."""
    tv, dv = (int(g.manifest.config["vocab_size"]) for g in (target, draft))
    ts, ds = (g.manifest.tokenizer.get("sha256") for g in (target, draft))
    if tv != dv or ts != ds:
        raise DraftError(
            f"the draft ({draft.manifest.variant}, vocabulary {dv}, tokenizer sha256 "
            f"{str(ds)[:12]}) does not share the target's vocabulary ({target.manifest.variant}, "
            f"{tv}, {str(ts)[:12]}): its token ids would mean other tokens")
    n = target.verify_tokens
    if not n:
        raise DraftError(
            f"the target artifact ({target.manifest.variant}, {target.target}) has no verify "
            f"signature to check a draft's proposals with; export it with --verify-lengths "
            f"(the default, 8)")
    if target.verify_any_length:
        return DEFAULT_ANY_LENGTH_TOKENS
    return n - 1


def tokens(gen, ids, max_new_tokens, temperature, top_k, top_p, rng, stats):
    """`Generator._tokens` with gen.draft proposing (see the module doc); stats gain
    draft_proposed and draft_accepted."""
    draft = gen.draft
    t0 = time.perf_counter()
    state = gen._fill(ids[:-1], gen.backend.new_state())
    dstate = draft._fill(ids[:-1], draft.backend.new_state())
    t1 = time.perf_counter()
    stats.update(prefill_s=t1 - t0, draft_proposed=0, draft_accepted=0)
    seq, filled = list(ids), len(ids) - 1   # the draft's cache holds seq[:filled]
    try:
        while stats["generated_tokens"] < max_new_tokens:
            k = _round_size(gen, len(seq), max_new_tokens - stats["generated_tokens"])
            if k == 0:
                logits, state = gen.backend.decode(seq[-1], len(seq) - 1, state)
                out = [sampling.sample(logits, temperature, top_k, top_p, rng)]
            else:
                dstate, filled = _catch_up(draft, seq, filled, dstate)
                props, qs, dstate = _propose(draft, seq, k, dstate, temperature, top_k, top_p,
                                             rng)
                rows, state = gen.verify_call([seq[-1]] + props, len(seq) - 1, state)
                out = _accept(props, qs, rows, temperature, top_k, top_p, rng)
                accepted = len(out) - 1
                stats["draft_proposed"] += k
                stats["draft_accepted"] += accepted
                filled = min(len(seq) - 1 + k, len(seq) + accepted)
            for token in out:
                if token in gen.stop_ids:
                    stats["finish_reason"] = "stop"
                    return
                stats["generated_tokens"] += 1
                seq.append(token)
                yield token
    finally:
        stats["decode_s"] = time.perf_counter() - t1


def _round_size(gen, length: int, left: int) -> int:
    """Proposals this round: at most left - 1 (a round emits k + 1 tokens), and none where the
    verify call would pass the end of the cache."""
    k = min(gen.draft_tokens, left - 1)
    return k if k > 0 and gen.verify_fits(length - 1, k + 1) else 0


def _catch_up(draft, seq, filled, dstate):
    """The accepted tokens the draft has not seen, through its cache (all but the last)."""
    while filled < len(seq) - 1:
        _, dstate = draft.backend.decode(seq[filled], filled, dstate)
        filled += 1
    return dstate, filled


def _propose(draft, seq, k, dstate, temperature, top_k, top_p, rng):
    props, qs = [], []
    token = seq[-1]
    for i in range(k):
        logits, dstate = draft.backend.decode(token, len(seq) - 1 + i, dstate)
        if temperature == 0:
            token = sampling.sample(logits, 0.0)
        else:
            q = sampling.probabilities(logits, temperature, top_k, top_p)
            token = int(rng.choice(q.size, p=q))
            qs.append(q)
        props.append(token)
    return props, qs, dstate


def _accept(props, qs, rows, temperature, top_k, top_p, rng) -> list[int]:
    """The kept proposals and one token more: the correction at the first rejection, or the
    target's next token after all of them."""
    out = []
    for i, d in enumerate(props):
        if temperature == 0:
            best = sampling.sample(rows[i], 0.0)
            out.append(best)
            if best != d:
                return out
            continue
        p = sampling.probabilities(rows[i], temperature, top_k, top_p)
        q = qs[i]
        if rng.random() * q[d] < p[d]:          # kept with probability min(1, p(d) / q(d))
            out.append(d)
            continue
        residual = np.maximum(p - q, 0.0)
        total = residual.sum()
        out.append(int(rng.choice(p.size, p=residual / total)) if total > 0 else
                   int(rng.choice(p.size, p=p)))
        return out
    out.append(sampling.sample(rows[len(props)], temperature, top_k, top_p, rng))
    return out
