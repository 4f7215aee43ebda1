"""Sampling with a KV cache: `ftjax.generate` (the CLI is ftjax/generate.py)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.model import Model, decoder, embed, final_hidden, logits_from_hidden


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
def _generate(model: Model, tokens, prompt_mask, adapters, key, *, max_new_tokens, temperature,
              top_p, pad_id):
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

  x = embed(spec, params, tokens)
  x, cache = decoder(spec, params, x, q_pos=pos_prompt, q_seg=seg_prompt, k_pos=k_pos,
                     k_seg=k_seg, adapters=adapters, cache=cache, cache_index=0,
                     kernels=model.kernels)
  last = logits_from_hidden(spec, params, final_hidden(spec, params, x[:, -1]))
  eos = jnp.asarray(spec.eos_ids or (-1,), jnp.int32)
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
    done = done | jnp.isin(tok, eos)
    pos = (next_pos + i)[:, None]
    k_pos = jax.lax.dynamic_update_slice(k_pos, pos, (0, t + i))
    k_seg = jax.lax.dynamic_update_slice(k_seg, jnp.ones((b, 1), jnp.int32), (0, t + i))
    h = embed(spec, params, tok[:, None])
    h, cache = decoder(spec, params, h, q_pos=pos, q_seg=jnp.ones((b, 1), jnp.int32), k_pos=k_pos,
                       k_seg=k_seg, adapters=adapters, cache=cache, cache_index=t + i,
                       kernels=model.kernels)
    last = logits_from_hidden(spec, params, final_hidden(spec, params, h[:, -1]))
    return i + 1, out, cache, k_pos, k_seg, last, key, done

  carry = (jnp.zeros((), jnp.int32), out, cache, k_pos, k_seg, last, key,
           jnp.zeros((b,), bool))
  return jax.lax.while_loop(cond, body, carry)[1]


def generate(model: Model, tokens, adapters=None, max_new_tokens=32, temperature=0.0, top_p=1.0,
             key=None, *, prompt_mask=None, pad_id=None):
  """New token ids int32 [B, max_new_tokens] after the prompts `tokens` [B, T].

  Greedy at temperature 0. A row stops at an eos of the model's config (the eos is included) and
  is filled with `pad_id` (default: the first eos id) after it. Prompts of different lengths are
  left-padded, with `prompt_mask` [B, T] False on the padding.
  """
  tokens = jnp.asarray(tokens, jnp.int32)
  if prompt_mask is None:
    prompt_mask = jnp.ones(tokens.shape, bool)
  if key is None:
    key = jax.random.PRNGKey(0)
  if pad_id is None:
    pad_id = model.spec.eos_ids[0] if model.spec.eos_ids else 0
  return _generate(model, tokens, jnp.asarray(prompt_mask, bool), adapters, key,
                   max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                   top_p=float(top_p), pad_id=int(pad_id))
