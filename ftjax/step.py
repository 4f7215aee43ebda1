"""The loss and the one jitted train step: pure functions of (state, base, batch).

state = {"adapters", "opt_state", "step", "rng", "data_position", "guard"}: everything that is
trained or advances, and nothing else (the guard of non-finite steps is not checkpointed); the
frozen base is a separate, never-donated argument with no gradient and no optimizer state. Gradient accumulation sums token losses over micro-batches and divides once
by the number of target tokens of the whole batch, so the loss scale does not drift with padding.
With stacked adapters (several trained in one run) each adapter is normalized by its own tokens.
"""
import functools

import jax
import jax.numpy as jnp
import optax

from ftjax import attention, kernels as kernels_lib, lora as lora_lib, objectives
from ftjax.errors import UserError
from ftjax.model import Kernels, Model, ModelSpec, hidden_states

# One loss tile is [TOKEN_CHUNK, VOCAB_CHUNK] float32 logits (64 MiB); a few live at a time, so the
# loss never costs more than ~200 MiB whatever the vocabulary (Llama 3: 128k -> 16 tiles per chunk).
TOKEN_CHUNK = 2048
VOCAB_CHUNK = 8192


def chunked_cross_entropy(spec, params, h, targets, mask, token_chunk=TOKEN_CHUNK,
                          vocab_chunk=VOCAB_CHUNK):
  """Sum over tokens of mask * -log p(target), without materializing [B*T, V] logits.

  h [B, T, D] final hidden states; targets int [B, T]; mask float [B, T], or [B, T, A] for one
  sum per adapter ([A], each over its own column of the mask). The logits are computed
  tile by tile ([token_chunk, vocab_chunk]) with an online logsumexp; the backward pass recomputes
  each tile from h and the per-token logsumexp, and returns only dh: the output projection is
  frozen. When everything is one tile, the forward keeps that tile's gradient instead (no
  recompute, the same peak).
  """
  d = h.shape[-1]
  tied = spec.tie_embeddings
  w = params["embed"]["embedding"] if tied else params["lm_head"]["kernel"]  # [V, D] | [D, V]
  h2 = h.reshape(-1, d)
  n = h2.shape[0]
  tc = min(token_chunk, n)
  pad = -n % tc
  per = mask.shape[2:]  # (A,) for a mask per adapter
  targets = targets.reshape(-1).astype(jnp.int32)
  mask = mask.reshape((-1,) + per).astype(jnp.float32)
  if pad:  # padded rows have mask 0: they add nothing and get zero gradient
    h2 = jnp.pad(h2, ((0, pad), (0, 0)))
    targets, mask = jnp.pad(targets, (0, pad)), jnp.pad(mask, ((0, pad),) + ((0, 0),) * len(per))
  vocab = w.shape[0] if tied else w.shape[1]
  vc = min(vocab_chunk, vocab)
  return _tiled_nll(tied, spec.final_softcap, vc, h2.reshape(-1, tc, d), w,
                    targets.reshape(-1, tc), mask.reshape((-1, tc) + per))


def _tile(tied, softcap, vc, hc, w, j):
  """Logits of token chunk hc [c, D] against vocab tile j: (logits f32 [c, vc], pre-softcap
  logits, weight tile, column ids [vc], valid [vc]). The last tile is shifted left to end at V
  (no padded copy of the weight); the columns it shares with tile j-1 are marked invalid."""
  vocab = w.shape[0] if tied else w.shape[1]
  start = jnp.minimum(j * vc, vocab - vc)
  wj = jax.lax.dynamic_slice_in_dim(w, start, vc, axis=0 if tied else 1)
  spec = "cd,vd->cv" if tied else "cd,dv->cv"
  z = jnp.einsum(spec, hc, wj.astype(hc.dtype), preferred_element_type=jnp.float32)
  logits = z if softcap is None else jnp.tanh(z / softcap) * softcap
  cols = start + jnp.arange(vc)
  return logits, z, wj, cols, cols >= j * vc


