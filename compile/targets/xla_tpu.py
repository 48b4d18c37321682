"""xla-tpu target: executables compiled ahead of time for a TPU topology, on a host without a TPU.

JAX compiles for a topology description that `libtpu` builds from its name ("deviceless AOT", as
MaxText's train_compile does), and the compiled executables are serialized. A TPU server of that
topology then loads them without compiling anything.

Sharding (tensor parallelism over the `model` mesh axis; the remaining chips form a `replica` axis
over which everything is replicated): query heads, the FFN's hidden dimension and the vocabulary are
split across `model`; KV heads (their projections and the KV cache) are split when there are at
least as many KV heads as `model` chips, else replicated. Norms, tokens and positions are
replicated. Each tensor's PartitionSpec is recorded in the manifest: the runtime places the weights
and the cache with exactly these shardings before calling the executables.

Files: `weights.safetensors` (bf16 by default, stored once) and `{signature}.xla_exec` (serialized
PjRt executables, taking `(weights, kv_state, tokens, input_pos)`; the KV state is donated). The
manifest records the topology, the mesh, the devices in mesh order (id and coords), the pytree
structures, jax/jaxlib/libtpu versions, XLA flags and each executable's memory analysis against the
chip's HBM.

An executable loads only on the same topology with the same jax, jaxlib and libtpu: the runtime
checks all of it and falls back to the portable `xla` artifact otherwise.

`cpu:N` compiles the same sharded program for this host's N CPU devices (N must equal the local
device count, e.g. set by XLA_FLAGS=--xla_force_host_platform_device_count=N): it exercises the
whole path (sharding, serialization, the runtime's loader) on a machine without a TPU.
"""

from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from runtime import contract as ct

from ..weights import safetensors, specs_of

NAME = "xla-tpu"
QUANTS = ("bf16", "none")       # weight dtype: bf16 (the TPU's native one) or float32
DEFAULT_QUANT = "bf16"
TRACE_PLATFORMS = ()   # compiled for the topology from the traced functions
GiB = 1 << 30


@dataclass(frozen=True)
class Chip:
    device_kind: str            # as jax reports it on that TPU
    hbm_bytes: int              # per chip
    shapes: tuple[str, ...]     # single-host topologies (a served model runs in one process)


CHIPS = {
    "v5e": Chip("TPU v5 lite", 16 * GiB, ("1x1", "2x2", "2x4")),
    "v6e": Chip("TPU v6 lite", 32 * GiB, ("1x1", "2x2", "2x4")),
    "v5p": Chip("TPU v5", 95 * GiB, ("2x2x1",)),
}


def known_topologies() -> list[str]:
    return [f"{c}:{s}" for c, chip in CHIPS.items() for s in chip.shapes]


def parse_topology(name: str) -> tuple[str, str]:
    """'v5e:2x2' -> ('v5e', '2x2'); 'cpu:4' -> ('cpu', '4'). Raises ValueError naming the known
    ones."""
    chip, _, shape = (name or "").partition(":")
    if chip == "cpu" and shape.isdigit() and int(shape) > 0:
        return chip, shape
    if chip not in CHIPS or shape not in CHIPS[chip].shapes:
        raise ValueError(f"unknown TPU topology {name!r}; known: {', '.join(known_topologies())} "
                         f"(or cpu:N for this host's CPU devices)")
    return chip, shape


def parse_mesh(text: str | None, chips: int) -> int:
    """--mesh model=M -> M (chips on the tensor-parallel axis; default all of them)."""
    if not text:
        return chips
    key, _, value = text.partition("=")
    if key.strip() != "model" or not value.strip().isdigit():
        raise ValueError(f"--mesh {text!r}: expected model=M (M chips for tensor parallelism)")
    m = int(value)
    if m < 1 or chips % m:
        raise ValueError(f"--mesh model={m} does not divide the topology's {chips} chips")
    return m


def check_options(options: dict) -> None:
    """Fails before any work when the topology or mesh is wrong."""
    if not options.get("tpu_topology"):
        raise ValueError(f"target xla-tpu needs --tpu-topology; known: "
                         f"{', '.join(known_topologies())}")
    parse_mesh(options.get("mesh"), num_chips(options["tpu_topology"]))


def check_config(cfg, options: dict) -> None:
    """Fails before any work (and before libtpu starts) when the model does not split over the
    mesh: its experts, query heads or FFN width not divisible by the model axis."""
    _check_divisible(cfg, parse_mesh(options.get("mesh"), num_chips(options["tpu_topology"])))


def num_chips(topology: str) -> int:
    _, shape = parse_topology(topology)
    return int(np.prod([int(x) for x in shape.split("x")]))


