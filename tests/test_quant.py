"""Quantization: each scheme against its reference (bitsandbytes for NF4, float64 numpy for int8 and
int4), the custom-VJP matmul's gradients and residuals, the Pallas kernels, storage size, errors."""
import contextlib
import io
import re

import bitsandbytes.functional as bnbf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.ad_checkpoint import print_saved_residuals

from ftjax import kernels, quant
from ftjax.errors import UserError
from ftjax.linear import linear


def _weights(shape, seed=0):
  """Random [..., in, out] float32 with exact zeros, repeated values (ties) and, in the first
  output column, an all-zero block of 64 inputs."""
  rng = np.random.default_rng(seed)
  w = rng.standard_normal(shape).astype(np.float32) * 0.05
  w[..., 64:128, 0] = 0.0
  w[..., ::7, 1:] = 0.0
  w[..., 1::5, :] = np.round(w[..., 1::5, :] * 64) / 64  # few distinct values: ties in absmax too
  return w


# --- NF4 against bitsandbytes -------------------------------------------------------------------

@pytest.mark.parametrize("torch_dtype", [torch.float32, torch.bfloat16])
def test_nf4_matches_bitsandbytes(torch_dtype):
  # 384 x 100 per layer: 600 absmax -> three double-quant blocks, the last one ragged.
  w = _weights((2, 384, 100))
  tw = torch.from_numpy(w).to(torch_dtype)
  qa = quant.quantize(tw.float().numpy(), "nf4", dtype=jnp.bfloat16 if torch_dtype == torch.bfloat16
                      else jnp.float32)
  ours = np.asarray(quant.dequantize(qa).astype(jnp.float32))
  codes = np.asarray(quant.unpack(jnp.asarray(qa.q), 64))
  for layer in range(2):
    packed, state = bnbf.quantize_4bit(tw[layer].T.contiguous(), blocksize=64, quant_type="nf4",
                                       compress_statistics=True)
    ref = bnbf.dequantize_4bit(packed, state).float().numpy().T
    np.testing.assert_allclose(ours[layer], ref, rtol=1e-6 if torch_dtype == torch.float32
                               else 2**-8, atol=0)
    # 4-bit codes: bnb pairs consecutive torch-layout elements, high nibble first.
    p = packed.numpy().reshape(-1)
    ref_codes = np.stack([p >> 4, p & 15], 1).reshape(100, 384).T
    blocks_zero = np.abs(w[layer]).reshape(6, 64, 100).max(1) == 0
    nonzero = ~np.repeat(blocks_zero, 64, axis=0)
    assert blocks_zero.any() and nonzero.sum() > 0.9 * nonzero.size
    np.testing.assert_array_equal(codes[layer][nonzero], ref_codes[nonzero])
    # Double quantization: 8-bit absmax codes in bnb's (out, in/64) order, their scales, offset.
    np.testing.assert_array_equal(qa.scale[layer].T.reshape(-1), state.absmax.numpy())
    np.testing.assert_allclose(qa.scale2[layer], state.state2.absmax.numpy(), rtol=1e-6)
    np.testing.assert_allclose(qa.offset[layer], state.offset.item(), rtol=1e-6)


def test_dynamic_map_and_blockwise8_match_bitsandbytes():
  np.testing.assert_array_equal(quant.DYNAMIC_CODE, bnbf.create_dynamic_map(signed=True).numpy())
  rng = np.random.default_rng(1)
  x = (rng.standard_normal(5 * 256 + 77) * 0.3).astype(np.float32)
  x[256:512] = 0.0
  x[600:700] = np.round(x[600:700] * 8) / 8
  codes, absmax = quant._quantize_blockwise8(x, 256)
  ref, state = bnbf.quantize_blockwise(torch.from_numpy(x), blocksize=256)
  np.testing.assert_array_equal(codes, ref.numpy())
  np.testing.assert_array_equal(absmax, state.absmax.numpy())


# --- int8 / int4 against float64 numpy ------------------------------------------------------------

