"""Run-time LoRA adapters of an artifact built with LoRA slots (`compile.export --lora-rank R`).

An artifact's manifest lists its adapters (`adapters`, written by `compile.adapter`), each one
safetensors file under `adapters/` holding, for every matmul it adapts, the slot inputs of the
LoRA signatures (`runtime.contract.LoraSlot`): A [in, R] and B [R, out], zero-padded from the
adapter's own rank to the artifact's R, with PEFT's scaling already in B. A matmul it does not
adapt gets zero slots. The file's metadata names the base it was converted for (`base_id`), and
an adapter is refused on any other base.

`slot_inputs` gives every slot input of the LoRA signatures for one (adapter, scale): what a
backend's `lora_inputs` prepares once and each call then feeds. Nothing here is mutable, so one
loaded artifact serves several adapters at once.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from . import contract as ct

BASE_KEY = "gemma_aot.base"      # safetensors metadata: the base_id it was converted for
NAME_KEY = "gemma_aot.adapter"   # and its name


class AdapterError(ValueError):
    pass


def base_id(manifest_data: dict) -> str:
    """What identifies an artifact's weights for its adapters: a sha256 over the model's config and
    its source record (the checkpoint's sha256, any adapter merged at export), paths left out."""
    model = manifest_data["model"]
    source = {k: v for k, v in model.get("source", {}).items() if k != "path"}
    if isinstance(source.get("lora"), dict):
        source["lora"] = {k: v for k, v in source["lora"].items() if k != "path"}
    text = json.dumps({"config": model["config"], "source": source}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Adapter:
    """An adapter's slot tensors (slot input name -> array, the artifact's rank R)."""
    name: str
    tensors: Mapping[str, np.ndarray] = field(repr=False)

    def check(self, contract: ct.Contract) -> "Adapter":
        """Every tensor is a slot input of `contract` with its shape, finite."""
        if not contract.lora_rank:
            raise AdapterError("this artifact has no LoRA slots (export it with --lora-rank R "
                               "to use run-time adapters)")
        specs = {t.name: t for t in contract.lora_specs()}
        for k, a in self.tensors.items():
            if k not in specs:
                raise AdapterError(f"adapter {self.name!r}: {k} is not a LoRA slot of this "
                                   f"artifact (slots for {', '.join(contract.lora_targets)})")
            if tuple(a.shape) != tuple(specs[k].shape):
                raise AdapterError(f"adapter {self.name!r}: {k} is {list(a.shape)}, the "
                                   f"artifact's slot is {list(specs[k].shape)}")
            if not np.isfinite(a).all():
                raise AdapterError(f"adapter {self.name!r}: {k} has non-finite values")
        return self


def read(manifest, name: str, verify: bool = True, log=None) -> Adapter:
    """The adapter `name` of the artifact (`runtime.manifest.Manifest`): its file present with
    its recorded size (and sha256 with `verify`), converted for this base, its tensors the
    artifact's slot shapes."""
    from .manifest import ArtifactError
    adapters = manifest.data.get(ct.ADAPTERS, {})
    if name not in adapters:
        raise AdapterError(f"unknown adapter {name!r}; this artifact has "
                           f"{', '.join(sorted(adapters)) or 'none'}")
    p, sha = manifest.present(adapters[name], f"adapter {name!r}")
    if verify:
        manifest.verify([(p, sha)], True, log, what=f"adapter {name!r}")
    try:
        meta, tensors = read_file(p)
    except (OSError, ValueError) as e:
        raise ArtifactError(f"adapter {name!r}: {p} is not a readable adapter file "
                            f"({e})") from None
    if meta.get(BASE_KEY) != base_id(manifest.data):
        raise AdapterError(f"adapter {name!r} ({p}) was converted for another base model; "
                           f"convert the PEFT adapter again for this artifact")
    return Adapter(name, tensors).check(manifest.contract)


def read_file(path) -> tuple[dict, dict[str, np.ndarray]]:
    """(metadata, name -> float32 array) of a safetensors file of F32 tensors, read with numpy
    alone (the runtime's onnx and tflite installs have no safetensors package). Raises
    ValueError saying what is wrong."""
    data = memoryview(open(path, "rb").read())
    if len(data) < 8:
        raise ValueError("shorter than a safetensors header")
    n = int.from_bytes(data[:8], "little")
    if not 2 <= n <= len(data) - 8:
        raise ValueError(f"header length {n} does not fit the file's {len(data)} bytes")
    try:
        header = json.loads(bytes(data[8:8 + n]))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    body = data[8 + n:]
    tensors = {}
    for k, t in header.items():
        try:
            dtype, shape, (lo, hi) = t["dtype"], [int(d) for d in t["shape"]], t["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise ValueError(f"tensor {k}: malformed header entry") from None
        if dtype != "F32":
            raise ValueError(f"tensor {k}: dtype {dtype}, adapters hold F32")
        if not (0 <= lo <= hi <= len(body)) or hi - lo != 4 * math.prod(shape):
            raise ValueError(f"tensor {k}: data offsets {lo}..{hi} do not hold {shape} float32 "
                             f"values within the file")
        tensors[k] = np.frombuffer(body[lo:hi], "<f4").reshape(shape).astype(np.float32)
    return meta if isinstance(meta, dict) else {}, tensors


def slot_inputs(contract: ct.Contract, adapter: Adapter, scale: float = 1.0
                ) -> dict[str, np.ndarray]:
    """Every slot input of the LoRA signatures, C-contiguous float32: the adapter's (B times
    `scale`), zeros for the matmuls it leaves alone."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise AdapterError(f"adapter scale must be a finite number, got {scale!r}")
    bnames = {s.b_name for s in contract.lora_slots()}
    out = {}
    for spec in contract.lora_specs():
        a = adapter.tensors.get(spec.name)
        if a is None:
            out[spec.name] = np.zeros(spec.shape, np.float32)
        else:
            a = np.asarray(a, np.float32)
            if scale != 1.0 and spec.name in bnames:
                a = a * np.float32(scale)
            out[spec.name] = np.ascontiguousarray(a)
    return out
