"""Pallas-Triton (GPU) dequantize-matmuls.

Triton programs run unordered, so a program owns one output tile and loops over the contraction
itself. One loop step is one quantization group (int4/nf4; int8: `step` rows), whose two packed
halves are contiguous input rows (see quant.py), so each half is its own dot and nothing is
interleaved in registers. Triton needs power-of-two tensor sizes and dots with K >= 16: shapes
that do not allow it fall back to XLA (`supports`).

Untested on a GPU so far (no GPU in CI); the interpret-mode tests check the logic.
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ftjax import quant
from ftjax.kernels import common

_TILE = (128, 64, 32, 16)


def _step(w):
  """Contraction rows per loop step: the group (int4/nf4) or a power-of-two chunk (int8)."""
  if w.kind == "int8":
    return common.pick(w.matrix_shape[0], _TILE)
  g = w.group_size
  return g if g >= 32 and g & (g - 1) == 0 else None


def supports(w: quant.QArray):
  return _step(w) is not None and common.pick(w.matrix_shape[1], _TILE) is not None


def _pieces(q, s, kind):
  """A loaded step of codes and its scale row -> [(row offset in the step, float32 rows)]."""
  if kind == "int8":
    return [(0, q.astype(jnp.float32) * s)]
  hi, lo = common.halves(q, s, kind)
  return [(0, hi), (q.shape[0], lo)]


def _fwd_kernel(x_ref, q_ref, s_ref, o_ref, *, kind, step, steps):
  rows = step if kind == "int8" else step // 2  # stored rows per step

  def body(j, acc):
    s = s_ref[pl.ds(0 if kind == "int8" else j, 1), :]
    for off, w in _pieces(q_ref[pl.ds(j * rows, rows), :], s, kind):
      xs = x_ref[:, pl.ds(j * step + off, w.shape[0])]
      acc += jnp.dot(xs, w.astype(xs.dtype), preferred_element_type=jnp.float32)
    return acc

  acc = jax.lax.fori_loop(0, steps, body, jnp.zeros(o_ref.shape, jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


def _bwd_kernel(g_ref, q_ref, s_ref, o_ref, *, kind, bn, chunks):
  bm, step = o_ref.shape
  n_pieces = 1 if kind == "int8" else 2
  width = step // n_pieces

  def body(n, accs):
    cols = pl.ds(n * bn, bn)
    g = g_ref[:, cols]
    out = []
    for acc, (_, w) in zip(accs, _pieces(q_ref[:, cols], s_ref[:, cols], kind)):
      out.append(acc + jax.lax.dot_general(g, w.astype(g.dtype), (((1,), (1,)), ((), ())),
                                           preferred_element_type=jnp.float32))
    return tuple(out)

  init = tuple(jnp.zeros((bm, width), jnp.float32) for _ in range(n_pieces))
  accs = jax.lax.fori_loop(0, chunks, body, init)
  for p, acc in enumerate(accs):
    o_ref[:, p * width:(p + 1) * width] = acc.astype(o_ref.dtype)


def matmul(x, w: quant.QArray, *, transpose=False, interpret=False):
  """x [M, in] @ dequant(w) -> [M, out]; transpose: x [M, out] @ dequant(w).T -> [M, in]."""
  n_in, n_out = w.matrix_shape
  step = _step(w)
  bn = common.pick(n_out, _TILE)
  bm = common.row_block(x.shape[0], 64)
  x, m = common.pad_rows(x, bm)
  s = quant.scales(w)
  q = jnp.asarray(w.q)
  stored = step if w.kind == "int8" else step // 2
  int8 = w.kind == "int8"
  params = dict(compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2))
  if not transpose:
    kernel = functools.partial(_fwd_kernel, kind=w.kind, step=step, steps=n_in // step)
    out = pl.pallas_call(
        kernel, grid=(x.shape[0] // bm, n_out // bn),
        in_specs=[pl.BlockSpec((bm, n_in), lambda i, j: (i, 0)),
                  pl.BlockSpec((q.shape[0], bn), lambda i, j: (0, j)),
                  pl.BlockSpec((s.shape[0], bn), lambda i, j: (0, j))],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((x.shape[0], n_out), x.dtype),
        interpret=interpret, **params)(x, q, s)
  else:
    kernel = functools.partial(_bwd_kernel, kind=w.kind, bn=bn, chunks=n_out // bn)
    out = pl.pallas_call(
        kernel, grid=(x.shape[0] // bm, n_in // step),
        in_specs=[pl.BlockSpec((bm, n_out), lambda i, j: (i, 0)),
                  pl.BlockSpec((stored, n_out), lambda i, j: (j, 0)),
                  pl.BlockSpec((1, n_out), lambda i, j: (0 if int8 else j, 0))],
        out_specs=pl.BlockSpec((bm, step), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((x.shape[0], n_in), x.dtype),
        interpret=interpret, **params)(x, q, s)
  return out[:m]