def topology_devices(name: str) -> list:
    chip, shape = parse_topology(name)
    if chip == "cpu":
        devs = jax.devices("cpu")
        if len(devs) != int(shape):
            raise ValueError(f"topology {name} needs {shape} CPU devices, this process has "
                             f"{len(devs)} (set XLA_FLAGS=--xla_force_host_platform_device_count="
                             f"{shape} before starting Python)")
        return devs
    from jax.experimental import topologies
    # deviceless compilation opens no chip, so another process may hold libtpu at the same time
    # (a second export, a test worker); its multi-process lockfile would refuse this one
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    dims = [int(x) for x in shape.split("x")] + [1] * (3 - len(shape.split("x")))
    try:
        topo = topologies.get_topology_desc(topology_name=f"{chip}:{shape}", platform="tpu",
                                            chips_per_host_bounds=tuple(dims))
    except RuntimeError as e:
        if "not installed" in str(e) or "libtpu" in str(e).lower():
            raise ValueError("compiling for a TPU topology needs libtpu: install the tpu extra "
                             "(pip install 'gemma-aot[tpu]')") from e
        raise
    return list(topo.devices)


def libtpu_version() -> str | None:
    try:
        return importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:
        return None


def _kv_split(cfg, model: int) -> bool:
    """K/V projections and caches split on the KV-head axis when every cache's head count
    divides the model axis (Gemma 4's global layers may have fewer KV heads)."""
    return model > 1 and all(a.kv_heads % model == 0 for a in cfg.attention())


def param_spec(cfg, name: str, model: int) -> tuple:
    """PartitionSpec entries for one weight ([in, out] linears, [V, D] embeddings, [E, in, out]
    expert stacks, 1-D norms and scales)."""
    from ..model import is_experts
    leaf = name.rsplit(".", 1)[-1]
    ndim = 3 if is_experts(name) else (
        1 if leaf.endswith("norm") or leaf in ("embed_scale", "layer_scalar", "router_scale",
                                               "expert_scale") else 2)
    if model == 1:
        return (None,) * ndim
    if is_experts(name):                                # expert parallel (E % model checked)
        return ("model", None, None)
    if leaf in ("q_proj", "gate_proj", "up_proj"):
        return (None, "model")
    if leaf in ("o_proj", "down_proj"):
        return ("model", None)
    if leaf in ("k_proj", "v_proj"):
        return (None, "model") if _kv_split(cfg, model) else (None, None)
    if leaf == "embed":
        return ("model", None) if cfg.vocab_size % model == 0 else (None, None)
    if leaf == "ple_embed":
        return ("model", None) if cfg.ple_vocab_size % model == 0 else (None, None)
    return (None,) * ndim                               # norms, scales, router, PLE blocks


def kv_spec(cfg, model: int) -> tuple:
    """K [B, K, S, H] and V [B, K, H, S] split on the KV-head axis, or replicated."""
    return (None, "model" if _kv_split(cfg, model) else None, None, None)


def _check_divisible(cfg, model: int) -> None:
    if model == 1:
        return
    for what, n in (("experts", cfg.num_experts), ("query heads", cfg.num_heads),
                    ("FFN dim", cfg.ffn_dim)):
        if n and n % model:
            raise ValueError(f"{cfg.name}: {what} ({n}) do not split over {model} chips; "
                             f"choose --mesh model=M with M dividing {n}")


def memory_report(compiled, hbm_bytes: int | None) -> dict:
    m = compiled.memory_analysis()
    if m is None:
        return {}
    total = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
             + m.temp_size_in_bytes + m.generated_code_size_in_bytes)
    report = {"argument_bytes": m.argument_size_in_bytes, "output_bytes": m.output_size_in_bytes,
              "alias_bytes": m.alias_size_in_bytes, "temp_bytes": m.temp_size_in_bytes,
              "code_bytes": m.generated_code_size_in_bytes, "total_bytes_per_device": total}
    if hbm_bytes:
        report.update(hbm_bytes_per_device=hbm_bytes, fits=total <= hbm_bytes)
    return report


