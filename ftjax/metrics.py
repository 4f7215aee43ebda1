"""What a run shows: a progress bar (or plain lines), workdir/metrics.jsonl, TensorBoard events."""
import json
import os
import sys
import time

import jax
import numpy as np
import tqdm


class MetricWriter:
  """One JSON object per logged step in metrics.jsonl, and the same scalars for TensorBoard.

  A run that starts at step `first` (resumed, or 0) first drops what an earlier process logged
  past it (steps it ran after its last checkpoint, or a whole run whose checkpoints were deleted),
  so no step is ever logged twice: the lines are rewritten, and TensorBoard purges those events.
  """

  def __init__(self, workdir: str, first: int = 0, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "metrics.jsonl")
    kept = _lines_up_to(path, first) if first > 0 else []
    with open(path + ".tmp", "w") as f:  # renamed over the old file: a kill here loses nothing
      f.writelines(kept)
    os.replace(path + ".tmp", path)
    self._jsonl = open(path, "a")
    from tensorboardX import SummaryWriter
    # purge_step: TensorBoard hides the events at and after it that earlier files hold
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=first + 1 if first
                             else 0)

  def write(self, step: int, metrics: dict):
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
    self._jsonl.flush()
    for k, v in metrics.items():
      self._tb.add_scalar(k, v, step)

  def close(self):
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


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
