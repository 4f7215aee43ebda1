"""Frozen base weights stored as int8, int4 or NF4 (QLoRA), and their exact dequantization.

A kernel `w` is (in, out), usually stacked over layers as [L, in, out]; each trailing [in, out]
matrix is quantized on its own, by one jitted function on the device that holds it (the loader
sends each layer there in 16 bits), in float32 arithmetic that reproduces the references below
bit for bit: tests/test_quant.py checks codes and scales on 1M values against bitsandbytes (nf4)
and a float64 numpy version (int8, int4).

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
        correctly rounded one (`_mean`; 1M test values: it does, by one ulp) and a value sits on
        a rounding edge; values then differ by one step of the 8-bit absmax code, which no test
        of ours has hit (on the 1M values: no code differs, values by 3e-8, the offset's ulp).

Float32 rounding edges, and what is done about them: int8/int4's w / s is rounded exactly
(`_round_div`: a float32 quotient puts ~150 int8 and ~1700 int4 codes of the 1M test values,
which plant values at the edge, on the wrong side of a .5); s = max|w| / 127 is one correctly
rounded division, kept from XLA's reciprocal rewrite (`_divide`); bitsandbytes' fused
multiply-add of the 8-bit quantizer is rounded once in integer arithmetic. All of this assumes
IEEE float32 division (CPU, GPU); TPUs divide by reciprocal, so there the last bit may differ.

Packing (int4, nf4): two 4-bit codes per uint8. Within each group of g inputs, byte row r holds
input g*j + r in its high nibble and g*j + g/2 + r in its low nibble. Groups stay whole, so a
shard along `in` (a multiple of g rows) holds exactly its rows, and a kernel unpacks a group
with two contiguous halves, never an interleave.
"""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.errors import UserError

MODES = ("int8", "int4", "nf4")
NF4_BLOCK = 64  # bitsandbytes' QLoRA blocksize
NF4_BLOCK2 = 256  # double-quantization blocksize of the absmax

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


_LUT = None  # built on first use (65536 searches)


def _lut():
  global _LUT
  if _LUT is None:
    _LUT = _bnb_lut()
  return _LUT


def _split(a):
  """float32 a == hi + lo exactly, each with at most 12 significant bits (so that products of
  either with a number of at most 12 bits are exact in float32). Masked bits, not Veltkamp's
  multiply, so that no compiler rewrite can change it."""
  bits = jax.lax.bitcast_convert_type(a, jnp.uint32) & jnp.uint32(0xFFFFF000)
  hi = jax.lax.bitcast_convert_type(bits, jnp.float32)
  return hi, a - hi


def _divide(a, b):
  """a / b correctly rounded. XLA rewrites a division by a constant or by a broadcast scalar as a
  multiplication by the rounded reciprocal (off in the last bit for ~30% of quotients), so the
  divisor goes in as an array computed from `a` (under vmap too), which it cannot see through."""
  return a / jnp.where(jnp.isnan(a), jnp.float32(1), jnp.float32(b))


def _round_div(w, s, limit):
  """clip(rint(w / s), -limit, limit) exactly as in real arithmetic (ties to even), in float32.

  Rounding w / s in float32 first can move a quotient just off a .5 onto it, or across it. So
  only k = floor(|w| / s) comes from the float32 quotient; whether |w| / s lies above, on or below
  k + 1/2 is decided exactly: 2|w| against (2k + 1) * s, a product made exact by splitting s into
  two 12-bit halves (2k + 1 has at most 9 bits). Where the float32 quotient is far from k + 1/2
  any comparison gives the same answer. This equals the float64 rounding of the numpy
  reference (whose float64 quotient is never within its rounding error of a .5: a float32 over a
  float32 lands at least 2^-33 relatively away from one when it is not on it)."""
  a = jnp.abs(w)
  k = jnp.floor(a / jnp.where(s == 0, 1, s))
  m = 2 * k + 1
  s_hi, s_lo = _split(s)
  d = 2 * a - m * s_hi  # exact near the boundary (Sterbenz); its sign is right away from it
  lo = m * s_lo
  q = k + (d > lo) + ((d == lo) & (jnp.fmod(k, 2) == 1))
  return jnp.sign(w) * jnp.minimum(q, limit)


def _two_sum(a, b):
  s = a + b
  bb = s - a
  return s, (a - (s - bb)) + (b - bb)


def _mean(x):
  """float32 mean of a 1-D float32 x: a sum in double float32 (~48 bits; one reduction whose
  every addition is error-free up to ~2^-48, in whatever order XLA adds) divided with an exact
  remainder, rounded once. It equals the correctly rounded mean (the float64 reference's)
  unless that lies within ~2^-44 (relative) of a float32 rounding edge; a float32 sum is off in
  the last bit for many matrices, bitsandbytes' own float32 mean among them."""
  n = x.shape[-1]

  def add(a, b):
    s, e = _two_sum(a[0], b[0])
    return _two_sum(s, e + a[1] + b[1])

  zero = jnp.float32(0)
  hi, lo = jax.lax.reduce((x, jnp.zeros_like(x)), (zero, zero), add, (0,))
  count = jnp.float32(n)  # exact: n < 2^24
  q = _divide(hi, count)
  # q * count exactly as p + err (Dekker's product; every partial product below is exact)
  p = q * count
  (qh, ql), (ch, cl) = _split(q), _split(count)
  err = ((qh * ch - p) + qh * cl + ql * ch) + ql * cl
  return q + _divide((hi - p) - err + lo, count)


