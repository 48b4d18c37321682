"""The generation loop: chunked prefill, decode, sampling, stop tokens, streaming.

Every call returns a `Generation`: an iterator with that request's own stats, so nothing in a
Generator changes per request and threads share one freely. The server streams through it too.

Prefill covers every prompt token but the last, in chunks over the exported prefill lengths (the
largest that fits first, the final remainder padded into the smallest length that holds it); the
last prompt token goes through `decode`, whose logits give the first new token. A chunk never
reaches past the cache end (writes there would be clamped onto valid slots); near the end of the
context the remainder is decoded token by token. A backend whose graph takes any token count
(`dynamic_length`, the ONNX one) gets chunks of at most the largest prefill length, unpadded.

A LoRA adapter (`runtime.adapters`) is chosen per generation: its slot inputs, prepared by the
backend once per (adapter, scale), are passed to every call as `lora=`, and the backend runs the
LoRA signatures with them; without one it runs the base signatures.
"""

from __future__ import annotations

import numbers
import time
from typing import Iterator

import numpy as np

from . import adapters, sampling
from . import contract as ct
from .backends.base import Backend
from .contract import prefill_name
from .manifest import Manifest
from .tokenizer import Tokenizer

# tokens per verify call on a backend that takes any number (onnx): [64, V] float32 logits is
# 64 MB for a 262k vocabulary, and the weights are read once per 64 positions
VERIFY_ROWS = 64


class ContextOverflowError(ValueError):
    pass


class TextStream:
    """Token ids in, displayable text out. Text waits while it ends inside a UTF-8 sequence, a
    tail that could still become a stop string is held back, and the first stop string ends the
    stream (`stopped`) without being shown. Invariant: the pieces returned only ever extend the
    text shown so far."""

    def __init__(self, tokenizer: Tokenizer, stop=()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.shown = ""
        self.stopped = False

    def add(self, token: int) -> str:
        self.ids.append(int(token))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):   # an incomplete UTF-8 sequence: wait for its other bytes
            return ""
        cut = min((text.find(s) for s in self.stop if s in text), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._show(text[:cut])
        hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])),
                   default=0)
        return self._show(text[:len(text) - hold])

    def finish(self) -> str:
        """The rest, at the end of generation (an incomplete tail shows as U+FFFD)."""
        return "" if self.stopped else self._show(self.tokenizer.decode(self.ids))

    def _show(self, ready: str) -> str:
        if len(ready) > len(self.shown) and ready.startswith(self.shown):
            piece, self.shown = ready[len(self.shown):], ready
            return piece
        return ""


def plan_chunks(start: int, count: int, lengths: list[int], max_context: int
                ) -> list[tuple[int, int]]:
    """Split `count` tokens from position `start` into (bucket length, real tokens) chunks;
    bucket length 1 means a decode step."""
    plan, pos, left = [], start, count
    while left > 0:
        fits = [n for n in lengths if pos + n <= max_context]
        covering = [n for n in fits if n >= left]
        if covering:
            plan.append((min(covering), left))
        elif fits:
            plan.append((max(fits), max(fits)))
        else:
            plan.append((1, 1))
        pos += plan[-1][1]
        left -= plan[-1][1]
    return plan


_BOUND = object()   # per-call adapter argument not given: the generator's own


class _Loras:
    """The backend's prepared slot inputs per (adapter, scale), made once and shared by a
    Generator and its `with_adapter` views (a bounded cache under a lock: entries are never
    changed, only added and dropped)."""
    SIZE = 16

    def __init__(self, backend, manifest: Manifest, verify: bool, log):
        import threading
        from collections import OrderedDict
        self.backend, self.manifest, self.verify, self.log = backend, manifest, verify, log
        self._lock = threading.Lock()
        self._read: dict[str, adapters.Adapter] = {}
        self._prepared: OrderedDict = OrderedDict()

    def adapter(self, name) -> "adapters.Adapter":
        if isinstance(name, adapters.Adapter):
            return name.check(self.manifest.contract)
        with self._lock:
            if name not in self._read:
                self._read[name] = adapters.read(self.manifest, name, self.verify, self.log)
            return self._read[name]

    def prepared(self, adapter, scale: float):
        """The backend's handle for (adapter, scale); None for no adapter (the base signatures)."""
        if adapter is None:
            return None
        ad = self.adapter(adapter)
        if not hasattr(self.backend, "lora_inputs"):
            raise adapters.AdapterError(f"the {self.backend.target} backend runs no LoRA "
                                        f"adapters")
        key = (ad.name if isinstance(adapter, str) else id(adapter), float(scale))
        with self._lock:
            if key in self._prepared:
                self._prepared.move_to_end(key)
                return self._prepared[key]
        handle = self.backend.lora_inputs(adapters.slot_inputs(self.manifest.contract, ad, scale))
        with self._lock:
            self._prepared[key] = handle
            while len(self._prepared) > self.SIZE:
                self._prepared.popitem(last=False)
        return handle


