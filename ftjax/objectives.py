"""Training objectives: pure loss functions of sequence log-probabilities, one signature, chosen
once by `train.objective` (`from_config`). The step calls the one it is given; nothing else asks
which it is.

Every objective maps (policy: Seqs, reference: Seqs | None, hp: Hyper) to Terms: a loss per pair,
a loss summed over each pair's chosen tokens, and per-pair metrics. The step normalizes the first
by the batch's pairs and the second by the batch's chosen tokens (both counted over the whole
batch, before the micro-batches), so gradient accumulation never changes the loss. SFT is the
same shape with the batch as one "chosen" sequence: its token term is today's token loss.

Formulas and metric names follow TRL 1.x (DPOTrainer; ORPO and CPO/SimPO in trl.experimental):
  dpo/sigmoid  -(1-e) logsig(b d) - e logsig(-b d),  d = (pc - rc) - (pr - rr), sums over tokens
               (e = preference.label_smoothing: conservative DPO; TRL's sigmoid is e = 0)
  dpo/ipo      (d' - 1/(2b))^2 with d' the same difference of per-token means (TRL's IPO)
  orpo         nll(chosen) - b logsig(log odds(mean pc) - log odds(mean pr))
  simpo        -(1-e) logsig(b (mean pc - mean pr) - gamma) - e logsig(-(...))
"""
import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from ftjax.errors import UserError


class Seqs(NamedTuple):
  """Summed log-probabilities of each pair's completions, and their token counts (float)."""
  chosen: jax.Array
  rejected: jax.Array
  chosen_n: jax.Array
  rejected_n: jax.Array


class Terms(NamedTuple):
  pair: jax.Array   # loss of each pair: the step divides the sum by the batch's pairs
  token: jax.Array  # loss summed over each pair's chosen tokens: divided by the batch's tokens
  metrics: dict     # TRL's name -> value per pair (the step reports the mean over pairs)


@dataclasses.dataclass(frozen=True)
class Hyper:
  beta: float = 0.1
  loss: str = "sigmoid"
  label_smoothing: float = 0.0
  simpo_gamma: float = 0.5


def _mean(logps, n):
  return logps / jnp.maximum(n, 1.0)


def _rewards(chosen_r, rejected_r, chosen_logps, rejected_logps) -> dict:
  return {"rewards/chosen": chosen_r, "rewards/rejected": rejected_r,
          "rewards/margins": chosen_r - rejected_r,
          "rewards/accuracies": (chosen_r > rejected_r).astype(jnp.float32),
          "logps/chosen": chosen_logps, "logps/rejected": rejected_logps}


def _smoothed(logits, e):
  return -(1.0 - e) * jax.nn.log_sigmoid(logits) - e * jax.nn.log_sigmoid(-logits)


def sft(policy: Seqs, reference, hp: Hyper) -> Terms:
  """Next-token cross-entropy of the targets: -log p summed, normalized per target token."""
  del reference, hp
  return Terms(jnp.zeros_like(policy.chosen), -policy.chosen, {})


def dpo(policy: Seqs, reference: Seqs, hp: Hyper) -> Terms:
  chosen_ratio = policy.chosen - reference.chosen
  rejected_ratio = policy.rejected - reference.rejected
  if hp.loss == "ipo":  # TRL normalizes IPO's log ratios per completion token
    d = _mean(chosen_ratio, policy.chosen_n) - _mean(rejected_ratio, policy.rejected_n)
    loss = jnp.square(d - 1.0 / (2.0 * hp.beta))
  else:
    loss = _smoothed(hp.beta * (chosen_ratio - rejected_ratio), hp.label_smoothing)
  metrics = _rewards(hp.beta * chosen_ratio, hp.beta * rejected_ratio, policy.chosen,
                     policy.rejected)
  return Terms(loss, jnp.zeros_like(loss), metrics)


