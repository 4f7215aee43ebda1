"""The tiled cross-entropy equals a float64 numpy one, in value and in gradient."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import step as step_lib
from ftjax.model import ModelSpec


def _spec(tied, softcap):
  return ModelSpec(arch="llama", vocab=37, dim=16, n_layers=1, n_heads=2, n_kv_heads=1,
                   head_dim=8, mlp_dim=32, tie_embeddings=tied, final_softcap=softcap)


def _reference(h, w_dv, targets, mask, softcap):
  """float64 numpy: (sum of mask * nll, d/dh)."""
  h, w = h.astype(np.float64).reshape(-1, h.shape[-1]), w_dv.astype(np.float64)
  t, m = targets.reshape(-1), mask.reshape(-1).astype(np.float64)
  z = h @ w
  logits = z if softcap is None else np.tanh(z / softcap) * softcap
  top = logits.max(-1, keepdims=True)
  lse = (top + np.log(np.exp(logits - top).sum(-1, keepdims=True)))[:, 0]
  nll = lse - logits[np.arange(len(t)), t]
  g = np.exp(logits - lse[:, None])
  g[np.arange(len(t)), t] -= 1.0
  g *= m[:, None]
  if softcap is not None:
    g *= 1.0 - np.tanh(z / softcap) ** 2
  return float((nll * m).sum()), g @ w.T


@pytest.mark.parametrize("tied,softcap,chunks", [
    (False, None, (8, 8)),  # 26 tokens: 8 does not divide them; 37 columns: the last tile shifts
    (True, None, (5, 16)),
    (False, 3.0, (8, 10)),  # Gemma 2's final soft-capping
    (False, None, (64, 64)),  # one tile: its gradient is kept from the forward pass
])
def test_tiled_cross_entropy_matches_float64(tied, softcap, chunks):
  spec = _spec(tied, softcap)
  rng = np.random.default_rng(0)
  h = rng.normal(size=(2, 13, spec.dim)).astype(np.float32)
  w_dv = (rng.normal(size=(spec.dim, spec.vocab)) * 0.7).astype(np.float32)
  params = {"embed": {"embedding": w_dv.T.copy()}} if tied else {"lm_head": {"kernel": w_dv}}
  targets = rng.integers(0, spec.vocab, (2, 13)).astype(np.int32)
  targets[0, :4] = spec.vocab - 1  # the column only the shifted last tile covers
  mask = (rng.random((2, 13)) > 0.3).astype(np.float32)
  want, want_grad = _reference(h, w_dv, targets, mask, softcap)

  loss = lambda x: step_lib.chunked_cross_entropy(spec, params, x, targets, mask, *chunks)
  got, grad = jax.jit(jax.value_and_grad(loss))(jnp.asarray(h))
  np.testing.assert_allclose(float(got), want, rtol=2e-5)
  np.testing.assert_allclose(np.asarray(grad).reshape(want_grad.shape), want_grad, rtol=2e-4,
                             atol=2e-6)
  assert np.abs(want_grad).max() > 0.1  # the gradient is not trivially zero


def test_loss_tiles_stay_small():
  """A Llama 3 vocabulary never builds [tokens, V] logits: the largest float32 array in the
  compiled loss + gradient is one tile."""
  spec = ModelSpec(arch="llama", vocab=128256, dim=64, n_layers=1, n_heads=2, n_kv_heads=1,
                   head_dim=32, mlp_dim=64)
  params = {"lm_head": {"kernel": jax.ShapeDtypeStruct((64, 128256), jnp.bfloat16)}}
  h = jax.ShapeDtypeStruct((1, 4096, 64), jnp.bfloat16)
  ids = jax.ShapeDtypeStruct((1, 4096), jnp.int32)
  mask = jax.ShapeDtypeStruct((1, 4096), jnp.float32)
  fn = jax.jit(jax.grad(lambda x, p, y, m: step_lib.chunked_cross_entropy(spec, p, x, y, m)))
  mem = fn.lower(h, params, ids, mask).compile().memory_analysis()
  full_logits = 4096 * 128256 * 4
  assert mem.temp_size_in_bytes < full_logits / 4, mem.temp_size_in_bytes