def _reference(w, mode, g):
  """(q, dequantized) per the definitions in quant.py, written plainly in float64."""
  w = w.astype(np.float64)
  n_in, n_out = w.shape
  q = np.zeros_like(w)
  deq = np.zeros_like(w)
  limit, group = (127, n_in) if mode == "int8" else (7, g)
  for o in range(n_out):
    for start in range(0, n_in, group):
      col = w[start:start + group, o]
      s = np.float64(np.float32(np.abs(col).max() / limit))
      qs = np.zeros_like(col) if s == 0 else np.clip(np.round(col / s), -limit, limit)
      q[start:start + group, o] = qs
      deq[start:start + group, o] = qs * s
  return q, deq.astype(np.float32)


@pytest.mark.parametrize("mode,g", [("int8", 128), ("int4", 32), ("int4", 128)])
def test_int_schemes_match_float64_reference(mode, g):
  w = _weights((256, 24))
  limit = 127 if mode == "int8" else 7
  # Column 2: absmax = limit * 2^-5, so scale = 2^-5 exactly and w / s hits exact .5 ties, which
  # must round half to even (2.5 -> 2, 3.5 -> 4, -2.5 -> -2).
  w[:, 2] = 0.0
  w[0, 2] = w[g, 2] = limit * 2.0**-5
  w[1:4, 2] = np.array([2.5, 3.5, -2.5]) * 2.0**-5
  w[g + 1, 2] = 4.5 * 2.0**-5
  qa = quant.quantize(w, mode, g)
  q_ref, deq_ref = _reference(w, mode, g)
  assert q_ref[1, 2] == 2 and q_ref[2, 2] == 4 and q_ref[3, 2] == -2 and q_ref[g + 1, 2] == 4
  np.testing.assert_array_equal(np.asarray(quant.values(qa)), q_ref)
  np.testing.assert_array_equal(np.asarray(quant.dequantize(qa)), deq_ref)
  np.testing.assert_array_equal(np.asarray(jax.jit(quant.dequantize)(qa)), deq_ref)


def _near_half_steps(w, limit, group, rng):
  """Plants, in every group of the first 256 columns, values a float32 ulp away from (k + 1/2)
  steps, where a float32 quotient w / s rounds onto or across the .5: the rounding edge."""
  w = w.copy()
  for start in range(0, w.shape[0], group):
    top = np.abs(w[start:start + group, :256]).max(0)
    s = (top.astype(np.float64) / limit).astype(np.float32)
    for r in range(start + 1, start + 17):
      k = rng.integers(0, limit, 256)
      mid = ((k + 0.5) * s.astype(np.float64)).astype(np.float32)
      w[r, :256] = np.nextafter(mid, np.where(r % 2, np.inf, -np.inf).astype(np.float32))
  return w