def _n_tiles(w, vc, tied):
  return -(-(w.shape[0] if tied else w.shape[1]) // vc)


# The vocab tiles run in a lax.scan: a loop is what keeps XLA from scheduling every tile's logits
# at once (unrolled, it holds them all: the [T, V] we set out to avoid). XLA:CPU, which has no
# native bf16 dot, then carries a float32 copy of a bf16 output projection through the loop:
# a CPU-only cost that `ftjax.plan` on CPU includes.


def _chunk_lse(tied, softcap, vc, hc, w, yc):
  """(logsumexp [c], target logit [c]) of one token chunk, streaming over vocab tiles."""
  low = jnp.finfo(jnp.float32).min

  def body(carry, j):
    m, s, t = carry
    logits, _, _, cols, valid = _tile(tied, softcap, vc, hc, w, j)
    logits = jnp.where(valid, logits, low)
    m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
    s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(logits - m_new[:, None]), axis=-1)
    hit = (cols[None, :] == yc[:, None]) & valid
    return (m_new, s, t + jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)), None

  c = hc.shape[0]
  init = (jnp.full((c,), low), jnp.zeros((c,)), jnp.zeros((c,)))
  (m, s, t), _ = jax.lax.scan(body, init, jnp.arange(_n_tiles(w, vc, tied)))
  return m + jnp.log(s), t


def _chunk_dh(tied, softcap, vc, hc, w, yc, mc, lse):
  """d(sum of mc * nll) / d hc [c, D] (float32), recomputing each vocab tile's logits."""

  def body(dh, j):
    logits, z, wj, cols, valid = _tile(tied, softcap, vc, hc, w, j)
    g = _dlogits(softcap, logits, z, cols, valid, yc, mc, lse)
    return dh + _dh(tied, g, wj, hc.dtype), None

  dh, _ = jax.lax.scan(body, jnp.zeros(hc.shape, jnp.float32), jnp.arange(_n_tiles(w, vc, tied)))
  return dh


def _dlogits(softcap, logits, z, cols, valid, yc, mc, lse):
  """d(sum mc * nll) / d(pre-softcap logits) of one tile, [c, vc] float32."""
  p = jnp.where(valid, jnp.exp(logits - lse[:, None]), 0.0)
  onehot = (cols[None, :] == yc[:, None]) & valid
  g = (p - onehot) * mc[:, None]
  if softcap is not None:
    g = g * (1.0 - jnp.square(jnp.tanh(z / softcap)))
  return g


def _dh(tied, g, wj, dtype):
  """g [c, vc] f32 @ weight tile^T -> [c, D] float32."""
  spec = "cv,vd->cd" if tied else "cv,dv->cd"
  return jnp.einsum(spec, g.astype(dtype), wj.astype(dtype), preferred_element_type=jnp.float32)


