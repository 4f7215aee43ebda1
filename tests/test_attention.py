"""Every attention path against the plain-XLA reference, and that against a float64 numpy version:
values and gradients on packed and padded rows, GQA, sliding windows and soft-capping. Pallas
kernels (splash, Triton) run in interpret mode; cuDNN's arguments run through JAX's XLA version of
the same call, and its GPU lowering is checked for the absence of a mask or bias."""
import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ftjax
from ftjax import attention as attn
from ftjax.errors import UserError
from ftjax.model import Kernels, ModelSpec, layer_windows, positions_from_segments

B, T, N, K, H = 2, 80, 4, 2, 16  # T: no multiple of the kernels' 128 or of the XLA query block
SCALE = 0.3
# Row 0 packs two documents then padding; row 1 is one document then padding.
SEG = np.array([[1] * 30 + [2] * 35 + [0] * 15, [1] * 70 + [0] * 10], np.int32)
POS = np.asarray(positions_from_segments(jnp.asarray(SEG)))
CASES = {"plain": (None, None), "window+softcap": (7, 5.0)}


def inputs(seed=0):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(B, T, N, H)).astype(np.float32)
  k, v = (rng.normal(size=(B, T, K, H)).astype(np.float32) for _ in range(2))
  w = rng.normal(size=(B, T, N, H)).astype(np.float32)  # the loss weights of the outputs
  return q, k, v, w


