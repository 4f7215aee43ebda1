"""The one matmul every projection goes through: `x @ W + ((x @ a) @ b) * scale`.

Kernels are (in, out). `w` is a dense array or a quantized `quant.QArray`; LoRA factors are
`a: (in, R)` and `b: (R, out)`, computed in x's dtype.

For a QArray the base matmul is a `jax.custom_vjp`: the base is frozen, so the backward pass
only needs dx = g @ dequant(w).T, which it recomputes from the packed weight. The only residual
is the QArray itself (already resident), never the dequantized [in, out] matrix, and w gets no
cotangent. LoRA stays outside in plain JAX so its gradients flow as usual. Which matmul runs
(XLA or a Pallas kernel) is `backend`, passed down from the Model's Kernels.
"""
import functools

import jax
import jax.numpy as jnp

from ftjax import kernels
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


def linear(x, w, lora=None, *, scale=1.0, bias=None, lora_input=None, adapter_ids=None,
           backend="xla", interpret=False):
  """x: [..., in] -> [..., out].

  lora: optional (a, b), each [in, R] / [R, out], or stacked [A, in, R] / [A, R, out] with
  `adapter_ids` [B] choosing each row's adapter (x [B, ..., in]; -1: no adapter for that row).
  lora_input: what the adapter reads (x after LoRA dropout); defaults to x.
  backend, interpret: the dequantize-matmul of a quantized w (ftjax.kernels.matmul).
  Operands are flattened to 2-D [tokens, in]: with 3-D activations XLA:CPU lays the LoRA weight
  gradients out transposed and runs them as slow small dots (measured: 3.7 s -> 2.6 s a step).
  """
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