@pytest.mark.parametrize("mode,g", [("int8", 1024), ("int4", 128)])
def test_int_schemes_exact_on_a_million_values(mode, g):
  """1M values (zeros, ties, an all-zero block, and values at the float32 rounding edge): the
  device quantizer equals the float64 reference everywhere, where float32 division does not."""
  limit = 127 if mode == "int8" else 7
  w = _near_half_steps(_weights((1024, 1024), seed=7), limit, g, np.random.default_rng(8))
  q_ref, deq_ref = _reference(w, mode, g)
  qa = quant.quantize(w, mode, g)
  got = np.asarray(quant.values(qa))
  s = np.repeat(np.asarray(qa.scale), w.shape[0] // qa.scale.shape[0], axis=0)
  naive = np.clip(np.rint(w / np.where(s == 0, 1, s)), -limit, limit)  # float32 division
  print(f"{mode}: {(naive != q_ref).sum()} of {w.size} codes differ with a float32 quotient, "
        f"{(got != q_ref).sum()} here")
  assert (naive != q_ref).sum() > 100  # the planted edges are edges
  np.testing.assert_array_equal(got, q_ref)
  np.testing.assert_array_equal(np.asarray(quant.dequantize(qa)), deq_ref)


def test_nf4_on_a_million_values_against_bitsandbytes():
  """1M values, 16384 absmax: 64 double-quant blocks. Codes, absmax codes and their scales equal
  bitsandbytes'; the offset equals the correctly rounded (float64) mean of the absmax, which
  bitsandbytes' float32 mean may miss by an ulp: the measured difference is printed and bounded
  by one step of the 8-bit absmax code."""
  w = _weights((1024, 1024), seed=9)
  qa = quant.quantize(w, "nf4")
  packed, state = bnbf.quantize_4bit(torch.from_numpy(w).T.contiguous(), blocksize=64,
                                     quant_type="nf4", compress_statistics=True)
  p = packed.numpy().reshape(-1)
  ref_codes = np.stack([p >> 4, p & 15], 1).reshape(1024, 1024).T
  codes = np.asarray(quant.unpack(qa.q, 64))
  zero = np.repeat(np.abs(w).reshape(16, 64, 1024).max(1) == 0, 64, axis=0)
  assert zero.any()
  absmax = np.abs(w).reshape(16, 64, 1024).max(1)
  assert qa.offset == np.float32(absmax.astype(np.float64).mean())
  differ = (codes != ref_codes) & ~zero
  ref = bnbf.dequantize_4bit(packed, state).float().numpy().T
  value_diff = np.abs(np.asarray(quant.dequantize(qa)) - ref).max()
  print(f"nf4: {differ.sum()} of {w.size} codes differ from bitsandbytes, {value_diff:.2e} "
        f"largest value difference; offset {float(qa.offset)!r} vs {state.offset.item()!r}")
  assert differ.sum() == 0
  np.testing.assert_array_equal(np.asarray(qa.scale).T.reshape(-1), state.absmax.numpy())
  np.testing.assert_allclose(qa.scale2, state.state2.absmax.numpy(), rtol=1e-6)
  assert value_diff <= 2 * np.abs(absmax).max() * 1e-6 + 1e-7


def test_mean_is_correctly_rounded():
  """`_mean` (the NF4 offset) equals the float64 mean rounded to float32, on absmax-like values
  spread over decades, where a float32 sum misses it for many rows."""
  rng = np.random.default_rng(10)
  x = (np.exp(rng.uniform(-12, 0, (300, 5000))) * rng.uniform(0.5, 1, (300, 1))).astype(np.float32)
  want = x.astype(np.float64).mean(1).astype(np.float32)
  got = np.asarray(jax.jit(jax.vmap(quant._mean))(x))
  float32 = np.asarray(jax.jit(lambda x: jnp.sum(x, 1) / 5000)(x))
  assert (float32 != want).sum() > 30, (float32 != want).sum()
  np.testing.assert_array_equal(got, want)


def test_round_trip_error_is_bounded():
  w = np.random.default_rng(2).standard_normal((512, 64)).astype(np.float32)
  rel = {}
  for mode in quant.MODES:
    qa = quant.quantize(w, mode)
    err = np.abs(np.asarray(quant.dequantize(qa)) - w)
    # Per element: half a step of the grid (NF4's widest gap is -0.6961928 - -1), plus for NF4 the
    # error of the double-quantized absmax it was scaled back with.
    absmax = np.abs(w).reshape(-1, qa.group_size, 64).max(1, keepdims=True)
    half_step = {"int8": 0.5 / 127, "int4": 0.5 / 7, "nf4": 0.5 * (1 - 0.6961928)}[mode]
    bound = absmax * half_step * (1 + 1e-5)
    if mode == "nf4":
      bound = bound + np.abs(np.asarray(quant.scales(qa))[:, None, :] - absmax)
    assert (err.reshape(-1, qa.group_size, 64) <= bound).all(), mode
    rel[mode] = np.sqrt((err**2).mean() / (w**2).mean())
  assert rel["int8"] < 0.012 and rel["int4"] < 0.15 and rel["nf4"] < 0.12, rel


# --- The pytree, and what the loader relies on ------------------------------------------------------

def test_qarray_stacks_and_slices_like_a_weight():
  w = _weights((3, 128, 32))
  for mode in quant.MODES:
    qa = quant.quantize(w, mode, 64)
    assert qa.shape == (3, 128, 32) and qa.ndim == 3 and qa.dtype == np.float32
    assert jax.tree.map(lambda x: (x.shape, x.dtype), quant.abstract(w.shape, w.dtype, mode, 64)) \
        == jax.tree.map(lambda x: (x.shape, x.dtype), qa)
    layer = jax.tree.map(lambda x: x[1], qa)  # what lax.scan does to every child
    assert layer.shape == (128, 32)
    assert jax.tree.structure(layer) == jax.tree.structure(quant.quantize(w[1], mode, 64))
    np.testing.assert_array_equal(quant.dequantize(layer), quant.dequantize(qa)[1])
    np.testing.assert_array_equal(quant.dequantize(layer), quant.dequantize(
        quant.quantize(jnp.asarray(w[1]), mode, 64)))


def test_stored_bytes_near_ideal():
  w = _weights((2, 512, 256))
  dense = w.size * 2  # bfloat16
  for mode in quant.MODES:
    qa = quant.quantize(w, mode)
    ideal = w.size * quant.bits_per_param(mode) / 8
    assert abs(quant.nbytes(qa) / ideal - 1) < 0.10, (mode, quant.nbytes(qa), ideal)
    assert quant.nbytes(qa) < dense * {"int8": 0.52, "int4": 0.27, "nf4": 0.27}[mode]
  assert abs(quant.bits_per_param("nf4") - 4.127) < 1e-3


def test_user_errors():
  w = np.zeros((96, 8), np.float32)
  for args, words in [(("int3",), ["int3", "int8", "nf4"]), (("int4", 64), ["64", "96"]),
                      (("int4", 7), ["7"]), (("nf4",), ["96", "64"])]:
    with pytest.raises(UserError) as e:
      quant.quantize(w, *args)
    msg = str(e.value)
    assert "\n" not in msg and all(word in msg for word in words), msg
  quant.quantize(w, "int4", 32)  # a divisor is fine; nf4's group_size is ignored (always 64)
  assert quant.quantize(np.zeros((128, 8)), "nf4", 128).group_size == 64


# --- The matmul: gradients, residuals, kernels --------------------------------------------------

def _lora(n_in, n_out, lead=(), seed=3):
  rng = np.random.default_rng(seed)
  a = jnp.asarray(rng.standard_normal(lead + (n_in, 4)), jnp.float32) * 0.1
  b = jnp.asarray(rng.standard_normal(lead + (4, n_out)), jnp.float32) * 0.1  # non-zero B
  return a, b


def _layer(w, i):
  """Layer i of a stacked dense array or QArray."""
  return jax.tree.map(lambda t: t[i], w)


@pytest.mark.parametrize("mode", quant.MODES)
def test_grads_match_dequantized_dense(mode):
  w = _weights((2, 128, 128))
  qa = quant.quantize(w, mode, 64)
  dense = quant.dequantize(qa)
  x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 3, 128)), jnp.float32)
  a, b = _lora(128, 128, (2,))

  def one(x, a, b, w):  # a single layer, under jit
    return jnp.sum(jnp.sin(linear(x, _layer(w, 0), (a[0], b[0]), scale=0.5)))

  def scanned(x, a, b, w):  # the model's shape: lax.scan over stacked layers
    def body(h, layer):
      wl, al, bl = layer
      return jnp.tanh(linear(h, wl, (al, bl), scale=0.5)), None
    return jnp.sum(jax.lax.scan(body, x, (w, a, b))[0] ** 2)

  for f in (one, scanned):
    grad = jax.jit(jax.grad(f, argnums=(0, 1, 2)))
    got = grad(x, a, b, qa)
    want = grad(x, a, b, dense)
    for g, h in zip(got, want):
      assert float(jnp.abs(h).max()) > 0
      np.testing.assert_allclose(g, h, rtol=2e-5, atol=2e-6)
  # The adapter changes the output (the test would be blind with b = 0).
  assert not np.allclose(linear(x, _layer(qa, 0), (a[0], b[0])), linear(x, _layer(qa, 0)))


