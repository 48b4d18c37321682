"""What this machine offers to run an artifact on. The runtime asks here and nowhere else, so the
choice of artifact can be tested with simulated machines by replacing `query`.

A `Machine` is JAX's devices on its default platform (`cpu`, `cuda`, `rocm` or `tpu`; empty when JAX
does not import), the execution providers onnxruntime offers, and the versions an ahead-of-time
executable must match.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
import sys
from dataclasses import dataclass, field


def quiet_jax() -> str | None:
    """Keeps JAX from starting libtpu on a machine with no accelerator at all.

    With libtpu installed (the tpu extra), JAX tries its TPU backend in every process; where no
    TPU exists that attempt fails quietly for JAX but libtpu itself prints errors about TPU
    hostnames and accelerator types, which read like a failure. Where JAX's own hardware probe sees
    no TPU chip, no NVIDIA GPU and no AMD GPU, and the user chose no platforms, JAX is limited to
    its CPU backend (JAX_PLATFORMS=cpu). The deviceless TPU compiler (the xla-tpu target) loads
    libtpu by itself and is unaffected. Call before JAX starts a backend; returns what it set."""
    if "JAX_PLATFORMS" in os.environ or importlib.util.find_spec("libtpu") is None:
        return None
    try:
        from jax._src import hardware_utils as hw   # JAX's probe: PCI ids, no backend started
        if hw.num_available_tpu_chips_and_device_id()[0] or hw.has_visible_nvidia_gpu() \
                or hw.num_available_amd_gpus(stop_at=1):
            return None
    except Exception:   # another JAX: leave it alone
        return None
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:   # imported already: its config read the variable before we set it
        try:
            sys.modules["jax"].config.update("jax_platforms", "cpu")
        except Exception:
            pass
    return "cpu"


@dataclass(frozen=True)
class Device:
    platform: str                     # cpu, cuda, rocm, tpu
    kind: str                         # as JAX reports it: "cpu", "NVIDIA H100 80GB HBM3", "TPU v5 lite"
    id: int = 0
    coords: tuple[int, ...] = ()


@dataclass(frozen=True)
class Machine:
    devices: tuple[Device, ...] = ()
    ort_providers: tuple[str, ...] = ()
    versions: dict = field(default_factory=dict)     # jax, jaxlib, libtpu (None if absent)

    @property
    def platform(self) -> str:
        """JAX's default platform, `cpu` when JAX is absent (the other backends run on the CPU)."""
        return self.devices[0].platform if self.devices else "cpu"

    def describe(self) -> str:
        if not self.devices:
            return "no JAX devices"
        kinds = sorted({d.kind for d in self.devices})
        return f"{self.platform}: {len(self.devices)} x {', '.join(kinds)}"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _platform(device) -> str:
    if device.platform != "gpu":
        return device.platform
    version = str(getattr(device.client, "platform_version", "")).lower()
    return "rocm" if "rocm" in version else "cuda"


def from_jax(device) -> Device:
    return Device(_platform(device), device.device_kind, int(device.id),
                  tuple(getattr(device, "coords", None) or ()))


@functools.lru_cache(maxsize=2)
def query(jax: bool = True) -> Machine:
    """jax=False skips JAX (importing it and starting its backends costs a few hundred MB and a
    second): only JAX's artifacts need to know its devices."""
    devices = ()
    try:
        if jax:
            quiet_jax()
            import jax as _jax
            devices = tuple(from_jax(d) for d in _jax.devices())
    except Exception:   # JAX absent or no usable backend: the other backends can still run
        pass
    providers = ()
    try:
        import onnxruntime
        providers = tuple(onnxruntime.get_available_providers())
    except Exception:
        pass
    return Machine(devices, providers, {d: _version(d) for d in ("jax", "jaxlib", "libtpu")})
