"""The export's parity gate: every artifact, run through the runtime, against the JAX reference.

A fixed text long enough for two prefill chunks is prefilled in chunks and then decoded token by
token; the logits of the decoded positions are compared with the model's full forward (no cache),
and so are those of the same positions scored through the artifact's verify signatures, where it
has them (`figures["verify"]`, held to the same limits).
An artifact passes when, within `TOLERANCE` for its weight quantization (the one tolerance table of
the exporter): its largest logit difference relative to the largest reference logit, its mean KL
divergence from the reference distribution (where a limit is set), and its top-1 agreement on the
positions whose reference top-1 is clear — a margin over the runner-up above `MARGIN` of the largest
reference logit — which must be at least `MIN_CLEAR` of the decoded positions. Random weights (tiny test models,
synthetic full-size checkpoints) can give near-ties that any rounding flips; counting only clear
positions keeps the check meaningful on them, and a broken artifact still fails (a test swaps two
layers). `top1_agreement` over all positions is recorded too.

Lossy artifacts of real checkpoints also pass a quality gate (`quality_check`): teacher-forced
(through the verify signatures, N tokens a call, else a decode per token) on the first
`QUALITY_TOKENS` tokens of the evaluation text (`compile.quality`), their top-1
agreement, mean KL and perplexity change against the fp32 reference must be no worse than
llama.cpp's on the same slice and weights — recorded for the embedded Gemma 3 270M Q4_K_M,
measured in the export for another GGUF when llama-cpp-python is installed — or, where llama.cpp
did not run on the weights (an HF checkpoint, an adapter merged), within `QUALITY_LIMITS`, which
the error and the manifest call fixed limits (`gate_rule`). Otherwise the export fails, unless
the user accepts the loss (`--accept-quality-loss`, recorded in the manifest with the rule). Random weights (`random:`, tiny test models, `compile.synthetic`
checkpoints, recognised by their generated tokenizer) predict no text: the margin rule above is
their only check.
"""

from __future__ import annotations

import gc
import tempfile
from pathlib import Path

import numpy as np

from runtime import contract as ct

from . import quality

PARITY_TEXT = ("The quick brown fox jumps over the lazy dog. In 1969, 3 astronauts flew to the Moon; "
               "they returned safely. Gemma models are lightweight, open models built from the same "
               "research as Gemini. Water boils at 100 degrees Celsius at sea level. ")
PARITY_DECODE_STEPS = 32   # enough positions for a meaningful top-1 agreement

MARGIN = 0.01      # a clear top-1: reference margin over the runner-up > 1 % of max |logit|
MIN_CLEAR = 0.5    # the share of decoded positions that must be clear for the top-1 check

# weight quantization -> limits: max |diff| / max |reference logit|, minimum top-1 agreement on
# clear positions, mean KL(reference || artifact) in nats (None: recorded, not gated)
TOLERANCE = {
    # fp32 end to end: only the summation order differs from the reference
    "none": {"max_rel_diff": 2e-4, "min_top1": 1.0, "max_kl": 1e-3},
    # bf16 weights and activations (xla-tpu) against the fp32 reference
    "bf16": {"max_rel_diff": 0.1, "min_top1": 0.9, "max_kl": None},
    # a block-quantized checkpoint's own values (the reference dequantizes the same blocks):
    # only the kernels' arithmetic differs (ONNX Runtime's MatMulNBits quantizes activations to
    # int8 per block of 32, as llama.cpp does)
    "native": {"max_rel_diff": 1.0, "min_top1": 0.9, "max_kl": None},
    # quantized weights change logits by design; the check guards against broken graphs
    "int8": {"max_rel_diff": 1.0, "min_top1": 0.9, "max_kl": None},
    "int4": {"max_rel_diff": 1.0, "min_top1": 0.75, "max_kl": None},
    "mixed": {"max_rel_diff": 1.0, "min_top1": 0.75, "max_kl": None},
}


def tolerance(quant: str) -> dict:
    return dict(TOLERANCE[quant])