def test_backward_keeps_no_dequantized_residual():
  n_in, n_out = 128, 64
  # On device, as the loader leaves it (scan does not forward numpy constants as residuals).
  qa = jax.device_put(quant.quantize(_weights((2, n_in, n_out)), "nf4"))
  x = jnp.ones((4, n_in), jnp.float32)
  a, b = _lora(n_in, n_out, (2,))

  def loss(x, a, b, w, naive):
    def body(h, layer):
      wl, al, bl = layer
      y = x @ quant.dequantize(wl) if naive else linear(x, wl, (al, bl))
      return h + jnp.sum(jnp.sin(y)), None
    return jax.lax.scan(body, 0.0, (w, a, b))[0]

  def residuals(naive):  # jax's own report, one line per residual: "f32[2,128,64] from ..."
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      print_saved_residuals(lambda x, a, b: loss(x, a, b, qa, naive), x, a, b)
    return out.getvalue().splitlines()

  weight_like = lambda line: re.match(rf"(f|bf)\d+\[(\d+,)*{n_in},{n_out}\]", line)
  assert any(map(weight_like, residuals(naive=True)))  # the check sees one when there is one
  lines = residuals(naive=False)
  assert not any(map(weight_like, lines)), lines
  # The packed weights are the stacked input itself, not per-layer copies made by the scan.
  packed = [line for line in lines if line.startswith("u8[")]
  assert len(packed) == 2 and all("output of" not in line for line in packed), lines


