"""Multi-host start-up: `jax.distributed.initialize` from flags, the environment or the cluster.

Every host runs the same command; this must be called before anything touches a JAX device. Where the
settings come from, first match wins:

  1. arguments (the entry points' `--coordinator_address/--num_processes/--process_id` flags);
  2. RRJAX_COORDINATOR_ADDRESS, RRJAX_NUM_PROCESSES, RRJAX_PROCESS_ID (RRJAX_LOCAL_DEVICE_IDS);
  3. JAX's own JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID (JAX_LOCAL_DEVICE_IDS);
  4. the cluster: a Cloud TPU VM (pod slice or multislice) or a SLURM step with more than one task, which
     `jax.distributed.initialize()` detects by itself.

With none of these, or one process, it does nothing (one host). RRJAX_DISTRIBUTED=0 turns it off.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Sequence

import jax

log = logging.getLogger("rrjax.distributed")

_STATE: dict[str, object] = {"done": False, "ours": False}


class DistributedConfigError(ValueError):
  pass


def _env(*names: str) -> str | None:
  for name in names:
    value = os.environ.get(name)
    if value not in (None, ""):
      return value
  return None


def _int(value, what: str) -> int | None:
  if value is None:
    return None
  try:
    return int(value)
  except (TypeError, ValueError):
    raise DistributedConfigError(f"{what}: expected an integer, got {value!r}") from None


def _device_ids(value) -> list[int] | None:
  if value is None:
    return None
  if isinstance(value, int):
    return [value]
  if isinstance(value, str):
    try:
      return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
      raise DistributedConfigError(f"local device ids: expected '0,1,...', got {value!r}") from None
  return [int(v) for v in value]


def _worker_hostnames() -> str | None:
  """TPU_WORKER_HOSTNAMES when it holds host names; None when unset or when it holds the warning text that
  libtpu's probe leaves there on a machine without TPUs ("WARNING: could not determine ...")."""
  hosts = _env("TPU_WORKER_HOSTNAMES")
  if hosts is None or any(c.isspace() for c in hosts.strip()) or hosts.lstrip().upper().startswith("WARNING"):
    return None
  return hosts


def _on_cloud_tpu_vm() -> bool:
  try:  # set by `import jax` when libtpu and TPU chips are present
    from jax._src import cloud_tpu_init
    if cloud_tpu_init.running_in_cloud_tpu_vm:
      return True
  except ImportError:
    pass
  return bool(_worker_hostnames() or _env("MEGASCALE_COORDINATOR_ADDRESS"))


def _tpu_is_multihost() -> bool:
  hosts = _worker_hostnames()
  if hosts is not None and len([h for h in hosts.split(",") if h.strip()]) > 1:
    return True
  if (_int(_env("MEGASCALE_NUM_SLICES"), "MEGASCALE_NUM_SLICES") or 1) > 1:
    return True
  # A GCE TPU VM exports nothing; its worker list lives in the metadata server, which JAX queries. One
  # host then comes back as one process, so asking costs a local service and nothing else.
  return hosts is None


