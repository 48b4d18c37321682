"""gemma-aot runtime: loads an artifact directory and generates. Never imports `compile`:
`manifest.json` is the whole contract.

    import runtime
    gen = runtime.load("artifacts/gemma3-270m")          # target="auto"
    print(gen.generate("The capital of France is", max_new_tokens=32))
"""

from __future__ import annotations

from pathlib import Path

from .generator import ContextOverflowError, Generator
from .manifest import ArtifactError, Manifest
from .tokenizer import Tokenizer

__all__ = ["load", "Generator", "Tokenizer", "Manifest", "ArtifactError", "ContextOverflowError"]


def load(artifact_dir: str | Path, target: str = "auto", verify: bool = True, log=None,
         adapter: str | None = None, adapter_scale: float = 1.0, draft=None,
         draft_target: str = "auto", draft_tokens: int | None = None, **options) -> Generator:
    """target: "auto" (the rules in `runtime.backends`; falls back to the next artifact when one
    fails to open) or a manifest target name. verify: check every file's sha256 (tokenizer
    included) against the manifest before use (`runtime.integrity`; remembered per unchanged
    file in the user's cache directory); False checks sizes only. log(msg): told about long
    steps (hashing a large file). options go to the chosen backend where it takes
    them: num_threads (tflite, onnx), provider (onnx), cache_dir (xla: JAX's compilation cache;
    tflite: XNNPACK's packed-weight cache; a directory, or False for no persistent cache),
    trust_executables (xla-tpu: unpickle executables whose manifest no seal of the user's key
    vouches for; see `runtime.backends.xla_tpu`). adapter: one of the artifact's run-time LoRA
    adapters (`runtime.adapters`), times adapter_scale, for every generation that names no other
    (`Generator.with_adapter`, or adapter= per call). draft: an artifact directory (loaded
    with draft_target and the same options) or a loaded Generator of a model with the same
    vocabulary, whose proposals this one checks draft_tokens at a time in one verify call
    (speculative decoding, `runtime.speculative`)."""
    from . import backends
    manifest = Manifest.read(artifact_dir)
    order = backends.candidates(manifest, target)
    tokenizer = Tokenizer(manifest.check_tokenizer(verify, log=log), manifest.tokenizer)
    gen = Generator(backends.open_first(manifest, order, verify=verify, log=log, **options),
                    manifest, tokenizer, adapter, adapter_scale, verify=verify, log=log)
    if draft is None:
        return gen
    if not isinstance(draft, Generator):
        draft = load(draft, draft_target, verify=verify, log=log, **options)
    return gen.with_draft(draft, draft_tokens)
