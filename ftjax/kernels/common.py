"""What the Pallas kernels share: decoding a tile of codes, tile sizes, padding.

Inside a kernel there is no gather, so NF4 codes become values through a chain of selects; all
integer work is done in int32, which every Triton and Mosaic target supports.
"""
import jax.numpy as jnp

from ftjax import quant


def decode(codes, kind):
  """int32 codes of a tile -> float32 values before scaling (as quant.values)."""
  if kind == "int8":
    return codes.astype(jnp.float32)
  if kind == "int4":
    return (codes - 8).astype(jnp.float32)
  v = jnp.full(codes.shape, float(quant.NF4_CODE[0]), jnp.float32)
  for k in range(1, 16):
    v = jnp.where(codes == k, float(quant.NF4_CODE[k]), v)
  return v


def halves(packed, scale, kind):
  """A packed tile of ONE group (uint8 [g/2, n]) and its scale row [1, n] -> the dequantized
  float32 rows of the first and of the second half of the group."""
  c = packed.astype(jnp.int32)
  return decode(c >> 4, kind) * scale, decode(c & 15, kind) * scale


def pick(n, candidates):
  """The first candidate dividing n, else None."""
  return next((c for c in candidates if n % c == 0), None)


def pad_rows(x, multiple):
  """Pads axis 0 of x up to a multiple (kernels tile rows evenly); returns (x, original rows)."""
  m = x.shape[0]
  extra = -m % multiple
  if extra:
    x = jnp.pad(x, ((0, extra), (0, 0)))
  return x, m


def row_block(m, cap):
  """Rows per block: `cap` for big inputs, else m rounded up to a multiple of 16."""
  return cap if m >= cap else max(16, -(-m // 16) * 16)
