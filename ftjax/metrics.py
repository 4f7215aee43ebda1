"""What a run shows: a progress bar on the terminal, workdir/metrics.jsonl, TensorBoard events."""
import json
import os

import jax
import numpy as np
import tqdm


class MetricWriter:
  """One JSON object per logged step in metrics.jsonl, and the same scalars for TensorBoard."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    from tensorboardX import SummaryWriter
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

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


class ProgressBar:
  """step / total with loss, tokens/s and ETA; silent on every process but 0."""

  def __init__(self, first: int, total: int, enabled: bool = True):
    self._bar = tqdm.tqdm(total=total, initial=first, unit="step", dynamic_ncols=True,
                          disable=not enabled, mininterval=0.5)

  def update(self, step: int, metrics: dict):
    self._bar.update(step - self._bar.n)
    self._bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}",
                          refresh=False)

  def note(self, text: str):
    if not self._bar.disable:  # tqdm.write prints even when the bar is disabled
      self._bar.write(text)

  def close(self):
    self._bar.close()


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
