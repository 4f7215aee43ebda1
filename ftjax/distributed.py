"""Joining the other processes of a multi-host run (jax.distributed), before anything touches
JAX devices."""
import os
import sys

import jax

from ftjax.errors import UserError


def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None):
  """jax.distributed.initialize from the flags, or auto-detected (TPU VMs, GKE TPU, SLURM srun,
  Open MPI); a single process otherwise.

  It must run before anything touches JAX devices, so main calls it first. Note that absl parses
  the flags, which loads --config and runs its get_config(), before main: a config file must not
  touch jax devices (jax.devices(), any jnp array) when it is loaded.
  """
  given = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in given):
    if any(v is None for v in given):
      raise UserError("multi-host: pass all three of --coordinator_address=HOST:PORT "
                      "--num_processes=N --process_id=I, or none of them to auto-detect")
    if not 0 <= process_id < num_processes:
      raise UserError(f"--process_id={process_id}: must be in [0, --num_processes="
                      f"{num_processes})")
    # "deactivate": the flags say it all. Left on, a SLURM/MPI environment would still restrict
    # each process to one local device (SLURM_LOCALID), wrong for one process per node.
    kwargs = dict(coordinator_address=coordinator_address,
                  num_processes=num_processes, process_id=process_id,
                  cluster_detection_method="deactivate")
  elif _cluster_detected():
    kwargs = {}  # jax reads the cluster's environment
  else:
    return
  try:  # CPU processes exchange collectives through gloo; it only concerns the CPU backend
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except AttributeError:  # a jax without the option (it is the default where it exists)
    pass
  try:
    jax.distributed.initialize(**kwargs)
  except RuntimeError as e:
    if "before" not in str(e):
      raise
    raise UserError(f"jax.distributed.initialize: {e}; does the --config file touch jax "
                    "devices when it is loaded?") from None
  if jax.default_backend() == "cpu":
    _native_stdout_to_devnull()


def _native_stdout_to_devnull():
  """gloo (XLA's CPU collectives) writes "[Gloo] Rank N is connected to M peer ranks" with
  std::cout, unconditionally, each time it connects a new group of devices, into the progress
  bar. No setting turns it off, so Python's output moves to a copy of file descriptor 1 and fd 1
  itself, which only native code writes to directly, goes to /dev/null. XLA's and absl's logs
  use stderr and are unaffected."""
  sys.stdout.flush()
  python_out = os.dup(1)
  sys.stdout = os.fdopen(python_out, "w", buffering=1, encoding=sys.stdout.encoding,
                         errors=sys.stdout.errors)
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 1)
  os.close(devnull)


def _cluster_detected() -> bool:
  """True where jax.distributed.initialize() can find its peers with no arguments."""
  env = os.environ
  count = lambda key: int(env.get(key) or 1)
  in_srun = all(k in env for k in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID"))
  try:  # set when `import jax` found TPU chips on the PCI bus (a Cloud TPU VM, GCE or GKE)
    from jax._src.cloud_tpu_init import running_in_cloud_tpu_vm as tpu_vm
  except ImportError:
    tpu_vm = False
  return bool((in_srun and count("SLURM_NTASKS") > 1) or count("OMPI_COMM_WORLD_SIZE") > 1
              or "TPU_WORKER_HOSTNAMES" in env or "TPU_PROCESS_ADDRESSES" in env or tpu_vm)
