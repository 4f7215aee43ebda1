"""python -m ftjax.train --config=configs/NAME.py [--config.a.b=value ...]

Fine-tunes LoRA adapters on a frozen (optionally quantized) base. Rerunning the same command resumes
from the newest checkpoint in `workdir`; SIGTERM saves the current step and exits 0.

The run's seams each have a module: prepare (checks, mesh, data, base, state), loop (the steps),
evaluation (eval loss, exact match), signals (SIGTERM / Ctrl-C), distributed (multi-host init).
"""
import functools

from absl import app, flags, logging
import jax
import numpy as np
from ml_collections import config_flags

from ftjax import ckpt, distributed, lora, objectives, optim, plan as plan_lib, sharding
from ftjax import step as step_lib
from ftjax import workdir as workdir_lib
from ftjax.errors import UserError, parse_flags, run_cli
from ftjax.evaluation import eval_losses, eval_metrics, eval_step_fn, report_exact_match
from ftjax.loop import train_loop
from ftjax.metrics import MetricWriter, ProgressBar, log0
from ftjax.prepare import make_adapters, prepare
from ftjax.signals import StopSignals

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file.", lock_config=True)
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0, for multi-host runs.")
flags.DEFINE_integer("num_processes", None, "Number of processes (hosts) in a multi-host run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run.")
FLAGS = flags.FLAGS


def run(cfg) -> dict:
  """Trains as `cfg` says; returns the last logged metrics."""
  with workdir_lib.Lock() as lock:  # one live run per workdir, until this one ends
    return _run(cfg, lock)


def _run(cfg, lock) -> dict:
  r = prepare(cfg, lock)
  if r is None:
    return {}
  cfg, mesh = r.cfg, r.mesh
  optimizer = optim.make_optimizer(cfg.optim, cfg.train.steps)
  shardings = jax.tree.map(lambda x: x.sharding, r.state)
  remat, remat_line = plan_lib.resolve_remat(cfg, mesh)  # "auto": the cheapest that fits
  log0(remat_line)
  objective = objectives.from_config(cfg)
  reference = reference_adapters(r) if objective.reference else None
  jitted_step = sharding.with_mesh(mesh, jax.jit(  # the mesh turns on activation constraints
      functools.partial(step_lib.train_step, adapters=r.adapters, optimizer=optimizer,
                        grad_accum=cfg.train.grad_accum, remat=remat,
                        skip_nonfinite=cfg.train.skip_nonfinite, objective=objective),
      donate_argnums=0, out_shardings=(shardings, sharding.replicated(mesh))))
  train_step = lambda state, model, batch: jitted_step(state, model, batch, reference)
  eval_fn = eval_step_fn(r.adapters, mesh, objective, reference)
  eval_loss = lambda state: eval_metrics(eval_fn, state["adapters"], r.model, r.data, cfg, mesh,
                                         r.host_table)

  writer = MetricWriter(cfg.workdir, r.first, enabled=jax.process_index() == 0)
  try:
    if cfg.train.eval_generate and r.data.eval_rows and r.first == 0:
      # where training starts: the base, or the base with lora.init_from's adapter
      start = lora.with_params(r.adapters, r.state["adapters"]) if cfg.lora.init_from else None
      report_exact_match(r, writer, start, "before training", 0)
    bar = ProgressBar(r.first, cfg.train.steps, enabled=jax.process_index() == 0)
    with StopSignals(multiprocess=jax.process_count() > 1) as stop:
      last, state, evaluated = train_loop(r, train_step, eval_loss, writer, bar, stop)
    bar.close()
    if stop.name is not None:
      log0(f"{stop.name}: saved step {int(jax.device_get(state['step']))} to {cfg.workdir}; "
           "rerun the same command to resume")
      return last
    if r.data.eval_examples and not evaluated:  # the loop's last eval may already be this one
      ev = eval_loss(state)
      writer.write(cfg.train.steps, ev)
      last.update(eval_losses(ev))
    if "eval_loss" in last:
      log0(f"final eval_loss {last['eval_loss']:.4f} (perplexity {np.exp(last['eval_loss']):.2f})")
    if cfg.train.eval_generate and r.data.eval_rows:
      last.update(report_exact_match(
          r, writer, lora.with_params(r.adapters, state["adapters"]), "after training",
          cfg.train.steps))
    return last
  finally:
    writer.close()
    ckpt.finish(r.mngr)  # a run stopped by an error still completes the checkpoint in flight


def reference_adapters(r):
  """DPO's reference beside the base: lora.init_from's adapter factors as loaded at step 0 (read
  again, so a resumed run has the same reference), placed as the trained ones are; None (the
  base alone) for a fresh adapter, whose zero B makes step 0 the base exactly."""
  if not r.cfg.lora.init_from:
    return None
  params = make_adapters(r.cfg, r.model.spec, None, r.data.names).params
  return jax.device_put(params, sharding.adapter_shardings(r.mesh, r.model.spec, params))


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}")
  if _CONFIG.value is None:
    raise UserError("--config=configs/NAME.py is required")
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  distributed.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                     FLAGS.process_id)
  run(_CONFIG.value)


if __name__ == "__main__":
  app.run(run_cli(main), flags_parser=parse_flags)
