"""`python -m compile.export`: checkpoint -> traced signatures -> artifacts + manifest.

The export is staged in a hidden sibling directory and published only after every target passed
its parity check (`compile.parity`; a target that cannot run on this machine, such as xla-tpu for a TPU, records the
check as skipped with the reason), so an interrupted or failed export never leaves a directory that
looks complete.
Exporting more targets into an existing directory of the same model and contract adds them to its
manifest (replacing the same target's older artifact).
"""

from __future__ import annotations

import argparse
import datetime as dt
import errno
import json
import os
import shutil
import sys
import time
from pathlib import Path

from runtime import contract as ct

from . import checkpoints, parity, publish, recipes, targets
from .checkpoints import Checkpoint, CheckpointError
from .config import get_variant
from .model import full_size_params, init_params
from .weights import Params
from .tokenizer import tiny_tokenizer


ExportError = publish.PublishError   # one error for everything that refuses an export


def random_checkpoint(variant: str, seed: int = 0) -> Checkpoint:
    """Random weights for a registry variant with a tokenizer of its vocabulary size. `-tiny`
    variants use `model.init_params`; full-size ones are produced tensor by tensor on the fly
    (`weights.seeded`: nothing stored, the same values in any order), to measure exports at scale
    without a checkpoint on disk."""
    cfg = get_variant(variant)
    model_bytes, special = tiny_tokenizer(cfg.vocab_size)
    if cfg.vocab_size <= 512:
        params = Params.from_arrays(init_params(cfg, seed))
    else:
        params = full_size_params(cfg, seed)
    return Checkpoint(cfg, params, model_bytes, special,
                      source={"format": "random", "variant": variant, "seed": seed})


def load_checkpoint(spec: str | None, progress=None) -> Checkpoint:
    if spec and spec.startswith("random:"):
        return random_checkpoint(spec.split(":", 1)[1])
    return checkpoints.load(spec, progress=progress)


def _file_record(root: Path, rel: str) -> dict:
    from runtime.manifest import sha256_file
    p = root / rel
    return {"path": rel, "sha256": sha256_file(p), "bytes": p.stat().st_size}


def source_sha256(source: dict) -> str | None:
    """The sha256 identifying the checkpoint's weights: its GGUF file's, or for a directory a
    sha256 over its safetensors files' (name and sha256 each); None for generated weights. Run-time
    adapters record it (`compile.adapter`) and the runtime refuses them on another base."""
    import hashlib
    from runtime.manifest import sha256_file
    path = source.get("path")
    if not path or not Path(path).exists():
        return None
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(path.glob("*.safetensors")):
        h.update(f"{f.name} {sha256_file(f)}\n".encode())
    return h.hexdigest()


def _manifest(ck: Checkpoint, contract: ct.Contract, tokenizer_file: str, tok_sha: str) -> dict:
    source = dict(ck.source)
    if "sha256" not in source and source.get("path"):
        source["sha256"] = source_sha256(source)
    return ct.new_manifest(ck.config.name, ck.config.to_dict(), source,
                           {"file": tokenizer_file, "sha256": tok_sha, **ck.special_ids,
                            **({"chat_template": ck.chat_template} if ck.chat_template else {})},
                           contract)


