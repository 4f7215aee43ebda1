"""Sampling with a KV cache: `ftjax.generate` (the CLI is ftjax/generate.py)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.model import Model, decode_layout, decoder, embed, final_hidden, logits_from_hidden


def _sample(logits, key, temperature, top_p):
  """logits [B, V] float32 -> token ids [B]. Greedy at temperature 0; nucleus below top_p."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # keep the smallest prefix whose mass reaches top_p (the first token always stays)
    cut = jnp.sum(jnp.cumsum(probs, axis=-1) - probs < top_p, axis=-1, keepdims=True)
    threshold = jnp.take_along_axis(sorted_logits, cut - 1, axis=-1)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("max_new_tokens", "temperature", "top_p", "pad_id"))
def _generate(model: Model, tokens, prompt_mask, adapters, adapter_ids, stop_ids, key, *,
              max_new_tokens, temperature, top_p, pad_id):
  spec, params = model.spec, model.params
  b, t = tokens.shape
  s = t + max_new_tokens
  dtype = params["embed"]["embedding"].dtype
  shape = (spec.n_layers, b, s, spec.n_kv_heads, spec.head_dim)
  cache = {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
  # Left padding: pad slots get segment 0, real tokens segment 1; empty cache slots segment -1.
  seg_prompt = prompt_mask.astype(jnp.int32)
  pos_prompt = jnp.maximum(jnp.cumsum(seg_prompt, axis=1) - 1, 0).astype(jnp.int32)
  k_pos = jnp.zeros((b, s), jnp.int32).at[:, :t].set(pos_prompt)
  k_seg = jnp.full((b, s), -1, jnp.int32).at[:, :t].set(seg_prompt)
  # Prefill: the prompt attends to itself as in training (no empty cache slots in its attention)
  # and leaves its keys in the cache.
  x, cache = decoder(spec, params, embed(spec, params, tokens), q_pos=pos_prompt, q_seg=seg_prompt,
                     adapters=adapters, adapter_ids=adapter_ids, cache=cache, cache_index=0,
                     kernels=model.kernels)
  # The decode steps read the layers as separate buffers on CPU, split once per call, not per
  # token (see decode_layout).
  step_params = decode_layout(spec, params) if jax.default_backend() == "cpu" else params
  run = functools.partial(decoder, spec, step_params, adapters=adapters, adapter_ids=adapter_ids,
                          kernels=model.kernels)
  last = logits_from_hidden(spec, params, final_hidden(spec, params, x[:, -1]))
  out = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
  next_pos = pos_prompt[:, -1] + 1

  def cond(carry):
    i, _, _, _, _, _, _, done = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, out, cache, k_pos, k_seg, last, key, done = carry
    key, sub = jax.random.split(key)
    tok = _sample(last, sub, temperature, top_p)
    tok = jnp.where(done, pad_id, tok)
    out = out.at[:, i].set(tok)
    done = done | jnp.isin(tok, stop_ids)
    pos = (next_pos + i)[:, None]
    k_pos = jax.lax.dynamic_update_slice(k_pos, pos, (0, t + i))
    k_seg = jax.lax.dynamic_update_slice(k_seg, jnp.ones((b, 1), jnp.int32), (0, t + i))
    h, cache = run(embed(spec, params, tok[:, None]), q_pos=pos, q_seg=jnp.ones((b, 1), jnp.int32),
                   k_pos=k_pos, k_seg=k_seg, cache=cache, cache_index=t + i)
    last = logits_from_hidden(spec, params, final_hidden(spec, params, h[:, -1]))
    return i + 1, out, cache, k_pos, k_seg, last, key, done

  carry = (jnp.zeros((), jnp.int32), out, cache, k_pos, k_seg, last, key,
           jnp.zeros((b,), bool))
  return jax.lax.while_loop(cond, body, carry)[1]


def generate(model: Model, tokens, adapters=None, max_new_tokens=32, temperature=0.0, top_p=1.0,
             key=None, *, adapter_ids=None, prompt_mask=None, pad_id=None, stop_ids=()):
  """New token ids int32 [B, max_new_tokens] after the prompts `tokens` [B, T].

  Greedy at temperature 0. A row stops at an eos of the model's config or one of `stop_ids` (e.g.
  the chat template's end of turn; the stop token is included) and is filled with `pad_id`
  (default: the first eos id) after it. Prompts of different lengths are left-padded, with
  `prompt_mask` [B, T] False on the padding. With stacked adapters (lora.stack), `adapter_ids` [B]
  picks each row's adapter (-1: the base alone): one batch decodes many behaviours at once.
  """
  tokens = jnp.asarray(tokens, jnp.int32)
  if prompt_mask is None:
    prompt_mask = jnp.ones(tokens.shape, bool)
  if key is None:
    key = jax.random.PRNGKey(0)
  stops = tuple(dict.fromkeys(tuple(model.spec.eos_ids) + tuple(int(i) for i in stop_ids)))
  if pad_id is None:
    pad_id = stops[0] if stops else 0
  if adapter_ids is not None:
    adapter_ids = jnp.asarray(adapter_ids, jnp.int32)
  return _generate(model, tokens, jnp.asarray(prompt_mask, bool), adapters, adapter_ids,
                   jnp.asarray(stops or (-1,), jnp.int32), key,
                   max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                   top_p=float(top_p), pad_id=int(pad_id))


def generate_rows(model: Model, prompts, adapters=None, adapter_ids=None, *, batch_size=8,
                  max_new_tokens=32, temperature=0.0, top_p=1.0, key=None, stop_ids=(),
                  pad_id=None) -> list[np.ndarray]:
  """Prompts of any lengths (lists of ids), each with its adapter -> their new ids, in order.

  Rows go through in batches of `batch_size`, left-padded to a multiple of 32 tokens (so a few
  shapes compile, not one per prompt length); the last batch is filled with copies of its first
  row. adapter_ids: one per prompt, into the stacked `adapters` (-1: the base).
  """
  key = jax.random.PRNGKey(0) if key is None else key
  ids = np.full(len(prompts), -1, np.int32) if adapter_ids is None else np.asarray(adapter_ids)
  out = []
  for first in range(0, len(prompts), batch_size):
    rows = list(range(first, min(first + batch_size, len(prompts))))
    rows += [first] * (batch_size - len(rows))
    width = -(-max(len(prompts[r]) for r in rows) // 32) * 32
    tokens = np.zeros((batch_size, width), np.int32)
    mask = np.zeros((batch_size, width), bool)
    for i, r in enumerate(rows):
      tokens[i, width - len(prompts[r]):] = prompts[r]
      mask[i, width - len(prompts[r]):] = True
    stacked = adapters is not None and adapters.stacked
    new = generate(model, tokens, adapters, max_new_tokens, temperature, top_p,
                   jax.random.fold_in(key, first), prompt_mask=mask,
                   adapter_ids=ids[rows] if stacked else None, stop_ids=stop_ids, pad_id=pad_id)
    out.extend(np.asarray(new)[:min(batch_size, len(prompts) - first)])
  return out
