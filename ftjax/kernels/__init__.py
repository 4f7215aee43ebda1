"""Fused dequantize-matmuls for a quantized kernel w [in, out] (see ftjax/quant.py):

  matmul(x, w)                   x [..., in] @ dequant(w)      -> [..., out]   (forward)
  matmul(g, w, transpose=True)   g [..., out] @ dequant(w).T   -> [..., in]    (backward dx)

Backends: "xla" dequantizes the whole matrix then calls dot (the reference, and the default until
a GPU/TPU measurement says a kernel beats it); "pallas" picks the Pallas kernel of the platform
(Triton on GPU, Mosaic on TPU; XLA elsewhere); "triton" / "mosaic" force one (with
interpret=True they run on CPU, which is how the tests check them). Shapes a kernel cannot tile
fall back to XLA. The model passes its choice down (Model.kernels.quant, static).

Every path dequantizes exactly as `quant.dequantize` does (float32 value * float32 scale, cast to
the activation dtype) and accumulates in float32; they differ only in summation order.
"""
import jax
import jax.numpy as jnp

from ftjax import quant

BACKENDS = ("xla", "pallas", "triton", "mosaic")


def platform_backend(backend: str, platform: str) -> str:
  """"pallas" -> the Pallas kernel of `platform` (Triton on GPU, Mosaic on TPU, XLA elsewhere)."""
  if backend == "pallas":
    return {"gpu": "triton", "tpu": "mosaic"}.get(platform, "xla")
  return backend


def reference(x, w, transpose=False):
  """The XLA path: dequantize to x's dtype, then one dot."""
  dense = quant.dequantize(w, x.dtype)
  if transpose:
    return jnp.einsum("...o,io->...i", x, dense)
  return x @ dense


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
