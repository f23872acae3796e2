"""Devices: one mesh with a `data` axis (batch sharded) and an `fsdp` axis (params sharded).

One code path for 1 CPU, 1 GPU, 8 local devices and a multi-host TPU pod: `jax.jit` with
NamedShardings; XLA inserts the collectives (gradient all-reduce, FSDP all-gathers).
"""

import os

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxgpt.errors import UserError

BATCH_AXES = ("data", "fsdp")  # the batch is split over every device
FSDP_MIN_SIZE = 2**14  # smaller tensors (biases, LayerNorms) stay replicated: not worth a gather


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


def one_device_mesh() -> Mesh:
    """A 1 x 1 mesh on the first device (sampling, loading a workdir from Python)."""
    return jax.make_mesh((1, 1), ("data", "fsdp"), devices=jax.devices()[:1],
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


def initialize_distributed(coordinator_address: str = "", num_processes: int = 0,
                           process_id: int = -1, auto: bool = False) -> bool:
    """Join a multi-process run before any other JAX call; False for a single-process run.

    Explicit (CPU clusters, GPUs without a scheduler): the coordinator's host:port, the number of
    processes and this one's id, as arguments or env JAXGPT_COORDINATOR, JAXGPT_NUM_PROCESSES,
    JAXGPT_PROCESS_ID. `auto` (or JAXGPT_DISTRIBUTED=1): plain `jax.distributed.initialize()`,
    which discovers everything itself on TPU pod slices, SLURM and Open MPI.
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get("JAXGPT_COORDINATOR", "")
    num_processes = num_processes or int(env.get("JAXGPT_NUM_PROCESSES", "0") or 0)
    if process_id < 0:
        process_id = int(env.get("JAXGPT_PROCESS_ID", "-1") or -1)
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
    if auto:
        jax.distributed.initialize()  # TPU pod slice / SLURM / Open MPI: discovered
        return True
    return False
