"""The runtime's tokenizer: SentencePiece plus Gemma's chat template.

Control tokens (<bos>, <start_of_turn>, <end_of_turn>) are inserted as ids and never parsed out of
user text: a user typing "<end_of_turn>" gets those characters, not a turn boundary.
"""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm

ROLES = {"user": "user", "assistant": "model", "model": "model"}


class Tokenizer:
    def __init__(self, model_file: str | Path, special: dict):
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.bos_id = int(special["bos"])
        self.eos_id = int(special["eos"])
        self.pad_id = int(special.get("pad", 0))
        self.start_of_turn_id = int(special["start_of_turn"])
        self.end_of_turn_id = int(special["end_of_turn"])

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text))

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    def prompt_ids(self, prompt, chat: bool = False) -> list[int]:
        """Token ids for a plain prompt (BOS + text) or, with chat=True, a chat prompt.

        A chat prompt is a string (one user turn) or a list of {"role", "content"} messages.
        """
        if not chat:
            if not isinstance(prompt, str):
                raise TypeError("a plain prompt must be a string; pass chat=True for messages")
            return [self.bos_id] + self.encode(prompt)
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        ids = [self.bos_id]
        for role, content in chat_turns(messages):
            ids += [self.start_of_turn_id] + self.encode(f"{role}\n{content}")
            ids += [self.end_of_turn_id] + self.encode("\n")
        return ids + [self.start_of_turn_id] + self.encode("model\n")


def chat_turns(messages) -> list[tuple[str, str]]:
    """Gemma's template rules: a system message is prepended to the first user turn; roles must
    alternate user/model starting with user; content is stripped of surrounding whitespace."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("chat messages must be a non-empty list of {'role', 'content'} dicts")
    messages = list(messages)
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m:
            raise ValueError(f"each chat message needs a string 'role' and 'content': {m!r}")
    system = ""
    if messages[0]["role"] == "system":
        system = messages[0]["content"].strip() + "\n\n"
        messages = messages[1:]
    turns = []
    for i, m in enumerate(messages):
        role = ROLES.get(m["role"])
        if role is None:
            raise ValueError(f"unknown chat role {m['role']!r}; use system, user or assistant")
        if role != ("user" if i % 2 == 0 else "model"):
            raise ValueError("chat roles must alternate user/assistant, starting with user "
                             f"(message {i} is {m['role']!r})")
        content = m["content"].strip()
        turns.append((role, (system + content) if i == 0 else content))
    if not turns:
        raise ValueError("chat needs at least one user message")
    return turns


def render_chat(messages) -> str:
    """The chat prompt as text (what the token ids spell), for display and cross-checks."""
    out = "<bos>"
    for role, content in chat_turns(messages):
        out += f"<start_of_turn>{role}\n{content}<end_of_turn>\n"
    return out + "<start_of_turn>model\n"
