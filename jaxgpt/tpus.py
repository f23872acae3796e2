"""TPU slices by the names users type, and what each chip holds: for compiling without a TPU.

`gcloud compute tpus tpu-vm create --accelerator-type=NAME` takes names such as v4-8,
v5litepod-16, v5p-32 or v6e-8; JAX's `get_topology_desc` takes topologies (`v5e:4x4`) and
refuses most of those names (`v5litepod-8`), so they are mapped here. The number in a v4 / v5p
name counts TensorCores (two per chip, which JAX drives as one device: megacore); in a v5e / v6e
name it counts chips. Topologies from Google Cloud's TPU pages (cloud.google.com/tpu/docs/v4,
/v5e, /v5p, /v6e: "Supported configurations" / "Topologies" tables).
"""

import contextlib
import dataclasses
import importlib.util
import os
import re
import sys
import tempfile

import jax
from jax.experimental import topologies

from jaxgpt.errors import UserError

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    generation: str  # the prefix of JAX's topology names
    hbm_bytes: int  # per chip
    hbm_bytes_per_s: float
    source: str


# HBM per chip and its bandwidth from Google Cloud's system-architecture pages (the bf16 peaks
# are flops.PEAK_TFLOPS's, looked up by device kind). XLA reserves a little of the HBM itself,
# so a margin of a few hundred MiB is not room to spare.
CHIPS = {
    "v4": Chip("v4", 32 * GiB, 1200e9, "cloud.google.com/tpu/docs/v4: 32 GiB HBM2, 1200 GB/s"),
    "v5e": Chip("v5e", 16 * GiB, 819e9, "cloud.google.com/tpu/docs/v5e: 16 GB HBM2, 819 GB/s"),
    "v5p": Chip("v5p", 95 * GiB, 2765e9, "cloud.google.com/tpu/docs/v5p: 95 GB HBM2e, 2765 GB/s"),
    "v6e": Chip("v6e", 32 * GiB, 1640e9, "cloud.google.com/tpu/docs/v6e: 32 GB HBM, 1640 GB/s"),
}

# accelerator-type number -> topology (chips per axis); v4 / v5p: the number is 2 x chips
_CUBE = {8: "2x2x1", 16: "2x2x2", 32: "2x2x4", 64: "2x4x4", 128: "4x4x4", 256: "4x4x8",
         512: "4x8x8", 1024: "8x8x8", 2048: "8x8x16", 4096: "8x16x16"}
_PLANE = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
          256: "16x16"}
ACCELERATOR_TYPES = {
    **{f"v4-{n}": f"v4:{t}" for n, t in _CUBE.items()},
    **{f"v5p-{n}": f"v5p:{t}" for n, t in _CUBE.items()},
    **{f"v5litepod-{n}": f"v5e:{t}" for n, t in _PLANE.items()},
    **{f"v6e-{n}": f"v6e:{t}" for n, t in _PLANE.items()},
}
_TOPOLOGY = re.compile(r"^(v4|v5e|v5p|v6e):(\d+x\d+(x\d+)?)$")


def topology_name(name: str) -> str:
    """A TPU VM accelerator type (v5litepod-16) or a topology (v5e:4x4) -> the topology."""
    name = name.strip().lower()
    if name in ACCELERATOR_TYPES:
        return ACCELERATOR_TYPES[name]
    if _TOPOLOGY.match(name):
        return name
    raise UserError(f"--topology={name!r}: unknown; use a TPU VM accelerator type (v4-8, "
                    "v5litepod-16, v5p-32, v6e-8, ...) or a topology such as v5e:4x4 or v4:2x2x2")


def chip(topology: str) -> Chip:
    return CHIPS[topology.split(":")[0]]


def _as_on_a_tpu_vm(topology: str) -> dict:
    """libtpu's defaults differ from what a TPU VM's JAX sees in two cases: a v4 chip's two
    TensorCores are one device there (megacore; libtpu's default makes them two), and a
    v5litepod-8 / v6e-8 is one host of 8 chips (libtpu's default: 2 hosts of 4)."""
    generation, shape = topology.split(":")
    if generation == "v4":
        return {"chip_config_name": "megacore"}
    if generation in ("v5e", "v6e") and shape == "2x4":
        return {"chips_per_host_bounds": (2, 4, 1)}
    return {}


def devices(topology: str):
    """The devices of a TPU slice that is not there (libtpu compiles for them on this CPU).

    Must run before JAX starts a backend: the TPU backend stays off (JAX_PLATFORMS=cpu) and
    libtpu does not ask a TPU VM's metadata server for the slice (TPU_SKIP_MDS_QUERY).
    """
    if importlib.util.find_spec("libtpu") is None:
        raise UserError("compiling for a TPU needs libtpu: pip install -e '.[aot]'")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    # no chip to share: several compiling processes may load libtpu at once (its lockfile)
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    jax.config.update("jax_platforms", "cpu")
    with quiet_stderr() as said:  # libtpu warns that this machine is no TPU worker
        try:
            return topologies.get_topology_desc(topology_name=topology, platform="tpu",
                                                **_as_on_a_tpu_vm(topology)).devices
        except Exception as e:  # noqa: BLE001  libtpu's refusal, as one line
            error = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise UserError(f"libtpu refused the topology {topology!r}: {error} "
                    f"(libtpu said: {' '.join(said()[-1:])[:300]})")


@contextlib.contextmanager
def quiet_stderr():
    """File descriptor 2 (where libtpu's C++ logging goes) into a temporary file; yields a
    function returning the lines written there."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile("w+") as tmp:
        os.dup2(tmp.fileno(), 2)
        lines = []
        try:
            yield lambda: lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines.extend(line.strip() for line in tmp if line.strip())