@pytest.mark.parametrize("mode,g", [("int8", 128), ("int4", 128), ("nf4", 64)])
def test_xla_path_in_tiles_is_the_whole_dequantization(mode, g):
  """kernels.reference loops over TILE-wide slices of the output (columns of w forward, rows of
  w transposed): bit for bit the dot of the whole dequantized matrix (quant.dequantize), while
  no temporary holds the whole dequantized [in, out] matrix (compiled, abstract 4096 x 14336)."""
  rng = np.random.default_rng(7)
  n_in, n_out = 2 * kernels.TILE, 3 * kernels.TILE
  qa = jax.tree.map(jnp.asarray, quant.quantize(
      rng.standard_normal((n_in, n_out)).astype(np.float32), mode, g, dtype=jnp.bfloat16))
  # more rows than a decode step (kernels.DECODE_ROWS), which on CPU goes block by block instead
  x = jnp.asarray(rng.standard_normal((2, 40, n_in)), jnp.bfloat16)
  gy = jnp.asarray(rng.standard_normal((2, 40, n_out)), jnp.bfloat16)
  dense = quant.dequantize(qa, jnp.bfloat16)
  assert "scan" in str(jax.make_jaxpr(kernels.reference)(x, qa))  # the tiled path ran
  np.testing.assert_array_equal(kernels.reference(x, qa), x @ dense)
  np.testing.assert_array_equal(kernels.reference(gy, qa, transpose=True),
                                jnp.einsum("...o,io->...i", gy, dense))
  big = jax.eval_shape(lambda: quant.abstract((4096, 14336), jnp.bfloat16, mode, g))
  xs = jax.ShapeDtypeStruct((256, 4096), jnp.bfloat16)
  whole = 4096 * 14336 * 2  # the dequantized matrix in bf16
  temp = lambda f, arg: jax.jit(f).lower(arg, big).compile().memory_analysis().temp_size_in_bytes
  assert temp(lambda y, w: y @ quant.dequantize(w, y.dtype), xs) >= whole  # the control
  assert temp(kernels.reference, xs) < whole / 4
  assert temp(lambda y, w: kernels.reference(y, w, transpose=True),
              jax.ShapeDtypeStruct((256, 14336), jnp.bfloat16)) < whole / 2  # [TILE, 14336] tiles


