"""The loss and the one jitted train step: pure functions of (state, base, batch).

state = {"adapters", "opt_state", "step", "rng", "data_position"}: everything that is trained or
advances, and nothing else; the frozen base is a separate, never-donated argument with no gradient
and no optimizer state. Gradient accumulation sums token losses over micro-batches and divides once
by the number of target tokens of the whole batch, so the loss scale does not drift with padding.
"""
import functools

import jax
import jax.numpy as jnp
import optax

from ftjax import lora as lora_lib
from ftjax.model import Model, hidden_states, logits_from_hidden

LOSS_CHUNK = 1024  # tokens per cross-entropy chunk: [chunk, V] float32 logits live at a time


def chunked_cross_entropy(spec, params, h, targets, mask, chunk=LOSS_CHUNK):
  """Sum over tokens of mask * -log p(target), without materializing [B*T, V] logits.

  h [B, T, D] final hidden states; targets int [B, T]; mask float [B, T]. Each chunk's logits are
  recomputed in the backward pass (jax.checkpoint), so peak memory is one chunk of logits.
  """
  d = h.shape[-1]
  h, targets, mask = h.reshape(-1, d), targets.reshape(-1), mask.reshape(-1).astype(jnp.float32)
  n = h.shape[0]
  chunk = min(chunk, n)
  pad = -n % chunk
  if pad:
    h = jnp.pad(h, ((0, pad), (0, 0)))
    targets, mask = jnp.pad(targets, (0, pad)), jnp.pad(mask, (0, pad))
  h = h.reshape(-1, chunk, d)
  targets, mask = targets.reshape(-1, chunk), mask.reshape(-1, chunk)

  @jax.checkpoint
  def one(hc, tc, mc):
    logits = logits_from_hidden(spec, params, hc)
    nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, tc[:, None], -1)[:, 0]
    return jnp.sum(nll * mc)

  def body(total, xs):
    return total + one(*xs), None

  total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (h, targets, mask))
  return total


def loss_sum(adapter_params, adapters: lora_lib.Adapters, model: Model, batch, dropout_key, remat):
  """(sum of token losses, number of target tokens) of one (micro-)batch."""
  adapters = lora_lib.with_params(adapters, adapter_params)
  h = hidden_states(model, batch["tokens"], adapters, batch["segment_ids"],
                    dropout_key=dropout_key, remat=remat)
  total = chunked_cross_entropy(model.spec, model.params, h, batch["targets"], batch["loss_mask"])
  return total, jnp.sum(batch["loss_mask"].astype(jnp.float32))


def train_step(state, model: Model, batch, *, adapters: lora_lib.Adapters,
               optimizer: optax.GradientTransformation, grad_accum: int, remat: str,
               skip_nonfinite: bool):
  """One optimizer step over `batch` ([B, T] arrays) split into `grad_accum` micro-batches.

  A non-finite loss or gradient never reaches the state: the update is dropped and the metric
  `nonfinite` says so; the loop then stops or counts it (train.skip_nonfinite).
  """
  rng, dropout_key = jax.random.split(state["rng"])
  micro = jax.tree.map(lambda x: x.reshape((grad_accum, -1) + x.shape[1:]), batch)
  grad_fn = jax.value_and_grad(loss_sum, has_aux=True)

  def accumulate(carry, xs):
    i, mb = xs
    (total, count), grads = grad_fn(state["adapters"], adapters, model, mb,
                                    jax.random.fold_in(dropout_key, i), remat)
    g_acc, l_acc, n_acc = carry
    return (jax.tree.map(jnp.add, g_acc, grads), l_acc + total, n_acc + count), None

  zeros = jax.tree.map(jnp.zeros_like, state["adapters"])
  (grads, total, count), _ = jax.lax.scan(
      accumulate, (zeros, jnp.zeros(()), jnp.zeros(())), (jnp.arange(grad_accum), micro))
  denom = jnp.maximum(count, 1.0)
  grads = jax.tree.map(lambda g: g / denom, grads)
  loss = total / denom
  grad_norm = optax.tree.norm(grads)
  updates, new_opt = optimizer.update(grads, state["opt_state"], state["adapters"])
  new_adapters = optax.apply_updates(state["adapters"], updates)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  new_state = {
      "adapters": keep(new_adapters, state["adapters"]),
      "opt_state": keep(new_opt, state["opt_state"]),
      "step": state["step"] + 1,
      "rng": rng,
      "data_position": state["data_position"] + 1,
  }
  metrics = {"loss": loss, "grad_norm": grad_norm, "target_tokens": count,
             "nonfinite": jnp.logical_not(finite)}
  return new_state, metrics


def eval_step(adapter_params, model: Model, batch, *, adapters: lora_lib.Adapters):
  """(sum of token losses, target tokens) without dropout; the caller sums over the eval set."""
  return loss_sum(adapter_params, adapters, model, batch, None, "none")


def init_state(adapters: lora_lib.Adapters, optimizer, seed: int):
  return {
      "adapters": adapters.params,
      "opt_state": optimizer.init(adapters.params),
      "step": jnp.zeros((), jnp.int32),
      "rng": jax.random.PRNGKey(seed),
      "data_position": jnp.zeros((), jnp.int32),
  }
