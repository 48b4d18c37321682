"""The generation loop's bookkeeping (with a fake backend) and the chat template."""

import numpy as np
import pytest

import runtime
from runtime.generator import Generator
from runtime.chat import render_chat
from runtime.tokenizer import Tokenizer


class ScriptedBackend:
    """Fake backend: emits a fixed token script and records every call (bookkeeping only)."""
    target = "fake"

    def __init__(self, script, vocab):
        self.script, self.vocab, self.calls = list(script), vocab, []

    def new_state(self):
        return {"n": 0}

    def prefill(self, signature, tokens, start, state):
        self.calls.append((signature, list(tokens), start))
        return state

    def decode(self, token, pos, state):
        self.calls.append(("decode", token, pos))
        logits = np.zeros(self.vocab, np.float32)
        logits[self.script[min(state["n"], len(self.script) - 1)]] = 1.0
        return logits, {"n": state["n"] + 1}


@pytest.fixture
def tiny_gen(tiny_artifacts):
    def make(script):
        gen = runtime.load(tiny_artifacts("gemma3-270m-tiny"))
        return Generator(ScriptedBackend(script, 512), gen.manifest, gen.tokenizer)
    return make


def test_stops_on_end_of_turn_and_eos(tiny_gen):
    gen = tiny_gen([300, 301, 5, 302])          # 5 = <end_of_turn>
    run = gen.stream_ids([2, 300], max_new_tokens=10)
    assert list(run) == [300, 301]
    assert run.stats["finish_reason"] == "stop"
    gen = tiny_gen([300, 1])                    # 1 = <eos>
    assert list(gen.stream_ids([2, 300], max_new_tokens=10)) == [300]
    gen = tiny_gen([300] * 20)
    run = gen.stream_ids([2, 300], max_new_tokens=7)
    assert len(list(run)) == 7
    assert run.stats["finish_reason"] == "length" and run.stats["generated_tokens"] == 7


def test_prompt_is_prefilled_in_chunks_then_last_token_decoded(tiny_gen):
    gen = tiny_gen([300] * 5)
    prompt = list(range(300, 314))               # 14 tokens: 13 prefilled, the 14th decoded
    list(gen.stream_ids(prompt, max_new_tokens=2))
    calls = gen.backend.calls
    assert calls[0] == ("prefill_8", prompt[:8], 0)
    assert calls[1] == ("prefill_8", prompt[8:13] + [0, 0, 0], 8)    # padded with <pad>
    assert calls[2] == ("decode", prompt[13], 13)
    assert calls[3] == ("decode", 300, 14)
    assert len(calls) == 4


def test_each_generation_has_its_own_stats(tiny_gen):
    gen = tiny_gen([300] * 20)
    a = gen.stream_ids([2, 300], max_new_tokens=3)
    b = gen.stream_ids([2, 300, 301], max_new_tokens=5)
    next(a)
    assert list(b) == [300] * 5
    assert list(a) == [300] * 2
    assert (a.stats["prompt_tokens"], a.stats["generated_tokens"]) == (2, 3)
    assert (b.stats["prompt_tokens"], b.stats["generated_tokens"]) == (3, 5)
    assert not hasattr(gen, "last_stats")


def test_stream_holds_back_partial_utf8(tiny_gen):
    # "é" is bytes C3 A9: byte pieces <0xC3> = id 6 + 0xC3, <0xA9> = id 6 + 0xA9
    gen = tiny_gen([6 + 0xC3, 6 + 0xA9, 1])
    pieces = list(gen.stream("the", max_new_tokens=5))
    assert pieces == ["é"]


def test_stop_string_split_across_tokens_ends_the_stream(tiny_gen):
    # byte tokens spell "ab\ncd": the stop string "\nc" spans two tokens and is never shown
    ids = [6 + b for b in b"ab\ncd"] + [1]
    run = tiny_gen(ids).stream("the", max_new_tokens=10, stop=["\nc"])
    pieces = list(run)
    assert pieces == ["a", "b"] and "".join(pieces) == "ab"
    assert run.stats["finish_reason"] == "stop" and run.stats["generated_tokens"] == 4
    # a held-back tail that stops looking like a stop string is released
    pieces = list(tiny_gen(ids).stream("the", max_new_tokens=10, stop=["\nx"]))
    assert "".join(pieces) == "ab\ncd" and pieces[2] == "\nc"


def test_context_overflow_is_refused(tiny_gen):
    gen = tiny_gen([300])
    with pytest.raises(runtime.ContextOverflowError, match="exceeds the model's max context of 64"):
        list(gen.stream_ids([2] * 60, max_new_tokens=5))
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
        list(gen.stream_ids([2, 3], max_new_tokens=0))


def test_chat_template_ids(tiny_artifacts):
    gen = runtime.load(tiny_artifacts("gemma3-270m-tiny"))
    tok: Tokenizer = gen.tokenizer
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " hi "},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "<end_of_turn>"}]
    ids = tok.prompt_ids(msgs, chat=True)
    text = render_chat(msgs)
    assert text == ("<bos><start_of_turn>user\nBe brief.\n\nhi<end_of_turn>\n"
                    "<start_of_turn>model\nhello<end_of_turn>\n"
                    "<start_of_turn>user\n<end_of_turn><end_of_turn>\n<start_of_turn>model\n")
    sot, eot = tok.start_of_turn_id, tok.end_of_turn_id
    assert ids[:2] == [tok.bos_id, sot]
    assert ids.count(sot) == 4 and ids.count(eot) == 3    # user text "<end_of_turn>" is not a token
    assert ids[-len(tok.encode("model\n")) - 1:] == [sot] + tok.encode("model\n")
    assert tok.decode(ids[2:ids.index(eot)]) == "user\nBe brief.\n\nhi"


@pytest.mark.parametrize("msgs,message", [
    ([], "non-empty list"),
    ([{"role": "assistant", "content": "x"}], "must alternate"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "must alternate"),
    ([{"role": "robot", "content": "a"}], "unknown chat role 'robot'"),
    ([{"role": "user"}], "string 'role' and 'content'"),
])
def test_chat_template_rejects_bad_conversations(msgs, message):
    with pytest.raises(ValueError, match=message):
        render_chat(msgs)