def export(ck: Checkpoint, contract: ct.Contract, target_names: list[str], out: Path,
           options: dict | None = None, progress=None, log=print) -> dict:
    """Writes (or adds to) the artifact directory `out`; returns its manifest. One export per
    directory at a time (`publish.locked`). A target that fails its parity check or the quality
    gate is left out and the others are published; the returned manifest then has `refused`
    (target -> why; not written to disk). When every target fails, or with
    `options["all_or_nothing"]`, a failure raises ExportError and nothing is published."""
    import jax  # noqa: F401  (initialised before the targets' converters import it)

    options = dict(options or {})
    seal_key = publish.seal_key()   # a key file others can read fails now, not after the work
    mods = [targets.get(t) for t in target_names]
    targets.check_recipe(mods, options)
    for mod in mods:
        if contract.lora_rank and not getattr(mod, "LORA_SIGNATURES", False):
            raise ExportError(f"target {mod.NAME!r} has no run-time LoRA signatures yet; build "
                              f"it without --lora-rank (merge an adapter with --lora instead)")
        targets.check_options(mod, options)
        if hasattr(mod, "check_config"):
            mod.check_config(ck.config, options)
        if hasattr(mod, "check_checkpoint"):
            mod.check_checkpoint(ck.params, options)
    out = Path(out)
    if out.is_dir() and os.path.ismount(out) and not (out / ct.MANIFEST_FILE).exists():
        # a new export is published by renaming its stage onto `out`: refused before the work
        raise ExportError(f"{out} is a mount point: a new export is published by renaming a "
                          f"finished directory onto --out, which a mount point cannot take; "
                          f"use a directory inside it, e.g. --out {out / ck.config.name}")
    with publish.locked(out, log):
        return _export(ck, contract, mods, out, options, progress, log, seal_key)


