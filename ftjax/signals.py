"""Stopping a run cleanly on SIGTERM (preemption) or Ctrl-C."""
import os
import signal
import sys


class StopSignals:
  """SIGTERM (a preemption) and Ctrl-C both end the run cleanly: the current step finishes, is
  saved, and the run exits 0. A second Ctrl-C aborts at once.

  With several processes, all must save the same step: jax's preemption service (which catches
  SIGTERM itself) agrees on it without a collective per step, and Ctrl-C is forwarded to it as a
  SIGTERM."""

  def __init__(self, multiprocess: bool):
    self.name, self._multi, self._previous = None, multiprocess, {}

  def __enter__(self):
    handlers = {signal.SIGINT: self._interrupt}
    if not self._multi:
      handlers[signal.SIGTERM] = self._terminate
    for sig, handler in handlers.items():
      self._previous[sig] = signal.signal(sig, handler)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def _terminate(self, signum, frame):
    self.name = self.name or "SIGTERM"

  def _interrupt(self, signum, frame):
    if self.name is not None:
      print("\nsecond Ctrl-C: aborted without saving this step; the newest complete checkpoint "
            "is intact", file=sys.stderr, flush=True)
      os._exit(130)
    self.name = "SIGINT"
    print("\nCtrl-C: finishing this step and saving (Ctrl-C again to abort)", file=sys.stderr,
          flush=True)
    if self._multi:
      os.kill(os.getpid(), signal.SIGTERM)  # to the preemption service, which tells the others

  def requested(self, step: int) -> bool:
    if self._multi:
      from jax.experimental import multihost_utils
      if multihost_utils.reached_preemption_sync_point(step):
        self.name = self.name or "SIGTERM"
        return True
      return False
    return self.name is not None
