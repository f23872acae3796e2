"""Devices: one mesh with a `data` axis (batch sharded) and an `fsdp` axis (params sharded).

One code path for 1 CPU, 1 GPU, 8 local devices and a multi-host TPU pod: `jax.jit` with
NamedShardings; XLA inserts the collectives (gradient all-reduce, FSDP all-gathers).
"""

import glob
import importlib.util
import os
import urllib.request
from pathlib import Path

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxgpt.errors import UserError

BATCH_AXES = ("data", "fsdp")  # the batch is split over every device
FSDP_MIN_SIZE = 2**14  # smaller tensors (biases, LayerNorms) stay replicated: not worth a gather


def tpu_chips_here() -> bool:
    """A Google TPU on this machine's PCI bus (JAX's own test: vendor id 0x1ae0)."""
    return any(Path(v).read_text().strip() == "0x1ae0"
               for v in glob.glob("/sys/bus/pci/devices/*/vendor"))


def cpu_without_accelerators() -> None:
    """With libtpu installed (the [aot] extra, to compile for TPUs) JAX tries the TPU backend
    first even on a machine without one, and libtpu prints warnings about TPU workers before
    JAX falls back to the CPU. With no TPU here and no GPU plugin installed the CPU is what JAX
    would pick anyway: pick it up front, so nothing is printed. An explicit JAX_PLATFORMS wins."""
    if (os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms
            or importlib.util.find_spec("libtpu") is None or tpu_chips_here()
            or any(importlib.util.find_spec(p) for p in ("jax_cuda12_plugin",
                                                          "jax_cuda13_plugin", "jax_rocm7_plugin",
                                                          "jax_rocm6_plugin"))):
        return
    jax.config.update("jax_platforms", "cpu")


def make_mesh(config, devices=None) -> Mesh:
    """A (data, fsdp) mesh from `config.mesh` sizes; -1 takes all remaining devices."""
    devices = jax.devices() if devices is None else devices
    n = len(devices)
    sizes = {"data": config.mesh.data, "fsdp": config.mesh.fsdp}
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise UserError("at most one of config.mesh.data / config.mesh.fsdp may be -1")
    fixed = int(np.prod([v for v in sizes.values() if v != -1]))
    if free:
        if n % fixed:
            raise UserError(f"{n} devices cannot be split into mesh axes {sizes}")
        sizes[free[0]] = n // fixed
    if sizes["data"] * sizes["fsdp"] != n:
        raise UserError(f"config.mesh data={sizes['data']} x fsdp={sizes['fsdp']} must use all "
                        f"{n} devices; set one of them to -1")
    # Auto axes: XLA's sharding propagation places the collectives (classic GSPMD style)
    return jax.make_mesh((sizes["data"], sizes["fsdp"]), ("data", "fsdp"), devices=devices,
                         axis_types=(AxisType.Auto, AxisType.Auto))


def traced_in(mesh: Mesh, fn):
    """`fn` traced with `mesh` as the abstract mesh in context, for `jax.jit`: code that must
    know the mesh while tracing (the splash kernel runs under shard_map over its batch axes)
    finds it with `jax.sharding.get_abstract_mesh()`."""
    def traced(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    # jit names the program after the function: keep fn's (a partial: its function's)
    traced.__name__ = getattr(fn, "__name__", getattr(getattr(fn, "func", None), "__name__",
                                                      "traced"))
    return traced


def one_device_mesh(device=None) -> Mesh:
    """A 1 x 1 mesh on `device`, by default the first (sampling, loading a workdir)."""
    return jax.make_mesh((1, 1), ("data", "fsdp"), devices=[device or jax.devices()[0]],
                         axis_types=(AxisType.Auto, AxisType.Auto))


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def check_batch(config, mesh: Mesh) -> None:
    n = data_parallel_size(mesh)
    if config.batch_size % n:
        raise UserError(f"config.batch_size={config.batch_size} does not divide across {n} "
                        f"data-parallel devices: use a multiple of {n}")


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, leading: int = 0) -> NamedSharding:
    """Shard the batch axis (after `leading` unsharded axes) over every device."""
    return NamedSharding(mesh, P(*([None] * leading), BATCH_AXES))


