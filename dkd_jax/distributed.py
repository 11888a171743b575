"""Devices and processes: ``jax.distributed`` start-up, cross-process reductions, replication.

Multi-host (:func:`maybe_initialize_distributed`): with a coordinator named by flags, by
``JAX_COORDINATOR_ADDRESS``/``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID``, or detected by
``jax.distributed.initialize`` (SLURM, TPU pods), every process reads its share of the training
shards, and pmap's collectives span all devices of all processes. Launch lines:

* SLURM, 2 nodes × 4 GPUs, one process per node (``jax.distributed.initialize()`` reads the
  SLURM environment)::

      srun --nodes=2 --ntasks-per-node=1 --gpus-per-node=4 \\
          python train.py --distributed --data PREP --workdir RUN --role teacher

* TPU pod slice (every worker runs the same command; the TPU environment is detected)::

      gcloud compute tpus tpu-vm ssh NAME --worker=all --command \\
          "cd dkd-jax && python train.py --distributed --data PREP --workdir gs-or-nfs/RUN ..."

* explicit (any cluster)::

      python train.py --coordinator HOST0:1234 --num-processes 2 --process-id {0,1} ...

The workdir and prep dir must be on a filesystem every process sees; process 0 holds the
workdir's lock and writes its files.

One multi-core CPU host (:func:`use_cpu_devices`, ``train.py --cpu-devices N``): JAX shows one
CPU device by default, and XLA:CPU gains only 1.2-1.3x from a second core on this network's
training step (README, Speed against PyTorch). Splitting the CPU into N host devices makes the
step data parallel as on N GPUs: the devices run at once, each on B/N segments of the batch,
BatchNorm statistics and gradients summed over the devices.
"""

from __future__ import annotations

import os

import jax
import numpy as np

__all__ = [
    "AXIS",
    "DistributedError",
    "device_axis_sharding",
    "local_devices",
    "maybe_initialize_distributed",
    "over_processes",
    "replicate",
    "unreplicate",
    "use_cpu_devices",
]

AXIS = "batch"
"""The name of the data-parallel (pmap) axis."""


class DistributedError(RuntimeError):
    """Multi-process start-up failed, or too few devices (one line)."""


def maybe_initialize_distributed(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto: bool = False,
) -> bool:
    """Calls ``jax.distributed.initialize`` when a multi-process run is requested.

    Requested by: explicit arguments; the environment ``JAX_COORDINATOR_ADDRESS`` (with
    ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``); ``auto=True`` (``--distributed``: let JAX detect
    SLURM, Open MPI or a TPU pod); or a SLURM job step with more than one task. CPU processes use
    the gloo collectives. Must run before anything touches a JAX device.

    Returns:
      True when initialised.

    Raises:
      DistributedError: initialisation failed (the message says how to name the coordinator).
    """
    env = os.environ
    explicit = num_processes is not None or process_id is not None
    coordinator = coordinator or env.get("JAX_COORDINATOR_ADDRESS") or None
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = _env_int("JAX_NUM_PROCESSES", minimum=1)
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = _env_int("JAX_PROCESS_ID", minimum=0)
    slurm = int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_STEP_ID" in env
    if not (coordinator or auto or slurm):
        if explicit:
            raise DistributedError(
                "--num-processes / --process-id without a coordinator: add --coordinator "
                "HOST:PORT (or --distributed), or drop them for a single-process run"
            )
        return False
    if not env.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if coordinator:
        kwargs["coordinator_address"] = coordinator
    if num_processes is not None:
        kwargs["num_processes"] = num_processes
    if process_id is not None:
        kwargs["process_id"] = process_id
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError) as e:
        raise DistributedError(
            f"jax.distributed.initialize({kwargs or ''}) failed: {str(e).splitlines()[0][:300]}; "
            "name the coordinator with --coordinator HOST:PORT --num-processes N --process-id I"
        ) from e
    return True


def _env_int(name: str, *, minimum: int) -> int:
    value = os.environ[name]
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or number < minimum:
        raise DistributedError(f"environment {name}={value!r}: expected an integer >= {minimum}")
    return number


#: The most CPU devices :func:`use_cpu_devices` makes (JAX makes 4096 in about a second; it
#: fails with an overflow near 2**31).
MAX_CPU_DEVICES = 4096


def use_cpu_devices(num_devices: int) -> None:
    """Splits the CPU into ``num_devices`` JAX devices (``jax_num_cpu_devices``), so a ``pmap``
    step runs data-parallel over the host's cores. Must run before JAX starts its backends.

    Without augmentation or dropout the numbers of a run then differ from a one-device run in
    float rounding only (BatchNorm statistics and gradients are sums over the devices;
    tests/test_train_lib.py checks 3 steps against one device to 1e-5); with them each device
    draws its own random numbers (the step key is folded with the device index), as on N GPUs.
    The run's ``metrics.jsonl`` start event records the device count.
    Only the CPU backend is split: on a GPU or TPU host the accelerators are used as before.

    Raises:
      DistributedError: ``num_devices`` < 1 or above :data:`MAX_CPU_DEVICES`, or JAX has
        already started its backends.
    """
    if isinstance(num_devices, bool) or not isinstance(num_devices, int) or num_devices < 1:
        raise DistributedError(f"--cpu-devices must be an integer >= 1, got {num_devices!r}")
    if num_devices > MAX_CPU_DEVICES:
        raise DistributedError(
            f"--cpu-devices {num_devices}: at most {MAX_CPU_DEVICES} (one device per core is "
            "the useful split)"
        )
    try:
        jax.config.update("jax_num_cpu_devices", num_devices)
    except RuntimeError as e:
        raise DistributedError(
            f"cannot split the CPU into {num_devices} devices: JAX has already started its "
            "backends in this process (choose the CPU device count before any JAX operation)"
        ) from e


def over_processes(value, op: str = "sum"):
    """Reduces a number or an array over all processes ("sum" or "max"); itself with one."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    gathered = np.asarray(multihost_utils.process_allgather(np.asarray(value)))
    out = gathered.sum(axis=0) if op == "sum" else gathered.max(axis=0)
    return type(value)(out) if isinstance(value, int | float) else out


def local_devices(num_devices: int = 0) -> tuple:
    """The first ``num_devices`` local devices (0: all).

    Raises:
      DistributedError: fewer local devices than asked for.
    """
    devs = jax.local_devices()
    if num_devices:
        if num_devices > len(devs):
            raise DistributedError(
                f"train.num_devices={num_devices} but only {len(devs)} local device(s): {devs}"
            )
        devs = devs[:num_devices]
    return tuple(devs)


def device_axis_sharding(devices) -> jax.NamedSharding:
    """Arrays split on their leading [devices] axis over ``devices``: how pmap lays out its
    outputs, and so how its inputs are put (a batch, replicated variables)."""
    return jax.NamedSharding(jax.sharding.Mesh(np.array(devices), (AXIS,)), jax.P(AXIS))


def replicate(tree, devices):
    """Copies of a host pytree on every device, stacked on a leading [devices] axis with the
    same sharding pmap gives its outputs (so the first call does not trace differently)."""
    n = len(devices)
    stacked = jax.tree.map(lambda x: np.broadcast_to(np.asarray(x)[None], (n, *np.shape(x))), tree)
    # One device_put for the whole tree: a put per leaf cost twice as long (the student's 44
    # leaves: 2.3 against 1.25 ms on one CPU device), paid at every evaluation.
    return jax.device_put(stacked, device_axis_sharding(devices))


def unreplicate(tree):
    """Device 0's copy of a replicated pytree, as host numpy (no compiled slicing)."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0))[0], tree)