def _slurm_tasks() -> int:
  if not all(_env(v) for v in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID")):
    return 1  # not inside an `srun` step (an salloc shell or the batch script itself)
  return _int(_env("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"), "SLURM_NTASKS") or 1


def resolve(coordinator_address: str | None = None, num_processes: int | None = None,
            process_id: int | None = None, local_device_ids: int | Sequence[int] | str | None = None
            ) -> tuple[str, dict]:
  """(how, kwargs for jax.distributed.initialize): how is "explicit", "cluster" or "single"."""
  coordinator_address = coordinator_address or _env("RRJAX_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS")
  num_processes = num_processes if num_processes is not None else _int(
      _env("RRJAX_NUM_PROCESSES", "JAX_NUM_PROCESSES"), "RRJAX_NUM_PROCESSES")
  process_id = process_id if process_id is not None else _int(
      _env("RRJAX_PROCESS_ID", "JAX_PROCESS_ID"), "RRJAX_PROCESS_ID")
  local_device_ids = _device_ids(local_device_ids if local_device_ids is not None
                                 else _env("RRJAX_LOCAL_DEVICE_IDS", "JAX_LOCAL_DEVICE_IDS"))
  if (_env("RRJAX_DISTRIBUTED") or "1").lower() in ("0", "false", "no", "off"):
    return "single", {}
  given = {"coordinator address": coordinator_address, "number of processes": num_processes,
           "process id": process_id}
  if num_processes is not None or process_id is not None or coordinator_address is not None:
    if num_processes == 1 and process_id in (None, 0):
      return "single", {}
    missing = [k for k, v in given.items() if v is None]
    if missing and (_on_cloud_tpu_vm() or _slurm_tasks() > 1):
      # The cluster fills in the rest (e.g. only the coordinator port is pinned).
      return "cluster", {k: v for k, v in dict(coordinator_address=coordinator_address, num_processes=num_processes,
                                               process_id=process_id, local_device_ids=local_device_ids).items()
                         if v is not None}
    if missing:
      raise DistributedConfigError(
          f"multi-host launch: missing {', '.join(missing)} (set --coordinator_address/--num_processes/"
          f"--process_id or RRJAX_COORDINATOR_ADDRESS/RRJAX_NUM_PROCESSES/RRJAX_PROCESS_ID)")
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise DistributedConfigError(f"multi-host launch: process id {process_id} is not in [0, {num_processes})")
    if ":" not in coordinator_address:
      raise DistributedConfigError(f"multi-host launch: coordinator address {coordinator_address!r} needs "
                                   f"host:port")
    # 'deactivate' stops JAX's cluster detection from overriding us, e.g. binding a SLURM task to one GPU.
    kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id,
                  local_device_ids=local_device_ids, cluster_detection_method="deactivate")
    return "explicit", kwargs
  if _on_cloud_tpu_vm():
    return ("cluster", {}) if _tpu_is_multihost() else ("single", {})
  if _slurm_tasks() > 1:
    # JAX reads the SLURM step; it binds each task to GPU $SLURM_LOCALID (one process per GPU) unless
    # RRJAX_LOCAL_DEVICE_IDS says otherwise.
    return "cluster", ({"local_device_ids": local_device_ids} if local_device_ids is not None else {})
  return "single", {}


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: int | Sequence[int] | str | None = None, *,
               timeout_s: int = 300) -> bool:
  """Joins the multi-host job when launched as one (see the module doc); a no-op on one host and on a
  second call. Returns whether more than one process takes part."""
  if _STATE["done"] or jax.distributed.is_initialized():
    _STATE["done"] = True
    return jax.process_count() > 1
  how, kwargs = resolve(coordinator_address, num_processes, process_id, local_device_ids)
  if how != "single":
    from jax._src import xla_bridge
    if xla_bridge.backends_are_initialized():
      raise DistributedConfigError("multi-host launch: rrjax.distributed.initialize() must run before any JAX "
                                   "computation or jax.devices() call")
    log.info("jax.distributed.initialize (%s): %s", how,
             {k: v for k, v in kwargs.items() if k != "cluster_detection_method"} or "auto-detected")
    jax.distributed.initialize(**kwargs, initialization_timeout=timeout_s)
    _STATE["ours"] = True
  _STATE["done"] = True
  multi = jax.process_count() > 1
  if multi:
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
  return multi


def shutdown() -> None:
  """Leaves the job (every process should, so none waits on the heartbeat timeout)."""
  if _STATE["ours"] and jax.distributed.is_initialized():
    jax.distributed.shutdown()
  _STATE["ours"] = False


def add_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
  """--coordinator_address, --num_processes, --process_id, --local_device_ids (all optional)."""
  group = parser.add_argument_group("multi-host (default: RRJAX_* environment or cluster auto-detection)")
  group.add_argument("--coordinator_address", default=None, help="host:port of process 0")
  group.add_argument("--num_processes", type=int, default=None, help="processes in the job")
  group.add_argument("--process_id", type=int, default=None, help="this process's index")
  group.add_argument("--local_device_ids", default=None, help="comma-separated local devices to use")
  return parser


def initialize_from_args(args: argparse.Namespace) -> bool:
  return initialize(getattr(args, "coordinator_address", None), getattr(args, "num_processes", None),
                    getattr(args, "process_id", None), getattr(args, "local_device_ids", None))


def is_primary() -> bool:
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """All processes reach `name` before any goes on; free on one process."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def allgather_bytes(data: bytes) -> list[bytes]:
  """Every process's `data`, in process order, on every process (no shared filesystem needed)."""
  if jax.process_count() == 1:
    return [bytes(data)]
  import numpy as np
  from jax.experimental import multihost_utils
  sizes = np.asarray(multihost_utils.process_allgather(np.asarray([len(data)], np.int32))).reshape(-1)
  width = max(int(sizes.max()), 1)
  padded = np.zeros(width, np.uint8)
  padded[:len(data)] = np.frombuffer(data, np.uint8)
  rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), width)
  return [rows[i, :int(n)].tobytes() for i, n in enumerate(sizes)]


def allgather_json(obj) -> list:
  """Every process's JSON-serialisable `obj`, in process order, on every process (e.g. report totals)."""
  import json
  return [json.loads(b) for b in allgather_bytes(json.dumps(obj).encode())]
