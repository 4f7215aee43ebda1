"""Stacked adapters chosen per row equal each adapter run alone, in values and in gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import data, hf_io, lora
from ftjax.errors import UserError
from ftjax.model import Model, ModelSpec, forward


def _model_and_adapters():
  spec = ModelSpec(arch="llama", vocab=31, dim=16, n_layers=2, n_heads=4, n_kv_heads=2,
                   head_dim=4, mlp_dim=24)
  key = jax.random.PRNGKey(0)
  shapes = hf_io.abstract_params(spec, hf_io.device_table(spec, False), jnp.float32)
  leaves, tree = jax.tree.flatten(shapes)
  params = tree.unflatten([0.3 * jax.random.normal(jax.random.fold_in(key, i), s.shape)
                           for i, s in enumerate(leaves)])
  named = {}
  for i, name in enumerate(("json", "tone", "label")):
    ad = lora.init(spec, "all-linear", 4, 8.0, jax.random.fold_in(key, 10 + i))
    # b random: with b = 0 every adapter would equal the base and the test could not fail
    ad = lora.with_params(ad, jax.tree.map(
        lambda x, k=i: x + 0.3 * jax.random.normal(jax.random.fold_in(key, 99 + k), x.shape),
        ad.params))
    named[name] = ad
  return Model(spec, params), named


def test_rows_use_their_own_adapter_and_minus_one_is_the_base():
  model, named = _model_and_adapters()
  stacked = lora.stack(named)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (4, 7), 0, 31)
  ids = jnp.asarray([2, -1, 0, 1])
  mixed = forward(model, tokens, stacked, adapter_ids=ids)
  names = list(named)
  for r, i in enumerate(ids.tolist()):
    alone = forward(model, tokens[r:r + 1], named[names[i]] if i >= 0 else None)
    np.testing.assert_allclose(mixed[r], alone[0], rtol=1e-5, atol=1e-5)
  base = forward(model, tokens)
  assert float(jnp.max(jnp.abs(mixed[0] - base[0]))) > 1e-2  # the adapters change the output


def test_each_adapter_gets_the_gradient_of_its_rows_only():
  model, named = _model_and_adapters()
  stacked = lora.stack(named)
  tokens = jax.random.randint(jax.random.PRNGKey(2), (3, 6), 0, 31)
  ids = jnp.asarray([1, 1, 2])  # adapter 0 has no row: its gradient must be zero

  def loss(params, ad, toks, **kw):
    return jnp.sum(jnp.sin(forward(model, toks, lora.with_params(ad, params), **kw)))

  g = jax.grad(loss)(stacked.params, stacked, tokens, adapter_ids=ids)
  g_tone = jax.grad(loss)(named["tone"].params, named["tone"], tokens[:2])
  g_label = jax.grad(loss)(named["label"].params, named["label"], tokens[2:])
  for name in named["tone"].params:
    for f in ("a", "b"):
      np.testing.assert_allclose(g[name][f][:, 1], g_tone[name][f], rtol=1e-4, atol=1e-5)
      np.testing.assert_allclose(g[name][f][:, 2], g_label[name][f], rtol=1e-4, atol=1e-5)
      assert not np.any(np.asarray(g[name][f][:, 0]))
  back = lora.unstack(stacked)
  np.testing.assert_array_equal(back["label"].params["q_proj"]["b"],
                                named["label"].params["q_proj"]["b"])


def test_parse_sources():
  assert data.parse_sources("a.jsonl") == {"": "a.jsonl"}
  assert data.parse_sources("json=a.jsonl, tone=b.jsonl") == {"json": "a.jsonl", "tone": "b.jsonl"}
  with pytest.raises(UserError, match="has no name"):
    data.parse_sources("json=a.jsonl,b.jsonl")
  with pytest.raises(UserError, match="two sources named 'json'"):
    data.parse_sources("json=a.jsonl,json=b.jsonl")
