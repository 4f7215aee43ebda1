"""Grouped matmuls on Hopper GPUs (sm90: H100, H200) with JAX's Pallas Mosaic GPU kernels.

  ragged_dot(x, w, group_sizes)   x [M, K] sorted by group, group e's rows @ w[e] [K, N] -> [M, N]

XLA:GPU (jax 0.11.2) expands `jax.lax.ragged_dot` into a zero-padded dense product over all E
groups: a [M, E, K] temporary, 8 GiB for one Qwen3-30B-A3B layer's experts in its train step.
These kernels walk the rows group by group instead (JAX's jax.experimental.pallas.ops.gpu
ragged_dot_mgpu, wgmma on bf16/f16 tiles, float32 accumulators), so the work and memory follow
the M routed rows, never E. A `jax.custom_vjp`: dx is the same kernel against w transposed; dw
(LoRA factors on experts) the transposed ragged dot, per group x_e^T @ g_e, run only for a w that
is differentiated (a frozen base gets none).

The kernels tile K and N in whole blocks: both are zero-padded up to a block (a LoRA rank of 16
becomes 64: exact, since the padding is zeros, and small next to the base product); rows need no
padding. Block sizes are untuned (no GPU here); bench/gpu.py checks the values on a card. On CPU
they run in Mosaic GPU's interpret mode (interpret=True), which is how the tests check them.
Planned for one GPU: XLA does not partition a kernel's call, so on a mesh of several it gathers
the operands to each device (a shard_map over the routed rows would be the next step).
"""
# The transposed kernel below is JAX's transposed_ragged_dot_mgpu (Copyright 2025 The JAX
# Authors, Apache License 2.0) with the SM count passed in: JAX's reads jax.devices()[0], which
# a deviceless compile (ftjax.plan --target=h200) does not have.
import contextlib
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

DTYPES = (jnp.bfloat16, jnp.float16)  # what wgmma multiplies here; other dtypes take XLA's path
BLOCK_M, BLOCK_K, STEPS = 128, 64, 4
DW_BLOCK_M, DW_STEPS = 64, 2
NUM_SMS = 132  # H100 SXM and H200 (JAX's forward kernel hard-codes it too)


def supports(x, w) -> bool:
  return x.dtype == w.dtype and any(x.dtype == d for d in DTYPES)


def _pad(a, axis, multiple):
  extra = -a.shape[axis] % multiple
  if not extra:
    return a
  widths = [(0, 0)] * a.ndim
  widths[axis] = (0, extra)
  return jnp.pad(a, widths)


def _block_n(n):
  return 64 if n <= 64 else 128


def _interpreted(interpret):
  return plgpu.force_gpu_interpret_mode() if interpret else contextlib.nullcontext()


def _dot(x, w, group_sizes, transpose, interpret):
  """x [M, K] @ w[e] (transpose: w [E, N, K], x @ w[e].T) -> [M, N]."""
  n = w.shape[1] if transpose else w.shape[2]
  bn = _block_n(n)
  x = _pad(x, 1, BLOCK_K)
  w = _pad(_pad(w, 2 if transpose else 1, BLOCK_K), 1 if transpose else 2, bn)
  with _interpreted(interpret):
    y = ragged_dot_mgpu.ragged_dot(
        x, w, group_sizes=group_sizes, block_m=BLOCK_M, block_n=bn, block_k=BLOCK_K,
        max_concurrent_steps=STEPS, grid_block_n=1, transpose_rhs=transpose)
  return y[:, :n]


