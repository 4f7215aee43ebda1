"""Fused dequantize-matmuls for a quantized kernel w [in, out] (see ftjax/quant.py):

  matmul(x, w)                   x [..., in] @ dequant(w)      -> [..., out]   (forward)
  matmul(g, w, transpose=True)   g [..., out] @ dequant(w).T   -> [..., in]    (backward dx)

Backends: "xla" dequantizes the whole matrix then calls dot (the reference, and the default until
a GPU/TPU measurement says a kernel beats it); "pallas" picks the Pallas kernel of the platform
(Triton on GPU, Mosaic on TPU; XLA elsewhere); "triton" / "mosaic" force one (with
interpret=True they run on CPU, which is how the tests check them). Shapes a kernel cannot tile
fall back to XLA. The model passes its choice down (Model.kernels.quant, static).

Grouped matmuls (experts, ftjax/moe.py) have their own choice, Model.kernels.grouped
(`grouped_backend`): "mgpu", JAX's Pallas Mosaic GPU ragged-dot kernels
(ftjax/kernels/grouped_gpu.py) on Hopper GPUs, since XLA:GPU expands `jax.lax.ragged_dot` into a
dense product over all experts; "xla", `jax.lax.ragged_dot`, elsewhere (XLA:TPU lowers it to a
grouped matmul kernel; XLA:CPU expands it too, fine at test sizes).

Every path dequantizes exactly as `quant.dequantize` does (float32 value * float32 scale, cast to
the activation dtype) and accumulates in float32; they differ only in summation order.
"""
import dataclasses

import jax
import jax.numpy as jnp

from ftjax import quant

BACKENDS = ("xla", "pallas", "triton", "mosaic")
GROUPED = ("xla", "mgpu")


def platform_backend(backend: str, platform: str) -> str:
  """"pallas" -> the Pallas kernel of `platform` (Triton on GPU, Mosaic on TPU, XLA elsewhere)."""
  if backend == "pallas":
    return {"gpu": "triton", "tpu": "mosaic"}.get(platform, "xla")
  return backend


def grouped_backend(platform: str, capability: str | None) -> str:
  """The grouped matmul of a device: "mgpu" on sm90 GPUs (H100, H200: compute capability 9.0; the
  kernels use Hopper's wgmma), "xla" elsewhere."""
  return "mgpu" if platform == "gpu" and capability == "9.0" else "xla"


def ragged_dot(x, w, group_sizes, *, transpose=False, backend="xla", interpret=False):
  """Rows x [M, in] sorted by group, group e's rows @ w[e] [in, out] -> [M, out] (transpose: w
  [E, out, in], rows @ w[e].T); differentiable in x and w. backend "mgpu" runs Mosaic GPU kernels
  where the dtypes allow (bf16 / f16), else XLA's ragged_dot. The Mosaic GPU kernel reads a
  transposed w as it is stored; XLA:GPU hoisted the transpose onto the whole stacked packed
  experts of every layer, 0.28 GiB a Qwen3-30B-A3B layer (bench/RESULTS.md)."""
  if backend not in GROUPED:
    raise ValueError(f"grouped matmul backend {backend!r}: use one of {GROUPED}")
  if backend == "mgpu":
    from ftjax.kernels import grouped_gpu  # Mosaic GPU's modules load only where they run
    if grouped_gpu.supports(x, w):
      return grouped_gpu.ragged_dot(x, w, group_sizes, transpose, interpret)
  return jax.lax.ragged_dot(x, jnp.swapaxes(w, 1, 2) if transpose else w, group_sizes)


# A product with at most this many rows (a decode step: one token per row) dequantizes on CPU one
# block of inputs at a time (`_blockwise`).
DECODE_ROWS = 64


# Output columns per step of the XLA path's loop: the dequantized weight exists one [in, TILE]
# (or, transposed, [TILE, out]) slice at a time. Dequantized whole, XLA kept float32 and bf16
# copies of the largest matrices alive at once (0.7 GiB of the Llama-3-8B QLoRA plan on TPU v5e).
TILE = 512


