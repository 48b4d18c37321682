"""Quality of an artifact (or a peer) against the fp32 JAX reference, teacher-forced on a text that
no model generated: `compile/eval_text.txt` (prose, code, Chinese, Russian and chat turns; origins
in its header), the text every recipe, calibration and gate is chosen on; and
`compile/heldout_text.txt`, the same five kinds, never tuned on, measured beside it by
`benchmarks.run` so that a recipe fitted to the first text shows on the second.

The text's tokens are cut into windows of at most `window` tokens, each starting with <bos>; in
every window the artifact reads the tokens one at a time through its cache (prefill-free decode,
the path generation uses) and its logits at each position are compared with the reference's full
forward (no cache) at the same position:

  top1        share of positions where the artifact's argmax equals the reference's
  mean_kl     mean KL(reference || artifact) in nats
  ppl_ref     perplexity of the text under the reference; ppl under the artifact; ppl_delta their
              difference (artifact - reference) and ppl_delta_rel relative to ppl_ref

Nothing holds a window's logits whole: the reference yields them in row chunks and each chunk is
compared with the artifact's rows for the same positions (a 1024-token window of a 262144-token
vocabulary is 1 GB of float32).
"""

from __future__ import annotations

import hashlib
import os
import re
from importlib import resources
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from runtime import chat

EVAL_FILE = "eval_text.txt"
TEXTS = {"eval": EVAL_FILE, "heldout": "heldout_text.txt"}   # name -> file in this package
ROW_CHUNK = 64      # reference rows computed per step (64 x 262144 float32 = 64 MB)


def eval_text(name: str = "eval") -> str:
    if name not in TEXTS:
        raise ValueError(f"unknown evaluation text {name!r}; known: {', '.join(TEXTS)}")
    return resources.files(__package__).joinpath(TEXTS[name]).read_text(encoding="utf-8")


def eval_sha256(name: str = "eval") -> str:
    return hashlib.sha256(eval_text(name).encode("utf-8")).hexdigest()


def sections(text: str | None = None) -> list[tuple[str, str]]:
    """(kind, body) of every section of a text (default: the evaluation text), in order."""
    text = eval_text() if text is None else text
    parts = re.split(r"^### (\w+):[^\n]*\n", text, flags=re.M)
    return [(kind, body.strip("\n")) for kind, body in zip(parts[1::2], parts[2::2])]


def _chat_messages(body: str) -> list[dict]:
    messages = []
    for block in re.split(r"^(user|model):\n", body, flags=re.M)[1:]:
        if block in ("user", "model"):
            messages.append({"role": block, "content": ""})
        else:
            messages[-1]["content"] = block.strip()
    return messages


def eval_ids(encode: Callable[[str], list[int]], piece_id: Callable[[str], int],
             name: str = "eval") -> list[int]:
    """A whole text of `TEXTS` as token ids, without <bos>: plain sections encoded as text
    (joined by a blank line), chat sections through Gemma's template with its control tokens as
    ids (never parsed out of text)."""
    ids: list[int] = []
    for kind, body in sections(eval_text(name)):
        if kind == "chat":
            pieces = chat.template(_chat_messages(body))[1:-2]   # no <bos>, no open model turn
            for p in pieces:
                ids += [piece_id(p)] if isinstance(p, chat.Marker) else encode(p)
            ids += encode("\n")
        else:
            ids += encode(body + "\n\n")
    return ids