def _dw(x, g, group_sizes, interpret):
  """Per group e, x_e^T @ g_e: x [M, K], g [M, N] -> [E, K, N] (rows of no group count nowhere).
  Rows are padded to whole blocks (the kernel reads each group's blocks from its first)."""
  k, n = x.shape[1], g.shape[1]
  bn = _block_n(n)
  x = _pad(_pad(x, 1, DW_BLOCK_M), 0, BLOCK_K)
  g = _pad(_pad(g, 1, bn), 0, BLOCK_K)
  with _interpreted(interpret):
    out = _transposed_ragged_dot(x, g, group_sizes, DW_BLOCK_M, bn, BLOCK_K, DW_STEPS, NUM_SMS)
  return out[:, :k, :n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def ragged_dot(x, w, group_sizes, transpose=False, interpret=False):
  """Rows x [M, K] sorted by group, group e's rows @ w[e] [K, N] (transpose: w [E, N, K], rows @
  w[e].T, with no transposed copy of w) -> [M, N] in x's dtype (x and w of one dtype in DTYPES;
  group_sizes int32 [E] summing to M)."""
  return _dot(x, w, group_sizes, transpose, interpret)


def _ragged_dot_fwd(x, w, group_sizes, transpose, interpret):
  out = _dot(x.value, w.value, group_sizes.value, transpose, interpret)
  return out, (x.value, w.value, group_sizes.value, x.perturbed, w.perturbed)


def _ragged_dot_bwd(transpose, interpret, res, g):
  x, w, group_sizes, x_perturbed, w_perturbed = res
  if isinstance(g, jax.custom_derivatives.SymbolicZero):
    return None, None, None
  dx = _dot(g, w, group_sizes, not transpose, interpret) if x_perturbed else None
  dw = None
  if w_perturbed:
    dw = _dw(g, x, group_sizes, interpret) if transpose else _dw(x, g, group_sizes, interpret)
    dw = dw.astype(w.dtype)
  return dx, dw, None


ragged_dot.defvjp(_ragged_dot_fwd, _ragged_dot_bwd, symbolic_zeros=True)


def _transposed_ragged_dot(lhs, rhs, group_sizes, block_m, block_n, block_k,
                           max_concurrent_steps, num_sms):
  """JAX's transposed_ragged_dot (grid_block_n=1): lhs [K, M], rhs [K, N] -> [G, M, N]."""
  k, m = lhs.shape
  n = rhs.shape[1]
  g = group_sizes.shape[0]
  group_sizes = group_sizes.astype(jnp.int32)
  group_ends = jnp.cumsum(group_sizes)
  group_starts = group_ends - group_sizes
  group_block_starts = group_starts // block_k * block_k
  group_block_ends = -(group_ends // -block_k) * block_k
  group_num_blocks = (group_block_ends - group_block_starts) // block_k

  swizzle = plgpu.find_swizzle(block_k * jnp.dtype(lhs.dtype).itemsize * 8)
  swizzle_elems = swizzle // jnp.dtype(lhs.dtype).itemsize
  transforms = (plgpu.TilingTransform((8, swizzle_elems)), plgpu.SwizzleTransform(swizzle))
  release = 1 if max_concurrent_steps > 1 else 0

  def body(sizes_gmem, starts_gmem, ends_gmem, num_blocks_gmem, block_starts_gmem, lhs_gmem,
           rhs_gmem, o_gmem):
    grid_m, grid_n = pl.cdiv(m, block_m), pl.cdiv(n, block_n)

    @plgpu.nd_loop((g, grid_m * grid_n), collective_axes="sm")
    def mn_loop(loop_info):
      g_i = loop_info.index[0]
      m_i, n_i = plgpu.planar_snake(loop_info.index[1], (grid_m, grid_n), 1, 1)
      # Potentially out of bounds; emit_pipeline never reads the part that is.
      block_start = pl.multiple_of(block_starts_gmem[g_i], block_k)
      rows = pl.ds(block_start, k)

      def mask(smem, keep):
        # The group's first and last blocks hold rows of the neighbouring groups: zero them.
        idx = plgpu.layout_cast(lax.broadcasted_iota(jnp.int32, (block_k, block_m), 0),
                                plgpu.Layout.WGMMA)
        smem[...] = smem[...] * keep(idx).astype(smem.dtype)
        plgpu.commit_smem()

      def acc_scope(acc_ref):
        def block_matmul(block_idx, lhs_smem, rhs_smem):
          block_idx = block_idx[0]

          @pl.when(block_idx == 0)
          def _():
            mask(lhs_smem, lambda i: i >= lax.rem(starts_gmem[g_i], block_k))

          @pl.when(block_idx == num_blocks_gmem[g_i] - 1)
          def _():
            mask(lhs_smem, lambda i: i <= lax.rem(ends_gmem[g_i] - 1, block_k))

          plgpu.wgmma(acc_ref, lhs_smem.transpose((1, 0)), rhs_smem)
          if max_concurrent_steps == 1:
            plgpu.wgmma_wait(0)  # no delayed release: smem is reused by the next step

        @pl.when(sizes_gmem[g_i] > 0)
        def _():
          plgpu.emit_pipeline(
              block_matmul,
              grid=(num_blocks_gmem[g_i],),
              in_specs=[
                  plgpu.BlockSpec((block_k, block_m), lambda k_i: (k_i, m_i),
                                  delay_release=release, transforms=transforms),
                  plgpu.BlockSpec((block_k, block_n), lambda k_i: (k_i, n_i),
                                  delay_release=release, transforms=transforms),
              ],
              max_concurrent_steps=max_concurrent_steps,
          )(lhs_gmem.at[rows, :], rhs_gmem.at[rows, :])

        return acc_ref[...]

      acc = pl.run_scoped(acc_scope, plgpu.ACC((block_m, block_n)))

      @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM((block_m, block_n), dtype=o_gmem.dtype,
                                                          transforms=transforms))
      def store_scope(o_smem):
        o_smem[...] = acc.astype(o_smem.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(
            o_smem, o_gmem.at[g_i, pl.ds(m_i * block_m, block_m), pl.ds(n_i * block_n, block_n)])
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  kernel = plgpu.kernel(
      body, out_type=jax.ShapeDtypeStruct((g, m, n), lhs.dtype), grid=(num_sms,),
      grid_names=("sm",),
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup))
  return kernel(group_sizes, group_starts, group_ends, group_num_blocks, group_block_starts,
                lhs, rhs)