def reference(x, w, transpose=False):
  """The XLA path: dequantize to x's dtype, then dot; in a loop over TILE-wide slices of the
  matmul's output where the shape allows (each output element is the same dot over the whole
  contraction as with the whole matrix, of the same dequantized values); on CPU, a decode-sized
  product (few rows) block by block."""
  rows = x.size // x.shape[-1]
  if not transpose and w.ndim == 2 and rows <= DECODE_ROWS and jax.default_backend() == "cpu":
    return _blockwise(x.reshape(rows, -1), w).reshape(*x.shape[:-1], -1)
  n_in, n_out = w.matrix_shape
  width = n_in if transpose else n_out  # the output dimension of this matmul
  g = w.group_size
  if w.ndim != 2 or width <= TILE or width % TILE or (transpose and w.kind != "int8" and TILE % g):
    dense = quant.dequantize(w, x.dtype)
    return jnp.einsum("...o,io->...i", x, dense) if transpose else x @ dense
  s = quant.scales(w)  # float32 [in/g, out]: small next to the weight

  def one(i):
    if transpose:  # rows i*TILE.. of w: whole groups (int8 has one group of all rows)
      packed = TILE if w.kind == "int8" else TILE // 2
      q = jax.lax.dynamic_slice_in_dim(w.q, i * packed, packed, axis=0)
      si = s if w.kind == "int8" else jax.lax.dynamic_slice_in_dim(s, i * (TILE // g), TILE // g, 0)
      rows, gi = TILE, (TILE if w.kind == "int8" else g)
      v = quant.values(dataclasses.replace(w, q=q, matrix_shape=(rows, n_out)))
      dense = (v.reshape(rows // gi, gi, n_out) * si[:, None, :]).reshape(rows, n_out)
      return jnp.einsum("...o,io->...i", x, dense.astype(x.dtype))
    q = jax.lax.dynamic_slice_in_dim(w.q, i * TILE, TILE, axis=1)
    si = jax.lax.dynamic_slice_in_dim(s, i * TILE, TILE, axis=1)
    v = quant.values(dataclasses.replace(w, q=q, matrix_shape=(n_in, TILE)))
    dense = (v.reshape(n_in // g, g, TILE) * si[:, None, :]).reshape(n_in, TILE)
    return x @ dense.astype(x.dtype)

  out = jax.lax.map(one, jnp.arange(width // TILE))  # [width / TILE, ..., TILE]
  return jnp.moveaxis(out, 0, -2).reshape(*x.shape[:-1], width)


def matmul(x, w: quant.QArray, *, transpose=False, backend="xla", interpret=False):
  """x @ dequant(w) (or x @ dequant(w).T) with the chosen backend; see the module docstring."""
  if backend not in BACKENDS:
    raise ValueError(f"kernel backend {backend!r}: use one of {BACKENDS}")
  backend = platform_backend(backend, jax.default_backend())
  if backend == "xla" or w.ndim != 2:
    return reference(x, w, transpose)
  if backend == "triton":
    from ftjax.kernels import triton as impl
  else:
    from ftjax.kernels import mosaic as impl
  if not impl.supports(w):
    return reference(x, w, transpose)
  lead = x.shape[:-1]
  out = impl.matmul(x.reshape(-1, x.shape[-1]), w, transpose=transpose, interpret=interpret)
  return out.reshape(*lead, out.shape[-1])


def _blockwise(x, w: quant.QArray):
  """x [M, in] @ dequant(w), one block of inputs (a whole number of groups) per loop step: the
  dequantized block stays in cache, where XLA:CPU would write the whole dequantized [in, out]
  matrix to memory and read it back for the dot (it fuses no dequantization into a dot), for
  every token of a decode. Measured on a [1024, 4096] int8 kernel, 8 rows: 0.61 ms against 0.80."""
  n_in, n_out = w.matrix_shape
  g = w.group_size
  block = g if g <= 256 else next(b for b in (256, 128, 64, n_in) if n_in % b == 0 and g % b == 0)
  packed = block * w.q.shape[-2] // n_in  # int4 / nf4 hold two inputs per byte
  s = quant.scales(w)

  def step(i, acc):
    q = jax.lax.dynamic_slice_in_dim(w.q, i * packed, packed, 0)
    scale = jax.lax.dynamic_slice_in_dim(s, (i * block) // g, 1, 0)
    dense = (quant.values_of(w.kind, q, min(g, block)) * scale).astype(x.dtype)
    part = jax.lax.dynamic_slice_in_dim(x, i * block, block, 1)
    return acc + jnp.dot(part, dense, preferred_element_type=jnp.float32)

  out = jax.lax.fori_loop(0, n_in // block, step, jnp.zeros((x.shape[0], n_out), jnp.float32))
  return out.astype(x.dtype)
