"""Pallas-Mosaic (TPU) dequantize-matmuls.

TPU grids run in order, so the contraction is the last grid axis and a VMEM float32 accumulator
carries across it. Each step dequantizes a whole [bk, bn] tile (its groups' halves stacked back in
order along sublanes) and feeds the MXU one dot with K = bk, rather than one small dot per group.
The scales of a column block stay in VMEM for the whole contraction ([in/group, bn] float32 is
small) and are sliced per step.

Untested on a TPU so far; the interpret-mode tests check the logic.
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ftjax import quant
from ftjax.kernels import common

_K_TILES = (1024, 512, 256, 128)
_N_TILES = (512, 256, 128)


def _k_block(w):
  """Contraction rows per grid step: a multiple of the group and of 128 lanes, or all of `in`."""
  n_in = w.matrix_shape[0]
  g = 1 if w.kind == "int8" else w.group_size
  return next((b for b in _K_TILES if n_in % b == 0 and b % g == 0), n_in)


def supports(w: quant.QArray):
  return True  # full-dimension blocks are always legal; tiles are only a speed choice


def _tile(q, s_ref, k, kind, g, bk):
  """The stored tile of step k -> float32 [bk, bn] dequantized rows."""
  if kind == "int8":
    return q.astype(jnp.float32) * s_ref[0:1, :]
  groups = bk // g
  s = s_ref[pl.ds(k * groups, groups), :]
  parts = []
  for r in range(groups):
    parts += common.halves(q[r * g // 2:(r + 1) * g // 2], s[r:r + 1], kind)
  return jnp.concatenate(parts, axis=0)


def _accumulate(acc_ref, o_ref, k, nk, value):
  @pl.when(k == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  acc_ref[...] += value

  @pl.when(k == nk - 1)
  def _():
    o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _precision(dtype):
  """Set, not inherited from jax_default_matmul_precision: Mosaic refuses fp32 precision on
  16-bit operands (exact products with float32 accumulation are what DEFAULT means for them)."""
  return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else jax.lax.Precision.DEFAULT


def _fwd_kernel(x_ref, q_ref, s_ref, o_ref, acc_ref, *, kind, g, bk, nk):
  k = pl.program_id(2)
  x = x_ref[...]
  w = _tile(q_ref[...], s_ref, k, kind, g, bk).astype(x.dtype)
  _accumulate(acc_ref, o_ref, k, nk, jnp.dot(x, w, precision=_precision(x.dtype),
                                              preferred_element_type=jnp.float32))


def _bwd_kernel(g_ref, q_ref, s_ref, o_ref, acc_ref, *, kind, g, bk, nk):
  n = pl.program_id(2)
  gy = g_ref[...]
  w = _tile(q_ref[...], s_ref, pl.program_id(1), kind, g, bk).astype(gy.dtype)
  dx = jax.lax.dot_general(gy, w, (((1,), (1,)), ((), ())), precision=_precision(gy.dtype),
                           preferred_element_type=jnp.float32)
  _accumulate(acc_ref, o_ref, n, nk, dx)


def matmul(x, w: quant.QArray, *, transpose=False, interpret=False):
  """x [M, in] @ dequant(w) -> [M, out]; transpose: x [M, out] @ dequant(w).T -> [M, in]."""
  n_in, n_out = w.matrix_shape
  g = w.group_size
  bk = _k_block(w)
  bn = common.pick(n_out, _N_TILES) or n_out
  bm = common.row_block(x.shape[0], 256)
  x, m = common.pad_rows(x, bm)
  s = quant.scales(w)
  q = jnp.asarray(w.q)
  qk = bk if w.kind == "int8" else bk // 2  # stored rows per K block
  mb, nb, kb = x.shape[0] // bm, n_out // bn, n_in // bk
  params = dict(scratch_shapes=[pltpu.VMEM((bm, bk if transpose else bn), jnp.float32)],
                interpret=interpret)
  if not transpose:
    kernel = functools.partial(_fwd_kernel, kind=w.kind, g=g, bk=bk, nk=kb)
    out = pl.pallas_call(
        kernel, grid=(mb, nb, kb),
        in_specs=[pl.BlockSpec((bm, bk), lambda i, j, k: (i, k)),
                  pl.BlockSpec((qk, bn), lambda i, j, k: (k, j)),
                  pl.BlockSpec((s.shape[0], bn), lambda i, j, k: (0, j))],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, k: (i, j)),
        out_shape=jax.ShapeDtypeStruct((x.shape[0], n_out), x.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        **params)(x, q, s)
  else:
    kernel = functools.partial(_bwd_kernel, kind=w.kind, g=g, bk=bk, nk=nb)
    out = pl.pallas_call(
        kernel, grid=(mb, kb, nb),
        in_specs=[pl.BlockSpec((bm, bn), lambda i, k, n: (i, n)),
                  pl.BlockSpec((qk, bn), lambda i, k, n: (k, n)),
                  pl.BlockSpec((s.shape[0], bn), lambda i, k, n: (0, n))],
        out_specs=pl.BlockSpec((bm, bk), lambda i, k, n: (i, k)),
        out_shape=jax.ShapeDtypeStruct((x.shape[0], n_in), x.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        **params)(x, q, s)
  return out[:m]
