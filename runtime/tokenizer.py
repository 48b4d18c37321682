"""The runtime's tokenizer: SentencePiece, and the chat template (`runtime.chat`: the checkpoint's
own when the manifest carries one, else Gemma's) as token ids.

The template's markers are inserted as ids and never parsed out of user text: a user typing the
end-of-turn marker gets those characters, not a turn boundary.
"""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm

from . import chat as template


class Tokenizer:
    def __init__(self, model_file: str | Path, special: dict):
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.bos_id = int(special["bos"])
        self.eos_id = int(special["eos"])
        self.pad_id = int(special.get("pad", 0))
        self.start_of_turn_id = int(special["start_of_turn"])
        self.end_of_turn_id = int(special["end_of_turn"])
        self.chat_template = special.get("chat_template")   # the checkpoint's own, or None
        self._specials = None

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text to encode must be a string, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:   # a lone surrogate: SentencePiece's binding would fail
            raise ValueError(f"the text is not valid Unicode: a lone surrogate "
                             f"U+{ord(text[e.start]):04X} at character {e.start}") from None
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
        if self.chat_template:
            specials = self.specials()
            pieces = template.render(messages, self.chat_template, specials,
                                     self.sp.id_to_piece(self.bos_id),
                                     self.sp.id_to_piece(self.eos_id))
            markers = specials
        else:   # Gemma's layout, with this vocabulary's turn markers
            pieces = template.template(messages)
            markers = {template.BOS: self.bos_id, template.START_OF_TURN: self.start_of_turn_id,
                       template.END_OF_TURN: self.end_of_turn_id}
        ids = []
        for piece in pieces:
            ids += [markers[piece]] if isinstance(piece, template.Marker) else self.encode(piece)
        return ids

    def specials(self) -> dict[str, int]:
        """The vocabulary's control pieces (piece -> id) and the turn markers: what a chat
        template's text may spell as tokens."""
        if self._specials is None:
            sp = self.sp
            ids = [i for i in range(sp.get_piece_size()) if sp.is_control(i)]
            ids += [self.bos_id, self.eos_id, self.start_of_turn_id, self.end_of_turn_id]
            self._specials = {sp.id_to_piece(i): i for i in ids if sp.id_to_piece(i)}
        return self._specials