def _export(ck, contract, mods, out: Path, options: dict, progress, log, seal_key) -> dict:
    """export()'s work, under the output directory's lock."""
    from runtime.manifest import sha256_file
    existing = None
    if (out / ct.MANIFEST_FILE).exists():
        existing = _read_existing(out / ct.MANIFEST_FILE)
        if existing["model"]["config"] != ck.config.to_dict() or \
                ct.Contract.from_manifest(existing).to_manifest() != contract.to_manifest():
            raise ExportError(f"{out} holds artifacts of a different model or signature set; "
                              f"choose another --out or delete it")
    elif out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} exists, is not empty and has no {ct.MANIFEST_FILE}; "
                          f"choose another --out or delete it")

    with publish.staged(out) as stage:
        (stage / "tokenizer.model").write_bytes(ck.tokenizer_model)
        options.update(tokenizer_path=str(stage / "tokenizer.model"), special_ids=ck.special_ids)
        manifest = _manifest(ck, contract, "tokenizer.model", sha256_file(stage / "tokenizer.model"))
        t0 = time.perf_counter()
        platforms = list(dict.fromkeys(p for m in mods for p in m.TRACE_PLATFORMS))
        traced = _trace(contract, ck.params, platforms, progress)
        if platforms:
            log(f"traced {len(traced)} signatures for {', '.join(platforms)} in "
                f"{time.perf_counter() - t0:.1f}s")
        for mod in mods:
            t0 = time.perf_counter()
            record = mod.write(traced, ck.params, stage / mod.NAME, options, progress)
            record["files"] = {role: _file_record(stage, f"{mod.NAME}/{rel}")
                               for role, rel in record["files"].items()}
            manifest["artifacts"][mod.NAME] = {
                "target": mod.NAME, "dir": mod.NAME, **record,
                "export_s": round(time.perf_counter() - t0, 2),
                "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
            log(f"wrote {mod.NAME} artifact in {time.perf_counter() - t0:.1f}s")
            parity.release()   # the target's transient buffers, before the next one
        publish.write_json(stage / ct.MANIFEST_FILE, manifest)
        refused = {}
        failures = parity.check(ck, contract, stage, manifest,
                                {m.NAME: "none" if targets.exact(m, options, ck.params)
                                 else targets.quant(m, options) for m in mods}, log)
        _refuse(failures, refused, mods, options, "artifact parity check failed against the "
                                                  "JAX reference: ")
        runnable = [m.NAME for m in mods if "skipped" not in
                    manifest["artifacts"][m.NAME].get("parity", {}) and m.NAME not in refused]
        failures = parity.quality_check(
            ck, contract, stage, manifest,
            [m.NAME for m in mods
             if not targets.exact(m, options, ck.params) and m.NAME in runnable],
            bool(options.get("accept_quality_loss")), log)
        _refuse(failures, refused, mods, options, "artifact quality check failed against the "
                                                  "fp32 reference: ")
        names = [m.NAME for m in mods if m.NAME not in refused]
        for name in refused:   # the others are published without them
            manifest["artifacts"].pop(name)
            shutil.rmtree(stage / name)
            log(f"not published: {refused[name]}")
        publish.write_json(stage / ct.MANIFEST_FILE, publish.sealed(manifest, seal_key, log))
        published = publish.publish(stage, out, manifest, existing, names, seal_key, log)
        return {**published, "refused": refused} if refused else published


def _refuse(failures: dict, refused: dict, mods, options: dict, what: str) -> None:
    """Adds a gate's failures (target -> message) to `refused`; raises instead, publishing
    nothing, when that would leave no target, or when the user asked for all or nothing."""
    refused.update(failures)
    if failures and (options.get("all_or_nothing") or len(refused) == len(mods)):
        raise ExportError(what + "; ".join(failures.values()))


def _read_existing(path: Path) -> dict:
    """The manifest of the directory being added to, checked against the schema."""
    try:
        return ct.validate(json.loads(path.read_text()))
    except ValueError as e:   # invalid JSON or a schema error
        raise ExportError(f"{path}: not a manifest this exporter can add to ({e}); choose "
                          f"another --out or delete it") from None


def _trace(contract, params, platforms, progress):
    from . import trace
    return trace.trace(contract, params, tuple(platforms), progress=progress)


def _parse_targets(text: str) -> tuple[str, ...]:
    try:
        return ct.lora_targets(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _parse_lengths(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m compile.export",
                                description="Compile a Gemma checkpoint ahead of time.")
    p.add_argument("--target", action="append", default=None,
                   help=f"target to build, repeatable or comma-separated: "
                        f"{', '.join(targets.AVAILABLE)}, all (= {', '.join(targets.PORTABLE)}"
                        f") or auto (the one that suits this machine: onnx on a CPU, xla on a "
                        f"TPU or GPU; default: xla)")
    p.add_argument("--checkpoint", default=None,
                   help="GGUF file or Hugging Face directory (default: the embedded Gemma 3 270M); "
                        "random:VARIANT-tiny makes random weights for testing")
    p.add_argument("--out", default=None, help="artifact directory (default: artifacts/<variant>)")
    p.add_argument("--prefill-lengths", type=_parse_lengths, default=ct.DEFAULT_PREFILL_LENGTHS,
                   help="static prefill lengths, comma-separated (default: 32,128,512)")
    p.add_argument("--verify-lengths", default=ct.DEFAULT_VERIFY_LENGTHS,
                   type=lambda t: () if t.strip().lower() == "none" else _parse_lengths(t),
                   help="token counts of the verify_N signatures, which return the logits of "
                        "every token they are given: the quality gate scores the artifact "
                        "through them, and a draft model's proposals are checked in one call "
                        "(comma-separated, or none; default: 8)")
    p.add_argument("--max-context", type=int, default=ct.DEFAULT_MAX_CONTEXT,
                   help="KV cache length (default: 2048)")
    p.add_argument("--quant", default=None,
                   help="weight quantization: none, native, int8, int4 or mixed (onnx: int8 for "
                        "the embedding/output, v and down, asymmetric int4 for the rest; bf16 or "
                        "none for xla-tpu). native keeps a GGUF checkpoint's own blocks (Q8_0, "
                        "Q5_0, Q4_K, Q6_K, ...) unchanged: onnx stores them, xla their exact float "
                        "values; int8/int4/mixed re-quantize (default: the target's own: none for xla, native for onnx, "
                        "int8 for tflite, bf16 for xla-tpu)")
    p.add_argument("--accept-quality-loss", action="store_true",
                   help="publish quantized artifacts of a real checkpoint even when their quality "
                        "on the evaluation text is below llama.cpp's on the same weights (the "
                        "manifest records it)")
    p.add_argument("--all-or-nothing", action="store_true",
                   help="with several targets: publish none of them when one fails its parity "
                        "check or the quality gate (default: publish those that pass, report "
                        "the others and exit with status 3)")
    p.add_argument("--activations", choices=("int8", "float"), default=None,
                   help="onnx: what quantized matmuls compute with: int8 (default: activations "
                        "quantized per block of 32, ONNX Runtime's fastest kernels) or float "
                        "(float32 activations: exact products of the stored weights, slower)")
    p.add_argument("--recipe", choices=recipes.NAMES, default=None,
                   help="tflite int8/int4 only: what is done to the weights before they are quantized "
                        "for LiteRT's kernels, which quantize activations to int8 per token "
                        "(docs/quality.md): rotate (Hadamard rotation of every matmul's "
                        "input), rotate-smooth (and SmoothQuant scales calibrated on the fp32 "
                        "model, folded into the norms; int4's default), rotate-smooth-gptq (and "
                        "the int8 values rounded by GPTQ for the calibration's inputs; int8's "
                        "default) or plain")
    p.add_argument("--float-embedding", action="store_true",
                   help="keep the tied embedding/output layer in float when quantizing")
    p.add_argument("--tpu-topology", default=None,
                   help="xla-tpu: the TPU topology to compile for, e.g. v5e:1x1, v5e:2x2, v6e:2x4 "
                        "(needs the tpu extra; no TPU needed)")
    p.add_argument("--android-demo", nargs="?", const="android_demo/model", default=None,
                   metavar="DIR", help="also build the tflite target and copy its .litertlm bundle "
                                       "to DIR (default: android_demo/model), printing the adb "
                                       "command that puts it on the phone")
    p.add_argument("--lora", default=None, metavar="PEFT_DIR",
                   help="merge a LoRA adapter (the directory PEFT's save_pretrained writes) into "
                        "the checkpoint before export (default --out: artifacts/<variant>-<adapter "
                        "directory name>)")
    p.add_argument("--lora-scale", type=float, default=1.0,
                   help="multiply the adapter's update by this (default 1)")
    p.add_argument("--lora-rank", type=int, default=0, metavar="R",
                   help="also build LoRA signatures that take a run-time adapter of rank <= R "
                        "(`python -m compile.adapter` converts PEFT adapters for them; zero "
                        "slots are the base model)")
    p.add_argument("--lora-targets", type=_parse_targets, default=ct.LORA_TARGETS,
                   metavar="q,k,v,o,gate,up,down",
                   help="with --lora-rank: the matmuls that get slots (default: all seven)")
    p.add_argument("--mesh", default=None,
                   help="xla-tpu: model=M splits the model over M chips (default: all chips)")
    return p


def _target_names(args) -> list[str]:
    """--target values (repeatable, comma-separated; all, auto) as target names, in order."""
    names = []
    for t in args.target or ([] if args.android_demo else ["xla"]):
        names += [x.strip() for x in t.split(",") if x.strip()]
    if args.android_demo and "tflite" not in names:
        names.append("tflite")
    if "all" in names:
        names = [n for n in names if n != "all"] + list(targets.PORTABLE)
    if "auto" in names:
        chosen, why = targets.for_machine()
        print(f"target auto: {chosen} ({why})", file=sys.stderr)
        names = [chosen if n == "auto" else n for n in names]
    return list(dict.fromkeys(names))


def _checkpoint_and_contract(args, progress):
    """The checkpoint (with a LoRA adapter merged), the contract and the output directory."""
    t0 = time.perf_counter()
    ck = load_checkpoint(args.checkpoint, progress=progress)
    print(f"loaded {ck.config.name} ({ck.config.num_params() / 1e6:.0f}M parameters) from "
          f"{ck.source.get('path', ck.source.get('format'))} in {time.perf_counter() - t0:.1f}s",
          file=sys.stderr)
    if args.lora:
        from . import lora
        ck = lora.apply(ck, args.lora, args.lora_scale, log=lambda m: print(m, file=sys.stderr))
    elif args.lora_scale != 1.0:
        raise ValueError("--lora-scale needs --lora PEFT_DIR")
    if args.lora_targets != ct.LORA_TARGETS and not args.lora_rank:
        raise ValueError("--lora-targets needs --lora-rank R")
    contract = ct.Contract(ck.config, args.prefill_lengths, args.max_context,
                           lora_rank=args.lora_rank, lora_targets=args.lora_targets,
                           verify_lengths=args.verify_lengths)
    default_out = ck.config.name + (f"-{Path(args.lora).resolve().name}" if args.lora else "")
    return ck, contract, Path(args.out or f"artifacts/{default_out}")


def _report(ck, names, out: Path, manifest: dict, seconds: float) -> None:
    """What was written and where (stdout)."""
    total = sum(f["bytes"] for n in names for f in manifest["artifacts"][n]["files"].values())
    print(f"exported {ck.config.name} [{', '.join(names)}] to {out}/ "
          f"({total / 1e6:.1f} MB, {seconds:.0f}s): "
          f"signatures {', '.join(s['name'] for s in manifest['signatures']['entries'])}")
    for n in names:
        for f in manifest["artifacts"][n]["files"].values():
            print(f"  {out / f['path']}  {f['bytes'] / 1e6:.1f} MB")
    print(f"  {out / ct.MANIFEST_FILE}")


def _close_bars() -> None:
    """Ends the progress bars an error interrupted, left as they stopped, so that the error's
    message starts a line of its own instead of continuing a bar's."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", None) or ()):
        bar.close()


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    publish.on_sigterm(lambda: out)
    out = None
    try:
        names = _target_names(args)
        options = {"quant": args.quant, "float_embedding": args.float_embedding,
                   "recipe": args.recipe,
                   "activations": args.activations,
                   "accept_quality_loss": args.accept_quality_loss,
                   "all_or_nothing": args.all_or_nothing,
                   "tpu_topology": args.tpu_topology, "mesh": args.mesh}
        targets.check_recipe([targets.get(n) for n in names], options)
        for n in names:
            targets.check_options(targets.get(n), options)
        from tqdm import tqdm
        t0 = time.perf_counter()
        if args.out:   # refused before the checkpoint loads when another export holds it
            publish.check_free(Path(args.out))
        ck, contract, out = _checkpoint_and_contract(args, tqdm)
        manifest = export(ck, contract, names, out, options, progress=tqdm,
                          log=lambda m: print(m, file=sys.stderr))
    except KeyboardInterrupt:
        _close_bars()
        print("\nerror: interrupted; nothing was published"
              + (f" ({out} is as it was)" if out else ""), file=sys.stderr)
        return 130
    except OSError as e:
        _close_bars()
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            print(f"error: could not write {e.filename or out}: {e.strerror} (the disk, your "
                  f"quota or the file size limit is full); nothing was published"
                  + (f" ({out} is as it was)" if out else ""), file=sys.stderr)
        else:
            print(f"error: {e}", file=sys.stderr)
        return 1
    except (CheckpointError, ExportError, ValueError, KeyError) as e:
        _close_bars()
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        return 1
    refused = manifest.pop("refused", {})
    names = [n for n in names if n not in refused]
    _report(ck, names, out, manifest, time.perf_counter() - t0)
    if args.android_demo and "tflite" in names:
        copy_for_android(out, manifest, Path(args.android_demo))
    if refused:
        print(f"error: not published (the others were): {'; '.join(refused.values())}. "
              f"Pass --all-or-nothing to publish nothing when a target fails.", file=sys.stderr)
        return 3
    return 0


ANDROID_APP_DIR = "/sdcard/Android/data/dev.gemmaaot.chat/files"   # the app's getExternalFilesDir


def copy_for_android(out: Path, manifest: dict, dest: Path) -> Path:
    """Copies the .litertlm bundle where android_demo/README.md's adb command expects it."""
    bundle = out / manifest["artifacts"]["tflite"]["files"]["litertlm"]["path"]
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / bundle.name
    tmp = target.with_name(target.name + ".partial")
    shutil.copyfile(bundle, tmp)
    os.replace(tmp, target)
    print(f"android demo: {target} ({target.stat().st_size / 1e6:.1f} MB); put it on the phone with\n"
          f"  adb push {target} {ANDROID_APP_DIR}/{target.name}")
    return target


if __name__ == "__main__":
    sys.exit(main())
