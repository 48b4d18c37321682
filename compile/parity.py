"""The export's parity gate: every artifact, run through the runtime, against the JAX reference.

A fixed text long enough for two prefill chunks is prefilled in chunks and then decoded token by
token; the logits of the decoded positions are compared with the model's full forward (no cache).
An artifact passes when its largest logit difference, relative to the largest reference logit, and
its top-1 agreement are within `TOLERANCE` for its weight quantization: the one tolerance table of
the exporter.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime import contract as ct

PARITY_TEXT = ("The quick brown fox jumps over the lazy dog. In 1969, 3 astronauts flew to the Moon; "
               "they returned safely. Gemma models are lightweight, open models built from the same "
               "research as Gemini. Water boils at 100 degrees Celsius at sea level. ")
PARITY_DECODE_STEPS = 32   # enough positions for a meaningful top-1 agreement

# weight quantization -> limits: max |diff| / max |reference logit|, minimum top-1 agreement
TOLERANCE = {
    # fp32 end to end: only the summation order differs from the reference
    "none": {"max_rel_diff": 2e-4, "min_top1": 1.0},
    # bf16 weights and activations (xla-tpu) against the fp32 reference
    "bf16": {"max_rel_diff": 0.1, "min_top1": 0.9},
    # quantized weights change logits by design; the check guards against broken graphs
    "int8": {"max_rel_diff": 1.0, "min_top1": 0.9},
    "int4": {"max_rel_diff": 1.0, "min_top1": 0.75},
}


def tolerance(quant: str) -> dict:
    return dict(TOLERANCE[quant])


def parity_tokens(contract: ct.Contract, encode, bos: int) -> tuple[np.ndarray, int]:
    """A fixed text's ids long enough for two prefill chunks plus decode steps, and where the
    decoded part starts."""
    lengths = contract.prefill_lengths
    steps = min(PARITY_DECODE_STEPS, contract.max_context // 4)
    prefill = min(lengths[-1] + max(1, lengths[0] // 2), contract.max_context - steps)
    total = prefill + steps
    ids = [bos]
    text_ids = encode(PARITY_TEXT)
    while len(ids) < total:
        ids += text_ids
    ids = np.asarray(ids[:total], np.int32) % contract.vocab_size
    return ids, prefill


def check(ck, contract: ct.Contract, stage: Path, manifest: dict, quants: dict, log) -> list[str]:
    """Runs every artifact of `quants` (target -> its quantization) in the staged directory,
    records the figures in `manifest`, and returns the failures (empty when all passed)."""
    import runtime
    import runtime.backends
    from . import trace
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_proto=ck.tokenizer_model)
    tokens, start = parity_tokens(contract, sp.encode, ck.special_ids["bos"])
    ref = trace.reference_logits(contract, ck.params, tokens, last=len(tokens) - start)
    failures = []
    here = runtime.backends.reasons(runtime.Manifest.read(stage))
    for target, quant in quants.items():
        if here.get(target):
            manifest["artifacts"][target]["parity"] = {"skipped": here[target]}
            log(f"parity {target}: not checked, it cannot run on this machine "
                f"({here[target]})")
            continue
        gen = runtime.load(stage, target=target, cache_dir=False)   # stage dirs move
        got = gen.logits(tokens, start=start)
        figures = {
            "tokens": int(len(tokens)), "prefill_tokens": int(start),
            "decode_steps": int(len(tokens) - start),
            "max_abs_diff": float(np.max(np.abs(got - ref))),
            "max_abs_ref": float(np.max(np.abs(ref))),
            "max_rel_diff": float(np.max(np.abs(got - ref)) / max(float(np.max(np.abs(ref))), 1e-6)),
            "mean_abs_diff": float(np.mean(np.abs(got - ref))),
            "top1_agreement": float(np.mean(got.argmax(-1) == ref.argmax(-1))),
            "tolerance": tolerance(quant),
        }
        manifest["artifacts"][target]["parity"] = figures
        log(f"parity {target}: max |diff| {figures['max_abs_diff']:.2e}, "
            f"top-1 agreement {figures['top1_agreement']:.0%} over {figures['decode_steps']} "
            f"decode steps after {start} prefill tokens")
        limit = figures["tolerance"]
        if figures["max_rel_diff"] > limit["max_rel_diff"] or \
                figures["top1_agreement"] < limit["min_top1"]:
            failures.append(f"{target}: max |diff| {figures['max_abs_diff']:.3g} = "
                            f"{figures['max_rel_diff']:.3g} of max |logit| (limit "
                            f"{limit['max_rel_diff']}), top-1 agreement "
                            f"{figures['top1_agreement']:.2f} (minimum {limit['min_top1']})")
    return failures
