"""Gemma's chat template: the one place that spells its markers and turn layout.

    <bos><start_of_turn>user\n{system\n\n}{text}<end_of_turn>\n<start_of_turn>model\n{reply}...

`template(messages)` gives the prompt as pieces: `Marker`s (control tokens, inserted as ids, never
parsed out of user text: a user typing "<end_of_turn>" gets those characters) and plain text
between them. The runtime's tokenizer encodes those pieces; `render_chat` joins them into the text
they spell. The exporter's `.litertlm` metadata uses `turn_prefix`/`TURN_SUFFIX`, the compiler's
tokenizer the marker strings, and the Android core is held to `render_chat` and these constants by
a golden file (tests/test_android_demo.py).
"""

from __future__ import annotations

ROLES = {"user": "user", "assistant": "model", "model": "model"}   # wire role -> template role
USER, MODEL = "user", "model"


class Marker(str):
    """A control token of the template, spelled as its piece."""


BOS = Marker("<bos>")
START_OF_TURN = Marker("<start_of_turn>")
END_OF_TURN = Marker("<end_of_turn>")


def turn_prefix(role: str) -> str:
    return f"{START_OF_TURN}{role}\n"


TURN_SUFFIX = f"{END_OF_TURN}\n"


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
        if role != (USER if i % 2 == 0 else MODEL):
            raise ValueError("chat roles must alternate user/assistant, starting with user "
                             f"(message {i} is {m['role']!r})")
        content = m["content"].strip()
        turns.append((role, (system + content) if i == 0 else content))
    if not turns:
        raise ValueError("chat needs at least one user message")
    return turns


def template(messages) -> list[str]:
    """The prompt for the model's next turn as Markers and text pieces."""
    out: list[str] = [BOS]
    for role, content in chat_turns(messages):
        out += [START_OF_TURN, f"{role}\n{content}", END_OF_TURN, "\n"]
    return out + [START_OF_TURN, f"{MODEL}\n"]


def render_chat(messages) -> str:
    """The chat prompt as text (what the token ids spell), for display and cross-checks."""
    return "".join(template(messages))


def constants() -> dict:
    """The template's strings, as the Android core's golden file records them."""
    return {"bos": str(BOS), "start_of_turn": str(START_OF_TURN),
            "end_of_turn": str(END_OF_TURN), "user_prefix": turn_prefix(USER),
            "model_prefix": turn_prefix(MODEL), "turn_suffix": TURN_SUFFIX}