def _blockwise8_index(t):
  """trunc(float32(65535 * t + 0.5)) for float32 t in [0, 1] that are multiples of 2^-25
  (bitsandbytes' fma, rounded once), in int32 arithmetic: y = N / 2^25 with N = 65535 T + 2^24
  and T = t * 2^25, a 41-bit N kept in two parts."""
  T = (t * 2.0**25).astype(jnp.int32)
  th, tl = T >> 12, T & 4095
  lo = tl * 65535 + (1 << 24)  # < 2^29
  top = th * 65535 + (lo >> 12)  # N >> 12, < 2^30
  n = top >> 13  # floor(y)
  frac = ((top & 8191) << 12) | (lo & 4095)  # N mod 2^25: y - n in units of 2^-25
  # float32 rounds y up to n + 1 within half an ulp of y's binade [2^e, 2^(e+1)), e = log2(n)
  # (e = -1 for n = 0): 2^(e+1) units of 2^-25. A tie goes up too, n + 1 being the even one.
  half_ulp = jnp.left_shift(1, 32 - jax.lax.clz(n))
  return n + ((1 << 25) - frac <= half_ulp)


def _quantize_blockwise8(x, block):
  """bitsandbytes `quantize_blockwise(x, blocksize=block)` for float32 on CPU -> (codes, absmax),
  in jnp, bit for bit.

  Its C kernel: absmax per block (0 -> all codes 0); v = clamp(x * (1 / absmax), -1, 1);
  code = LUT[trunc(fma(65535, (v + 1) * 0.5, 0.5))].
  """
  n = x.shape[-1]
  nb = -(-n // block)
  blocks = jnp.pad(x, (0, nb * block - n)).reshape(nb, block)  # zeros keep each absmax
  absmax = jnp.max(jnp.abs(blocks), axis=1)
  inv = 1 / jnp.where(absmax == 0, 1, absmax)
  v = jnp.clip(blocks * inv[:, None], -1, 1)
  t = (v + 1) * 0.5  # a multiple of 2^-25: v + 1 is a multiple of 2^-24 in [0, 2]
  codes = jnp.take(jnp.asarray(_lut()), _blockwise8_index(t), axis=0)
  codes = jnp.where(absmax[:, None] == 0, jnp.uint8(0), codes)
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


def quantize(w, mode, group_size=128, *, dtype=None, sharding=None) -> QArray:
  """w: [..., in, out] float array -> QArray, computed by XLA on the device(s) holding w (a numpy
  w goes to the default device). Under a mesh each device quantizes its own slice; the
  statistics that span a matrix (int8's column scales, NF4's double quantization) are reduced
  across devices by the compiler.

  dtype: what `dequantize` returns by default (w's dtype if None; float64 becomes float32).
  sharding: a QArray of shardings for the result (default: where XLA puts it).
  """
  w = jnp.asarray(w)
  if dtype is None:
    dtype = np.float32 if w.dtype == np.float64 else w.dtype
  g = abstract(w.shape, dtype, mode, group_size).group_size
  return _compiled(mode, g, np.dtype(dtype), sharding)(w)


@functools.lru_cache(maxsize=None)
def _compiled(mode, g, dtype, sharding):
  def run(w):
    fn = functools.partial(_quantize_matrix, mode=mode, g=g)
    for _ in w.shape[:-2]:  # each trailing [in, out] matrix on its own
      fn = jax.vmap(fn)
    sixteen = w.dtype in (jnp.bfloat16, jnp.float16)  # float32 from there on, see below
    q, scale, scale2, offset = fn(w if sixteen else w.astype(jnp.float32))
    return QArray(q, scale, scale2, offset, mode, g, tuple(w.shape[-2:]), dtype)
  return jax.jit(run, out_shardings=sharding)


def _quantize_matrix(w, mode, g):
  """One [in, out] matrix -> (q, scale, scale2, offset), jnp, in float32. Maxima are taken in w's
  own dtype (exact), so that a backend with 16-bit arithmetic can fuse the cast to float32 into
  the one elementwise pass; XLA:CPU widens a bf16 matrix first and keeps that float32 copy as a
  temporary (2x the 16-bit layer, measured)."""
  n_in, n_out = w.shape
  absmax = lambda x, axis: jnp.max(jnp.abs(x), axis=axis).astype(jnp.float32)
  if mode == "int8":
    s = _divide(absmax(w, 0), 127)  # rounded once: f32(float64 absmax / 127)
    return _round_div(w.astype(jnp.float32), s, 127).astype(jnp.int8), s[None], None, None
  blocks = w.reshape(n_in // g, g, n_out)
  if mode == "int4":
    s = _divide(absmax(blocks, 1), 7)
    codes = (_round_div(blocks.astype(jnp.float32), s[:, None], 7) + 8).astype(jnp.uint8)
    return _pack(codes.reshape(n_in, n_out), g), s, None, None
  # nf4, as bitsandbytes' quantize_4bit (float32 throughout, reciprocal multiply).
  am = absmax(blocks, 1)
  inv = 1 / jnp.where(am == 0, 1, am)  # bnb: max(absmax, 1e-38), subnormal, flushed here
  x = jnp.clip(blocks.astype(jnp.float32) * inv[:, None], -1, 1)
  codes = sum((x > m).astype(jnp.uint8) for m in _NF4_MID)  # midpoints strictly below x
  q = _pack(codes.reshape(n_in, n_out), g)
  flat = am.T.reshape(-1)  # torch (out, in/64) order: the double-quant blocks run along it
  offset = _mean(flat)
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
  if w.kind == "int8":
    return jnp.asarray(w.q).astype(jnp.float32)
  codes = unpack(jnp.asarray(w.q), w.group_size)
  if w.kind == "int4":
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
