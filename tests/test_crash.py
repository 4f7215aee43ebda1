"""Crash safety: SIGKILL at any moment, mid-checkpoint included, loses at most the steps since the
newest complete checkpoint, and resuming from it reproduces an uninterrupted run bit for bit."""
import glob
import json
import os
import random
import re
import subprocess
import sys
import time

import pytest

from test_errors import tiny_base

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STEPS = 40
ENV = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false", PYTHONPATH=REPO,
           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


@pytest.fixture(scope="module")
def cwd(tmp_path_factory):
  """Where the runs start: configs/demo.py builds its base under it (runs/demo_base) when loaded,
  so it is built here once, before runs that start together would race to build it."""
  return str(tmp_path_factory.mktemp("cwd"))


@pytest.fixture(scope="module")
def base(tmp_path_factory, cwd):
  # The demo recipe on a one-layer Llama with the demo's tokenizer: quick to compile and step.
  path = tiny_base(str(tmp_path_factory.mktemp("tiny_base")),
                   os.path.join(cwd, "runs", "demo_base"))
  # A fifth of the demo data: tokenizing it is most of a run's start-up.
  with open(os.path.join(REPO, "configs/demo_data/train.jsonl")) as f:
    rows = f.readlines()[:200]
  with open(os.path.join(path, "train.jsonl"), "w") as f:
    f.writelines(rows)
  return path


def demo_cmd(base, workdir, steps, ckpt_every=1, keep=None):
  """`python -m ftjax.train` of the demo recipe on `base` (tests/test_workdir.py runs it too)."""
  return [sys.executable, "-m", "ftjax.train", f"--config={REPO}/configs/demo.py",
          f"--config.workdir={workdir}", f"--config.model.path={base}",
          f"--config.tokenizer.path={base}", f"--config.data.train={base}/train.jsonl",
          f"--config.train.steps={steps}",
          "--config.train.log_every=1", "--config.train.eval_generate=0",
          "--config.train.batch_size=8", "--config.data.seq_len=64", "--config.data.eval=",
          f"--config.ckpt.every={ckpt_every}"] + ([f"--config.ckpt.keep={keep}"] if keep else [])


def _loss_per_step(workdir) -> dict:
  """{step: loss} of metrics.jsonl, which never holds a step twice: a killed run may have logged
  steps after its last checkpoint, and the rerun drops those lines before logging them again."""
  losses = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      m = json.loads(line)
      if "loss" in m:
        assert m["step"] not in losses, f"step {m['step']} logged twice"
        losses[m["step"]] = m["loss"]
  return losses


def _logged_steps(workdir) -> int:
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      return sum(1 for _ in f)
  except FileNotFoundError:
    return 0


def _complete_steps(workdir) -> list[int]:
  """Step dirs orbax has finalized (renamed from their tmp name)."""
  return sorted(int(p) for p in os.listdir(os.path.join(workdir, "checkpoints")) if p.isdigit())


def _tmp_dirs(workdir) -> list[str]:
  return glob.glob(os.path.join(workdir, "checkpoints", "*orbax-checkpoint-tmp*"))


def _wait(pred, proc, timeout=240, poll=0.05):
  deadline = time.time() + timeout
  while not pred():
    assert proc.poll() is None, "the run ended before it could be killed"
    assert time.time() < deadline, "timed out waiting for the run"
    time.sleep(poll)


def _kill_mid_checkpoint(proc, workdir):
  """SIGKILL the moment a checkpoint's tmp dir exists (orbax is writing it)."""
  ckpts = os.path.join(workdir, "checkpoints")
  deadline = time.time() + 60
  while time.time() < deadline and proc.poll() is None:
    if any("orbax-checkpoint-tmp" in p for p in os.listdir(ckpts)):
      break
    time.sleep(0.001)
  proc.kill()


def test_sigkill_anywhere_resumes_to_the_uninterrupted_losses(base, cwd, tmp_path,
                                                               monkeypatch):
  rng = random.Random(0)
  # Every run after the first loads its compiled step from disk: a rerun starts in seconds.
  monkeypatch.setitem(ENV, "JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax_cache"))
  straight = tmp_path / "straight"
  # The reference run goes alongside the interrupted ones; without checkpoints, which must not
  # change a single value.
  reference = subprocess.Popen(demo_cmd(base, straight, STEPS, 1000, keep=2), env=ENV, cwd=cwd,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  work = tmp_path / "killed"
  cmd = demo_cmd(base, work, STEPS, 1, keep=2)
  kills = []
  for how in ("mid-checkpoint", "random", "mid-checkpoint"):
    before = _logged_steps(work)
    proc = subprocess.Popen(cmd, env=ENV, cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    # Let it train a few steps past where it resumed (its first steps re-log old ones).
    _wait(lambda: _logged_steps(work) >= before + 3, proc)
    if how == "random":
      time.sleep(rng.uniform(0.0, 0.5))
      proc.kill()
    else:
      _kill_mid_checkpoint(proc, work)
    proc.wait()
    assert proc.returncode == -9
    kills.append((how, _complete_steps(work), _tmp_dirs(work)))
    assert kills[-1][1], kills  # at least one complete checkpoint to resume from
  # At least one kill landed while orbax was writing: its tmp dir was left behind.
  assert any(tmp for _, _, tmp in kills), kills
  assert max(kills[-1][1]) < STEPS, kills

  last = subprocess.run(cmd, env=ENV, cwd=cwd, capture_output=True, text=True, timeout=300)
  assert last.returncode == 0, last.stderr[-3000:]
  resumed = re.search(r"resumed from .* at step (\d+)", last.stdout + last.stderr)
  assert resumed and int(resumed.group(1)) == max(kills[-1][1]), (resumed, kills)
  assert not _tmp_dirs(work)  # the leftovers were cleaned up, not mistaken for checkpoints
  assert _complete_steps(work)[-1] == STEPS

  _, err = reference.communicate(timeout=300)
  assert reference.returncode == 0, err[-3000:]
  want, got = _loss_per_step(straight), _loss_per_step(work)
  assert sorted(want) == list(range(1, STEPS + 1))
  assert got == want  # bitwise: adapters, optimizer state, rng and data position all restored
