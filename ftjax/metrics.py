"""What a run shows: a progress bar (or plain lines), workdir/metrics.jsonl, TensorBoard events."""
import contextlib
import json
import os
import sys
import time

import jax
import numpy as np
from tensorboardX import summary as tb_summary
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto.event_pb2 import Event, SessionLog
import tqdm

from ftjax import ckpt


class MetricWriter:
  """One JSON object per logged step in metrics.jsonl, and the same scalars for TensorBoard.

  A run that starts at step `first` (resumed, or 0) first drops what an earlier process logged
  past it (steps it ran after its last checkpoint, or a whole run whose checkpoints were deleted),
  so no step is ever logged twice: the lines are rewritten, and TensorBoard purges those events.
  TensorBoard events are written here, not by tensorboardX's writer thread, so that a full disk
  (or a read-only one) is one line naming the file, as for metrics.jsonl, instead of a dead thread
  and a run that hangs on its full queue.
  """

  def __init__(self, workdir: str, first: int = 0, enabled: bool = True):
    self.enabled = enabled
    self._jsonl = self._tb = None
    if not enabled:
      return
    self._path = os.path.join(workdir, "metrics.jsonl")
    with _storage(self._path):
      os.makedirs(workdir, exist_ok=True)
      kept = _lines_up_to(self._path, first) if first > 0 else []
      try:
        with open(self._path + ".tmp", "w") as f:  # renamed over the old file: a kill or a full
          f.writelines(kept)                       # disk here loses nothing
        os.replace(self._path + ".tmp", self._path)
      finally:
        if os.path.exists(self._path + ".tmp"):
          os.remove(self._path + ".tmp")
      self._jsonl = open(self._path, "a")
    self._tb_dir = os.path.join(workdir, "tensorboard")
    with _storage(self._tb_dir):
      os.makedirs(self._tb_dir, exist_ok=True)
      # tensorboardX names the file by the second: two runs in one second would share (and
      # truncate) one file without a suffix of their own
      self._tb = EventsWriter(os.path.join(self._tb_dir, "events"), f".{time.time_ns()}")
      # as tensorboardX's purge_step: TensorBoard hides the events at and after it that earlier
      # files hold
      purge = first + 1 if first else 0
      self._tb.write_event(Event(step=purge, file_version="brain.Event:2"))
      self._tb.write_event(Event(step=purge, session_log=SessionLog(status=SessionLog.START)))
      self._tb.flush()

  def write(self, step: int, metrics: dict):
    if not self.enabled:
      return
    with _storage(self._path):
      self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
      self._jsonl.flush()
    with _storage(self._tb_dir):
      for k, v in metrics.items():
        self._tb.write_event(Event(wall_time=time.time(), step=step,
                                   summary=tb_summary.scalar(k, v)))
      self._tb.flush()

  def close(self):
    for f in (self._jsonl, self._tb):
      try:
        if f is not None:
          f.close()
      except OSError:  # the failed write already stopped the run with its line; a cut last line
        pass          # is dropped when the run resumes


@contextlib.contextmanager
def _storage(path: str):
  """A write under `path` that the storage refuses (full, read-only, forbidden) as one line."""
  try:
    yield
  except OSError as e:
    error = ckpt.storage_error(path, e)
    if error is None:
      raise
    raise error from None


def _lines_up_to(path: str, step: int) -> list[str]:
  if not os.path.exists(path):
    return []
  kept = []
  with open(path) as f:
    for line in f:
      try:
        if json.loads(line)["step"] <= step:
          kept.append(line)
      except (ValueError, KeyError, TypeError):  # a line cut by a kill: it was never complete
        continue
  return kept


class ProgressBar:
  """step / total with the logged step's loss, lr, tokens/s, eval loss and the time left; a tqdm
  bar on a terminal, one plain line per log step otherwise (a log file gets lines, not a single
  line of carriage returns). Silent on every process but 0."""

  def __init__(self, first: int, total: int, enabled: bool = True, tty: bool | None = None):
    self.enabled, self._first, self._total = enabled, first, total
    self._tty = sys.stdout.isatty() if tty is None else tty
    self._t0 = time.time()
    self._bar = None
    if enabled and self._tty:
      self._bar = tqdm.tqdm(total=total, initial=first, unit="step", dynamic_ncols=True,
                            mininterval=0.5)

  def update(self, step: int, metrics: dict):
    if not self.enabled:
      return
    fields = {"loss": f"{metrics['loss']:.4f}", "lr": f"{metrics['lr']:.2e}",
              "tok/s": f"{metrics['tokens_per_s']:.0f}"} if "loss" in metrics else {}
    if "eval_loss" in metrics:
      fields["eval_loss"] = f"{metrics['eval_loss']:.4f}"
    if self._bar is not None:
      self._bar.set_postfix(fields, refresh=False)  # before update, which redraws with it
      self._bar.update(step - self._bar.n)
      return
    done = step - self._first
    left = (time.time() - self._t0) / max(done, 1) * (self._total - step)
    text = " ".join(f"{k} {v}" for k, v in fields.items())
    print(f"step {step}/{self._total} {text} left {_duration(left)}", flush=True)

  def close(self):
    if self._bar is not None:
      self._bar.close()


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  if seconds >= 3600:
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
  return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def by_adapter(key: str, values: dict) -> dict:
  """{adapter name: value} -> {key: value} for one unnamed adapter (""); for several, each as
  `key/NAME` and their mean as `key`."""
  if list(values) == [""]:
    return {key: values[""]}
  return {key: float(np.mean(list(values.values()))),
          **{f"{key}/{name}": value for name, value in values.items()}}


def per_adapter(metrics: dict, names: tuple) -> dict:
  """The train step's per-adapter metrics ([A] arrays) as `loss/NAME`, `grad_norm/NAME`, ...;
  {} for a run of one unnamed adapter."""
  if not names:
    return {}
  per = jax.device_get(metrics["per_adapter"])
  return {f"{key}/{name}": float(values[i]) for key, values in per.items()
          for i, name in enumerate(names)}


def log0(msg):
  if jax.process_index() == 0:
    print(msg, flush=True)
