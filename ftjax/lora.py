"""LoRA adapters: a pytree of their own, beside the frozen base, whose paths mirror it.

For each targeted projection with kernel (in, out), stacked over layers like the base:
`a: [L, in, R]` (kaiming-uniform, as PEFT) and `b: [L, R, out]` (zeros), so step 0 equals the base.
Experts' kernels [L, E, in, out] get one pair per expert: `a: [L, E, in, R]`, `b: [L, E, R, out]`.
The forward adds `((x @ a) @ b) * scale` with scale = alpha / R, or alpha / sqrt(R) with rsLoRA.

Several adapters of one shape (same targets, rank, alpha) stack on an adapter axis A after the
layer axis: `a: [L, A, in, R]`, `b: [L, A, R, out]`, named by `names`. The forward then takes
`adapter_ids` [B], one adapter per row (-1: the base alone), so one pass of the frozen base serves
rows of many adapters, in training and in decoding alike.
"""
import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from ftjax.errors import UserError
from ftjax.model import ModelSpec

ALL_LINEAR = "all-linear"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Adapters:
  """params: {name: {"a": [L, in, R], "b": [L, R, out]}}; the rest is static config."""
  params: Any
  rank: int = dataclasses.field(metadata=dict(static=True))
  alpha: float = dataclasses.field(metadata=dict(static=True))
  rslora: bool = dataclasses.field(default=False, metadata=dict(static=True))
  dropout: float = dataclasses.field(default=0.0, metadata=dict(static=True))
  names: tuple[str, ...] = dataclasses.field(default=(), metadata=dict(static=True))  # stacked

  @property
  def scale(self) -> float:
    return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

  @property
  def targets(self) -> tuple[str, ...]:
    return tuple(self.params)

  @property
  def stacked(self) -> bool:
    """Whether the factors carry an adapter axis (several adapters, chosen per row)."""
    return bool(self.names)


def _matches(target: str, projection: str) -> bool:
  """Whether lora.targets' `target` names `projection`: exactly, or by its last part as PEFT's
  target_modules do (gate_proj / up_proj / down_proj name the experts' and the shared
  expert's; the experts hold gate and up fused, so either names experts.gate_up_proj)."""
  if target == projection:
    return True
  last = projection.split(".")[-1]
  return target == last or (projection == "experts.gate_up_proj" and
                            target in ("gate_proj", "up_proj"))


def resolve_targets(spec: ModelSpec, targets: str) -> tuple[str, ...]:
  """"all-linear" or "q_proj,v_proj" -> the projections of this architecture, in layer order
  (a MoE's router last). On a mixture of experts all-linear includes every expert; the router
  `gate` only when named (`gate` alone: `gate_proj` names the experts' gates): adapting it
  changes which experts each token reaches, which a user asks for explicitly."""
  if targets.strip() == ALL_LINEAR:
    return spec.projections
  names = tuple(t.strip() for t in targets.split(",") if t.strip())
  unknown = [t for t in names if not any(_matches(t, p) for p in spec.adaptable)]
  if unknown or not names:
    hint = ""
    if any(t.startswith(("experts", "shared_expert")) or t == "gate" for t in unknown):
      hint = f"; {spec.arch} is a dense model, without experts or router"
    raise UserError(f"lora.targets={targets!r}: {unknown or 'empty'} not among the {spec.arch} "
                    f"projections {list(spec.adaptable)} (or use 'all-linear'){hint}")
  return tuple(p for p in spec.adaptable if any(_matches(t, p) for t in names))


def init(spec: ModelSpec, targets: str | tuple[str, ...], rank: int, alpha: float, key, *,
         rslora: bool = False, dropout: float = 0.0, dtype=jnp.float32) -> Adapters:
  """PEFT's default init: a ~ U(+-1/sqrt(in)) (kaiming-uniform, a=sqrt(5)), b = 0."""
  if rank <= 0:
    raise UserError(f"lora.rank={rank}: must be a positive integer")
  if isinstance(targets, str):
    targets = resolve_targets(spec, targets)
  params = {}
  for i, name in enumerate(targets):
    d_in, d_out = spec.projection_shape(name)
    # experts: one pair per expert; a mixed model's MLP parts: their layers only
    lead = (len(spec.layers_of(name)),) + spec.projection_lead(name)
    bound = 1.0 / math.sqrt(d_in)
    a = jax.random.uniform(jax.random.fold_in(key, i), lead + (d_in, rank), dtype, -bound, bound)
    params[name] = {"a": a, "b": jnp.zeros(lead + (rank, d_out), dtype)}
  return Adapters(params, rank=rank, alpha=float(alpha), rslora=rslora, dropout=dropout)


def with_params(adapters: Adapters, params) -> Adapters:
  """The same adapter config around new factor arrays (e.g. the ones being optimized)."""
  return dataclasses.replace(adapters, params=params)


def stack(named: dict) -> Adapters:
  """{name: Adapters} of one shape -> one Adapters with an adapter axis, in the dict's order."""
  names, items = tuple(named), list(named.values())
  first = items[0]
  for name, ad in named.items():
    if (ad.targets, ad.rank, ad.alpha, ad.rslora) != (first.targets, first.rank, first.alpha,
                                                       first.rslora) or ad.stacked:
      raise UserError(f"adapter {name!r}: targets {list(ad.targets)} rank {ad.rank} alpha "
                      f"{ad.alpha} rslora {ad.rslora} differ from {names[0]!r}'s "
                      f"({list(first.targets)}, {first.rank}, {first.alpha}, {first.rslora}); "
                      "adapters decoded in one batch share one shape")
  params = jax.tree.map(lambda *xs: jnp.stack(xs, axis=1), *[ad.params for ad in items])
  return dataclasses.replace(first, params=params, names=names)


def unstack(adapters: Adapters) -> dict:
  """The inverse of `stack`: {name: Adapters without an adapter axis}."""
  return {name: dataclasses.replace(
      adapters, params=jax.tree.map(lambda x, i=i: x[:, i], adapters.params), names=())
          for i, name in enumerate(adapters.names)}
