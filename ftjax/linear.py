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
expert takes; every product is then a grouped matmul (`kernels.ragged_dot`: `jax.lax.ragged_dot`,
or on Hopper GPUs JAX's Mosaic GPU kernels, `grouped`), and a quantized w goes through
`qmatmul_grouped`, whose only residual is again the packed QArray; it dequantizes the experts
one slice of output columns at a time (`grouped_qdot`), never the whole stack.
"""
import functools
import math

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


# The grouped dequantize-matmul's loop: each step dequantizes the slice [E, depth, tile] of the
# experts that makes `tile` columns of the output, at most this many elements (64 MiB in bf16).
# Whole, the [E, in, out] stacks were dequantized in float32 with their NF4 lookup masks, several
# at once: 9.0 GiB of temporaries for one Qwen3-30B-A3B layer's forward and backward (TPU v5e), 0.9
# with bf16 experts; sliced, 1.1 (bench/RESULTS.md).
EXPERT_TILE_ELEMENTS = 1 << 25


def expert_tile(n_experts, depth, width, unit, budget=EXPERT_TILE_ELEMENTS):
  """Output columns per loop step: the widest multiple of `unit` dividing `width` whose slice
  [n_experts, depth, tile] holds at most `budget` elements (`unit` if none does); `width` itself
  when that fits or no multiple of `unit` divides it."""
  if n_experts * depth * width <= budget or width % unit or width <= unit:
    return width
  fits = [t for t in range(unit, width, unit) if width % t == 0]
  return max([t for t in fits if n_experts * depth * t <= budget], default=fits[0])


def grouped_qdot(x, w: QArray, group_sizes, transpose=False, budget=EXPERT_TILE_ELEMENTS,
                 grouped="xla", interpret=False):
  """Rows x [M, in] sorted by expert -> [M, out]: group e's rows @ dequant(w)[e] (transpose:
  x [M, out] @ dequant(w)[e].T -> [M, in]). A loop over slices of the output's columns, each
  dequantizing [E, depth, tile] straight into x's dtype (float32 only inside the fusion) and
  running one ragged_dot: the same values and the same dot per output column as the whole
  dequantized stack, never the whole stack. Column slices need whole quantization groups along
  `in` when transposed (int4 / nf4); lanes come in 128s on TPU, so tiles are multiples of 128.
  grouped, interpret: the grouped matmul each slice runs (kernels.ragged_dot)."""
  dot = functools.partial(kernels.ragged_dot, backend=grouped, interpret=interpret)
  e = w.shape[0]
  n_in, n_out = w.matrix_shape
  g = w.group_size
  width, depth = (n_in, n_out) if transpose else (n_out, n_in)
  unit = 128 if not transpose or w.kind == "int8" else math.lcm(128, g)
  tile = expert_tile(e, depth, width, unit, budget)
  if tile == width:
    dense = quant.dequantize(w, x.dtype)
    return dot(x, dense, group_sizes, transpose=transpose)
  s = quant.scales(w)  # float32 [E, in/g, out]: 1/g of the weight's size (int8: [E, 1, out])

  def one(i):
    if transpose:  # rows i*tile.. of each expert: whole groups (int8 has one group of all rows)
      packed = tile * w.q.shape[-2] // n_in  # int4 / nf4 hold two inputs per byte
      q = jax.lax.dynamic_slice_in_dim(w.q, i * packed, packed, axis=1)
      gi = tile if w.kind == "int8" else g
      si = s if w.kind == "int8" else jax.lax.dynamic_slice_in_dim(s, i * (tile // g), tile // g, 1)
      v = quant.values_of(w.kind, q, gi).reshape(e, tile // gi, gi, n_out)
      dense = (v * si[:, :, None, :]).reshape(e, tile, n_out).astype(x.dtype)
      return dot(x, dense, group_sizes, transpose=True)
    q = jax.lax.dynamic_slice_in_dim(w.q, i * tile, tile, axis=2)
    si = jax.lax.dynamic_slice_in_dim(s, i * tile, tile, axis=2)
    v = quant.values_of(w.kind, q, g).reshape(e, n_in // g, g, tile)
    dense = (v * si[:, :, None, :]).reshape(e, n_in, tile).astype(x.dtype)
    return dot(x, dense, group_sizes)

  out = jax.lax.map(one, jnp.arange(width // tile))  # [width / tile, M, tile]
  return jnp.moveaxis(out, 0, 1).reshape(x.shape[0], width)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def qmatmul_grouped(x, w: QArray, group_sizes, grouped="xla", interpret=False):
  """Rows x [M, in] sorted by group, group g's rows @ dequant(w)[g] -> [M, out] in x's dtype."""
  return grouped_qdot(x, w, group_sizes, grouped=grouped, interpret=interpret)


def _qmatmul_grouped_fwd(x, w, group_sizes, grouped, interpret):
  return qmatmul_grouped(x, w, group_sizes, grouped, interpret), (w, group_sizes)


def _qmatmul_grouped_bwd(grouped, interpret, res, g):
  w, group_sizes = res  # the dequantized experts are recomputed, slice by slice, never saved
  return grouped_qdot(g, w, group_sizes, transpose=True, grouped=grouped,
                      interpret=interpret), None, None


qmatmul_grouped.defvjp(_qmatmul_grouped_fwd, _qmatmul_grouped_bwd)


def linear(x, w, lora=None, *, scale=1.0, bias=None, lora_input=None, adapter_ids=None,
           group_sizes=None, backend="xla", grouped="xla", interpret=False):
  """x: [..., in] -> [..., out].

  lora: optional (a, b), each [in, R] / [R, out], or stacked [A, in, R] / [A, R, out] with
  `adapter_ids` [B] choosing each row's adapter (x [B, ..., in]; -1: no adapter for that row).
  lora_input: what the adapter reads (x after LoRA dropout); defaults to x.
  group_sizes [E]: w holds E experts [E, in, out] and x [M, in] is rows sorted by expert (see the
  module doc); stacked adapters are then [A, E, in, R] / [A, E, R, out] and adapter_ids [M],
  one per row.
  backend, interpret: the dequantize-matmul of a quantized w (ftjax.kernels.matmul).
  grouped, interpret: the grouped matmul of experts (ftjax.kernels.ragged_dot).
  Operands are flattened to 2-D [tokens, in]: with 3-D activations XLA:CPU lays the LoRA weight
  gradients out transposed and runs them as slow small dots (measured: 3.7 s -> 2.6 s a step).
  """
  if group_sizes is not None:
    return _grouped(x, w, lora, scale, lora_input, adapter_ids, group_sizes, grouped, interpret)
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
  pick = lambda f: jnp.take(f, ids, axis=0).astype(dtype)  # not f[ids]: see _grouped
  ua = jnp.einsum("btd,bdr->btr", u.reshape(rows, -1, u.shape[-1]), pick(a))
  out = jnp.einsum("btr,bro->bto", ua, pick(b))
  on = (adapter_ids >= 0).astype(dtype)[:, None, None] * jnp.asarray(scale, dtype)
  return (out * on).reshape(u.shape[0], -1)


def _grouped(x, w, lora, scale, lora_input, adapter_ids, group_sizes, grouped, interpret):
  """`linear` over experts: x [M, in] sorted by expert, w [E, in, out] -> [M, out]."""
  dot = functools.partial(kernels.ragged_dot, backend=grouped, interpret=interpret)
  if isinstance(w, QArray):
    y = qmatmul_grouped(x, w, group_sizes, grouped, interpret)
  else:
    y = dot(x, w.astype(x.dtype), group_sizes)
  if lora is None:
    return y
  a, b = (f.astype(x.dtype) for f in lora)
  u = x if lora_input is None else lora_input
  s = jnp.asarray(scale, x.dtype)
  if a.ndim == 3:
    return y + dot(dot(u, a, group_sizes), b, group_sizes) * s
  # stacked adapters: row m uses adapter adapter_ids[m] of its expert (gathered per row: [M, in,
  # R], fine for decoding's few rows; a grouped form would sort by (expert, adapter))
  if adapter_ids is None:
    raise ValueError("stacked adapters need adapter_ids (one adapter per row)")
  expert = jnp.repeat(jnp.arange(w.shape[0]), group_sizes, total_repeat_length=x.shape[0])
  # jnp.take, not a[ids, expert]: indexing a sharded array that a shard_map closes over (the
  # experts run in one, moe.sparse_mlp) fails in jax 0.10 and 0.11 ("Context mesh ... should
  # match the mesh of sharding ... passed to index_to_gather")
  pair = jnp.maximum(adapter_ids, 0) * w.shape[0] + expert
  pick = lambda f: jnp.take(f.reshape((-1,) + f.shape[2:]), pair, axis=0)
  ua = jnp.einsum("md,mdr->mr", u, pick(a))
  out = jnp.einsum("mr,mro->mo", ua, pick(b))
  return y + out * ((adapter_ids >= 0).astype(x.dtype) * s)[:, None]
