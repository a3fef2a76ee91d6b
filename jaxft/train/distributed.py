"""Multi-host start-up through JAX's own distributed runtime (no home-made launcher).

``maybe_initialize`` calls ``jax.distributed.initialize`` when the process runs under a
multi-process launcher: explicit flags, ``JAX_COORDINATOR_ADDRESS`` (+ ``JAX_NUM_PROCESSES``,
``JAX_PROCESS_ID``), SLURM with more than one task, or a multi-host Cloud TPU slice; JAX
auto-detects the cluster in the last two cases.
"""

from __future__ import annotations

import os

import jax


def _launcher_detected() -> bool:
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and os.environ.get("SLURM_JOB_ID"):
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h]) > 1


def maybe_initialize(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> bool:
    """Initialise ``jax.distributed`` if asked or detected; returns whether it did."""
    if jax.distributed.is_initialized():
        return True
    explicit = coordinator is not None
    if not explicit and not _launcher_detected():
        return False
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    if (os.environ.get("JAX_PLATFORMS", "") or "").startswith("cpu"):
        # CPU collectives across processes need gloo (development and tests).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
    return True
