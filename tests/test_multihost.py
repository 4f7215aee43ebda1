"""Multi-host on one machine: 2 processes x 2 CPU devices (gloo over 127.0.0.1) train like one device
(hence like 1 process x 4 devices, which tests/test_sharding.py's meshes also match), through a
checkpoint saved by both processes and a resume with the real command line
(launch/local_multiprocess.sh); and each process reads and holds only its share of the base.

This file is also the worker: `python tests/test_multihost.py PORT PROCESS_ID BASE WORKDIR`.
"""
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_sharding import (REPO, SAVED_AT, STEPS, base, losses, one_device_losses,  # noqa: F401
                           tiny_config, worker_env)

MESH = (1, 2, 2)  # data, fsdp, tensor over 4 devices: each process holds one fsdp half


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def write_config(cfg, path):
  """A --config file that returns `cfg` (what the command line of a real run reads)."""
  with open(path, "w") as f:
    f.write('"""Written by tests/test_multihost.py."""\nimport json\n\nimport ml_collections\n\n\n'
            f"def get_config():\n  return ml_collections.ConfigDict(json.loads({cfg.to_json()!r}))\n")


def test_two_processes_equal_one_device_with_save_and_resume(base, tmp_path, tmp_path_factory):
  workdir, port = tmp_path / "two_processes", free_port()
  procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), str(port), str(i), base,
                             str(workdir)], env=worker_env(2, tmp_path / "jax_cache"), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  try:
    want = one_device_losses(base, tmp_path_factory)  # while the two processes run
    logs = [p.communicate(timeout=600)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-5000:]
  assert sorted(losses(workdir)) == list(range(1, SAVED_AT + 1))

  # Resume to STEPS with the real command line, both processes restoring the checkpoint.
  config = tmp_path / "config.py"
  write_config(tiny_config(base, workdir, mesh=MESH), config)
  env = dict(worker_env(2, tmp_path / "jax_cache"), DEVICES_PER_PROCESS="2",
             PYTHON=sys.executable)
  out = subprocess.run([os.path.join(REPO, "launch/local_multiprocess.sh"), "2",
                        f"--config={config}"], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
  assert f"resumed from {workdir} at step {SAVED_AT}" in out.stdout

  got = losses(workdir)
  assert sorted(got) == sorted(want)
  np.testing.assert_allclose([got[s] for s in want], list(want.values()), rtol=1e-5)
  with open(workdir / "metrics.jsonl") as f:  # only process 0 writes metrics
    assert len(f.readlines()) == STEPS


@pytest.mark.parametrize("flags, message", [
    (["--num_processes=2"], "pass all three of --coordinator_address"),
    (["--coordinator_address=127.0.0.1:1", "--num_processes=2", "--process_id=2"],
     "--process_id=2: must be in"),
])
def test_incomplete_or_wrong_flags_are_user_errors(flags, message):
  from ftjax import distributed
  from ftjax.errors import UserError
  values = {k.split("=")[0][2:]: v for k, _, v in (f.partition("=") for f in flags)}
  args = (values.get("coordinator_address"), values.get("num_processes"), values.get("process_id"))
  with pytest.raises(UserError, match=message):
    distributed.initialize_distributed(*(None if v is None else (v if i == 0 else int(v))
                                         for i, v in enumerate(args)))


def test_cluster_detection(monkeypatch):
  from ftjax import distributed
  for key in list(os.environ):
    if key.startswith(("SLURM_", "OMPI_", "TPU_")):
      monkeypatch.delenv(key)
  assert not distributed._cluster_detected()  # a plain machine: one process, no initialize
  srun = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_PROCID": "0"}
  for key, value in srun.items():
    monkeypatch.setenv(key, value)
  monkeypatch.setenv("SLURM_NTASKS", "1")
  assert not distributed._cluster_detected()  # `srun python ...` with one task
  monkeypatch.setenv("SLURM_NTASKS", "2")
  assert distributed._cluster_detected()
  monkeypatch.delenv("SLURM_PROCID")  # without the variables srun sets for each task
  assert not distributed._cluster_detected()
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "w0,w1")  # GKE TPU pod
  assert distributed._cluster_detected()


# ----------------------------------------------------------------------------- the workers


def host(port, process_id, base, workdir):
  """One of 2 processes: distributed init as `python -m ftjax.train` does it, a check that this
  process reads and holds only its share of the base, then SAVED_AT steps and a checkpoint."""
  import ftjax
  from ftjax import distributed, hf_io, sharding, train
  distributed.initialize_distributed(f"127.0.0.1:{port}", 2, int(process_id))
  assert (jax.process_count(), jax.local_device_count(), jax.device_count()) == (2, 2, 4)
  assert jax.process_index() == int(process_id)

  read = []  # every slice this process reads from the safetensors files
  read_slice = hf_io._read_slice
  hf_io._read_slice = lambda view, idx, dtype: read.append(read_slice(view, idx, dtype)) or read[-1]
  mesh = sharding.make_mesh(tiny_config(base, workdir, mesh=MESH).mesh)
  model = ftjax.load_hf(base, "float32", mesh=mesh)
  hf_io._read_slice = read_slice

  total = held = 0
  for path, x in jax.tree_util.tree_leaves_with_path(model.params):
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    mine = {tuple((s.start, s.stop) for s in idx)
            for idx in x.sharding.addressable_devices_indices_map(x.shape).values()}
    mine_bytes = sum(np.prod([(b or n) - (a or 0) for (a, b), n in zip(k, x.shape)])
                     for k in mine) * x.dtype.itemsize
    total, held = total + x.nbytes, held + mine_bytes
    if name.endswith("kernel"):  # sharded over fsdp x tensor: half of it lives here
      assert x.sharding.spec[1:] in (("fsdp", "tensor"), ("tensor", "fsdp")), name
      assert sum(s.data.nbytes for s in x.addressable_shards) == x.nbytes // 2, name
      assert mine_bytes == x.nbytes // 2, name
  read_bytes = sum(a.nbytes for a in read)
  assert read_bytes == held, (read_bytes, held)  # each held slice read once, nothing else
  assert held < 0.55 * total, (held, total)  # only norms are on both processes

  train.run(tiny_config(base, workdir, mesh=MESH, steps=SAVED_AT))


if __name__ == "__main__":
  jax.config.update("jax_default_matmul_precision", "highest")  # as conftest.py does
  host(*sys.argv[1:])