@pytest.mark.parametrize("mode,g", [("int8", 128), ("int4", 128), ("nf4", 64)])
def test_pallas_kernels_match_xla_in_interpret_mode(mode, g):
  # in = out = 384: the Mosaic kernel takes 3 K steps and 3 column blocks; M = 20 is padded.
  rng = np.random.default_rng(5)
  qa = quant.quantize(rng.standard_normal((384, 384)).astype(np.float32), mode, g)
  x = jnp.asarray(rng.standard_normal((2, 10, 384)), jnp.float32)
  want, want_t = kernels.reference(x, qa), kernels.reference(x, qa, transpose=True)
  for backend in ("triton", "mosaic"):
    got = kernels.matmul(x, qa, backend=backend, interpret=True)
    got_t = kernels.matmul(x, qa, backend=backend, interpret=True, transpose=True)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * float(jnp.abs(want).max()))
    np.testing.assert_allclose(got_t, want_t, rtol=1e-5, atol=1e-4 * float(jnp.abs(want_t).max()))


def test_linear_grads_through_a_kernel():
  qa = quant.quantize(_weights((128, 128)), "nf4")
  x = jnp.asarray(np.random.default_rng(6).standard_normal((8, 128)), jnp.float32)
  a, b = _lora(128, 128)
  f = lambda x, a, b, w: jnp.sum(jnp.sin(linear(x, w, (a, b), scale=2.0)))
  through = lambda x, a, b, w: jnp.sum(jnp.sin(linear(x, w, (a, b), scale=2.0, backend="mosaic",
                                                      interpret=True)))
  got = jax.jit(jax.grad(through, argnums=(0, 1, 2)))(x, a, b, qa)
  want = jax.grad(f, argnums=(0, 1, 2))(x, a, b, quant.dequantize(qa))
  for g, h in zip(got, want):
    np.testing.assert_allclose(g, h, rtol=1e-4, atol=1e-5)


def test_quantized_train_step_keeps_no_dequantized_weights(monkeypatch):
  """memory_analysis of the compiled train step of a Llama-1B-shaped model in nf4 (abstract: nothing
  is allocated), without remat so every residual the backward pass needs is kept. A plain-JAX
  dequantize-then-matmul, the control, keeps each layer's dequantized weights for the backward
  pass; the custom_vjp matmul keeps none, so its temporaries are smaller by about that much."""
  import functools
  from ftjax import hf_io, linear, lora, optim, step as step_lib
  from ftjax.config import defaults
  from ftjax.model import Model, ModelSpec
  spec = ModelSpec(arch="llama", vocab=8000, dim=2048, n_layers=4, n_heads=32, n_kv_heads=8,
                   head_dim=64, mlp_dim=8192)
  params = hf_io.abstract_params(spec, hf_io.key_table(spec), jnp.bfloat16, "nf4")
  adapters = lora.init(spec, "all-linear", 16, 32.0, jax.random.PRNGKey(0))
  optimizer = optim.make_optimizer(defaults().optim, 100)
  state = jax.eval_shape(lambda: step_lib.init_state(adapters, optimizer, 0))
  batch = {k: jax.ShapeDtypeStruct((1, 128), jnp.float32 if k == "loss_mask" else jnp.int32)
           for k in ("tokens", "targets", "loss_mask", "segment_ids")}

  def temp_bytes():
    fn = jax.jit(functools.partial(step_lib.train_step, adapters=adapters, optimizer=optimizer,
                                   grad_accum=1, remat="none"),
                 donate_argnums=0)
    return fn.lower(state, Model(spec, params), batch).compile().memory_analysis().temp_size_in_bytes

  ours = temp_bytes()
  monkeypatch.setattr(linear, "qmatmul", lambda x, w, *_: x @ quant.dequantize(w, x.dtype))
  naive = temp_bytes()
  layer = sum(spec.projection_shape(n)[0] * spec.projection_shape(n)[1]
              for n in spec.projections) * 2  # bf16 bytes of one layer's dequantized weights
  assert naive - ours > 0.75 * spec.n_layers * layer, (ours, naive, layer)
  assert ours < naive / 2
