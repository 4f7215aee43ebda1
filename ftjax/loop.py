"""The training loop: steps, logging, eval, checkpoints, and the one sync per logged step."""
import collections
import concurrent.futures
import time

import jax
import jax.numpy as jnp
import numpy as np

from ftjax import ckpt, lora, optim, sharding
from ftjax.errors import UserError
from ftjax.evaluation import eval_losses
from ftjax.metrics import per_adapter
from ftjax.model import expert_load
from ftjax.prepare import Run


# Steps queued on the device ahead of the one the host waits for. The host waits for step n - 2
# to finish (no transfer, only its completion) once step n is queued, so the device always has
# work and a stop (checked every step) waits for at most the steps already queued, not for every
# step up to the next log step (minutes with slow steps).
IN_FLIGHT = 2


def train_loop(r: Run, train_step, eval_loss, writer, bar, stop):
  """Steps r.first+1 .. train.steps. The device is never waited for between steps except where
  the host must know a value: log steps, evals, checkpoints, a stop; and the host stays at most
  IN_FLIGHT steps ahead of the device. The next batch is built and placed in a background thread
  while the device runs the current step.

  Returns (last logged metrics, final state, whether the last step was just evaluated)."""
  cfg, state = r.cfg, r.state
  n_proc, me = jax.process_count(), jax.process_index()

  def make_batch(position):
    host = r.data.train(position, me, n_proc)
    return sharding.place_batch(host, r.mesh, r.host_table), int(np.sum(host["segment_ids"] > 0)) * n_proc

  load_fn = _expert_load_fn(r) if r.model.spec.n_experts else None
  last, evaluated, tokens, t_log = {}, False, 0, time.time()
  queued = collections.deque()  # the newest steps' metrics: done when their step is
  position = int(jax.device_get(state["data_position"]))
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    upcoming = pool.submit(make_batch, position)
    for done in range(r.first + 1, cfg.train.steps + 1):
      batch, n_tokens = upcoming.result()
      state, metrics = train_step(state, r.model, batch)
      position += 1
      tokens += n_tokens
      if done < cfg.train.steps:
        upcoming = pool.submit(make_batch, position)
      queued.append(metrics)
      if len(queued) > IN_FLIGHT:
        jax.block_until_ready(queued.popleft())  # step done - IN_FLIGHT finished; nothing read
      stopping = stop.requested(done)
      log = done % cfg.train.log_every == 0 or done == cfg.train.steps
      evaluate_now = bool(r.data.eval_examples and cfg.train.eval_every
                          and done % cfg.train.eval_every == 0)
      save = done % cfg.ckpt.every == 0 or done == cfg.train.steps or stopping
      if not (log or evaluate_now or save):
        continue
      guard, metrics = jax.device_get((state["guard"], metrics))  # the one sync of this step
      check_finite(r, guard)
      if log:
        dt = time.time() - t_log
        last = {"loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
                "lr": float(optim.learning_rate(cfg.optim, cfg.train.steps)(done - 1)),
                "tokens_per_s": tokens / max(dt, 1e-9),
                "skipped_nonfinite": int(guard["skipped"]), **per_adapter(metrics, r.data.names),
                **{k: float(v) for k, v in metrics["objective"].items()}}  # TRL's names
        if load_fn is not None:  # a mixture of experts: routing collapse shows here
          last.update(load_fn(state["adapters"], r.model, batch))
        writer.write(done, last)
        tokens, t_log = 0, time.time()
      evaluated = evaluate_now
      if evaluate_now:
        ev = eval_loss(state)
        writer.write(done, ev)
        last = {**last, **eval_losses(ev)}
      if log or evaluate_now:
        bar.update(done, last)
      if save:
        ckpt.save(r.mngr, {k: v for k, v in state.items() if k != "guard"}, r.meta, force=True)
      if stopping:
        break
  ckpt.wait(r.mngr)
  return last, state, evaluated


def _expert_load_fn(r: Run):
  """(adapter factors, model, batch) -> {"expert_load_max", "expert_load_min"}: the largest and
  smallest share of routed tokens any expert of any layer took in this batch (1/E each when
  balanced; near 1 is a collapse, 0 a dead expert). One extra forward pass, at log steps only."""
  def loads(params, model, batch):
    load = expert_load(model, batch["tokens"], lora.with_params(r.adapters, params),
                       batch["segment_ids"], adapter_ids=batch.get("adapter_ids"),
                       embeds=batch.get("embeds"))
    return jnp.max(load), jnp.min(load)
  fn = sharding.with_mesh(r.mesh, jax.jit(loads))
  return lambda params, model, batch: dict(zip(("expert_load_max", "expert_load_min"),
                                               map(float, fn(params, model, batch))))


def check_finite(r: Run, guard):
  """Stops at the first non-finite step (unless train.skip_nonfinite). The step froze the state
  there, so however late this is read, the adapters are those from before that step."""
  bad = int(guard["halted_at"])
  if not bad:
    return
  name = "loss" if not np.isfinite(float(guard["loss"])) else "grad_norm"
  ckpt.wait(r.mngr)  # let the save in flight finish: the checkpoints stay as they were
  raise UserError(f"step {bad}: non-finite {name} ({float(guard[name])}); stopped "
                  "before applying it, checkpoints untouched. Lower optim.lr (or raise "
                  "optim.warmup_steps), or set train.skip_nonfinite=True to skip such steps")
