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
XLA does not partition a kernel's call: on a mesh, moe.sparse_mlp calls these inside a shard_map
over the batch axes, so each device runs its own routed rows.
"""
import contextlib
import functools
import types

import jax
import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu, transposed_ragged_dot_mgpu

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
  with _interpreted(interpret), _sm_count():
    out = transposed_ragged_dot_mgpu.transposed_ragged_dot(
        x, g, group_sizes=group_sizes, block_m=DW_BLOCK_M, block_n=bn, block_k=BLOCK_K,
        max_concurrent_steps=DW_STEPS, grid_block_n=1)
  return out[:, :k, :n]


class _JaxWithSmCount:
  """The jax module, except that devices() is one Hopper GPU with NUM_SMS cores: JAX's
  transposed kernel sizes its grid by jax.devices()[0].core_count, which neither a compile for a
  GPU this machine lacks (ftjax.plan --target=h200) nor the CPU interpreter can answer."""

  def devices(self, *args, **kwargs):
    del args, kwargs
    return [types.SimpleNamespace(core_count=NUM_SMS)]

  def __getattr__(self, name):
    return getattr(jax, name)


@contextlib.contextmanager
def _sm_count():
  """While tracing JAX's transposed kernel without a GPU, its module sees _JaxWithSmCount; on a
  GPU it asks the device itself."""
  if any(d.platform == "gpu" for d in jax.devices()):
    yield
    return
  transposed_ragged_dot_mgpu.jax = _JaxWithSmCount()
  try:
    yield
  finally:
    transposed_ragged_dot_mgpu.jax = jax


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