def numpy_attention(q, k, v, pos, seg, window, softcap):
  """float64, written from the definition: per head, its kv head n // (N / K)."""
  q, k, v = (x.astype(np.float64) for x in (q, k, v))
  k, v = np.repeat(k, N // K, axis=2), np.repeat(v, N // K, axis=2)
  s = np.einsum("btnh,bsnh->bnts", q, k) * SCALE
  if softcap is not None:
    s = np.tanh(s / softcap) * softcap
  ok = (seg[:, :, None] == seg[:, None, :]) & (pos[:, None, :] <= pos[:, :, None])
  if window is not None:
    ok &= pos[:, :, None] - pos[:, None, :] < window
  s = np.where(ok[:, None], s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  return np.einsum("bnts,bsnh->btnh", p / p.sum(-1, keepdims=True), v)


def value_and_grads(impl, window, softcap, seg=SEG, **kw):
  """jitted (q, k, v, w) -> (outputs, d sum(o * w) / d(q, k, v)) of one implementation."""
  seg = jnp.asarray(seg)
  pos = positions_from_segments(seg)
  if impl == "cudnn-as-xla":
    run = lambda q, k, v: attn._cudnn(q, k, v, seg, window, SCALE, softcap, "xla")
  else:
    run = functools.partial(attn.attention, q_pos=pos, k_pos=pos, q_seg=seg, k_seg=seg,
                            window=window, scale=SCALE, softcap=softcap, impl=impl, **kw)

  def f(q, k, v, w):
    o = run(q, k, v)
    return jnp.sum(o * w), o

  grads = jax.jit(jax.grad(f, argnums=(0, 1, 2), has_aux=True))
  return lambda q, k, v, w: grads(q, k, v, w)[::-1]


def assert_close(got, want, rtol=1e-5):
  """Relative 1e-5 of the largest magnitude, elementwise (float32 summation orders differ)."""
  got, want = np.asarray(got), np.asarray(want)
  assert np.abs(want).max() > 0
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())


@pytest.fixture(scope="module")
def reference():
  """The XLA path, one block: {case: (outputs, grads)}."""
  q, k, v, w = inputs()
  return {c: value_and_grads("xla", *ws, q_block=T)(q, k, v, w) for c, ws in CASES.items()}


@pytest.mark.parametrize("case", CASES)
def test_xla_reference_equals_float64_numpy_and_blocking(case, reference):
  """The reference equals the definition; its query blocks (80 tokens padded to 3 blocks of 32)
  give the same values and gradients as one block."""
  q, k, v, w = inputs()
  window, softcap = CASES[case]
  out, grads = reference[case]
  assert_close(out, numpy_attention(q, k, v, POS, SEG, window, softcap))
  blocked_out, blocked_grads = value_and_grads("xla", window, softcap, q_block=32)(q, k, v, w)
  assert_close(blocked_out, out)
  for g, want in zip(blocked_grads, grads):
    assert_close(g, want)


def test_blocked_xla_keeps_no_scores_of_all_blocks():
  """Any sequence length runs in blocks, padded to a multiple: the compiled gradient of 80 tokens
  in blocks of 16 keeps far less than the [B, N, T, S] float32 scores one block keeps."""
  q, k, v, w = inputs()
  seg, pos = jnp.asarray(SEG), jnp.asarray(POS)

  def temp(q_block):
    loss = lambda q, k, v: jnp.sum(w * attn.attention(
        q, k, v, q_pos=pos, k_pos=pos, q_seg=seg, k_seg=seg, window=None, scale=SCALE,
        softcap=5.0, q_block=q_block))
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  scores = B * N * T * T * 4
  assert temp(T) - temp(16) > 2 * scores


@pytest.mark.parametrize("case", CASES)
def test_splash_equals_reference(case, reference):
  """TPU splash attention (interpret mode): packed and padded rows, GQA, window, soft-cap."""
  q, k, v, w = inputs()
  out, grads = value_and_grads("splash", *CASES[case], interpret=True)(q, k, v, w)
  assert_close(out, reference[case][0])
  for g, want in zip(grads, reference[case][1]):
    assert_close(g, want)


def test_splash_bfloat16_runs_at_default_precision(reference):
  """16-bit inputs take the wrapper that traces splash (backward included) at matmul precision
  "default" (Mosaic has no 16-bit "highest" dot; conftest sets "highest"): bf16-close values and
  gradients."""
  q, k, v, w = (jnp.asarray(x, jnp.bfloat16) for x in inputs())
  out, grads = value_and_grads("splash", None, None, interpret=True)(q, k, v, w)
  assert out.dtype == jnp.bfloat16
  assert_close(out.astype(np.float32), reference["plain"][0], rtol=3e-2)
  for g, want in zip(grads, reference["plain"][1]):
    assert_close(g.astype(np.float32), want, rtol=3e-2)


def test_triton_equals_reference(reference):
  """GPU Pallas-Triton flash attention (interpret mode) on packed rows with GQA."""
  q, k, v, w = inputs()
  out, grads = value_and_grads("triton", None, None, interpret=True)(q, k, v, w)
  assert_close(out, reference["plain"][0])
  for g, want in zip(grads, reference["plain"][1]):
    assert_close(g, want)


def test_cudnn_arguments_mean_the_reference():
  """The cuDNN path's arguments (causal, per-row lengths, local window) run through JAX's XLA
  version of jax.nn.dot_product_attention: on one-document rows they give the reference on the
  real tokens (padding comes out zero), gradients included; a packed row comes out NaN."""
  q, k, v, w = inputs()
  real = (np.array([[1] * 65 + [0] * 15, [1] * 70 + [0] * 10]) > 0)[:, :, None, None]
  w = w * real  # the loss never reads padded positions
  one_doc = np.array([[1] * 65 + [0] * 15, [1] * 70 + [0] * 10], np.int32)
  for window in (None, 7):
    want, want_grads = value_and_grads("xla", window, None, one_doc)(q, k, v, w)
    out, grads = value_and_grads("cudnn-as-xla", window, None, one_doc)(q, k, v, w)
    assert_close(np.where(real, out, 0), np.where(real, want, 0))
    assert not np.asarray(out)[~real[..., 0, 0]].any()
    for g, wg in zip(grads, want_grads):
      assert_close(g, wg)
  packed, _ = value_and_grads("cudnn-as-xla", None, None)(q, k, v, w)
  assert np.isnan(np.asarray(packed)[0]).all() and np.isfinite(np.asarray(packed)[1]).all()


def test_cudnn_lowering_has_no_mask_or_bias(monkeypatch):
  """Lowered for CUDA here (cuDNN's version check patched): our call is a cuDNN flash attention
  with causal + padding masks computed in the kernel, and no [B, 1|N, T, S] operand anywhere,
  forward or backward. The control, a dense boolean mask as the old path passed it, shows the
  check sees such a bias when there is one."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn
  monkeypatch.setattr(cudnn, "check_cudnn_version", lambda: 91000)
  t = 256
  q = jax.ShapeDtypeStruct((B, t, N, 64), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((B, t, K, 64), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((B, t), jnp.int32)

  def hlo(f):
    g = jax.grad(lambda q, k, v, s: jnp.sum(f(q, k, v, s).astype(jnp.float32)), argnums=(0, 1, 2))
    return jax.jit(g).trace(q, k, k, seg).lower(lowering_platforms=("cuda",)).as_text()

  ours = hlo(lambda q, k, v, s: attn._cudnn(q, k, v, s, 31, SCALE, None, "cudnn"))
  dense = hlo(lambda q, k, v, s: jax.nn.dot_product_attention(
      q, k, v, scale=SCALE, implementation="cudnn",
      mask=attn.mask(jnp.zeros_like(s), jnp.zeros_like(s), s, s, None)[:, 0]))
  calls = lambda text: set(re.findall(r"custom_call @(__cudnn\$\w+)", text))
  scores_shaped = lambda text: re.search(rf"tensor<{B}x(1|{N})x{t}x{t}x", text)
  assert calls(ours) == {"__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"}, calls(ours)
  assert "PADDING_CAUSAL" in ours and not scores_shaped(ours)
  assert any("Bias" in c for c in calls(dense)) and scores_shaped(dense)


SPEC = ModelSpec(arch="llama", vocab=8, dim=8, n_layers=8, n_heads=4, n_kv_heads=2, head_dim=16,
                 mlp_dim=8)


def test_resolve():
  packed = dict(packing=True, dtype="bfloat16")
  assert attn.resolve("auto", "tpu", SPEC, **packed) == "splash"
  assert attn.resolve("auto", "cpu", SPEC, **packed) == "xla"
  assert attn.resolve("auto", "gpu", SPEC, **packed) == "xla"  # cuDNN: no segment ids
  assert attn.resolve("auto", "gpu", SPEC, packing=False, dtype="bfloat16") == "cudnn"
  assert attn.resolve("auto", "gpu", SPEC, packing=False, dtype="float32") == "xla"
  assert attn.resolve("triton", "gpu", SPEC, **packed) == "triton"
  gemma2 = dataclasses.replace(SPEC, attn_softcap=50.0, sliding_window=4096,
                               layer_sliding=(True, False) * 4)
  for name, platform, spec, why in [
      ("flash", "gpu", SPEC, "use one of auto, xla"), ("splash", "gpu", SPEC, "TPU only"),
      ("cudnn", "tpu", SPEC, "GPU only"), ("cudnn", "gpu", SPEC, "packed rows"),
      ("triton", "gpu", gemma2, "no sliding window")]:
    with pytest.raises(UserError, match=rf"^model\.attention=.*{why}"):
      attn.resolve(name, platform, spec, **packed)


def test_layer_kinds_copy_no_weights():
  """Layers that differ in window (Gemma 2's local, global) run as static branches of one scan over
  the stacked weights: the compiled train step (remat full, nf4 base of 1B-like layers, abstract)
  needs no more temporaries than the same model with every layer alike (scanning blocks of layers
  instead made XLA copy the stacked weights: 9 MiB packed, 35 MiB dequantized here)."""
  from ftjax import hf_io, lora, optim, step as step_lib
  from ftjax.config import defaults
  from ftjax.model import Model
  spec = ModelSpec(arch="llama", vocab=512, dim=512, n_layers=4, n_heads=8, n_kv_heads=2,
                   head_dim=64, mlp_dim=2048)
  local_global = dataclasses.replace(spec, sliding_window=64, layer_sliding=(True, False) * 2)
  assert layer_windows(local_global) == ((64, True), (None, False)) * 2
  adapters = lora.init(spec, "all-linear", 8, 16.0, jax.random.PRNGKey(0))
  optimizer = optim.make_optimizer(defaults().optim, 10)
  state = jax.eval_shape(lambda: step_lib.init_state(adapters, optimizer, 0))
  batch = {k: jax.ShapeDtypeStruct((1, 128), jnp.float32 if k == "loss_mask" else jnp.int32)
           for k in ("tokens", "targets", "loss_mask", "segment_ids")}
  params = hf_io.abstract_params(spec, hf_io.key_table(spec), jnp.bfloat16, "nf4")
  step = jax.jit(functools.partial(step_lib.train_step, adapters=adapters, optimizer=optimizer,
                                   grad_accum=1, remat="full"), donate_argnums=0)
  temp = lambda s: step.lower(state, Model(s, params), batch).compile().memory_analysis(
      ).temp_size_in_bytes
  alike, kinds = temp(spec), temp(local_global)
  # Copied stacked weights would add ~44 MiB here (~2.9x). Each branch keeps its own temporaries
  # of the tiled dequantize-matmul: measured 1.26x.
  assert kinds < alike * 1.4, (alike, kinds)


@pytest.mark.parametrize("arch,impl", [("gemma2", "splash"), ("llama", "triton")])
def test_model_with_kernel_equals_xla(arch, impl, tiny_hf):
  """A whole model whose Kernels name a Pallas kernel (interpret mode) equals its XLA forward on
  packed rows: Gemma 2 has soft-capping and a window on every other layer (3 layers: a block of
  2, one left over), Llama has GQA."""
  _, path = tiny_hf(arch)
  model = ftjax.load_hf(path, dtype="float32")
  rng = np.random.default_rng(1)
  tokens = rng.integers(3, 100, (2, 20))
  seg = np.array([[1] * 9 + [2] * 11, [1] * 16 + [0] * 4])
  want = ftjax.forward(model, tokens, segment_ids=seg)
  fast = dataclasses.replace(model, kernels=Kernels(attention=impl, interpret=True))
  got = jax.jit(ftjax.forward)(fast, tokens, segment_ids=seg)
  # relative to the logits' norm (through 3 layers elementwise errors reach 3e-5 of the largest)
  assert np.linalg.norm(got - want) < 1e-5 * np.linalg.norm(want)


def test_tpu_train_step_runs_splash(tmp_path):
  """The train step ftjax.plan compiles for a v5e chip with libtpu (no TPU needed) resolves
  model.attention "auto" to splash, and the compiled step holds splash's Mosaic kernels, forward
  and both backward ones, at a seq_len (200) that is no multiple of the kernel's blocks."""
  from test_plan import tiny_config
  from ftjax import hf_io, plan as plan_lib
  cfg = tiny_config(tmp_path, train__remat="full", data__seq_len=200)
  device, _ = plan_lib.target_device("tpu-v5e")
  compiled, (_, model, _) = plan_lib.compile_step(cfg, hf_io.read_spec(cfg.model.path), device)
  assert model.kernels.attention == "splash"
  text = compiled.as_text()
  assert 'custom_call_target="tpu_custom_call"' in text
  kernels = set(re.findall(r"splash_mha_\w+", text))
  assert {k.split("_segmented")[0] for k in kernels} == {"splash_mha_fwd", "splash_mha_dq",
                                                       "splash_mha_dkv"}, kernels
