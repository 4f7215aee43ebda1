"""The one matmul every projection goes through: `x @ W + ((x @ a) @ b) * scale`.

Kernels are (in, out). `w` is a dense array or a quantized `quant.QArray`; LoRA factors are
`a: (in, R)` and `b: (R, out)`, computed in x's dtype.

For a QArray the base matmul is a `jax.custom_vjp`: the base is frozen, so the backward pass
only needs dx = g @ dequant(w).T, which it recomputes from the packed weight. The only residual
is the QArray itself (already resident), never the dequantized [in, out] matrix, and w gets no
cotangent. LoRA stays outside in plain JAX so its gradients flow as usual. Which matmul runs
(XLA or a Pallas kernel) is `backend`, passed down from the Model's Kernels.

Experts (ftjax/moe.py) are the same with one more axis: w [E, in, out], a [E, in, R],
b [E, R, out], x the routed rows sorted by expert and `group_sizes` [E] how many rows each
expert takes; every product is then a `jax.lax.ragged_dot`, and a quantized w goes through
`qmatmul_grouped`, whose only residual is again the packed QArray.
"""
import functools

import jax
import jax.numpy as jnp

from ftjax import kernels, quant
from ftjax.quant import QArray


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def qmatmul(x, w: QArray, backend="xla", interpret=False):
  """x [..., in] @ dequant(w) -> [..., out] in x's dtype; differentiable in x only."""
  return kernels.matmul(x, w, backend=backend, interpret=interpret)


def _qmatmul_fwd(x, w, backend, interpret):
  return kernels.matmul(x, w, backend=backend, interpret=interpret), w


def _qmatmul_bwd(backend, interpret, w, g):
  # None: no cotangent for the frozen base
  return kernels.matmul(g, w, transpose=True, backend=backend, interpret=interpret), None


qmatmul.defvjp(_qmatmul_fwd, _qmatmul_bwd)


@jax.custom_vjp
def qmatmul_grouped(x, w: QArray, group_sizes):
  """Rows x [M, in] sorted by group, group g's rows @ dequant(w)[g] -> [M, out] in x's dtype."""
  return jax.lax.ragged_dot(x, quant.dequantize(w, x.dtype), group_sizes)


def _qmatmul_grouped_fwd(x, w, group_sizes):
  return qmatmul_grouped(x, w, group_sizes), (w, group_sizes)


def _qmatmul_grouped_bwd(res, g):
  w, group_sizes = res  # the dequantized experts are recomputed, never saved
  dense_t = jnp.swapaxes(quant.dequantize(w, g.dtype), -1, -2)
  return jax.lax.ragged_dot(g, dense_t, group_sizes), None, None


qmatmul_grouped.defvjp(_qmatmul_grouped_fwd, _qmatmul_grouped_bwd)


def linear(x, w, lora=None, *, scale=1.0, bias=None, lora_input=None, adapter_ids=None,
           group_sizes=None, backend="xla", interpret=False):
  """x: [..., in] -> [..., out].

  lora: optional (a, b), each [in, R] / [R, out], or stacked [A, in, R] / [A, R, out] with
  `adapter_ids` [B] choosing each row's adapter (x [B, ..., in]; -1: no adapter for that row).
  lora_input: what the adapter reads (x after LoRA dropout); defaults to x.
  group_sizes [E]: w holds E experts [E, in, out] and x [M, in] is rows sorted by expert (see the
  module doc); stacked adapters are then [A, E, in, R] / [A, E, R, out] and adapter_ids [M],
  one per row.
  backend, interpret: the dequantize-matmul of a quantized w (ftjax.kernels.matmul).
  Operands are flattened to 2-D [tokens, in]: with 3-D activations XLA:CPU lays the LoRA weight
  gradients out transposed and runs them as slow small dots (measured: 3.7 s -> 2.6 s a step).
  """
  if group_sizes is not None:
    return _grouped(x, w, lora, scale, lora_input, adapter_ids, group_sizes)
  lead = x.shape[:-1]
  x2 = x.reshape(-1, x.shape[-1])
  if isinstance(w, QArray):
    y = qmatmul(x2, w, backend, interpret)
  else:
    y = x2 @ w.astype(x.dtype)
  if bias is not None:
    y = y + bias.astype(y.dtype)
  if lora is not None:
    a, b = lora
    u = x2 if lora_input is None else lora_input.reshape(x2.shape)
    if a.ndim == 3:
      y = y + _per_row_lora(u, a, b, adapter_ids, scale, x.dtype)
    else:
      y = y + ((u @ a.astype(x.dtype)) @ b.astype(x.dtype)) * jnp.asarray(scale, x.dtype)
  return y.reshape(lead + (y.shape[-1],))


def _per_row_lora(u, a, b, adapter_ids, scale, dtype):
  """The LoRA term of stacked adapters, row r using adapter adapter_ids[r]: u [B * T, in] ->
  [B * T, out]. Each row's factors are gathered ([B, in, R], small next to the activations), and
  the gather's transpose sums each adapter's gradient over its rows only."""
  if adapter_ids is None:
    raise ValueError("stacked adapters need adapter_ids (one adapter per row)")
  rows = adapter_ids.shape[0]
  ids = jnp.maximum(adapter_ids, 0)
  ua = jnp.einsum("btd,bdr->btr", u.reshape(rows, -1, u.shape[-1]), a[ids].astype(dtype))
  out = jnp.einsum("btr,bro->bto", ua, b[ids].astype(dtype))
  on = (adapter_ids >= 0).astype(dtype)[:, None, None] * jnp.asarray(scale, dtype)
  return (out * on).reshape(u.shape[0], -1)


def _grouped(x, w, lora, scale, lora_input, adapter_ids, group_sizes):
  """`linear` over experts: x [M, in] sorted by expert, w [E, in, out] -> [M, out]."""
  if isinstance(w, QArray):
    y = qmatmul_grouped(x, w, group_sizes)
  else:
    y = jax.lax.ragged_dot(x, w.astype(x.dtype), group_sizes)
  if lora is None:
    return y
  a, b = (f.astype(x.dtype) for f in lora)
  u = x if lora_input is None else lora_input
  s = jnp.asarray(scale, x.dtype)
  if a.ndim == 3:
    return y + jax.lax.ragged_dot(jax.lax.ragged_dot(u, a, group_sizes), b, group_sizes) * s
  # stacked adapters: row m uses adapter adapter_ids[m] of its expert (gathered per row: [M, in,
  # R], fine for decoding's few rows; a grouped form would sort by (expert, adapter))
  if adapter_ids is None:
    raise ValueError("stacked adapters need adapter_ids (one adapter per row)")
  expert = jnp.repeat(jnp.arange(w.shape[0]), group_sizes, total_repeat_length=x.shape[0])
  ids = jnp.maximum(adapter_ids, 0)
  ua = jnp.einsum("md,mdr->mr", u, a[ids, expert])
  out = jnp.einsum("mr,mro->mo", ua, b[ids, expert])
  return y + out * ((adapter_ids >= 0).astype(x.dtype) * s)[:, None]
