"""Frozen base weights stored as int8, int4 or NF4 (QLoRA), and their exact dequantization.

A kernel `w` is (in, out), usually stacked over layers as [L, in, out]; each trailing [in, out]
matrix is quantized on its own, on host with numpy, one matrix (in row chunks) at a time.

Schemes (groups run along `in`, the contraction dim, so a scale multiplies a whole output column):

  int8  s = f32(max|w| / 127) per output column; q = clip(rint(w / s), -127, 127) (float64 math).
  int4  s = f32(max|w| / 7) per group of `group_size` inputs; q = clip(rint(w / s), -7, 7),
        stored as the nibble q + 8.
  nf4   bitsandbytes `quantize_4bit(w.T, blocksize=64, quant_type="nf4", compress_statistics=True)`:
        per 64-input block absmax; code = number of NF4 midpoints below w * (1 / absmax); the
        absmax are double quantized (offset = their mean, then 8-bit dynamic-map blockwise with
        blocks of 256 over the torch (out, in/64) order). `group_size` does not apply: NF4 blocks
        are always 64, as in QLoRA. Codes equal bitsandbytes' except where its float32 `mean` of
        the absmax (a summation order that depends on the CPU) differs in the last bit from our
        correctly rounded one and a value sits on a rounding edge; values then differ by one step
        of the 8-bit absmax code, which no test of ours has hit.

Packing (int4, nf4): two 4-bit codes per uint8. Within each group of g inputs, byte row r holds
input g*j + r in its high nibble and g*j + g/2 + r in its low nibble. Groups stay whole, so a
shard along `in` (a multiple of g rows) holds exactly its rows, and a kernel unpacks a group
with two contiguous halves, never an interleave.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.errors import UserError

MODES = ("int8", "int4", "nf4")
NF4_BLOCK = 64  # bitsandbytes' QLoRA blocksize
NF4_BLOCK2 = 256  # double-quantization blocksize of the absmax
_CHUNK = 1 << 21  # elements per host chunk: bounds temporaries to a few MiB per matrix

NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], np.float32)
_NF4_MID = (NF4_CODE[:-1] + NF4_CODE[1:]) / np.float32(2)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QArray:
  """A quantized [..., in, out] kernel. Children carry the leading dims (so `lax.scan` slices
  them like the weight); aux data is only the per-matrix metadata.

  q:      int8 [..., in, out] (int8) | uint8 [..., in/2, out] (int4, nf4; see module doc)
  scale:  float32 [..., in/group, out] (int8: one group; int4) | uint8 codes of the absmax (nf4)
  scale2: float32 [..., ceil(out*in/64/256)] nf4 absmax of the absmax; None otherwise
  offset: float32 [...] nf4 mean of the absmax; None otherwise
  """
  q: jax.Array
  scale: jax.Array
  scale2: jax.Array | None
  offset: jax.Array | None
  kind: str = dataclasses.field(metadata=dict(static=True))
  group_size: int = dataclasses.field(metadata=dict(static=True))
  matrix_shape: tuple[int, int] = dataclasses.field(metadata=dict(static=True))
  dtype: np.dtype = dataclasses.field(metadata=dict(static=True))  # what dequantize returns

  @property
  def shape(self):
    return tuple(self.q.shape[:-2]) + tuple(self.matrix_shape)

  @property
  def ndim(self):
    return len(self.shape)

  @property
  def size(self):
    return math.prod(self.shape)


def _dynamic_map():
  """bitsandbytes `create_dynamic_map(signed=True)`, float32 for float32 (its torch.linspace
  runs as a fused multiply-add, reproduced here in float64 then rounded)."""

  def linspace(n):
    step = (np.float32(1.0) - np.float32(0.1)) / np.float32(n - 1)
    i = np.arange(n, dtype=np.float64)
    lo = np.float64(step) * i + np.float64(np.float32(0.1))
    hi = -np.float64(step) * (n - 1 - i) + 1.0
    return np.where(i < n // 2, lo, hi).astype(np.float32)

  parts = [np.array([0.0, 1.0], np.float32)]
  for e in range(7):
    b = linspace(2**e + 1)
    means = (b[:-1] + b[1:]) / np.float32(2)
    parts += [np.float32(10.0**(e - 6)) * means, np.float32(-(10.0**(e - 6))) * means]
  return np.sort(np.concatenate(parts))


DYNAMIC_CODE = _dynamic_map()


def _bnb_lut():
  """bitsandbytes' CPU 8-bit quantizer table: 65536 evenly spaced points of [-1, 1] -> the first
  code whose upper midpoint is not below the point."""
  mid = (DYNAMIC_CODE[:-1] + DYNAMIC_CODE[1:]) * np.float32(0.5)
  points = np.float32(2) * np.arange(65536, dtype=np.float32) / np.float32(65535) - np.float32(1)
  return np.searchsorted(mid, points, side="left").astype(np.uint8)


_LUT = None


def _round_f32(p, h):
  """float32(p + h), rounded once (p, h float64): float64 rounding first would double-round."""
  s = p + h
  b = s - p
  err = (p - (s - b)) + (h - b)  # TwoSum: s + err == p + h exactly
  r = s.astype(np.float32)
  r64 = r.astype(np.float64)
  other = np.where(s > r64, np.nextafter(r, np.float32(np.inf)), np.nextafter(r, np.float32(-np.inf)))
  tie = (s != r64) & (s == (r64 + other.astype(np.float64)) / 2) & (err != 0)
  toward = np.where(err > 0, np.maximum(r, other), np.minimum(r, other))
  return np.where(tie, toward, r)


def _quantize_blockwise8(x, block):
  """bitsandbytes `quantize_blockwise(x, blocksize=block)` for float32 on CPU -> (codes, absmax).

  Its C kernel: absmax per block (0 -> all codes 0); v = clamp(x * (1 / absmax), -1, 1);
  code = LUT[trunc(fma(65535, (v + 1) * 0.5, 0.5))].
  """
  global _LUT
  if _LUT is None:
    _LUT = _bnb_lut()
  n = x.size
  nb = -(-n // block)
  blocks = np.zeros(nb * block, np.float32)
  blocks[:n] = x
  blocks = blocks.reshape(nb, block)  # zero padding leaves each block's absmax unchanged
  absmax = np.abs(blocks).max(axis=1)
  inv = np.float32(1) / np.where(absmax == 0, np.float32(1), absmax)
  v = np.clip(blocks * inv[:, None], np.float32(-1), np.float32(1))
  t = ((v + np.float32(1)) * np.float32(0.5)).astype(np.float64)
  idx = np.trunc(_round_f32(t * 65535.0, np.full_like(t, 0.5))).astype(np.int64) & 0xFFFF
  codes = _LUT[idx]
  codes[absmax == 0] = 0
  return codes.reshape(-1)[:n], absmax


def _pack(codes, g):
  """uint8 codes [in, out] < 16 -> [in/2, out]: per group, first half high nibble."""
  n_in, n_out = codes.shape
  c = codes.reshape(n_in // g, 2, g // 2, n_out)
  return ((c[:, 0] << 4) | c[:, 1]).reshape(n_in // 2, n_out)


def unpack(q, g):
  """uint8 [..., in/2, out] -> uint8 codes [..., in, out] (jnp; inverse of the packing). Codes
  stay one byte: as int32 they were a temporary 4x the weight's size (TPU compiler, 8B MLP)."""
  *lead, half, n_out = q.shape
  q = jnp.asarray(q, jnp.uint8).reshape(*lead, half * 2 // g, g // 2, n_out)
  return jnp.concatenate([q >> 4, q & 15], axis=-2).reshape(*lead, half * 2, n_out)


def check(mode, shape, group_size=128):
  """Raises UserError if `mode` cannot quantize a [..., in, out] weight of `shape`; returns the
  group size the mode uses."""
  if mode not in MODES:
    raise UserError(f"quant.mode={mode!r}: use one of {list(MODES)} (or none)")
  if len(shape) < 2:
    raise UserError(f"quantize: weight shape {tuple(shape)} is not [..., in, out]")
  n_in = shape[-2]
  if mode == "int8":
    return n_in
  if mode == "nf4":
    if n_in % NF4_BLOCK:
      raise UserError(f"quant.mode=nf4: input dim {n_in} is not a multiple of the NF4 block "
                      f"size {NF4_BLOCK}")
    return NF4_BLOCK
  if not isinstance(group_size, int) or group_size < 2 or group_size % 2:
    raise UserError(f"quant.group_size={group_size!r}: int4 needs a positive even group size")
  if n_in % group_size:
    raise UserError(f"quant.group_size={group_size}: does not divide the input dim {n_in} "
                    f"(use a divisor of {n_in})")
  return group_size


def abstract(shape, dtype, mode, group_size=128):
  """The QArray of jax.ShapeDtypeStruct that `quantize` returns for a weight of `shape`."""
  g = check(mode, shape, group_size)
  *lead, n_in, n_out = shape
  lead = tuple(lead)
  sds = jax.ShapeDtypeStruct
  if mode == "int8":
    return QArray(sds(lead + (n_in, n_out), np.int8), sds(lead + (1, n_out), np.float32), None, None,
                  mode, g, (n_in, n_out), np.dtype(dtype))
  q = sds(lead + (n_in // 2, n_out), np.uint8)
  if mode == "int4":
    return QArray(q, sds(lead + (n_in // g, n_out), np.float32), None, None, mode, g,
                  (n_in, n_out), np.dtype(dtype))
  n2 = -(-(n_in // g) * n_out // NF4_BLOCK2)
  return QArray(q, sds(lead + (n_in // g, n_out), np.uint8), sds(lead + (n2,), np.float32),
                sds(lead, np.float32), mode, g, (n_in, n_out), np.dtype(dtype))


def quantize(w, mode, group_size=128, *, dtype=None) -> QArray:
  """w: [..., in, out] numpy or jax float array -> QArray of host (numpy) arrays.

  dtype: what `dequantize` returns by default (w's dtype if None; float64 becomes float32).
  """
  w = np.asarray(w)
  if dtype is None:
    dtype = np.float32 if w.dtype == np.float64 else w.dtype
  spec = abstract(w.shape, dtype, mode, group_size)
  out = jax.tree.map(lambda s: np.empty(s.shape, s.dtype), spec)
  for idx in np.ndindex(*w.shape[:-2]):
    parts = _quantize_matrix(w[idx], mode, spec.group_size)
    for field, value in zip(("q", "scale", "scale2", "offset"), parts):
      if value is not None:
        getattr(out, field)[idx] = value
  return out


def _row_chunks(n_in, n_out, g):
  rows = max(g, (_CHUNK // max(n_out, 1)) // g * g)
  return [slice(r, min(r + rows, n_in)) for r in range(0, n_in, rows)]


def _quantize_matrix(w, mode, g):
  """One [in, out] matrix -> (q, scale, scale2, offset), numpy."""
  n_in, n_out = w.shape
  chunks = _row_chunks(n_in, n_out, 1 if mode == "int8" else g)  # int8's one group is all rows
  if mode == "int8":
    absmax = np.zeros(n_out, np.float64)
    for c in chunks:
      absmax = np.maximum(absmax, np.abs(w[c].astype(np.float64)).max(axis=0))
    s = (absmax / 127).astype(np.float32)
    div = np.where(s == 0, 1.0, s.astype(np.float64))
    q = np.empty((n_in, n_out), np.int8)
    for c in chunks:
      q[c] = np.clip(np.rint(w[c].astype(np.float64) / div), -127, 127)
    return q, s[None], None, None
  q = np.empty((n_in // 2, n_out), np.uint8)
  if mode == "int4":
    s = np.empty((n_in // g, n_out), np.float32)
    for c in chunks:
      blocks = w[c].astype(np.float64).reshape(-1, g, n_out)
      sc = (np.abs(blocks).max(axis=1) / 7).astype(np.float32)
      div = np.where(sc == 0, 1.0, sc.astype(np.float64))[:, None]
      codes = (np.clip(np.rint(blocks / div), -7, 7) + 8).astype(np.uint8)
      q[c.start // 2:c.stop // 2] = _pack(codes.reshape(-1, n_out), g)
      s[c.start // g:c.stop // g] = sc
    return q, s, None, None
  # nf4, as bitsandbytes' quantize_4bit (float32 throughout, reciprocal multiply).
  absmax = np.empty((n_in // g, n_out), np.float32)
  for c in chunks:
    blocks = w[c].astype(np.float32).reshape(-1, g, n_out)
    am = np.abs(blocks).max(axis=1)
    inv = np.float32(1) / np.maximum(am, np.float32(1e-38))
    x = np.clip(blocks * inv[:, None], np.float32(-1), np.float32(1))
    codes = np.zeros(x.shape, np.uint8)
    for m in _NF4_MID:  # count of midpoints strictly below x; one byte per element of scratch
      codes += x > m
    q[c.start // 2:c.stop // 2] = _pack(codes.reshape(-1, n_out), g)
    absmax[c.start // g:c.stop // g] = am
  flat = absmax.T.reshape(-1)  # torch (out, in/64) order: the double-quant blocks run along it
  offset = np.float32(flat.astype(np.float64).mean())
  codes2, scale2 = _quantize_blockwise8(flat - offset, NF4_BLOCK2)
  return q, codes2.reshape(n_out, -1).T, scale2, offset


def scales(w: QArray):
  """Per-group float32 scales [..., in/group, out] (jnp): the nf4 absmax decoded, else `scale`."""
  if w.kind != "nf4":
    return jnp.asarray(w.scale, jnp.float32)
  n_in, n_out = w.matrix_shape
  groups = n_in // w.group_size
  # Block of the absmax at (group j, column o) in the torch (out, in/64) flattening.
  block = (np.arange(n_out)[None, :] * groups + np.arange(groups)[:, None]) // NF4_BLOCK2
  code = jnp.take(jnp.asarray(DYNAMIC_CODE), jnp.asarray(w.scale).astype(jnp.int32), axis=0)
  scale2 = jnp.take(jnp.asarray(w.scale2), jnp.asarray(block, jnp.int32), axis=-1)
  return code * scale2 + jnp.asarray(w.offset)[..., None, None]


def values(w: QArray):
  """The quantized values before scaling, float32 [..., in, out] (jnp)."""
  return values_of(w.kind, w.q, w.group_size)


def values_of(kind: str, q, group_size: int):
  """`values` of packed rows q (whole groups of a QArray's q)."""
  if kind == "int8":
    return jnp.asarray(q).astype(jnp.float32)
  codes = unpack(jnp.asarray(q), group_size)
  if kind == "int4":
    return codes.astype(jnp.float32) - 8.0
  return jnp.take(jnp.asarray(NF4_CODE), codes, axis=0)


def dequantize(w: QArray, dtype=None):
  """QArray -> [..., in, out] array of `dtype` (default: the dtype it was quantized from).
  Pure jnp and jit-able; computed in float32, then cast."""
  n_in, n_out = w.matrix_shape
  g = w.group_size
  v = values(w)
  lead = v.shape[:-2]
  s = scales(w)
  out = v.reshape(*lead, n_in // g, g, n_out) * s[..., :, None, :]
  return out.reshape(*lead, n_in, n_out).astype(dtype or w.dtype)


def nbytes(tree):
  """Bytes stored by every array in `tree` (QArray children included)."""
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def bits_per_param(mode, group_size=128):
  """The ideal storage cost of `mode` in bits per weight, scales included."""
  if mode == "nf4":
    return 4 + 8 / NF4_BLOCK + 32 / (NF4_BLOCK * NF4_BLOCK2)
  return {"int8": 8.0, "int4": 4 + 32 / group_size}[mode]


def partition_specs(w: QArray, spec):
  """The PartitionSpecs of a QArray's children given the weight's `spec` over [..., in, out]:
  q and scale shard like the weight (int8's single scale row does not shard along `in`); the
  nf4 double-quant statistics shard only along the leading dims."""
  spec = tuple(spec) + (None,) * (w.ndim - len(tuple(spec)))
  lead = spec[:-2]
  P = jax.sharding.PartitionSpec
  scale_in = None if w.kind == "int8" else spec[-2]
  return dataclasses.replace(
      w, q=P(*spec), scale=P(*lead, scale_in, spec[-1]),
      scale2=None if w.scale2 is None else P(*lead, None),
      offset=None if w.offset is None else P(*lead))