class Generator:
    """Generation over one loaded artifact. `adapter` (a name from the manifest's adapters, or a
    `runtime.adapters.Adapter`) and `adapter_scale` are this generator's LoRA adapter, None for
    the base model; every generation method takes them per call too, and `with_adapter` gives a
    generator sharing the loaded backend."""

    def __init__(self, backend: Backend, manifest: Manifest, tokenizer: Tokenizer,
                 adapter=None, adapter_scale: float = 1.0, verify: bool = True, log=None,
                 _loras: _Loras | None = None):
        self.backend = backend
        self.manifest = manifest
        self.tokenizer = tokenizer
        contract = manifest.contract
        self.max_context = contract.max_context
        self.prefill_lengths = list(contract.prefill_lengths)
        self.stop_ids = {tokenizer.eos_id, tokenizer.end_of_turn_id}
        self._loras = _loras or _Loras(backend, manifest, verify, log)
        self.adapter, self.adapter_scale = adapter, adapter_scale
        self._lora(adapter, adapter_scale)   # a bad name or scale fails here, not mid-request
        self.draft, self.draft_tokens = None, 0

    def with_draft(self, draft: "Generator", draft_tokens: int | None = None) -> "Generator":
        """This generator with `draft` proposing tokens that it checks in one verify call
        (`runtime.speculative`); the draft must share its vocabulary. draft_tokens: proposals
        per call (default: its verify length - 1; 4 on onnx, whose verify takes any length)."""
        from . import speculative
        most = speculative.check_pair(self, draft)
        k = most if draft_tokens is None else draft_tokens
        limit = VERIFY_ROWS - 1 if self.verify_any_length else most
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= limit:
            raise ValueError(f"draft_tokens must be an integer from 1 to {limit} (the target "
                             f"checks them and the token before in one verify call), got {k!r}")
        out = Generator(self.backend, self.manifest, self.tokenizer, self.adapter,
                        self.adapter_scale, _loras=self._loras)
        out.draft, out.draft_tokens = draft, int(k)
        return out

    @property
    def target(self) -> str:
        return self.backend.target

    @property
    def adapters(self) -> list[str]:
        """The names of the artifact's run-time adapters."""
        return sorted(self.manifest.data.get(ct.ADAPTERS, {}))

    def with_adapter(self, adapter, scale: float = 1.0) -> "Generator":
        """This generator with another adapter (None: the base model), sharing the backend."""
        return Generator(self.backend, self.manifest, self.tokenizer, adapter, scale,
                         _loras=self._loras)

    def _lora(self, adapter=_BOUND, scale=None):
        if adapter is _BOUND:
            adapter, scale = self.adapter, self.adapter_scale if scale is None else scale
        return self._loras.prepared(adapter, 1.0 if scale is None else scale)

    def __repr__(self):
        extra = f", adapter={self.adapter!r}" if self.adapter is not None else ""
        return f"Generator(variant={self.manifest.variant!r}, target={self.target!r}{extra})"

    # -- cache filling ------------------------------------------------------------------------

    def _fill(self, ids: list[int], state, start: int = 0, lora=None):
        """Run ids through the cache from position `start` without logits; returns the state."""
        kw = {} if lora is None else {"lora": lora}
        if getattr(self.backend, "dynamic_length", False):
            step = self.prefill_lengths[-1]
            for i in range(0, len(ids), step):
                state = self.backend.prefill_tokens(ids[i:i + step], start + i, state, **kw)
            return state
        pos = start
        for bucket, real in plan_chunks(start, len(ids), self.prefill_lengths, self.max_context):
            chunk = ids[pos - start: pos - start + real]
            if bucket == 1:
                _, state = self.backend.decode(chunk[0], pos, state, **kw)
            else:
                tokens = np.full(bucket, self.tokenizer.pad_id, np.int32)
                tokens[:real] = chunk
                state = self.backend.prefill(prefill_name(bucket), tokens, pos, state, **kw)
            pos += real
        return state

    def logits(self, token_ids, start: int = 0, adapter=_BOUND, adapter_scale=None,
               verify: bool = False) -> np.ndarray:
        """Logits [T - start, V] for positions start..T-1 of token_ids: tokens before `start` go
        through chunked prefill, the rest through decode one at a time, or with `verify`
        through the artifact's verify signatures, several tokens a call (where it has none, or
        near the end of the context, through decode)."""
        return np.stack(list(self.iter_logits(token_ids, start, adapter, adapter_scale,
                                              verify)))

    def iter_logits(self, token_ids, start: int = 0, adapter=_BOUND, adapter_scale=None,
                    verify: bool = False) -> Iterator[np.ndarray]:
        """`logits` a row [V] at a time (teacher-forced evaluation over long texts)."""
        ids = self._ids(token_ids)
        if not 0 <= start < len(ids):
            raise ValueError(f"start must be in [0, {len(ids)}), got {start}")
        self._check_fits(len(ids), 0)
        lora = self._lora(adapter, adapter_scale)
        kw = {} if lora is None else {"lora": lora}
        return self._rows(ids, start, lora, kw, verify)

    def _rows(self, ids, start, lora, kw, verify=False):
        state = self._fill(ids[:start], self.backend.new_state(), lora=lora)
        pos, step = start, self.verify_tokens if verify else 0
        while pos < len(ids):
            chunk = ids[pos:pos + step]
            if step and self.verify_fits(pos, len(chunk)):
                rows, state = self.verify_call(chunk, pos, state, **kw)
            else:
                row, state = self.backend.decode(ids[pos], pos, state, **kw)
                rows = row[None]
            yield from rows
            pos += len(rows)

    def verify_fits(self, pos: int, n: int) -> bool:
        """Whether a verify call of n tokens at `pos` stays inside the cache (a fixed verify_N
        writes N slots, padding included)."""
        return pos + (n if self.verify_any_length else self.verify_tokens) <= self.max_context

    def verify_call(self, tokens, pos: int, state, **kw):
        """(logits [n, V] of the n tokens at pos.., state) in one verify call: any n on a
        backend that takes it, else padded into verify_N (the slots past them are never read
        before they are written again, the contract's rule)."""
        n = len(tokens)
        if self.verify_any_length:
            return self.backend.verify(None, tokens, pos, state, **kw)
        padded = np.full(self.verify_tokens, self.tokenizer.pad_id, np.int32)
        padded[:n] = tokens
        rows, state = self.backend.verify(ct.verify_name(len(padded)), padded, pos, state, **kw)
        return rows[:n], state

    @property
    def verify_any_length(self) -> bool:
        """Whether one verify call takes any number of tokens (onnx's graph), not N."""
        return bool(getattr(self.backend, "verify_any_length", False))

    @property
    def verify_tokens(self) -> int:
        """Tokens per verify call (`logits(..., verify=True)`): 0 where the artifact has no
        verify signature."""
        if not hasattr(self.backend, "verify"):
            return 0
        if self.verify_any_length:
            return VERIFY_ROWS
        lengths = self.manifest.contract.verify_lengths
        return max(lengths) if lengths else 0

    def _ids(self, token_ids) -> list[int]:
        """Token ids as ints, each a token of this model's vocabulary (an id out of range would
        read past the embedding table on one backend and fail inside another)."""
        ids = []
        vocab = int(self.manifest.config["vocab_size"])
        for i, t in enumerate(token_ids):
            if isinstance(t, bool) or not isinstance(t, numbers.Integral):
                raise TypeError(f"token ids must be integers; item {i} is {t!r}")
            if not 0 <= t < vocab:
                raise ValueError(f"token id {int(t)} (item {i}) is outside the vocabulary "
                                 f"[0, {vocab})")
            ids.append(int(t))
        return ids

    def _check_fits(self, prompt_len: int, max_new_tokens: int) -> None:
        if prompt_len < 1:
            raise ValueError("the prompt is empty")
        if prompt_len + max_new_tokens > self.max_context:
            raise ContextOverflowError(
                f"prompt of {prompt_len} tokens + max_new_tokens {max_new_tokens} exceeds the "
                f"model's max context of {self.max_context} tokens")

    # -- generation ---------------------------------------------------------------------------

    def stream_ids(self, prompt_ids, max_new_tokens: int = 256, temperature: float = 0.0,
                   top_k: int | None = None, top_p: float | None = None,
                   seed: int | None = None, adapter=_BOUND, adapter_scale=None
                   ) -> "Generation":
        """The new token ids, one at a time, ending at a stop token or after max_new_tokens.
        Arguments are checked now; the work runs as the result is iterated."""
        sampling.validate(temperature, top_k, top_p)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) \
                or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        max_new_tokens = int(max_new_tokens)
        ids = self._ids(prompt_ids)
        self._check_fits(len(ids), max_new_tokens)
        rng = np.random.default_rng(sampling.check_seed(seed))
        if self.draft is not None and (self.adapter if adapter is _BOUND else adapter) \
                is not None:
            raise ValueError("speculative decoding does not combine with a LoRA adapter yet: "
                             "the draft would propose for the base model")
        lora = self._lora(adapter, adapter_scale)
        stats = {"prompt_tokens": len(ids), "generated_tokens": 0, "finish_reason": "length"}
        if self.draft is not None:
            from . import speculative
            return Generation(stats, speculative.tokens(self, ids, max_new_tokens, temperature,
                                                        top_k, top_p, rng, stats))
        return Generation(stats, self._tokens(ids, max_new_tokens, temperature, top_k, top_p, rng,
                                              stats, lora))

    def _tokens(self, ids, max_new_tokens, temperature, top_k, top_p, rng, stats, lora=None):
        kw = {} if lora is None else {"lora": lora}
        t0 = time.perf_counter()
        state = self._fill(ids[:-1], self.backend.new_state(), lora=lora)
        logits, state = self.backend.decode(ids[-1], len(ids) - 1, state, **kw)
        t1 = time.perf_counter()
        stats["prefill_s"] = t1 - t0
        pos = len(ids)
        try:
            for n in range(max_new_tokens):
                token = sampling.sample(logits, temperature, top_k, top_p, rng)
                if token in self.stop_ids:
                    stats["finish_reason"] = "stop"
                    break
                stats["generated_tokens"] = n + 1
                yield token
                if n + 1 == max_new_tokens:
                    break
                logits, state = self.backend.decode(token, pos, state, **kw)
                pos += 1
        finally:   # also when the consumer stops early (a stop string, a closed connection)
            stats["decode_s"] = time.perf_counter() - t1

    def stream_text(self, prompt_ids, max_new_tokens: int = 256, temperature: float = 0.0,
                    top_k: int | None = None, top_p: float | None = None,
                    seed: int | None = None, stop=(), adapter=_BOUND, adapter_scale=None
                    ) -> "Generation":
        """Text pieces as they become complete characters; ends at a stop token or before the
        first of the `stop` strings (finish_reason "stop" either way)."""
        tokens = self.stream_ids(prompt_ids, max_new_tokens, temperature, top_k, top_p, seed,
                                 adapter, adapter_scale)
        return Generation(tokens.stats, self._pieces(tokens, TextStream(self.tokenizer, stop)))

    @staticmethod
    def _pieces(tokens: "Generation", text: TextStream):
        try:
            for token in tokens:
                piece = text.add(token)
                if piece:
                    yield piece
                if text.stopped:
                    tokens.stats["finish_reason"] = "stop"
                    return
            piece = text.finish()
            if piece:
                yield piece
        finally:   # closing the text stream closes the token stream under it
            tokens.close()

    def stream(self, prompt, max_new_tokens: int = 256, temperature: float = 0.0,
               top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
               chat: bool = False, stop=(), adapter=_BOUND, adapter_scale=None
               ) -> "Generation":
        """`stream_text` of a plain prompt (BOS + text) or, with chat=True, a chat prompt."""
        return self.stream_text(self.tokenizer.prompt_ids(prompt, chat=chat), max_new_tokens,
                                temperature, top_k, top_p, seed, stop, adapter, adapter_scale)

    def generate(self, prompt, **kwargs) -> str:
        return "".join(self.stream(prompt, **kwargs))


class Generation:
    """One request's output: an iterator (token ids or text pieces) with its own `stats`
    (prompt_tokens, generated_tokens, finish_reason "stop" or "length", prefill_s, decode_s),
    filled in as it runs. Nothing is shared between requests, so one Generator serves many
    threads at once."""

    def __init__(self, stats: dict, items: Iterator):
        self.stats = stats
        self._items = items

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._items)

    def close(self) -> None:
        """Stops generating (what a consumer that leaves early should call)."""
        self._items.close()
