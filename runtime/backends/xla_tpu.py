"""Runs the xla-tpu artifact: executables compiled ahead of time for one TPU topology.

Nothing is compiled on load. The executables were compiled for a mesh of devices (recorded in the
manifest in mesh order, with their coords) and for exact jax/jaxlib/libtpu versions; `unsupported`
refuses any other machine with the reason, and `runtime.load(target="auto")` then falls back to the
portable xla artifact. Weights and the KV cache are placed with the PartitionSpecs the manifest
records, the cache stays on the devices between calls and its buffers are donated.

The executables are pickles (jax's `serialize_executable`): loading one runs code its writer
chose. So they load only when the manifest's seal verifies with the user's key and every file's
hash was checked against that manifest, or when the caller trusts whoever can write the artifact
directory (`trust_executables=True`, `--trust-executables`); `trust_problem` says why not.
"""

from __future__ import annotations

import numpy as np

from .. import kv
from .xla import JaxSignatures, device_weights

TARGET = "xla-tpu"


def unsupported(record: dict, machine) -> str | None:
    want = record.get("platform", "tpu")
    n, kind, topo = record["num_devices"], record["device_kind"], record["topology"]
    if machine.platform != want:
        return (f"compiled for {topo} ({n} x {kind}); this machine has "
                f"{machine.describe()}")
    kinds = {d.kind for d in machine.devices}
    if kinds != {kind} or len(machine.devices) != n:
        return f"compiled for {topo} ({n} x {kind}); this machine has {machine.describe()}"
    if want == "tpu" and len(_match_devices(record, machine.devices)) != n:
        return f"compiled for {topo}; this machine's chips have other coordinates"
    for pkg, version in record.get("versions", {}).items():
        if version is not None and machine.versions.get(pkg) != version:
            return (f"compiled with {pkg} {version}; this machine has {pkg} "
                    f"{machine.versions.get(pkg) or 'not installed'} (executables load only "
                    f"with the exact versions they were compiled with)")
    return None


def _match_devices(record: dict, devices) -> list:
    """The devices in the executable's mesh order: by coords on TPU, by id otherwise."""
    by_coords = {tuple(d.coords): d for d in devices if d.coords}
    by_id = {d.id: d for d in devices}
    out = []
    for want in record["devices"]:
        d = by_coords.get(tuple(want["coords"])) if want["coords"] else by_id.get(want["id"])
        if d is not None:
            out.append(d)
    return out


def trust_problem(manifest, verified: bool) -> str | None:
    """Why this artifact's executables may not be unpickled without an explicit trust flag; None
    when its seal verifies with the user's key and its files were checked against the manifest."""
    from .. import integrity
    from ..contract import SEAL
    try:
        why = integrity.seal_problem(manifest.data, SEAL)
    except integrity.IntegrityError as e:   # an unusable key file
        why = str(e)
    if why is None and not verified:
        why = "its files were not checked against the signed manifest (--no-verify)"
    if why is None:
        return None
    return (f"{manifest.root}: the xla-tpu executables are pickles, and loading one runs code "
            f"chosen by whoever wrote it; not loading them because {why}. Sign the artifact with "
            f"your key (`python -m runtime.sign --artifacts {manifest.root}`; the key is "
            f"${integrity.KEY_ENV} or {integrity.key_path()}), or, if you trust everyone who can "
            f"write that directory, pass --trust-executables "
            f"(runtime.load(..., trust_executables=True))")


class XlaTpuBackend(JaxSignatures):
    target = TARGET

    def __init__(self, manifest, record: dict, trust_executables: bool = False,
                 verified: bool = True):
        from ..manifest import ArtifactError
        if not trust_executables:
            why = trust_problem(manifest, verified)
            if why:
                raise ArtifactError(why)

        import jax
        from jax.experimental.serialize_executable import deserialize_and_load
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

        from ..devices import Machine, from_jax, query

        machine = query()
        why = unsupported(record, machine)
        if why:
            raise ArtifactError(f"cannot run the xla-tpu artifact here: {why}")
        self._jax = jax
        platform = record.get("platform", "tpu")
        local = {int(d.id): d for d in jax.devices()}
        found = Machine(tuple(from_jax(d) for d in local.values()), (), machine.versions)
        why = unsupported(record, found)
        if why:
            raise ArtifactError(f"the devices JAX reports do not match the xla-tpu executables: "
                                f"{why}")
        devices = [local[d.id] for d in _match_devices(record, found.devices)]
        mesh = Mesh(np.array(devices).reshape(record["mesh"]["shape"]), record["mesh"]["axes"])
        self.mesh = mesh
        specs = record["shardings"]
        files = record["files"]
        self.weights = device_weights(
            manifest.path(files["weights"]["path"]),
            lambda k, v: jax.device_put(v, NamedSharding(mesh, P(*specs["weights"][k]))))
        self._kv_sharding = NamedSharding(mesh, P(*specs["kv_cache"]))
        self._replicated = NamedSharding(mesh, P())
        self._kv = manifest.contract.kv
        state = self.new_state()
        self._fns = {}
        for s in manifest.contract.signatures():
            name, n = s.name, s.length
            in_tree = jax.tree_util.tree_structure(
                ((self.weights, state, np.zeros((1, n), np.int32), np.zeros(n, np.int32)), {}))
            out_tree = jax.tree_util.tree_structure({t.name: 0 for t in s.outputs})
            recorded = record["pytrees"][name]
            if str(in_tree) != recorded["in"] or str(out_tree) != recorded["out"]:
                raise ArtifactError(f"xla-tpu artifact: {name} was compiled for arguments "
                                    f"{recorded['in']}, the manifest describes {in_tree}")
            payload = manifest.path(files[name]["path"]).read_bytes()
            self._fns[name] = deserialize_and_load(payload, in_tree, out_tree, backend=platform,
                                                   execution_devices=devices)

    def new_state(self):
        jax = self._jax
        return kv.zeros(self._kv, alloc=lambda shape, dtype: jax.device_put(
            np.zeros(shape, dtype), self._kv_sharding))

    def _run(self, name, tokens, start, state, lora=None):
        jax = self._jax
        n = tokens.shape[0]
        tok = jax.device_put(tokens.reshape(1, n), self._replicated)
        pos = jax.device_put(np.arange(start, start + n, dtype=np.int32), self._replicated)
        out = self._fns[name](self.weights, state, tok, pos)
        return out, {k: out[k] for k in self._kv.names}
