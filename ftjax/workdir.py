"""A workdir has one live run: its lock. And what a resume says about the schedule it recomputes.

The lock is an flock on `WORKDIR/run.lock`, held by the live run's process (process 0 of a
multi-host run) until the run ends: the kernel drops it when that process ends, however it ends,
so a killed run (SIGKILL, a lost machine) leaves at most a stale file that never blocks the next
run. The file holds the holder's host and pid, for the refusal's message; a run that ends deletes
it, so a finished workdir holds nothing of it.
"""
import fcntl
import os
import socket

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from ml_collections import ConfigDict

from ftjax import ckpt, optim
from ftjax.errors import UserError

LOCK_FILE = "run.lock"


class Lock:
  """`with Lock() as lock: ... lock.take(workdir) ...`: the workdir stays locked until the block
  ends (or the process does)."""

  def __init__(self):
    self._file, self._made = None, []

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.release()

  def take(self, workdir: str):
    """Locks `workdir` for this run, or raises a UserError naming the run that holds it. With
    several processes, process 0 locks and tells the others, so all stop or none."""
    refusal = None
    if jax.process_index() == 0:
      try:
        holder = self._try(workdir)
      except UserError as e:
        refusal = e
      else:
        if holder is not None:
          refusal = UserError(f"{workdir}: another run is training in it ({holder}); wait for "
                              "it to end or stop it (SIGTERM saves its step), or use another "
                              "--config.workdir")
    if jax.process_count() > 1:
      refused = int(multihost_utils.broadcast_one_to_all(np.int32(refusal is not None)))
      if refused and refusal is None:
        refusal = UserError(f"{workdir}: process 0 could not lock it for this run (its error "
                            "says why)")
    if refusal is not None:
      raise refusal

  def _try(self, workdir: str) -> str | None:
    """None once locked; else who holds the lock ("host H, pid P")."""
    unusable = ckpt.workdir_error(workdir, 0)  # a file, read-only, full: one line, first
    if unusable is not None:
      raise unusable
    path = os.path.join(workdir, LOCK_FILE)
    self._made = _missing_dirs(workdir)  # removed again if the run ends with them empty
    try:
      while True:
        os.makedirs(workdir, exist_ok=True)
        f = open(path, "a+")
        try:
          fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
          f.seek(0)
          holder = f.read().strip() or "its host and pid not yet written"
          f.close()
          return holder
        if _same_file(f, path):
          break
        f.close()  # the holder deleted the file as we opened it: lock the one at the path now
      self._file, self._path = f, path
      f.seek(0)
      f.truncate()
      f.write(f"host {socket.gethostname()}, pid {os.getpid()}\n")
      f.flush()
    except OSError as e:
      self.release()
      if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UserError(f"{workdir}: is a file, not a directory; use another --config.workdir") \
            from None
      raise UserError(f"{workdir}: cannot write in it ({e.strerror or e}); free space or fix its "
                      "permissions, or use another --config.workdir") from None
    return None

  def release(self):
    """Deletes the file while still holding it (a run waiting on the old file then finds it gone
    and retries), then unlocks: a finished run leaves no lock file, and a run that wrote nothing
    leaves no workdir it created."""
    if self._file is not None:
      try:
        os.unlink(self._path)
      except OSError:
        pass
      self._file.close()  # closing the descriptor drops the flock
      self._file = None
    for d in self._made:  # a run refused before writing anything leaves no empty workdir
      try:
        os.rmdir(d)
      except OSError:
        break
    self._made = []


def _missing_dirs(path: str) -> list[str]:
  """`path` and those of its parents that do not exist yet, deepest first."""
  out, path = [], os.path.abspath(path)
  while not os.path.exists(path):
    out.append(path)
    path = os.path.dirname(path)
  return out


def _same_file(f, path: str) -> bool:
  try:
    return os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
  except FileNotFoundError:
    return False


def schedule_note(mngr, step: int, cfg) -> str:
  """What a resume changes in the learning rate: "" when the schedule at `step` is the saved
  run's; else "; train.steps 400 -> 800 recomputes the learning-rate schedule: lr at step 100 was
  X, now Y" (train.steps and optim.* may change on resume; the schedule follows them)."""
  saved = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  old = saved.get("config") or {}
  old_steps = (old.get("train") or {}).get("steps")
  old_optim = old.get("optim")
  if old_steps is None or old_optim is None:
    return ""
  was = float(optim.learning_rate(ConfigDict(old_optim), int(old_steps))(step))
  now = float(optim.learning_rate(cfg.optim, cfg.train.steps)(step))
  changed = [f"train.steps {old_steps} -> {cfg.train.steps}"] if old_steps != cfg.train.steps \
      else []
  changed += [f"optim.{k} {old_optim.get(k)!r} -> {cfg.optim[k]!r}"
              for k in ("lr", "warmup_steps", "schedule") if old_optim.get(k) != cfg.optim[k]]
  if not changed:
    return ""
  return (f"; {', '.join(changed)} recomputes the learning-rate schedule: lr at step {step} was "
          f"{was:.3e}, now {now:.3e}")