def _over_chunks(f, xs):
  """lax.map over the leading (token chunk) axis; a single chunk runs without the loop."""
  if jax.tree.leaves(xs)[0].shape[0] == 1:
    return jax.tree.map(lambda y: y[None], f(jax.tree.map(lambda x: x[0], xs)))
  return jax.lax.map(f, xs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _tiled_nll(tied, softcap, vc, h, w, targets, mask):
  """h [n, c, D] in n token chunks; targets, mask [n, c] -> sum of mask * nll (float32).

  A mask [n, c, A] (one column per adapter) gives the A sums at the cost of one."""
  return _tiled_nll_fwd(tied, softcap, vc, h, w, targets, mask)[0]


def _tiled_nll_fwd(tied, softcap, vc, h, w, targets, mask):
  if mask.ndim == 2 and h.shape[0] == 1 and _n_tiles(w, vc, tied) == 1:
    # One tile: loss and gradient from the same logits, no recompute (and no bigger peak).
    logits, z, _, cols, _ = _tile(tied, softcap, vc, h[0], w, 0)
    lse = jax.nn.logsumexp(logits, axis=-1)
    nll = lse - jnp.sum(jnp.where(cols[None, :] == targets[0][:, None], logits, 0.0), axis=-1)
    g = _dlogits(softcap, logits, z, cols, cols >= 0, targets[0], mask[0], lse)
    return jnp.sum(nll * mask[0]), (h, w, targets, mask, None, g)
  lse, t = _over_chunks(lambda xs: _chunk_lse(tied, softcap, vc, xs[0], w, xs[1]), (h, targets))
  if mask.ndim == 3:  # one weight column per adapter: a sum per adapter, [A]
    return jnp.einsum("nc,nca->a", lse - t, mask), (h, w, targets, mask, lse, None)
  return jnp.sum((lse - t) * mask), (h, w, targets, mask, lse, None)


def _tiled_nll_bwd(tied, softcap, vc, res, ct):
  h, w, targets, mask, lse, g = res
  if g is not None:  # one tile, its gradient kept from the forward
    dh = _dh(tied, g * ct, w, h.dtype)[None]
  elif mask.ndim == 3:  # each token's weight: its adapter column times that adapter's cotangent
    dh = _over_chunks(lambda xs: _chunk_dh(tied, softcap, vc, xs[0], w, xs[1], xs[2], xs[3]),
                      (h, targets, mask @ ct, lse))
  else:
    dh = _over_chunks(lambda xs: _chunk_dh(tied, softcap, vc, xs[0], w, xs[1], xs[2] * ct, xs[3]),
                      (h, targets, mask, lse))
  return dh.astype(h.dtype), None, None, None  # None: the output projection is frozen


_tiled_nll.defvjp(_tiled_nll_fwd, _tiled_nll_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _token_nll(tied, softcap, vc, h, w, targets):
  """h [n, c, D] in n token chunks; targets [n, c] -> -log p(target) of each token [n, c]."""
  return _token_nll_fwd(tied, softcap, vc, h, w, targets)[0]


def _token_nll_fwd(tied, softcap, vc, h, w, targets):
  lse, t = _over_chunks(lambda xs: _chunk_lse(tied, softcap, vc, xs[0], w, xs[1]), (h, targets))
  return lse - t, (h, w, targets, lse)


def _token_nll_bwd(tied, softcap, vc, res, ct):
  h, w, targets, lse = res  # each token's cotangent is its weight in _chunk_dh
  dh = _over_chunks(lambda xs: _chunk_dh(tied, softcap, vc, xs[0], w, xs[1], xs[2], xs[3]),
                    (h, targets, ct.astype(jnp.float32), lse))
  return dh.astype(h.dtype), None, None


_token_nll.defvjp(_token_nll_fwd, _token_nll_bwd)


def token_logps(spec, params, h, targets, token_chunk=TOKEN_CHUNK, vocab_chunk=VOCAB_CHUNK):
  """log p(target) of every position, float32 [B, T], tiled as chunked_cross_entropy is (no
  [B*T, V] logits, the same backward recompute)."""
  b, t, d = h.shape
  tied = spec.tie_embeddings
  w = params["embed"]["embedding"] if tied else params["lm_head"]["kernel"]
  h2, targets = h.reshape(-1, d), targets.reshape(-1).astype(jnp.int32)
  tc = min(token_chunk, b * t)
  pad = -(b * t) % tc
  if pad:
    h2, targets = jnp.pad(h2, ((0, pad), (0, 0))), jnp.pad(targets, (0, pad))
  vc = min(vocab_chunk, w.shape[0] if tied else w.shape[1])
  nll = _token_nll(tied, spec.final_softcap, vc, h2.reshape(-1, tc, d), w, targets.reshape(-1, tc))
  return -nll.reshape(-1)[:b * t].reshape(b, t)


def pair_seqs(per_token, mask, segment_ids) -> objectives.Seqs:
  """Per-token values [B, T] -> their sums over each pair's chosen and rejected completion, and
  the completions' token counts, each [B, T // 2]: pair k of a row is segments 2k+1 (chosen) and
  2k+2 (rejected) (ftjax/pairs.py). Slots without a pair count 0 tokens."""
  t = per_token.shape[1]
  seg_sum = jax.vmap(lambda x, s: jax.ops.segment_sum(x, s, num_segments=t + 2))
  sums, counts = seg_sum(per_token * mask, segment_ids), seg_sum(mask, segment_ids)
  s = t // 2
  side = lambda x, k: x[:, k:k + 2 * s:2]
  return objectives.Seqs(side(sums, 1), side(sums, 2), side(counts, 1), side(counts, 2))


def _pair_sums(adapter_params, adapters: lora_lib.Adapters, model: Model, batch, dropout_key,
               remat, reference, objective):
  """The objective's sums over the pairs of one (micro-)batch (objectives.finish's input), per
  stacked adapter ([A]) or scalars. The reference (the model at step 0: the base when
  `reference` is None, else those adapter factors) runs without gradient."""
  ids = batch.get("adapter_ids")
  mask = batch["loss_mask"].astype(jnp.float32)

  def seqs(params, key, remat):
    h = hidden_states(model, batch["tokens"], params, batch["segment_ids"],
                      embeds=batch.get("embeds"), adapter_ids=ids, dropout_key=key, remat=remat)
    return pair_seqs(token_logps(model.spec, model.params, h, batch["targets"]), mask,
                     batch["segment_ids"])

  policy = seqs(lora_lib.with_params(adapters, adapter_params), dropout_key, remat)
  ref = None
  if objective.reference:
    ref_adapters = None if reference is None else lora_lib.with_params(adapters, reference)
    ref = jax.lax.stop_gradient(seqs(ref_adapters, None, "none"))
  terms = objective(policy, ref)
  valid = ((policy.chosen_n > 0) & (policy.rejected_n > 0)).astype(jnp.float32)
  if adapters.stacked:  # [B, A]: each row counts for its own adapter
    group = (ids[:, None] == jnp.arange(len(adapters.names))).astype(jnp.float32)
    total = lambda x: jnp.einsum("bs,ba->a", x * valid, group)
  else:
    total = lambda x: jnp.sum(x * valid)
  sums = {"pair": total(terms.pair), "token": total(terms.token), "pairs": total(valid),
          "tokens": total(policy.chosen_n)}
  return {**sums, **{k: total(jax.lax.stop_gradient(v)) for k, v in terms.metrics.items()}}


def _pair_objective(adapter_params, adapters, model, batch, dropout_key, remat, reference,
                    objective, pairs, tokens):
  """(what is differentiated, (loss per adapter, metric sums)): the micro-batch's loss terms over
  the whole batch's pairs and chosen tokens, so micro-batch gradients simply add up."""
  sums = _pair_sums(adapter_params, adapters, model, batch, dropout_key, remat, reference,
                    objective)
  loss = sums["pair"] / jnp.maximum(pairs, 1.0) + sums["token"] / jnp.maximum(tokens, 1.0)
  return jnp.sum(loss), (loss, sums)


def pair_counts(batch, stacked_names=()):
  """(pairs, chosen completion tokens) of a whole batch, from its masks alone; [A] per adapter."""
  mask = batch["loss_mask"].astype(jnp.float32)
  seqs = pair_seqs(jnp.zeros_like(mask), mask, batch["segment_ids"])
  valid = ((seqs.chosen_n > 0) & (seqs.rejected_n > 0)).astype(jnp.float32)
  if stacked_names:
    group = (batch["adapter_ids"][:, None] == jnp.arange(len(stacked_names))).astype(jnp.float32)
    return (jnp.einsum("bs,ba->a", valid, group),
            jnp.einsum("bs,ba->a", valid * seqs.chosen_n, group))
  return jnp.sum(valid), jnp.sum(valid * seqs.chosen_n)


def loss_sum(adapter_params, adapters: lora_lib.Adapters, model: Model, batch, dropout_key, remat):
  """(sum of token losses, number of target tokens) of one (micro-)batch. With stacked adapters
  both are [A], adapter k's over the rows whose batch["adapter_ids"] is k."""
  adapters = lora_lib.with_params(adapters, adapter_params)
  ids = batch.get("adapter_ids")
  h = hidden_states(model, batch["tokens"], adapters, batch["segment_ids"],
                    embeds=batch.get("embeds"), adapter_ids=ids, dropout_key=dropout_key,
                    remat=remat)
  mask = batch["loss_mask"].astype(jnp.float32)
  if adapters.stacked:  # [B, T, A]: each token counts for its row's adapter only
    mine = ids[:, None] == jnp.arange(len(adapters.names))
    mask = mask[:, :, None] * mine[:, None, :].astype(jnp.float32)
  total = chunked_cross_entropy(model.spec, model.params, h, batch["targets"], mask)
  return total, jnp.sum(mask, axis=(0, 1))


def _objective(*args, objective=objectives.SFT):
  """loss_sum as (what is differentiated, (sums, counts)). The sum over adapters of their token
  losses: an adapter's factors act on its own rows only, so each gets its own sum's gradient.
  The batch is SFT's one "chosen" sequence (per adapter); the step divides by its tokens."""
  logp, count = loss_sum(*args)
  logp = -logp
  total = objective(objectives.Seqs(logp, jnp.zeros_like(logp), count, jnp.zeros_like(count)),
                    None).token
  return jnp.sum(total), (total, count)


def _update(optimizer, grads, total, count, params, opt_state):
  """One adapter's optimizer step from its summed gradient, token-loss sum and target count:
  (new factors, new optimizer state, loss, gradient norm, whether both are finite)."""
  denom = jnp.maximum(count, 1.0)
  grads = jax.tree.map(lambda g: g / denom, grads)
  loss = total / denom
  grad_norm = optax.tree.norm(grads)
  updates, new_opt = optimizer.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  return new_params, new_opt, loss, grad_norm, finite


def _keep(apply, new, old, axis: int):
  """`new` where `apply`, else `old`; for stacked adapters apply is [A], along `axis`."""
  pick = lambda a, n, o: jax.tree.map(lambda x, y: jnp.where(a, x, y), n, o)
  if jnp.ndim(apply) == 0:
    return pick(apply, new, old)
  return jax.vmap(pick, in_axes=(0, axis, axis), out_axes=axis)(apply, new, old)


def train_step(state, model: Model, batch, reference=None, *, adapters: lora_lib.Adapters,
               optimizer: optax.GradientTransformation, grad_accum: int, remat: str,
               skip_nonfinite: bool = False, objective: objectives.Objective = objectives.SFT):
  """One optimizer step over `batch` ([B, T] arrays) split into `grad_accum` micro-batches.

  A non-finite loss or gradient never reaches the state: the update is dropped and counted in
  state["guard"]. Unless `skip_nonfinite`, the first such step also halts the state (every later
  update is dropped too) and is recorded with its loss and gradient norm, so the loop can read
  the guard only at its log points and still stop with the adapters of before that step.

  Stacked adapters (the batch then carries `adapter_ids` [B]): the base runs once over all rows,
  and `_update` is vmapped over the adapter axis, so each adapter has its own loss normalization,
  gradient clipping and optimizer state: it steps as it would in a run on its rows alone.
  Metrics `loss` and `grad_norm` are then the mean over adapters, `per_adapter` holds each. With
  skip_nonfinite an adapter skips only its own non-finite steps (as its run alone would); without,
  one adapter's non-finite step drops and halts every adapter's update.

  `objective` (objectives.from_config): SFT sums token losses and divides once by the batch's
  target tokens. A preference objective reads pairs (ftjax/pairs.py); its loss is normalized by
  the whole batch's pairs (and chosen tokens) counted before the micro-batches; `reference`: the
  adapter factors of step 0 for DPO's reference (None: the base alone). Its metrics (TRL's names)
  are in metrics["objective"].
  """
  rng, dropout_key = jax.random.split(state["rng"])
  stacked = adapters.names if adapters.stacked else ()
  if objective.pairs:
    pairs, tokens = pair_counts(batch, stacked)
    fn = lambda *args: _pair_objective(*args, reference, objective, pairs, tokens)
  else:
    fn = functools.partial(_objective, objective=objective)
  grad_fn = jax.value_and_grad(fn, has_aux=True)

  def micro_grads(i, mb):
    (_, aux), grads = grad_fn(state["adapters"], adapters, model, mb,
                              jax.random.fold_in(dropout_key, i), remat)
    return grads, aux

  if grad_accum == 1:  # no loop: XLA fuses the gradient straight into the optimizer update
    grads, aux = micro_grads(0, batch)
  else:
    # micro-batch i = rows i, i + G, i + 2G, ... (G = grad_accum): each one stays spread over all
    # the devices that shard the batch (a contiguous split would put each on a fraction of them).
    # Rows keep their adapter ids, and each adapter's block of rows splits as its run alone would.
    micro = jax.tree.map(
        lambda x: x.reshape((-1, grad_accum) + x.shape[1:]).swapaxes(0, 1), batch)
    shapes = jax.eval_shape(micro_grads, 0, jax.tree.map(lambda x: x[0], micro))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    (grads, aux), _ = jax.lax.scan(
        lambda carry, xs: (jax.tree.map(jnp.add, carry, micro_grads(*xs)), None), zeros,
        (jnp.arange(grad_accum), micro))
  if objective.pairs:  # already normalized over the whole batch
    (total, sums), count = aux, jnp.ones_like(aux[0])
  else:
    (total, count), sums = aux, None
  update = functools.partial(_update, optimizer)
  if adapters.stacked:  # factors [L, A, ...] (axis 1), optimizer state [A, ...] (axis 0)
    update = jax.vmap(update, in_axes=(1, 0, 0, 1, 0), out_axes=(1, 0, 0, 0, 0))
  new_adapters, new_opt, loss, grad_norm, finite = update(grads, total, count, state["adapters"],
                                                          state["opt_state"])
  extra = {} if sums is None else {k: v for k, v in objectives.finish(sums).items() if k != "loss"}
  if sums is not None:
    count = sums["tokens"]
  metrics = {"loss": loss, "grad_norm": grad_norm, "target_tokens": count, "objective": extra}
  if adapters.stacked:
    metrics = {"loss": jnp.mean(loss), "grad_norm": jnp.mean(grad_norm),
               "target_tokens": jnp.sum(count),
               "objective": {k: jnp.mean(v) for k, v in extra.items()},
               "per_adapter": {"loss": loss, "grad_norm": grad_norm, **extra}}
  guard = state["guard"]
  halted = guard["halted_at"] > 0
  all_finite = jnp.all(finite)
  apply = finite & ~halted & (all_finite | skip_nonfinite)
  first_bad = ~all_finite & ~halted & (not skip_nonfinite)
  new_guard = {
      "skipped": guard["skipped"] + (~all_finite).astype(jnp.int32),
      "halted_at": jnp.where(first_bad, state["step"] + 1, guard["halted_at"]),
      "loss": jnp.where(first_bad, metrics["loss"], guard["loss"]),
      "grad_norm": jnp.where(first_bad, metrics["grad_norm"], guard["grad_norm"]),
  }
  new_state = {
      "adapters": _keep(apply, new_adapters, state["adapters"], 1),
      "opt_state": _keep(apply, new_opt, state["opt_state"], 0),
      "step": state["step"] + 1,
      "rng": rng,
      "data_position": state["data_position"] + 1,
      "guard": new_guard,
  }
  return new_state, metrics


def eval_step(adapter_params, model: Model, batch, reference=None, *,
              adapters: lora_lib.Adapters, objective: objectives.Objective = objectives.SFT):
  """(sum of token losses, target tokens) without dropout ([A] each with stacked adapters); the
  caller sums over the eval set. A preference objective: the dict of sums objectives.finish
  takes (summed over the eval set, it gives the eval loss and metrics)."""
  if objective.pairs:
    return _pair_sums(adapter_params, adapters, model, batch, None, "none", reference, objective)
  return loss_sum(adapter_params, adapters, model, batch, None, "none")


def kernels_for(cfg, platform: str, spec: ModelSpec, capability: str | None = None) -> Kernels:
  """The kernels of the step, static: model.attention and quant.kernel resolved for `platform`
  ("cpu" | "gpu" | "tpu"); a choice that cannot run there is a UserError naming the key. The
  experts' grouped matmul follows the device (`capability`: a GPU's compute capability, "9.0")."""
  if cfg.quant.kernel not in ("xla", "pallas"):
    raise UserError(f"quant.kernel={cfg.quant.kernel!r}: use xla or pallas")
  return Kernels(attention=attention.resolve(cfg.model.attention, platform, spec,
                                             # a preference row is always two segments or more
                                             packing=cfg.data.packing or
                                             cfg.data.format == "preference",
                                             dtype=cfg.model.dtype),
                 quant=kernels_lib.platform_backend(cfg.quant.kernel, platform),
                 grouped=kernels_lib.grouped_backend(platform, capability))


def init_state(adapters: lora_lib.Adapters, optimizer, seed: int):
  # stacked adapters: one optimizer state per adapter, on a leading adapter axis
  init = jax.vmap(optimizer.init, in_axes=1) if adapters.stacked else optimizer.init
  return {
      "adapters": adapters.params,
      "opt_state": init(adapters.params),
      "step": jnp.zeros((), jnp.int32),
      "rng": jax.random.PRNGKey(seed),
      "data_position": jnp.zeros((), jnp.int32),
      # Not checkpointed: non-finite steps since this process started (see train_step).
      "guard": {"skipped": jnp.zeros((), jnp.int32), "halted_at": jnp.zeros((), jnp.int32),
                "loss": jnp.zeros((), jnp.float32), "grad_norm": jnp.zeros((), jnp.float32)},
  }
