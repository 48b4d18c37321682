"""SentencePiece tokenizer models for the artifact directory.

GGUF files carry the vocabulary (pieces, scores, types) but no SentencePiece file: we rebuild a
`ModelProto` from it (BPE, byte fallback, identity normalizer, no dummy prefix, whitespace escaped as
U+2581), which tokenizes as llama.cpp does. GGUF marks every special token CONTROL, `<unk>` included;
SentencePiece refuses a model without an UNKNOWN piece, so the unk id is retyped UNKNOWN.
GGUF spells USER_DEFINED pieces (Gemma's whitespace runs) with raw spaces; llama.cpp matches them in
the raw text, SentencePiece matches user-defined pieces after escaping whitespace, so their spaces
are written as U+2581 for the same result.
"""

from __future__ import annotations

from sentencepiece import sentencepiece_model_pb2 as spm

from runtime.chat import BOS, END_OF_TURN, START_OF_TURN, TURN_MARKERS

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def build_sentencepiece(pieces, scores, types, *, bos_id, eos_id, pad_id, unk_id) -> bytes:
    m = spm.ModelProto()
    t = m.trainer_spec
    t.model_type = spm.TrainerSpec.BPE
    t.vocab_size = len(pieces)
    t.byte_fallback = True
    t.bos_id, t.eos_id, t.pad_id, t.unk_id = bos_id, eos_id, pad_id, unk_id
    n = m.normalizer_spec
    n.name = "identity"
    n.add_dummy_prefix = False
    n.remove_extra_whitespaces = False
    n.escape_whitespaces = True
    for i, (piece, score, typ) in enumerate(zip(pieces, scores, types)):
        p = m.pieces.add()
        p.piece = piece.replace(" ", "\u2581") if typ == USER_DEFINED else piece
        p.score = float(score)
        p.type = UNKNOWN if i == unk_id else int(typ)
    return m.SerializeToString()


def special_ids(pieces, *, bos_id, eos_id, pad_id, unk_id) -> dict[str, int]:
    """The ids the runtime needs; start_of_turn / end_of_turn are the first pair of
    `runtime.chat.TURN_MARKERS` (Gemma 1-3's, then Gemma 4's) the vocabulary holds."""
    wanted = {p for pair in TURN_MARKERS for p in pair}
    index = {p: i for i, p in enumerate(pieces) if p in wanted}
    for start, end in TURN_MARKERS:
        if start in index and end in index:
            return {"bos": bos_id, "eos": eos_id, "pad": pad_id, "unk": unk_id,
                    "start_of_turn": index[start], "end_of_turn": index[end]}
    pairs = " or ".join(f"{a}/{b}" for a, b in TURN_MARKERS)
    raise ValueError(f"tokenizer has no turn pieces ({pairs}): not a Gemma vocabulary")


def sentencepiece_from_gguf(reader) -> tuple[bytes, dict[str, int]]:
    f = reader.fields

    def scalar(key, default):
        return int(f[key].contents()) if key in f else default

    pieces = f["tokenizer.ggml.tokens"].contents()
    scores = f["tokenizer.ggml.scores"].contents() if "tokenizer.ggml.scores" in f else [0.0] * len(pieces)
    types = f["tokenizer.ggml.token_type"].contents() if "tokenizer.ggml.token_type" in f else [NORMAL] * len(pieces)
    ids = dict(bos_id=scalar("tokenizer.ggml.bos_token_id", 2),
               eos_id=scalar("tokenizer.ggml.eos_token_id", 1),
               pad_id=scalar("tokenizer.ggml.padding_token_id", 0),
               unk_id=scalar("tokenizer.ggml.unknown_token_id", 3))
    return build_sentencepiece(pieces, scores, types, **ids), special_ids(pieces, **ids)


def tiny_tokenizer(vocab_size: int, turns: int = 0) -> tuple[bytes, dict[str, int]]:
    """A small byte-fallback BPE vocabulary with Gemma's special pieces, for tiny test models;
    `turns` picks the turn markers (`runtime.chat.TURN_MARKERS`: 0 Gemma 1-3's, 1 Gemma 4's)."""
    pieces = ["<pad>", "<eos>", str(BOS), "<unk>", *map(str, TURN_MARKERS[turns])]
    types = [CONTROL] * len(pieces)
    pieces += [f"<0x{b:02X}>" for b in range(256)]
    types += [BYTE] * 256
    chars = "▁etaoinshrdlcumwfgypbvkjxqzETAOINSHRDLCUMWFGYPBVKJXQZ0123456789.,!?'\n"
    merges = ["▁t", "th", "▁th", "he", "▁the", "in", "er", "an", "re", "on", "▁a", "en", "at", "ou",
              "ed", "nd", "▁o", "▁w", "is", "it", "▁s", "▁c", "es", "or", "▁f", "▁b", "▁p", "al"]
    normal = list(chars) + merges
    normal = normal[: vocab_size - len(pieces)]
    pieces += normal
    types += [NORMAL] * len(normal)
    while len(pieces) < vocab_size:
        pieces.append(f"<unused{len(pieces)}>")
        types.append(UNUSED)
    scores = [0.0] * len(pieces)
    for rank, i in enumerate(range(262, len(pieces))):
        scores[i] = -float(rank) if types[i] == NORMAL else 0.0
    ids = dict(bos_id=2, eos_id=1, pad_id=0, unk_id=3)
    return build_sentencepiece(pieces, scores, types, **ids), special_ids(pieces, **ids)
