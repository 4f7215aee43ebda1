"""One live run per workdir (a second is refused, a killed one never blocks), how soon a stop
takes effect (in steps), and what a resume with a longer train.steps says about the schedule."""
import json
import math
import os
import re
import signal
import subprocess
import time

import pytest

from ftjax import ckpt, train
from test_crash import ENV, base, cwd, demo_cmd  # noqa: F401  (base, cwd: fixtures)
from test_errors import make_config, snapshot

def test_second_run_is_refused_and_a_killed_run_never_blocks(base, cwd, tmp_path):
  env = dict(ENV, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"))
  work = tmp_path / "work"
  first = subprocess.Popen(demo_cmd(base, work, 100000), env=env, cwd=cwd,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 300
    while not ckpt.complete_steps(str(work / "checkpoints")):
      assert first.poll() is None and time.time() < deadline, "the first run did not checkpoint"
      time.sleep(0.1)
    first.send_signal(signal.SIGSTOP)  # frozen: nothing in the workdir moves while we look
    while open(f"/proc/{first.pid}/stat").read().split(") ")[1][0] != "T":  # stopped, not stopping
      time.sleep(0.01)
    time.sleep(0.2)  # a write in a syscall when the signal came has landed
    before = snapshot(work)
    second = subprocess.run(demo_cmd(base, work, 100000), env=env, cwd=cwd, capture_output=True,
                            text=True, timeout=300)
    assert second.returncode == 1, second.stdout + second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr
    assert re.fullmatch(rf"error: {work}: another run is training in it \(host \S+, pid "
                        rf"{first.pid}\); .*", lines[0]), lines[0]
    assert snapshot(work) == before  # the refused run changed nothing
  finally:
    first.kill()  # SIGKILL: its lock must not outlive it
    first.wait()
  # The killed run's lock is gone with it: the next run goes straight to its checkpoint (here
  # one that is already at train.steps, which needs no compile; tests/test_crash.py resumes
  # SIGKILLed runs to the end through this same lock).
  saved = ckpt.complete_steps(str(work / "checkpoints"))[-1]
  third = subprocess.run(demo_cmd(base, work, saved), env=env, cwd=cwd, capture_output=True,
                         text=True, timeout=300)
  assert third.returncode == 0, third.stderr[-3000:]
  assert f"{work}: already trained to step {saved}" in third.stdout, third.stdout
  assert not (work / "run.lock").exists()  # a run that ends leaves no lock file


def _cosine_lr(lr, warmup, total, step):
  """optim's warmup + cosine schedule, written out: lr at `step` (0-based) of `total` steps."""
  if step < warmup:
    return lr * step / warmup
  t = min(step - warmup, total - warmup) / (total - warmup)
  return lr * 0.5 * (1 + math.cos(math.pi * t))


def test_stop_waits_for_at_most_the_queued_steps_and_resume_names_the_new_schedule(
    base, tmp_path, monkeypatch, capsys):
  """SIGTERM comes when the host queues step TRIGGER, while the device runs step k (the first
  step whose result is not ready): the run saves a step at most 2 past k, however far the next
  log step is. (Unbounded, the host queues every step up to the log step before the device has
  done any: k stays near 1 and the save waits for all of them.) Then a resume with a longer
  train.steps says the learning-rate schedule changed, with both rates."""
  TRIGGER, steps, running = 12, 16, []
  real_loop = train.train_loop

  def instrumented_loop(r, train_step, *rest):
    queued = []  # each step's loss: ready once the device has finished that step

    def step(*args):
      state, metrics = train_step(*args)
      queued.append(metrics["loss"])
      if len(queued) == TRIGGER:
        running.append(r.first + 1 + sum(x.is_ready() for x in queued))  # no read, no wait
        os.kill(os.getpid(), signal.SIGTERM)
      return state, metrics

    return real_loop(r, step, *rest)

  monkeypatch.setattr(train, "train_loop", instrumented_loop)
  workdir = tmp_path / "stopped"
  cfg = make_config(base, os.path.join(base, "train.jsonl"), workdir, train__steps=steps,
                    train__log_every=1000, ckpt__every=1000, optim__lr=1e-3,
                    optim__warmup_steps=2, optim__schedule="cosine")
  train.run(cfg)
  monkeypatch.undo()
  saved = ckpt.complete_steps(str(workdir / "checkpoints"))
  k = running[0]
  assert len(saved) == 1 and saved[0] <= k + 2, (saved, k)  # the two steps queued after k
  assert f"SIGTERM: saved step {saved[0]}" in capsys.readouterr().out

  longer = steps + 8
  cfg = make_config(base, os.path.join(base, "train.jsonl"), workdir, train__steps=longer,
                    train__log_every=1, ckpt__every=1000, optim__lr=1e-3, optim__warmup_steps=2,
                    optim__schedule="cosine")
  train.run(cfg)
  s = saved[0]
  was, now = _cosine_lr(1e-3, 2, steps, s), _cosine_lr(1e-3, 2, longer, s)
  out = capsys.readouterr().out
  assert (f"resumed from {workdir} at step {s}; train.steps {steps} -> {longer} recomputes the "
          f"learning-rate schedule: lr at step {s} was {was:.3e}, now {now:.3e}") in out, out
  with open(workdir / "metrics.jsonl") as f:
    logged = {m["step"]: m["lr"] for m in map(json.loads, f) if "lr" in m}
  assert logged[s + 1] == pytest.approx(now, rel=1e-6)  # the rate the resumed step trains with
