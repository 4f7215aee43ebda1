"""The one matmul every projection goes through: `x @ W + ((x @ a) @ b) * scale`.

Kernels are (in, out). `w` is a dense array or a quantized array (see quant.py); LoRA factors are
`a: (in, R)` and `b: (R, out)`, computed in x's dtype.
"""
import jax.numpy as jnp


def linear(x, w, lora=None, *, scale=1.0, bias=None, lora_input=None):
  """x: [..., in] -> [..., out].

  lora: optional (a, b). lora_input: what the adapter reads (x after LoRA dropout); defaults to x.
  """
  y = x @ w.astype(x.dtype)
  if bias is not None:
    y = y + bias.astype(y.dtype)
  if lora is not None:
    a, b = lora
    u = x if lora_input is None else lora_input
    y = y + ((u @ a.astype(x.dtype)) @ b.astype(x.dtype)) * jnp.asarray(scale, x.dtype)
  return y
