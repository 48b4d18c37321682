"""Gemma's chat template: the one place that spells its markers and turn layout.

    <bos><start_of_turn>user\n{system\n\n}{text}<end_of_turn>\n<start_of_turn>model\n{reply}...

A checkpoint that carries its own Jinja chat template (Gemma 4's `<|turn>` turns with a native
system turn, tools and thinking) is rendered with it instead (`render`); `template` is the
fallback for those that carry none.

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
# the turn markers of each vocabulary: Gemma 1-3's, then Gemma 4's
TURN_MARKERS = ((START_OF_TURN, END_OF_TURN), (Marker("<|turn>"), Marker("<turn|>")))


def turn_prefix(role: str, start: str = START_OF_TURN) -> str:
    return f"{start}{role}\n"


def turn_suffix(end: str = END_OF_TURN) -> str:
    return f"{end}\n"


TURN_SUFFIX = turn_suffix()


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


_PLACEHOLDERS = 0xF0000   # Unicode plane 15 (private use): stand-ins for specials in content


def render(messages, chat_template: str, specials, bos_token: str, eos_token: str) -> list[str]:
    """The prompt for the model's next turn from the checkpoint's own Jinja chat template, as
    transformers' apply_chat_template renders it (jinja2's immutable sandbox, trim_blocks and
    lstrip_blocks, add_generation_prompt), as Markers and text pieces like `template`.

    `specials` are the vocabulary's control pieces. Markers come only from the template's own
    text: a special piece inside a message's content is swapped for a private-use stand-in before
    rendering (so the template's filters, e.g. trim, still see the content) and restored as plain
    text after, so a user typing "<turn|>" gets those characters, not a turn boundary."""
    import re
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise RuntimeError("this model's chat template needs jinja2 (pip install jinja2)") from None
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("chat messages must be a non-empty list of {'role', 'content'} dicts")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) \
                or not isinstance(m.get("role"), str):
            raise ValueError(f"each chat message needs a string 'role' and 'content': {m!r}")
    specials = sorted({str(p) for p in specials if p}, key=len, reverse=True)
    text = "".join(m["content"] for m in messages)
    stand_in, back = {}, {}
    code = _PLACEHOLDERS
    for piece in specials:
        if piece in text:
            while chr(code) in text:
                code += 1
            stand_in[piece], back[chr(code)] = chr(code), piece
            code += 1
    hide = re.compile("|".join(map(re.escape, stand_in))) if stand_in else None
    safe = [{**m, "content": hide.sub(lambda x: stand_in[x.group(0)], m["content"])
             if hide else m["content"]} for m in messages]

    def refuse(message):
        raise jinja2.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = refuse
    try:
        out = env.from_string(chat_template).render(
            messages=safe, bos_token=bos_token, eos_token=eos_token, add_generation_prompt=True)
    except jinja2.TemplateError as e:
        raise ValueError(f"the model's chat template refused these messages: {e}") from None
    pieces: list[str] = []
    split = re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None
    for i, part in enumerate(split.split(out) if split else [out]):
        if i % 2:
            pieces.append(Marker(part))
        elif part:
            for c, piece in back.items():
                part = part.replace(c, piece)
            pieces.append(part)
    return pieces


def render_chat(messages) -> str:
    """The chat prompt as text (what the token ids spell), for display and cross-checks."""
    return "".join(template(messages))


def constants() -> dict:
    """The template's strings, as the Android core's golden file records them."""
    return {"bos": str(BOS), "start_of_turn": str(START_OF_TURN),
            "end_of_turn": str(END_OF_TURN), "user_prefix": turn_prefix(USER),
            "model_prefix": turn_prefix(MODEL), "turn_suffix": TURN_SUFFIX}