def _log1mexp(x):
  """log(1 - exp(x)) for x < 0, accurate at both ends."""
  return jnp.where(x > -0.693, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def orpo(policy: Seqs, reference, hp: Hyper) -> Terms:
  del reference
  pc, pr = _mean(policy.chosen, policy.chosen_n), _mean(policy.rejected, policy.rejected_n)
  log_odds = (pc - pr) - (_log1mexp(pc) - _log1mexp(pr))
  ratio = jax.nn.log_sigmoid(log_odds)
  metrics = {**_rewards(hp.beta * pc, hp.beta * pr, pc, pr), "log_odds_ratio": ratio,
             "log_odds_chosen": log_odds, "nll_loss": -policy.chosen}
  return Terms(-hp.beta * ratio, -policy.chosen, metrics)


def simpo(policy: Seqs, reference, hp: Hyper) -> Terms:
  del reference
  pc, pr = _mean(policy.chosen, policy.chosen_n), _mean(policy.rejected, policy.rejected_n)
  loss = _smoothed(hp.beta * (pc - pr) - hp.simpo_gamma, hp.label_smoothing)
  return Terms(loss, jnp.zeros_like(loss), _rewards(hp.beta * pc, hp.beta * pr, pc, pr))


# Metrics that are sums over chosen tokens (TRL's ORPO nll_loss is a mean over the batch's tokens).
PER_TOKEN = ("nll_loss",)


def finish(sums: dict) -> dict:
  """Sums over pairs (of one batch, or a whole eval set) -> the loss and TRL's metrics.

  sums: "pair", "token" (the two loss terms summed), "pairs", "tokens" (their counts) and each
  metric's sum; [A] arrays (one per stacked adapter) or scalars."""
  pairs, tokens = jnp.maximum(sums["pairs"], 1.0), jnp.maximum(sums["tokens"], 1.0)
  out = {"loss": sums["pair"] / pairs + sums["token"] / tokens}
  for k, v in sums.items():
    if k not in ("pair", "token", "pairs", "tokens"):
      out[k] = v / (tokens if k in PER_TOKEN else pairs)
  return out


class Objective(NamedTuple):
  name: str
  fn: Callable
  hp: Hyper
  pairs: bool      # reads preference pairs (data.format=preference)
  reference: bool  # needs the reference model's log-probabilities

  def __call__(self, policy: Seqs, reference: Seqs | None) -> Terms:
    return self.fn(policy, reference, self.hp)


SFT = Objective("sft", sft, Hyper(), False, False)  # what a step does unless told otherwise
TABLE = {"sft": (sft, False, False), "dpo": (dpo, True, True), "orpo": (orpo, True, False),
         "simpo": (simpo, True, False)}
LOSSES = ("sigmoid", "ipo")


def from_config(cfg) -> Objective:
  """train.objective and preference.* -> the Objective; a bad value is a UserError naming it."""
  name, p = cfg.train.objective, cfg.preference
  if name not in TABLE:
    raise UserError(f"train.objective={name!r}: unknown; use one of {', '.join(TABLE)}")
  hp = Hyper(beta=float(p.beta), loss=p.loss, label_smoothing=float(p.label_smoothing),
             simpo_gamma=float(p.simpo_gamma))
  if name == "sft":
    changed = [k for k, v in dataclasses.asdict(hp).items() if v != getattr(Hyper(), k)]
    if changed:
      raise UserError(f"preference.{changed[0]} is set but train.objective=sft ignores it; set "
                      "train.objective=dpo, orpo or simpo, or drop the key")
  if hp.loss not in LOSSES:
    raise UserError(f"preference.loss={hp.loss!r}: use one of {', '.join(LOSSES)}")
  if hp.loss != "sigmoid" and name != "dpo":
    raise UserError(f"preference.loss={hp.loss!r} is DPO's; train.objective={name} has one loss")
  if hp.beta <= 0:
    raise UserError(f"preference.beta={hp.beta}: must be positive")
  if not 0.0 <= hp.label_smoothing < 0.5:
    raise UserError(f"preference.label_smoothing={hp.label_smoothing}: must be in [0, 0.5)")
  fn, pairs, reference = TABLE[name]
  return Objective(name, fn, hp, pairs, reference)