def tokenizer_fns(tokenizer_model: bytes):
    """(encode, piece_id) of a SentencePiece model given as bytes."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_proto=tokenizer_model)
    return sp.encode, sp.piece_to_id


def windows(ids: list[int], bos: int, window: int, limit: int | None = None) -> list[np.ndarray]:
    """Consecutive windows of the text, each <bos> + up to window - 1 tokens; `limit` caps the
    total number of tokens measured (the export gate's slice)."""
    body = window - 1
    ids = ids[:limit] if limit else ids
    return [np.asarray([bos] + ids[i:i + body], np.int32) for i in range(0, len(ids), body)
            if len(ids[i:i + body]) > 1]


def reference_chunks(contract, params, tokens: np.ndarray, rows: int = ROW_CHUNK
                     ) -> Iterator[np.ndarray]:
    from . import trace
    return trace.reference_logit_chunks(contract, params, tokens, rows)


def reference_to_disk(contract, params, wins: list[np.ndarray], folder: Path
                      ) -> Callable[[np.ndarray], Iterator[np.ndarray]]:
    """Runs the reference on every window now, writing its float32 logits under `folder`, and
    returns a `reference` for `evaluate_many` that reads them back ROW_CHUNK rows at a time. So
    the reference's weights and an artifact's are never in memory together (the export's quality
    gate: 2.8 GB peak for the 270M when they were)."""
    from . import trace
    V = contract.config.vocab_size
    files = {}
    for k, w in enumerate(wins):
        path = Path(folder) / f"reference-{k}.f32"
        # [T, V] row-major, written a slice of the vocabulary (all T rows) at a time, so the
        # table is read once per window (not once per row chunk: 8 times for 512 tokens)
        with open(path, "wb") as f:
            f.truncate(len(w) * V * 4)
            for v, cols in trace.reference_logit_slices(contract, params, w):      # [T, s]
                cols = np.ascontiguousarray(cols, np.float32)
                for t in range(len(w)):
                    os.pwrite(f.fileno(), cols[t].data, (t * V + v) * 4)
        files[id(w)] = path

    def reference(w: np.ndarray) -> Iterator[np.ndarray]:
        with open(files[id(w)], "rb") as f:
            while True:
                chunk = np.fromfile(f, np.float32, count=ROW_CHUNK * V)
                if not chunk.size:
                    return
                yield chunk.reshape(-1, V)
    return reference


def evaluate(contract, params, wins: Iterable[np.ndarray],
             logits_of: Callable[[np.ndarray], Iterable[np.ndarray]],
             reference: Callable | None = None, progress=None) -> dict:
    """Figures of `logits_of(window)` — an iterable of logit rows ([V] or [r, V]) for positions
    0..len-1 of the window, in order — against the reference on every window."""
    return evaluate_many(contract, params, wins, {"": logits_of}, reference, progress)[""]


def evaluate_many(contract, params, wins: Iterable[np.ndarray],
                  candidates: dict[str, Callable[[np.ndarray], Iterable[np.ndarray]]],
                  reference: Callable | None = None, progress=None,
                  text: str = "eval") -> dict[str, dict]:
    """`evaluate` for several candidates at once: the reference runs once per window. `text`
    names the text of `TEXTS` the windows come from (its sha256 goes with the figures)."""
    reference = reference or (lambda w: reference_chunks(contract, params, w))
    scratch = _Scratch()
    accs = {name: _Acc(scratch) for name in candidates}
    wins = list(wins)
    bar = progress(total=sum(len(w) for w in wins) * len(candidates), desc="quality",
                   unit="tok") if progress else None
    for w in wins:
        rows = {name: _rows(fn(w)) for name, fn in candidates.items()}
        pos = 0
        for ref in reference(w):
            ref = np.asarray(ref, np.float32)
            lp = _log_softmax(ref, scratch, "lp")   # once per chunk, for every candidate
            p = np.exp(lp, out=scratch.get("p", lp.shape))
            targets = w[pos + 1: pos + 1 + len(ref)]
            for name, it in rows.items():
                got = np.stack([next(it) for _ in range(len(ref))])
                accs[name].add(ref, got, targets, lp, p)
                if bar:
                    bar.update(len(ref))
            pos += len(ref)
        for name, it in rows.items():
            if next(it, None) is not None:
                raise ValueError(f"{name}: more logit rows than the window has tokens")
    if bar:
        bar.close()
    sha = eval_sha256(text)
    return {name: acc.figures(len(wins), sha) for name, acc in accs.items()}


def llama_cpp_rows(gguf: str, window: int, threads: int | None = None,
                   lora_path: str | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """llama.cpp (llama-cpp-python) on a GGUF as a candidate: window -> its logits [T, V],
    teacher-forced; `lora_path` applies a LoRA GGUF. The export's quality gate and
    `benchmarks.run` measure llama.cpp through this one function."""
    from llama_cpp import Llama
    llm = Llama(model_path=gguf, n_ctx=window, n_batch=512, logits_all=True, verbose=False,
                **({"n_threads": threads} if threads else {}),
                **({"lora_path": lora_path} if lora_path else {}))

    def rows(w):
        llm.reset()
        llm.eval([int(t) for t in w])
        return np.asarray(llm.scores[:len(w)], np.float32)
    return rows


def _rows(chunks: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    for c in chunks:
        c = np.asarray(c)
        if c.ndim == 1:
            yield c
        else:
            yield from c.reshape(-1, c.shape[-1])


class _Scratch:
    """float64 work arrays kept across chunks: a fresh [64, 262144] one costs 32k page faults
    (glibc maps and unmaps arrays that size on every allocation), more than the arithmetic."""

    def __init__(self):
        self.arrays: dict[str, np.ndarray] = {}

    def get(self, name: str, shape: tuple) -> np.ndarray:
        a = self.arrays.get(name)
        if a is None or a.shape != shape:
            a = self.arrays[name] = np.empty(shape, np.float64)
        return a


class _Acc:
    def __init__(self, scratch: _Scratch | None = None):
        self.scratch = scratch
        self.n = 0
        self.agree = 0
        self.kl = 0.0
        self.nll_ref = 0.0
        self.nll_got = 0.0
        self.scored = 0

    def add(self, ref: np.ndarray, got: np.ndarray, targets: np.ndarray,
            lp: np.ndarray | None = None, p: np.ndarray | None = None) -> None:
        """`lp`, `p`: the reference's log-softmax and softmax, when the caller has them."""
        lp = _log_softmax(ref) if lp is None else lp
        p = np.exp(lp) if p is None else p
        lq = _log_softmax(got, self.scratch, "lq")
        self.n += len(ref)
        self.agree += int(np.sum(ref.argmax(-1) == got.argmax(-1)))
        k = len(targets)   # the last position of a window has no next token to score
        rows = np.arange(k)
        self.nll_ref -= float(lp[rows, targets].sum())
        self.nll_got -= float(lq[rows, targets].sum())
        self.scored += k
        self.kl += float(_kl(lp, lq, p, into=lq).sum())    # lq is not read after this

    def figures(self, windows: int, text_sha256: str) -> dict:
        ppl_ref = float(np.exp(self.nll_ref / max(1, self.scored)))
        ppl = float(np.exp(self.nll_got / max(1, self.scored)))
        return {"positions": self.n, "windows": windows,
                "top1": self.agree / max(1, self.n), "mean_kl": self.kl / max(1, self.n),
                "ppl_ref": ppl_ref, "ppl": ppl, "ppl_delta": ppl - ppl_ref,
                "ppl_delta_rel": (ppl - ppl_ref) / ppl_ref, "text_sha256": text_sha256}


def kl_rows(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    """KL(softmax(ref) || softmax(got)) per row of logits, in float64."""
    return _kl(_log_softmax(ref), _log_softmax(got))


def _kl(lp: np.ndarray, lq: np.ndarray, p: np.ndarray | None = None,
        into: np.ndarray | None = None) -> np.ndarray:
    """KL per row from log-softmaxes (and the first's softmax p, when known); `into`: an array
    of lp's shape that may be overwritten (lq, when the caller is done with it)."""
    p = np.exp(lp) if p is None else p
    d = np.subtract(lp, lq, out=into)
    return np.maximum(np.einsum("ij,ij->i", p.reshape(-1, p.shape[-1]),
                                d.reshape(-1, d.shape[-1])).reshape(p.shape[:-1]), 0.0)


def _log_softmax(x: np.ndarray, scratch: _Scratch | None = None, name: str = "x"
                 ) -> np.ndarray:
    """In float64, in place on one copy: a new array, or `scratch`'s array `name` (valid until
    that name is asked for again)."""
    if scratch is None:
        x, tmp = x.astype(np.float64), None
    else:
        out = scratch.get(name, x.shape)
        np.copyto(out, x)
        x, tmp = out, scratch.get("exp", x.shape)
    x -= x.max(axis=-1, keepdims=True)
    x -= np.log(np.exp(x, out=tmp).sum(axis=-1, keepdims=True))
    return x