def fsdp_spec(shape, fsdp_size: int) -> P:
    """Split a large tensor along its largest axis that fsdp divides; replicate the rest."""
    if fsdp_size == 1 or int(np.prod(shape)) < FSDP_MIN_SIZE:
        return P()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % fsdp_size == 0:
            return P(*[("fsdp" if a == axis else None) for a in range(len(shape))])
    return P()


def state_sharding(abstract_state, mesh: Mesh):
    """Shardings for every leaf of a (train) state: FSDP-split large arrays, replicate others."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(x.shape, fsdp)), abstract_state)


def put_replicated(array: np.ndarray, mesh: Mesh) -> jax.Array:
    """A host array (identical on every process) as a global array replicated on the mesh."""
    sharding = replicated(mesh)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def local_rows(sharding: NamedSharding, shape, axis: int) -> np.ndarray:
    """The indices along `axis` of a global `shape` that this process's devices hold (sorted).

    This is the slice of the global batch a process loads: `make_array_from_process_local_data`
    maps them, in this order, onto its devices.
    """
    rows = set()
    for index in sharding.addressable_devices_indices_map(tuple(shape)).values():
        rows.update(range(*index[axis].indices(shape[axis])))
    return np.array(sorted(rows), dtype=np.int64)


def put_process_local(local: np.ndarray, sharding: NamedSharding, global_shape) -> jax.Array:
    """This process's rows (from `local_rows`) -> one global array sharded over every process."""
    return jax.make_array_from_process_local_data(sharding, local, tuple(global_shape))


def is_main_process() -> bool:
    return jax.process_index() == 0


# ---------------------------------------------------------------------------------------------
# Multi-host start-up


def tpu_slice_workers() -> int:
    """How many hosts this TPU VM's slice has (1 off a TPU VM). As JAX's own cluster detection
    finds them: TPU_WORKER_HOSTNAMES, else the TPU VM metadata server's
    worker-network-endpoints (asked only where TPU chips are on this machine's bus)."""
    if not tpu_chips_here():
        return 1
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if not hosts:
        server = os.environ.get("GCE_METADATA_IP", "metadata.google.internal")
        request = urllib.request.Request(
            f"http://{server}/computeMetadata/v1/instance/attributes/worker-network-endpoints",
            headers={"Metadata-Flavor": "Google"})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                hosts = response.read().decode()
        except OSError:  # not a TPU VM (a TPU in another kind of machine): one host
            return 1
    return len([h for h in hosts.split(",") if h.strip()])


def initialize_distributed(coordinator_address: str = "", num_processes: int = 0,
                           process_id: int = -1, auto: bool = False) -> bool:
    """Join a multi-process run before any other JAX call; False for a single-process run.

    Explicit (CPU clusters, GPUs without a scheduler): the coordinator's host:port, the number of
    processes and this one's id, as arguments, or in the environment as jaxgpt's
    JAXGPT_COORDINATOR, JAXGPT_NUM_PROCESSES, JAXGPT_PROCESS_ID or JAX's own
    JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID. `auto` (or JAXGPT_DISTRIBUTED=1):
    plain `jax.distributed.initialize()`, which discovers everything itself on TPU pod slices,
    SLURM and Open MPI; a host of a multi-host TPU VM slice does that without being asked.
    """
    env = os.environ

    def get(*names, default=""):
        return next((env[n] for n in names if env.get(n)), default)

    coordinator_address = coordinator_address or get("JAXGPT_COORDINATOR",
                                                     "JAX_COORDINATOR_ADDRESS")
    num_processes = num_processes or int(get("JAXGPT_NUM_PROCESSES", "JAX_NUM_PROCESSES",
                                             default="0"))
    if process_id < 0:
        process_id = int(get("JAXGPT_PROCESS_ID", "JAX_PROCESS_ID", default="-1"))
    auto = auto or env.get("JAXGPT_DISTRIBUTED", "") not in ("", "0")
    if jax.distributed.is_initialized():
        return True
    if coordinator_address:
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise UserError(f"multi-process run with coordinator {coordinator_address}: also set "
                            f"num_processes >= 1 and 0 <= process_id < num_processes (got "
                            f"{num_processes} and {process_id})")
        if num_processes == 1:
            return False
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
        return True
    if auto or tpu_slice_workers() > 1:
        jax.distributed.initialize()  # TPU pod slice / SLURM / Open MPI: discovered
        return True
    return False
