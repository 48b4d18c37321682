"""`python -m compile.adapter PEFT_DIR --artifacts ART [--name NAME] [--replace]`: a PEFT LoRA
adapter made into a run-time adapter of an artifact built with slots (`compile.export
--lora-rank R`), for every target of that artifact at once.

The adapter is read and checked as for a merge (`compile.lora.read`: PEFT's config, r / alpha
patterns, rslora, the refusals), against the artifact's own config: every module must fit the
model's matmul shapes, adapt a matmul the artifact has a slot for, and have a rank of at most R.
Its slot tensors (`runtime.adapters`: A = lora_A^T [in, R], B = scaling * lora_B^T [R, out],
zero-padded) go to `adapters/<NAME>.safetensors`, whose metadata names the base (`base_id`), and
the manifest lists it with its sha256. All of it under the artifact directory's export lock; the
file is written beside its final name and renamed, the manifest replaced last, so an interrupted
conversion leaves the artifact as it was. A sealed manifest is sealed again with the user's key,
or left unsealed (and said) when there is none.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from pathlib import Path

import numpy as np

from runtime import adapters as rt_adapters
from runtime import contract as ct


class _SlotShapes:
    """The base's matmul shapes as `lora.read` checks an adapter against them (every matmul the
    model computes, from the manifest's config alone)."""

    def __init__(self, config: dict):
        self._specs = {f"layers.{s.layer}.{s.target}": ((s.n_in, s.n_out), np.dtype(np.float32))
                       for s in ct.lora_slots(config)}

    def specs(self):
        return self._specs


def convert(peft_dir: Path, art: Path, name: str | None = None, replace: bool = False,
            log=print) -> dict:
    """Adds the adapter to the artifact directory; returns its manifest record."""
    from runtime.manifest import Manifest

    from . import lora, publish
    from .config import GemmaConfig
    peft_dir, art = Path(peft_dir), Path(art)
    name = name or peft_dir.resolve().name
    why = ct.adapter_name_error(name)
    if why:
        raise ValueError(f"{why} (choose one with --name)")
    Manifest.read(art)   # a readable artifact before taking its lock
    with publish.locked(art, log):
        manifest = Manifest.read(art)   # again, under the lock: what we replace
        contract = manifest.contract
        if not contract.lora_rank:
            raise ValueError(f"{art} was exported without LoRA slots: export it again with "
                             f"--lora-rank R (or merge this adapter at export with --lora "
                             f"{peft_dir})")
        if name in manifest.data.get(ct.ADAPTERS, {}) and not replace:
            raise ValueError(f"{art} already has an adapter named {name!r}; choose another "
                             f"--name or pass --replace")
        cfg = GemmaConfig.from_dict(manifest.config)
        adapter = lora.read(peft_dir, cfg, _SlotShapes(manifest.config))
        _check_fits(adapter, contract, art)
        tensors = _slot_tensors(adapter, contract)
        rt_adapters.Adapter(name, tensors).check(contract)
        return _publish(art, manifest, name, tensors, adapter, peft_dir, log)


def _check_fits(adapter, contract, art: Path) -> None:
    """Every module has a slot in the artifact, of at least its rank."""
    from . import lora
    for m in adapter.modules.values():
        target = m.name.rsplit(".", 1)[-1]
        if target not in contract.lora_targets:
            raise lora.AdapterError(
                f"module {m.peft_name} adapts {target}, which {art} has no LoRA slot for "
                f"(slots: {', '.join(contract.lora_targets)}); export with --lora-targets "
                f"including it, or merge the adapter at export with --lora")
        if m.rank > contract.lora_rank:
            raise lora.AdapterError(
                f"module {m.peft_name} has rank {m.rank}, above the artifact's LoRA rank "
                f"{contract.lora_rank}; export with --lora-rank {m.rank} or more, or merge the "
                f"adapter at export with --lora")


