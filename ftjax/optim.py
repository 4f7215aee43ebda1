"""AdamW over the adapter tree only, with warmup then cosine / linear / constant decay."""
import optax

from ftjax.errors import UserError

SCHEDULES = ("cosine", "linear", "constant")


def learning_rate(cfg_optim, total_steps: int) -> optax.Schedule:
  lr, warmup = cfg_optim.lr, min(cfg_optim.warmup_steps, total_steps)
  decay_steps = max(total_steps - warmup, 1)
  if cfg_optim.schedule == "cosine":
    decay = optax.cosine_decay_schedule(lr, decay_steps)
  elif cfg_optim.schedule == "linear":
    decay = optax.linear_schedule(lr, 0.0, decay_steps)
  elif cfg_optim.schedule == "constant":
    decay = optax.constant_schedule(lr)
  else:
    raise UserError(f"optim.schedule={cfg_optim.schedule!r}: use one of {SCHEDULES}")
  if not warmup:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def make_optimizer(cfg_optim, total_steps: int) -> optax.GradientTransformation:
  schedule = learning_rate(cfg_optim, total_steps)
  parts = [optax.clip_by_global_norm(cfg_optim.clip_norm)] if cfg_optim.clip_norm else []
  parts.append(optax.adamw(schedule, weight_decay=cfg_optim.weight_decay))
  return optax.chain(*parts)
