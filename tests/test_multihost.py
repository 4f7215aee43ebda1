"""Multi-host on one machine: 2 processes x 2 CPU devices (gloo over 127.0.0.1) train like one device
(hence like 1 process x 4 devices, which tests/test_sharding.py's meshes also match), through a
checkpoint saved by both processes and a resume with the real command line
(launch/local_multiprocess.sh); and each process reads and holds only its share of the base.

Both runs keep the demo's defaults (eval data, eval loss, greedy exact match before and after
training), and between them each batch axis spans the processes: fsdp in the first run (mesh 1 x 2
x 2), data in the resumed one (2 x 2 x 1: the issue's data=2 x fsdp=2). Exact match decodes under
those meshes must equal one device's.

This file is also the worker: `python tests/test_multihost.py PORT PROCESS_ID BASE WORKDIR`.
"""
import json
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
RESUME_MESH = (2, 2, 1)  # each process is one data replica, FSDP over its two devices
EXACT_MATCH = 4  # prompts decoded before and after training (the demo decodes 40)


def demo_config(base, workdir, mesh, steps):
  """tiny_config with what the demo recipe turns on: eval data, eval loss under the mesh, greedy
  exact match before and after training."""
  c = tiny_config(base, workdir, mesh=mesh, steps=steps)
  c.data.eval = os.path.join(REPO, "configs/demo_data/eval.jsonl")
  c.train.eval_generate, c.train.eval_every = EXACT_MATCH, SAVED_AT
  return c


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
    assert "[Gloo]" not in log, log[-3000:]  # gloo's connection lines stay out of the console
  assert sorted(losses(workdir)) == list(range(1, SAVED_AT + 1))
  assert "before training: exact match 0.0%" in logs[0], logs[0][-3000:]

  # Resume to STEPS with the real command line, both processes restoring the checkpoint.
  config = tmp_path / "config.py"
  write_config(demo_config(base, workdir, RESUME_MESH, STEPS), config)
  env = dict(worker_env(2, tmp_path / "jax_cache"), DEVICES_PER_PROCESS="2",
             PYTHON=sys.executable)
  out = subprocess.run([os.path.join(REPO, "launch/local_multiprocess.sh"), "2",
                        f"--config={config}"], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
  assert f"resumed from {workdir} at step {SAVED_AT}" in out.stdout
  assert "[Gloo]" not in out.stdout + out.stderr, out.stdout[-3000:]
  assert "mesh data=2 fsdp=2 tensor=1" in out.stdout, out.stdout[-3000:]

  got = losses(workdir)
  assert sorted(got) == sorted(want)
  np.testing.assert_allclose([got[s] for s in want], list(want.values()), rtol=1e-5)
  with open(workdir / "metrics.jsonl") as f:  # only process 0 writes metrics
    logged = [json.loads(line) for line in f]
  assert len([m for m in logged if "loss" in m]) == STEPS
  assert sorted(m["step"] for m in logged if "eval_loss" in m) == [SAVED_AT, STEPS]

  # The decodes gathered from both processes are one device's decodes of the same adapters.
  import ftjax
  from ftjax import data, evaluation, sharding
  from ml_collections import ConfigDict
  cfg = demo_config(base, workdir, (1, 1, 1), STEPS)
  em, n, sample = evaluation.exact_match(
      cfg, ftjax.load_hf(base, "float32"), ftjax.load_adapters(str(workdir)),
      data.load_tokenizer(base), list(data.load_rows(cfg.data.eval)), EXACT_MATCH,
      sharding.make_mesh(ConfigDict(dict(data=1, fsdp=1, tensor=1))))
  assert f"after training: exact match {em:.1%} on {n} eval prompts; sample {sample}" in (
      out.stdout), out.stdout[-3000:]
  exact = {m["step"]: m["exact_match"] for m in logged if "exact_match" in m}
  assert sorted(exact) == [0, SAVED_AT, STEPS] and exact[STEPS] == em, exact


def test_two_process_dpo_equals_one_device(base, tmp_path):
  """DPO from a lora.init_from adapter (its reference) with the data axis across 2 processes of
  one device each: each process loads its half of the pairs and places the reference adapter on
  a mesh it shares; the losses and TRL metrics are one device's."""
  from ftjax import hf_io, lora, peft_io, train
  spec = hf_io.read_spec(base)
  start = lora.init(spec, "all-linear", 4, 8.0, jax.random.PRNGKey(1))
  rng = np.random.default_rng(1)  # a random B: the reference is not the base
  start = lora.with_params(start, jax.tree.map(
      lambda x: np.asarray(x) + rng.normal(0.0, 0.05, x.shape).astype(np.float32), start.params))
  peft_io.write_adapters(start, spec, str(tmp_path / "start"), base)
  with open(os.path.join(REPO, "configs/demo_data/pref_train.jsonl")) as f:
    (tmp_path / "pairs.jsonl").write_text("".join(f.readline() for _ in range(16)))

  def dpo_config(workdir, mesh):
    c = tiny_config(base, workdir, mesh=mesh, steps=2)
    c.data.train, c.data.format, c.data.seq_len = str(tmp_path / "pairs.jsonl"), "preference", 96
    c.data.packing, c.train.objective, c.lora.init_from = False, "dpo", str(tmp_path / "start")
    c.lora.rank, c.optim.lr, c.optim.warmup_steps, c.preference.beta = 4, 1e-3, 0, 0.5
    return c
  config = tmp_path / "config.py"
  write_config(dpo_config(tmp_path / "two", (2, 1, 1)), config)
  env = dict(worker_env(1, tmp_path / "jax_cache"), DEVICES_PER_PROCESS="1", PYTHON=sys.executable)
  proc = subprocess.Popen([os.path.join(REPO, "launch/local_multiprocess.sh"), "2",
                           f"--config={config}"], env=env, cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  try:
    train.run(dpo_config(tmp_path / "one", (1, 1, 1)))  # while the two processes run
    out = proc.communicate(timeout=600)[0]
  finally:
    proc.kill()
  assert proc.returncode == 0, out[-5000:]
  assert "mesh data=2 fsdp=1 tensor=1" in out, out[-3000:]
  for key in ("loss", "rewards/margins", "logps/chosen"):
    want, got = losses(tmp_path / "one", key), losses(tmp_path / "two", key)
    assert sorted(got) == sorted(want) == [1, 2], key
    # margins are beta x differences of sums near -30: float32 rounds them by ~2e-6
    np.testing.assert_allclose([got[s] for s in want], list(want.values()), rtol=1e-5, atol=2e-5)
  step_loss = losses(tmp_path / "one")
  assert abs(step_loss[1] - np.log(2)) < 2e-6 and abs(step_loss[2] - np.log(2)) > 1e-4


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


def test_two_processes_read_only_their_share_of_a_gguf_base(base, tmp_path):
  """A GGUF base streams like safetensors: each of 2 processes reads (and dequantizes) only the
  rows of its own shards, half of each kernel (Q8_0 for the MLP, F32 elsewhere)."""
  import transformers
  from gguf import GGMLQuantizationType as Q
  from test_gguf import write_gguf
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(base)
  path = str(tmp_path / "base.gguf")
  write_gguf(hf_model, path, types={f"blk.{i}.ffn_{p}.weight": Q.Q8_0
                                    for i in range(hf_model.config.num_hidden_layers)
                                    for p in ("gate", "up", "down")})
  port = free_port()
  procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), str(port), str(i), path,
                             str(tmp_path / "unused"), "load_only"],
                            env=worker_env(2, tmp_path / "jax_cache"), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  try:
    logs = [p.communicate(timeout=300)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  for i, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, log[-5000:]
    assert f"process {i} read " in log, log[-3000:]

def host(port, process_id, base, workdir, load_only=""):
  """One of 2 processes: distributed init as `python -m ftjax.train` does it, a check that this
  process reads and holds only its share of the base, then (unless load_only) SAVED_AT steps and
  a checkpoint."""
  from ftjax import distributed, train
  distributed.initialize_distributed(f"127.0.0.1:{port}", 2, int(process_id))
  assert (jax.process_count(), jax.local_device_count(), jax.device_count()) == (2, 2, 4)
  assert jax.process_index() == int(process_id)
  check_share(base, workdir)
  if not load_only:
    train.run(demo_config(base, workdir, MESH, SAVED_AT))


def check_share(base, workdir):
  """This process reads (safetensors or GGUF alike) and holds only its half of each kernel."""
  import ftjax
  from ftjax import hf_io, sharding

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
  print(f"process {jax.process_index()} read {read_bytes} of {total} bytes")


if __name__ == "__main__":
  jax.config.update("jax_default_matmul_precision", "highest")  # as conftest.py does
  host(*sys.argv[1:])