def _slot_tensors(adapter, contract) -> dict[str, np.ndarray]:
    """The adapter as the artifact's slot inputs: A [in, R] and B [R, out] per slot, zero-padded
    to the artifact's rank R, the scaling folded into B."""
    R = contract.lora_rank
    slots = {f"layers.{s.layer}.{s.target}": s for s in contract.lora_slots()}
    tensors = {}
    for m in adapter.modules.values():
        s = slots[m.name]
        a = np.zeros((s.n_in, R), np.float32)
        b = np.zeros((R, s.n_out), np.float32)
        a[:, :m.rank] = m.a.T
        b[:m.rank] = (np.float32(m.scaling) * m.b).T
        tensors[s.a_name], tensors[s.b_name] = a, b
    return tensors


def _publish(art: Path, manifest, name: str, tensors: dict, adapter, peft_dir: Path,
             log) -> dict:
    """Writes the adapter's file and its manifest record (the caller holds the lock); a
    failure or SIGTERM leaves the artifact as it was."""
    from runtime.manifest import sha256_file

    from . import lora, publish
    rel = f"{ct.ADAPTER_DIR}/{name}.safetensors"
    path = art / rel
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    undo = publish.undo(lambda: publish.unlink(tmp))
    try:
        from safetensors.numpy import save_file
        save_file(tensors, str(tmp), metadata={rt_adapters.BASE_KEY:
                                               rt_adapters.base_id(manifest.data),
                                               rt_adapters.NAME_KEY: name})
        record = {"path": rel, "sha256": sha256_file(tmp), "bytes": tmp.stat().st_size,
                  "rank": adapter.rank, "targets": list(adapter.targets),
                  "modules": len(adapter.modules),
                  "source": {"path": str(peft_dir.resolve()),
                             "sha256": sha256_file(peft_dir / lora.WEIGHTS_FILE),
                             "config_sha256": sha256_file(peft_dir / lora.CONFIG_FILE)},
                  "skipped": list(adapter.skipped),
                  "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        data = dict(manifest.data)
        data[ct.ADAPTERS] = {**data.get(ct.ADAPTERS, {}), name: record}
        ct.validate(data)
        key = publish.seal_key()
        had_seal = ct.SEAL in data
        os.replace(tmp, path)
        publish.replace_manifest(art, data, key, log, had_seal)
    finally:
        publish.unlink(tmp)
        publish.done(undo)
    return record


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m compile.adapter",
        description="Add a PEFT LoRA adapter to an artifact exported with --lora-rank, as a "
                    "run-time adapter for all of its targets.")
    p.add_argument("peft_dir", metavar="PEFT_DIR",
                   help="the directory PEFT's save_pretrained wrote (adapter_config.json, "
                        "adapter_model.safetensors)")
    p.add_argument("--artifacts", required=True, metavar="ART",
                   help="the artifact directory (exported with --lora-rank R)")
    p.add_argument("--name", default=None,
                   help="the adapter's name in the artifact (default: PEFT_DIR's name)")
    p.add_argument("--replace", action="store_true", help="replace an adapter of that name")
    args = p.parse_args(argv)
    from runtime.manifest import ArtifactError

    from .export import ExportError
    from .lora import AdapterError
    try:
        rec = convert(Path(args.peft_dir), Path(args.artifacts), args.name, args.replace,
                      log=lambda m: print(m, file=sys.stderr))
    except KeyboardInterrupt:
        print(f"\nerror: interrupted; {args.artifacts} is as it was", file=sys.stderr)
        return 130
    except (AdapterError, ArtifactError, ExportError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    name = Path(rec["path"]).stem
    print(f"added adapter {name!r} (rank {rec['rank']}, {rec['modules']} matmuls: "
          f"{', '.join(rec['targets'])}) to {args.artifacts}: "
          f"{Path(args.artifacts) / rec['path']} ({rec['bytes'] / 1e6:.1f} MB); run it with "
          f"runtime.load({str(args.artifacts)!r}, adapter={name!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