def parity_tokens(contract: ct.Contract, encode, bos: int) -> tuple[np.ndarray, int]:
    """A fixed text's ids long enough for two prefill chunks plus decode steps, and where the
    decoded part starts."""
    lengths = contract.prefill_lengths
    steps = max(1, min(PARITY_DECODE_STEPS, contract.max_context // 4))
    prefill = min(lengths[-1] + max(1, lengths[0] // 2), contract.max_context - steps)
    total = prefill + steps
    ids = [bos]
    text_ids = encode(PARITY_TEXT)
    while len(ids) < total:
        ids += text_ids
    ids = np.asarray(ids[:total], np.int32) % contract.vocab_size
    return ids, prefill


def check(ck, contract: ct.Contract, stage: Path, manifest: dict, quants: dict, log
          ) -> dict[str, str]:
    """Runs every artifact of `quants` (target -> its quantization) in the staged directory,
    records the figures in `manifest`, and returns the failures, target -> "target: why"
    (empty when all passed)."""
    import runtime
    import runtime.adapters
    import runtime.backends
    from . import trace
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_proto=ck.tokenizer_model)
    tokens, start = parity_tokens(contract, sp.encode, ck.special_ids["bos"])
    ref = trace.reference_logits(contract, ck.params, tokens, last=len(tokens) - start)
    lora_ref = slots = None
    if contract.lora_rank:   # the LoRA signatures, with a random adapter in every slot
        slots, merged = parity_adapter(contract, ck.params)
        lora_ref = trace.reference_logits(contract, merged, tokens, last=len(tokens) - start)
        del merged
    release()   # the reference's weights, before the artifacts load theirs
    failures = {}
    here = runtime.backends.reasons(runtime.Manifest.read(stage))
    for target, quant in quants.items():
        if here.get(target):
            manifest["artifacts"][target]["parity"] = {"skipped": here[target]}
            log(f"parity {target}: not checked, it cannot run on this machine "
                f"({here[target]})")
            continue
        # no persistent caches in the stage (it moves, and XNNPACK's packed weights are
        # specific to this CPU); tflite packs into a temporary weight cache, which keeps the
        # packed copy out of anonymous memory (fp32 270M: 1.9 GB peak instead of 3.4 GB)
        with tempfile.TemporaryDirectory(prefix="parity-cache-", dir=stage.parent) as tmp:
            # the stage holds files this process just wrote (and hashed): nothing to verify,
            # and its own xla-tpu executables are trusted
            gen = runtime.load(stage, target=target, verify=False, trust_executables=True,
                               cache_dir=tmp if target == "tflite" else False)
            got = gen.logits(tokens, start=start)
            # the verify signatures (or onnx's any-length verify) over the same positions
            gen_verify = gen.verify_tokens
            got_verify = gen.logits(tokens, start=start, verify=True) if gen_verify else None
            got_lora = None if slots is None else gen.logits(
                tokens, start=start, adapter=runtime.adapters.Adapter("parity", slots))
            del gen
        release()
        figures = {"tokens": int(len(tokens)), "prefill_tokens": int(start),
                   **compare(ref, got), "tolerance": tolerance(quant)}
        manifest["artifacts"][target]["parity"] = figures
        log(f"parity {target}: max |diff| {figures['max_abs_diff']:.2e}, KL "
            f"{figures['mean_kl']:.2e}, top-1 agreement {figures['top1_agreement']:.0%} over "
            f"{figures['decode_steps']} decode steps after {start} prefill tokens "
            f"({figures['top1_agreement_clear']:.0%} of {figures['clear_positions']} clear)")
        problems = judge(figures, figures["tolerance"])
        if got_verify is not None:
            figures["verify"] = {"tokens_per_call": gen_verify, **compare(ref, got_verify)}
            log(f"parity {target} through its verify signature (up to {gen_verify} tokens a call): "
                f"max |diff| {figures['verify']['max_abs_diff']:.2e}, top-1 agreement "
                f"{figures['verify']['top1_agreement']:.0%}")
            problems += [f"verify signature: {p}" for p in judge(figures["verify"],
                                                                  figures["tolerance"])]
        if got_lora is not None:
            figures["lora"] = compare(lora_ref, got_lora)
            log(f"parity {target} with a random rank-{contract.lora_rank} adapter in its LoRA "
                f"signatures: max |diff| {figures['lora']['max_abs_diff']:.2e}, KL "
                f"{figures['lora']['mean_kl']:.2e}, top-1 agreement "
                f"{figures['lora']['top1_agreement']:.0%}")
            problems += [f"LoRA signatures: {p}" for p in judge(figures["lora"],
                                                                figures["tolerance"])]
        if problems:
            failures[target] = f"{target}: " + "; ".join(problems)
    return failures


def parity_adapter(contract: ct.Contract, params):
    """A random adapter of the artifact's rank in every LoRA slot: (slot inputs, the params with
    it merged, lazily). Its update is a tenth of each weight's scale, large enough that a slot
    wired to the wrong matmul or left out fails the comparison."""
    from . import lora
    R = contract.lora_rank
    rng = np.random.default_rng(0)
    slots, modules = {}, {}
    for s in contract.lora_slots():
        name = f"layers.{s.layer}.{s.target}"
        w_scale = float(np.sqrt(np.mean(np.square(np.asarray(params[name], np.float32)))))
        a = (rng.standard_normal((R, s.n_in)) / np.sqrt(s.n_in)).astype(np.float32)
        b = (rng.standard_normal((s.n_out, R)) * (0.1 * w_scale * np.sqrt(s.n_in / R))
             ).astype(np.float32)
        slots[s.a_name], slots[s.b_name] = np.ascontiguousarray(a.T), np.ascontiguousarray(b.T)
        modules[name] = lora.Module(name, name, a, b, 1.0)
    return slots, lora.merge(params, lora.Adapter(Path("parity"), modules, ()))


QUALITY_TOKENS = 512
# llama.cpp (llama-cpp-python 0.3.36, 2 threads) on the embedded Gemma 3 270M Q4_K_M, teacher-forced
# on the same QUALITY_TOKENS slice against the fp32 reference on the same weights (2026-11-30)
# (ours then: onnx native 0.9707 / 0.0030 / +0.53 %, tflite int8 0.8906 / 0.0296 / +1.96 %)
LLAMA_CPP_ON_SLICE = {"top1": 0.9492, "mean_kl": 0.00675, "ppl_delta_rel": 0.0133}
# llama.cpp's figures where it ran: (GGUF sha256, evaluation text sha256, window) -> figures
LLAMA_CPP_RECORDED = {
    ("a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
     "1dd6eca8680bb49bda7425db9831a497d04d7850ced63239d60374eaa910f64b", QUALITY_TOKENS):
        LLAMA_CPP_ON_SLICE,
}
LLAMA_CPP = "llama.cpp"   # the peer's name among the gate's candidates


def limits_of(peer: dict) -> dict:
    """The gate's limits from a peer's figures: no worse than it on any of the three."""
    return {"min_top1": peer["top1"], "max_kl": peer["mean_kl"],
            "max_ppl_delta_rel": peer["ppl_delta_rel"]}


# where llama.cpp did not run on the checkpoint's weights: its figures on the embedded model
QUALITY_LIMITS = limits_of(LLAMA_CPP_ON_SLICE)


def gate_rule(source: dict, window: int, llama_cpp_installed: bool) -> dict:
    """What the quality gate compares with, so that it claims only what it measured:
    - a GGUF checkpoint (no adapter merged) whose llama.cpp figures on this slice are recorded
      (`LLAMA_CPP_RECORDED`: the embedded model): llama.cpp on the same weights, as recorded;
    - another GGUF, with llama-cpp-python installed: llama.cpp on the same weights, measured in
      this export beside the artifacts (`"measure": True`);
    - otherwise the fixed `QUALITY_LIMITS`, said to be llama.cpp's figures on another model.
    Returns {"rule", "how", "measure", "limits" (None while to be measured), "llama_cpp"}."""
    from . import quality
    sha = source.get("sha256")
    if source.get("format") != "gguf":
        why = "the checkpoint is not a GGUF file llama.cpp could run"
    elif source.get("lora"):
        why = "an adapter was merged into the GGUF's weights"
    else:
        recorded = LLAMA_CPP_RECORDED.get((sha, quality.eval_sha256(), window))
        if recorded:
            return {"rule": "llama.cpp on the same weights", "measure": False,
                    "how": f"recorded for this file (sha256 {sha[:12]}…, llama-cpp-python "
                           f"0.3.36)", "limits": limits_of(recorded), "llama_cpp": recorded}
        if llama_cpp_installed:
            return {"rule": "llama.cpp on the same weights", "measure": True,
                    "how": "measured in this export (llama-cpp-python)", "limits": None,
                    "llama_cpp": None}
        why = "llama-cpp-python is not installed to measure it on this GGUF"
    return {"rule": "fixed limits", "measure": False,
            "how": f"llama.cpp's figures on the embedded Gemma 3 270M Q4_K_M; llama.cpp did not "
                   f"run on these weights: {why}", "limits": QUALITY_LIMITS, "llama_cpp": None}


def quality_failure(target: str, f: dict, problems: list[str], rule: dict) -> str:
    """The export's error for a target the gate refused, naming what it was compared with."""
    against = ("worse than llama.cpp on the same weights" if rule["rule"] != "fixed limits" else
               f"below the gate's fixed limits ({rule['how']})")
    return (f"{target}: on {f['positions']} tokens of the evaluation text " + "; ".join(problems)
            + f" — {against}; pass --accept-quality-loss to publish it anyway")


def _llama_cpp_installed() -> bool:
    import importlib.util
    return importlib.util.find_spec("llama_cpp") is not None


def predicts_text(ck) -> bool:
    """Whether the checkpoint is a trained model (its tokenizer is not one we generated for
    random weights)."""
    from .tokenizer import tiny_tokenizer
    if ck.source.get("format") == "random":
        return False
    return ck.tokenizer_model != tiny_tokenizer(ck.config.vocab_size)[0]


def quality_check(ck, contract: ct.Contract, stage: Path, manifest: dict, lossy: list[str],
                  accept: bool, log) -> dict[str, str]:
    """The quality gate for the `lossy` targets (see the module docstring); records the figures
    in `manifest` and returns the failures, target -> message (none when `accept`)."""
    import runtime
    if not lossy or not predicts_text(ck):
        return {}
    encode, piece_id = quality.tokenizer_fns(ck.tokenizer_model)
    ids = quality.eval_ids(encode, piece_id)
    window = min(QUALITY_TOKENS, contract.max_context)
    wins = quality.windows(ids, ck.special_ids["bos"], window, limit=window - 1)[:1]
    rule = gate_rule(manifest["model"]["source"], window, _llama_cpp_installed())
    failures = {}
    with tempfile.TemporaryDirectory(prefix="quality-", dir=stage.parent) as tmp:
        # the reference first, to disk, so that its weights and the artifacts' are not held at
        # once (2.8 GB peak for the 270M's onnx export when they were)
        reference = quality.reference_to_disk(contract, ck.params, wins, Path(tmp))
        release()
        # verify=False: the stage's files are the ones this process just wrote and hashed
        gens = {t: runtime.load(stage, target=t, verify=False, trust_executables=True,
                                cache_dir=tmp if t == "tflite" else False)
                for t in lossy}
        # teacher-forced through the verify signatures, a call per N tokens (where the
        # artifact has none: a decode per token, ~25 ms each for the 270M)
        candidates = {t: (lambda w, g=g: g.iter_logits(w, 0, verify=True))
                      for t, g in gens.items()}
        through = {t: f"verify, {g.verify_tokens} tokens a call" if g.verify_tokens else "decode"
                   for t, g in gens.items()}
        if rule["measure"]:
            candidates[LLAMA_CPP] = quality.llama_cpp_rows(ck.source["path"], window)
        figures = quality.evaluate_many(contract, ck.params, wins, candidates,
                                        reference=reference)
        del gens, candidates
    release()
    if rule["measure"]:
        rule.update(llama_cpp=figures.pop(LLAMA_CPP), measure=False)
        rule["limits"] = limits_of(rule["llama_cpp"])
        log(f"quality llama.cpp on the same GGUF: top-1 {rule['llama_cpp']['top1']:.1%}, KL "
            f"{rule['llama_cpp']['mean_kl']:.4f}, perplexity "
            f"{rule['llama_cpp']['ppl_delta_rel']:+.2%} (the gate's limits)")
    for target, f in figures.items():
        problems = judge_quality(f, rule["limits"])
        manifest["artifacts"][target]["quality"] = {
            **f, "through": through[target],
            "limits": rule["limits"], "rule": rule["rule"], "rule_how": rule["how"],
            "llama_cpp": rule["llama_cpp"], "passed": not problems,
            "accepted_loss": bool(problems and accept)}
        below = "llama.cpp's level" if rule["rule"] != "fixed limits" else "the fixed limits"
        log(f"quality {target}: top-1 {f['top1']:.1%}, KL {f['mean_kl']:.4f}, perplexity "
            f"{f['ppl_delta_rel']:+.2%} against fp32 on {f['positions']} tokens of the evaluation "
            f"text" + (f" — below {below}: {'; '.join(problems)}"
                       + (" (accepted: --accept-quality-loss)" if accept else "")
                       if problems else ""))
        if problems and not accept:
            failures[target] = quality_failure(target, f, problems, rule)
    return failures


def judge_quality(f: dict, limits: dict) -> list[str]:
    out = []
    bad = [k for k in ("top1", "mean_kl", "ppl_delta_rel") if not np.isfinite(f[k])]
    if bad:   # NaN compares false with every limit: say it instead of passing
        out.append(f"{', '.join(bad)} not finite (NaN or infinite logits)")
    if f["top1"] < limits["min_top1"]:
        out.append(f"top-1 agreement {f['top1']:.1%} (minimum {limits['min_top1']:.1%})")
    if f["mean_kl"] > limits["max_kl"]:
        out.append(f"mean KL {f['mean_kl']:.4f} (maximum {limits['max_kl']:.4f})")
    if f["ppl_delta_rel"] > limits["max_ppl_delta_rel"]:
        out.append(f"perplexity {f['ppl_delta_rel']:+.2%} (maximum "
                   f"{limits['max_ppl_delta_rel']:+.2%})")
    return out


def release() -> None:
    """Frees what the last step dropped and hands the freed heap back to the system: glibc keeps
    freed blocks below its (growing) mmap threshold in the heap, which held over 1 GB of the
    reference's per-layer arrays through the artifacts' checks."""
    gc.collect()
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):   # not glibc
        pass


def compare(ref: np.ndarray, got: np.ndarray) -> dict:
    """Figures of artifact logits `got` against reference logits `ref`, both [N, V]."""
    top = max(float(np.max(np.abs(ref))), 1e-6)
    bad = int(np.size(got) - np.isfinite(got).sum())
    got = np.where(np.isfinite(got), got, 0.0).astype(np.float32) if bad else got
    diff = np.abs(got - ref)
    ref_top2 = np.sort(ref, axis=-1)[:, -2:]
    clear = (ref_top2[:, 1] - ref_top2[:, 0]) > MARGIN * top
    agree = got.argmax(-1) == ref.argmax(-1)
    return {
        "decode_steps": int(ref.shape[0]),
        "non_finite": bad,   # NaN/Inf logits (compared as 0 below: NaN would pass every "<")
        "max_abs_diff": float(diff.max()), "max_abs_ref": top,
        "max_rel_diff": float(diff.max()) / top, "mean_abs_diff": float(diff.mean()),
        "mean_kl": float(np.mean(quality.kl_rows(ref, got))),
        "top1_agreement": float(np.mean(agree)),
        "clear_positions": int(clear.sum()),
        "top1_agreement_clear": float(np.mean(agree[clear])) if clear.any() else 0.0,
    }


def judge(figures: dict, limit: dict) -> list[str]:
    """What breaks the limits, each said with its figure (empty: the artifact passes)."""
    out = []
    if figures.get("non_finite"):
        out.append(f"{figures['non_finite']} of its logits are NaN or infinite")
    if figures["max_rel_diff"] > limit["max_rel_diff"]:
        out.append(f"max |diff| {figures['max_abs_diff']:.3g} = {figures['max_rel_diff']:.3g} of "
                   f"max |logit| (limit {limit['max_rel_diff']})")
    if limit.get("max_kl") is not None and figures["mean_kl"] > limit["max_kl"]:
        out.append(f"mean KL {figures['mean_kl']:.3g} (limit {limit['max_kl']})")
    need = int(np.ceil(MIN_CLEAR * figures["decode_steps"]))
    if figures["clear_positions"] < need:
        out.append(f"only {figures['clear_positions']} of {figures['decode_steps']} positions have "
                   f"a clear reference top-1 (margin > {MARGIN:.0%} of max |logit|); the check "
                   f"needs {need}")
    elif figures["top1_agreement_clear"] < limit["min_top1"]:
        out.append(f"top-1 agreement {figures['top1_agreement_clear']:.2f} on "
                   f"{figures['clear_positions']} clear positions (minimum {limit['min_top1']})")
    return out