def lower(traced, params: dict, devices, model: int, weight_dtype, tick=None):
    """Compiles every signature for `devices`; returns (mesh, weight specs, {name: Compiled})."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    first = next(iter(traced.values()))
    cfg, kv = first.contract.config, first.contract.kv_specs()
    mesh = Mesh(np.array(devices).reshape(len(devices) // model, model), ("replica", "model"))
    rep = NamedSharding(mesh, P())
    kvs = NamedSharding(mesh, P(*kv_spec(cfg, model)))
    wspecs = {k: param_spec(cfg, k, model) for k in params}
    weights = {k: jax.ShapeDtypeStruct(shape, weight_dtype if _is_float(dt) else dt,
                                       sharding=NamedSharding(mesh, P(*wspecs[k])))
               for k, (shape, dt) in specs_of(params).items()}
    state = {s.name: jax.ShapeDtypeStruct(s.shape, jnp.dtype(s.dtype), sharding=kvs) for s in kv}
    compiled = {}
    for name, t in traced.items():
        def call(weights, state, tokens, input_pos, fn=t.fn):
            return fn(weights, {**state, ct.TOKENS: tokens, ct.INPUT_POS: input_pos})

        ins = {s.name: s for s in t.signature.inputs}
        tokens = jax.ShapeDtypeStruct(ins[ct.TOKENS].shape, jnp.int32, sharding=rep)
        pos = jax.ShapeDtypeStruct(ins[ct.INPUT_POS].shape, jnp.int32, sharding=rep)
        outs = {s.name: kvs if first.contract.kv.is_cache(s.name) else rep
                for s in t.signature.outputs}
        jitted = jax.jit(call, out_shardings=outs, donate_argnums=(1,))
        compiled[name] = jitted.lower(weights, state, tokens, pos).compile()
        if tick:
            tick()
    return mesh, wspecs, compiled


def _is_float(dtype) -> bool:
    return np.issubdtype(np.dtype(dtype), np.floating)


def write(traced, params, out_dir: Path, options: dict, progress=None) -> dict:
    from jax.experimental.serialize_executable import serialize

    topology = options["tpu_topology"]
    chip, _ = parse_topology(topology)
    devices = topology_devices(topology)
    model = parse_mesh(options.get("mesh"), len(devices))
    cfg = next(iter(traced.values())).contract.config
    _check_divisible(cfg, model)
    dtype = jnp.bfloat16 if (options.get("quant") or DEFAULT_QUANT) == "bf16" else jnp.float32
    hbm = CHIPS[chip].hbm_bytes if chip in CHIPS else None

    out_dir.mkdir(parents=True, exist_ok=True)
    bar = progress(total=len(traced) + 1, desc=f"compile {topology}", unit="signature") \
        if progress else None
    mesh, wspecs, compiled = lower(traced, params, devices, model, dtype,
                                   tick=bar.update if bar else None)
    files = {"weights": "weights.safetensors"}
    stored = {k: (shape, np.dtype(dtype) if _is_float(dt) else dt)
              for k, (shape, dt) in specs_of(params).items()}
    safetensors.write(out_dir / files["weights"], stored,     # tensor by tensor
                      lambda k: np.asarray(params[k]).astype(stored[k][1]))
    if bar:
        bar.update()
    memory, trees = {}, {}
    for name, c in compiled.items():
        payload, in_tree, out_tree = serialize(c)
        (out_dir / f"{name}.xla_exec").write_bytes(payload)
        files[name] = f"{name}.xla_exec"
        memory[name] = memory_report(c, hbm)
        trees[name] = {"in": str(in_tree), "out": str(out_tree)}
    if bar:
        bar.close()
    too_big = {n: m for n, m in memory.items() if m.get("fits") is False}
    if too_big:
        need = max(m["total_bytes_per_device"] for m in too_big.values())
        raise ValueError(f"{cfg.name} does not fit {topology}: {', '.join(too_big)} need "
                         f"{need / GiB:.3g} GiB per chip, a {chip} chip has {hbm / GiB:.3g} GiB; "
                         f"choose a topology with more chips")
    platform = devices[0].platform
    return {
        "files": files, "quantization": options.get("quant") or DEFAULT_QUANT,
        "weights_dtype": jnp.dtype(dtype).name, "platform": platform,
        "topology": topology, "device_kind": devices[0].device_kind, "num_devices": len(devices),
        "hbm_bytes_per_device": hbm,
        "mesh": {"axes": list(mesh.axis_names), "shape": list(mesh.devices.shape)},
        "devices": [{"id": int(d.id), "coords": list(getattr(d, "coords", []) or [])}
                    for d in mesh.devices.reshape(-1)],
        "shardings": {"weights": {k: list(v) for k, v in wspecs.items()},
                      "kv_cache": list(kv_spec(cfg, model)), ct.TOKENS: [], ct.INPUT_POS: [],
                      ct.LOGITS: []},
        "pytrees": trees,
        "memory": memory,
        "versions": {"jax": jax.__version__, "jaxlib": jaxlib.__version__,
                     "libtpu": libtpu_version() if platform == "tpu" else None},
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
