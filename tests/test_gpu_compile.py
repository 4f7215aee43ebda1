"""The train step compiled for an NVIDIA H100 (the 8B recipes for an H200) by XLA:GPU on a machine
without a GPU, as `ftjax.plan --target=h100` compiles it: what each attention and quantized-matmul
path lowers to, that every remat policy, stacked adapters and eval compile, and what the recipes
plan at. Real sm_90 code; what only a real card decides (cuDNN accepting its graph, speed) is
bench/gpu.py's.

The CI's GPU tier runs these (.ci/run: a Python 3.12 env with jax[cuda12]==0.11.2, the GPU
machine's jax; `pytest --noconftest -m gpu_compile`, so nothing here needs torch); without the CUDA
compiler they skip. Tiny compiles are shared per module (`compiled`).
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only GPUs need no CUDA backend

import dataclasses
import functools
import re
import sys
import types

import pytest

from ftjax import plan as plan_lib

pytestmark = [pytest.mark.gpu_compile, pytest.mark.skipif(
    not plan_lib.has_cuda_plugin(),
    reason="no CUDA compiler here (jax[cuda12]: pip install -e '.[gpu-plan]' in a Python 3.12 "
           "env); the CI's GPU tier runs these")]

import jax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from ftjax import evaluation, hf_io, sharding, step as step_lib  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))
import llama3_8b_lora  # noqa: E402
import llama3_8b_qlora  # noqa: E402  (writes the config.json the planner reads)
import qwen3_30b_a3b_qlora  # noqa: E402

GiB = 2**30
T = 384  # tokens per row: no other dimension of the model is 384, so two of them are [T, S]
TINY = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=64)
# A tiny Qwen3-MoE: 24 experts, 2 per token, so the routed rows are 2 x T x 2 = 1536.
TINY_MOE = dict(vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                num_experts=24, num_experts_per_tok=2)
PALLAS = "__gpu$xla.gpu.triton"  # a Pallas-Triton kernel's custom call (not XLA's own GEMM fusions)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  return llama3_8b_qlora.write_config_json(str(tmp_path_factory.mktemp("tiny")), **TINY)


def config(path, **overrides):
  """Tiny Llama, bf16 LoRA on every linear, 2 x T tokens; a__b=v sets c.a.b."""
  c = llama3_8b_qlora.get_config()
  c.model.path, c.model.embed_on_host, c.quant.mode = path, False, "none"
  c.data.seq_len, c.train.batch_size, c.train.remat = T, 2, "none"
  for k, v in overrides.items():
    section, key = k.split("__")
    c[section][key] = v
  return c


@pytest.fixture(scope="module")
def compiled(tiny):
  """compiled(**overrides) -> the Plan on one H100, each distinct config compiled once."""
  return functools.cache(lambda **kw: plan_lib.plan(config(tiny, **kw), "h100"))


MOSAIC_GPU = "mosaic_gpu_v2"  # a Pallas Mosaic GPU kernel's custom call


def custom_calls(text):
  return set(re.findall(r'custom_call_target="([^"]+)"', text))


def kernel_names(text):
  """The names of the Pallas-Triton kernels in the HLO (the kernels' Python function names)."""
  return set(re.findall(r'name = "(\w+)"', text))


def scores(text):
  """Shapes with two dimensions of T: [B, N, T, S] attention scores (or masks), in any layout."""
  return {m for m in re.findall(r"\[([\d,]+)\]", text) if m.split(",").count(str(T)) >= 2}


def test_cudnn_attention(compiled, tiny):
  """model.attention=cudnn (unpacked bf16 rows): cuDNN's fused attention forward and backward,
  no [T, S] scores; `auto` picks it for such rows (README), and the XLA reference for packed ones.
  The capacity of an H100 is JAX's allocator share (0.75) of its memory."""
  p = compiled(model__attention="cudnn", data__packing=False)
  text = p.hlo
  assert {"__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"} <= custom_calls(text)
  assert not scores(text) and PALLAS not in custom_calls(text)
  assert p.device == "gpu:NVIDIA H100 80GB HBM3" and p.fits
  assert p.device_bytes == int(0.75 * 84978434048)
  spec = hf_io.read_spec(tiny)
  auto = lambda packing: step_lib.kernels_for(
      config(tiny, data__packing=packing), "gpu", spec).attention
  assert auto(False) == "cudnn" and auto(True) == "xla"


def test_triton_attention_packed(compiled):
  """model.attention=triton on packed rows: JAX's Pallas-Triton flash attention, lowered under the
  step's mesh (the kernel reads the GPU from it), forward and backward; no [T, S] scores."""
  text = compiled(model__attention="triton").hlo
  assert PALLAS in custom_calls(text)
  assert {"mha_forward", "mha_backward"} <= kernel_names(text)
  assert not scores(text)


def test_xla_attention_holds_block_scores(compiled):
  """The check above can fail: the XLA reference (auto on packed rows) holds a [T, S] block."""
  text = compiled(quant__mode="nf4").hlo
  assert scores(text) and "__cudnn$fmhaSoftmax" not in custom_calls(text)


@pytest.mark.parametrize("mode,remat", [("nf4", "full"), ("int4", "save_proj")])
def test_pallas_quant_kernels_are_triton(compiled, mode, remat):
  """quant.kernel=pallas: the dequantize-matmuls are Pallas-Triton kernels, forward and backward
  (dx); quant.kernel=xla: no Pallas kernel at all."""
  text = compiled(quant__mode=mode, quant__kernel="pallas", train__remat=remat).hlo
  assert PALLAS in custom_calls(text)
  assert {"_fwd_kernel", "_bwd_kernel"} <= kernel_names(text)
  xla = compiled(quant__mode=mode, train__remat="offload" if mode == "int4" else "none").hlo
  assert PALLAS not in custom_calls(xla) and not kernel_names(xla) & {"_fwd_kernel", "_bwd_kernel"}


def test_remat_policies_compile(compiled):
  """none, save_proj, full and offload each compile for the GPU; offload moves every layer's input
  to pinned host memory (a compile-only GPU lists none, a GPU host has it), the others none."""
  plans = {"none": compiled(quant__mode="nf4"),
           "save_proj": compiled(quant__mode="int4", quant__kernel="pallas",
                                 train__remat="save_proj"),
           "full": compiled(quant__mode="nf4", quant__kernel="pallas", train__remat="full"),
           "offload": compiled(quant__mode="int4", train__remat="offload")}
  for remat, p in plans.items():
    assert p.remat == remat and p.fits and sum(p.categories.values()) == p.peak > 0
    assert (p.host_bytes > 0) == (remat == "offload"), remat
  layer_inputs = TINY["num_hidden_layers"] * 2 * T * TINY["hidden_size"] * 2  # bf16
  assert plans["offload"].host_bytes >= layer_inputs


def test_stacked_adapters_and_eval_compile(compiled, tiny):
  """Two named data.train sources (stacked adapters, rows routed by adapter id) compile for the
  GPU, and so does the eval step ftjax.train runs under its mesh."""
  two = compiled(data__train="a=a.jsonl,b=b.jsonl", model__attention="cudnn",
                 data__packing=False)
  one = compiled(model__attention="cudnn", data__packing=False)
  assert two.categories["adapters"] == 2 * one.categories["adapters"]
  assert "__cudnn$fmhaSoftmaxBackward" in custom_calls(two.hlo)

  cfg = config(tiny, data__train="a=a.jsonl,b=b.jsonl", quant__mode="nf4", quant__kernel="pallas")
  spec = hf_io.read_spec(tiny)
  device, _ = plan_lib.target_device("h100")
  mesh = sharding.make_mesh(types.SimpleNamespace(data=1, fsdp=1, tensor=1), [device])
  adapters = plan_lib.abstract_adapters(cfg, spec)
  model, state = plan_lib.abstract_model_and_state(cfg, spec, adapters)
  model = dataclasses.replace(model, kernels=step_lib.kernels_for(cfg, "gpu", spec))
  batch = plan_lib.abstract_batch(4, T)
  batch["adapter_ids"] = jax.ShapeDtypeStruct((4,), "int32")
  on = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P()))
  args = jax.tree.map(on, (state["adapters"], model, batch))
  text = evaluation.eval_step_fn(adapters, mesh).lower(*args).compile().as_text()
  assert "_fwd_kernel" in kernel_names(text) and "_bwd_kernel" not in kernel_names(text)


def test_llama3_8b_lora_recipe_fits_an_h200(tmp_path):
  """configs/llama3_8b_lora.py as written, on one H200: the remat it picks (auto) fits the share of
  the card JAX's allocator takes (0.75 of 139 GiB), with HEADROOM to spare."""
  cfg = llama3_8b_lora.get_config()
  cfg.model.path = llama3_8b_qlora.write_config_json(str(tmp_path))
  assert cfg.train.remat == "auto"
  p = plan_lib.plan(cfg, "h200")
  assert p.device == "gpu:NVIDIA H200" and p.device_bytes == int(0.75 * 139 * GiB)
  assert p.fits and p.peak <= plan_lib.HEADROOM * p.device_bytes
  assert p.categories["base params"] > 14 * GiB  # bf16 Llama-3-8B
  print(f"llama3_8b_lora on h200: remat {p.remat}, peak {p.peak / GiB:.2f} GiB")


def test_llama3_8b_qlora_recipe_on_an_h200(tmp_path):
  """configs/llama3_8b_qlora.py as written (remat offload: every layer's input in pinned host
  memory) plans under 24 GiB on one H200."""
  cfg = llama3_8b_qlora.get_config()
  cfg.model.path = llama3_8b_qlora.write_config_json(str(tmp_path))
  p = plan_lib.plan(cfg, "h200")
  assert p.remat == cfg.train.remat == "offload" and p.fits
  assert p.peak < 24 * GiB and p.host_bytes >= 32 * 2048 * 4096 * 2
  print(f"llama3_8b_qlora on h200: remat {p.remat}, peak {p.peak / GiB:.2f} GiB")


def test_plugin_that_did_not_start_is_one_line(tiny, monkeypatch):
  """Where the CUDA plugin is installed but JAX started it before the planner (its GPU check then
  failed, and JAX starts plugins once): one line naming the variables that skip the check."""
  from jax.experimental import topologies
  from ftjax.errors import UserError

  def not_started(**_):  # what jax raises when no CUDA plugin registered a topology
    raise NotImplementedError("topology not implemented for cuda")

  monkeypatch.setattr(topologies, "get_topology_desc", not_started)
  before = os.environ.get("JAX_SKIP_CUDA_CONSTRAINTS_CHECK")
  with pytest.raises(UserError, match=r"^--target=h200: the CUDA plugin did not start: .*"
                     r"JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 or JAX_PLATFORMS=cpu first$"):
    plan_lib.plan(config(tiny), "h200")
  assert os.environ.get("JAX_SKIP_CUDA_CONSTRAINTS_CHECK") == before  # set for the planner only


def test_grouped_matmul_interpreted_matches_ragged_dot():
  """JAX's Mosaic GPU grouped-matmul kernels (ftjax/kernels/grouped_gpu.py), run in Mosaic GPU's
  interpret mode on CPU: forward, dx and dw against jax.lax.ragged_dot in float32 (w as stored and
  transposed, as the quantized backward reads its dequantized slices), with an empty
  group, rows that fill no whole block, K and N not multiples of a block, and a LoRA rank of 4
  (padded to a block and sliced back); through `linear` with NF4 experts and LoRA on them, its
  grads in x, a and b against the XLA path's."""
  import jax.numpy as jnp
  import numpy as np
  from ftjax import kernels, linear as linear_lib, quant

  e, m, d, f, r = 4, 100, 96, 80, 4
  ks = jax.random.split(jax.random.key(0), 6)
  bf = lambda k, shape: jax.random.normal(k, shape, jnp.float32).astype(jnp.bfloat16)
  x, w, ct = bf(ks[0], (m, d)), bf(ks[1], (e, d, f)), bf(ks[2], (m, f))
  sizes = jnp.array([30, 0, 50, 20], jnp.int32)
  f32 = lambda t: np.asarray(t, np.float32)

  def grads(fn, *args):
    y, vjp = jax.vjp(fn, *args)
    return (y,) + vjp(ct.astype(y.dtype))

  for t, wt in ((False, w), (True, jnp.swapaxes(w, 1, 2))):  # transpose: w as [E, out, in]
    ours = grads(lambda x, w: kernels.ragged_dot(x, w, sizes, transpose=t, backend="mgpu",
                                                 interpret=True), x, wt)
    ref = grads(lambda x, w: jax.lax.ragged_dot(x, jnp.swapaxes(w, 1, 2) if t else w, sizes),
                x.astype(jnp.float32), wt.astype(jnp.float32))
    for name, a, b in zip(("y", "dx", "dw"), ours, ref):
      assert a.dtype == jnp.bfloat16 and a.shape == b.shape, (t, name)
      np.testing.assert_allclose(f32(a), f32(b), atol=0.02 * np.abs(f32(b)).max(),
                                 err_msg=f"transpose={t} {name}")
    assert np.abs(f32(ours[2][1])).max() == 0  # the empty group's weight gets no gradient

  wq = quant.quantize(jax.random.normal(ks[3], (e, 128, 128), jnp.float32), "nf4", 64)
  a, b = bf(ks[4], (e, 128, r)), bf(ks[5], (e, r, 128))
  xq = bf(ks[0], (m, 128))

  def lin(grouped):
    fn = lambda x, a, b: linear_lib.linear(x, wq, (a, b), scale=2.0, group_sizes=sizes,
                                           grouped=grouped, interpret=True)
    y, vjp = jax.vjp(fn, xq, a, b)
    return (y,) + vjp(y)

  # the kernels ran (a dtype they do not take would quietly run XLA's ragged_dot); interpreted,
  # a kernel is its body's jaxpr, Hopper's wgmma included
  wgmma = lambda grouped: "wgmma" in str(jax.make_jaxpr(lin, static_argnums=0)(grouped))
  assert wgmma("mgpu") and not wgmma("xla")
  assert "wgmma" in str(jax.make_jaxpr(lambda x, w: kernels.ragged_dot(
      x, w, sizes, backend="mgpu", interpret=True))(x, w))

  for name, got, want in zip(("y", "dx", "da", "db"), lin("mgpu"), lin("xla")):
    want = f32(want)
    np.testing.assert_allclose(f32(got), want, atol=0.03 * np.abs(want).max(), err_msg=name)


@pytest.fixture(scope="module")
def moe_plans(tmp_path_factory):
  """configs/qwen3_30b_a3b_qlora.py (NF4 experts, LoRA on every linear) on a tiny Qwen3-MoE,
  planned for an H200 and for an A100 (sm80: no Mosaic GPU kernel, XLA's ragged_dot)."""
  path = qwen3_30b_a3b_qlora.write_config_json(str(tmp_path_factory.mktemp("moe")), **TINY_MOE)
  c = qwen3_30b_a3b_qlora.get_config()
  c.model.path, c.model.embed_on_host = path, False
  c.data.seq_len, c.train.batch_size = T, 2
  return {t: plan_lib.plan(c, t) for t in ("h200", "a100")}


def dense_expansions(text, rows, experts):
  """Shapes holding both the routed rows and the expert count: ragged_dot expanded over all
  experts ([rows, E, ...] in any order)."""
  return {s for s in re.findall(r"\[([\d,]+)\]", text)
          if {str(rows), str(experts)} <= set(s.split(","))}


def test_moe_step_grouped_matmuls_are_mosaic_gpu(moe_plans):
  """On an H200 the MoE train step's grouped matmuls (experts' forward, dx, LoRA's dw) are Mosaic
  GPU kernels and no buffer is [rows, E, ...]; on an A100 XLA's ragged_dot holds such buffers
  (the check can fail)."""
  rows = 2 * T * TINY_MOE["num_experts_per_tok"]
  e = TINY_MOE["num_experts"]
  h200, a100 = moe_plans["h200"].hlo, moe_plans["a100"].hlo
  assert MOSAIC_GPU in custom_calls(h200)
  assert not dense_expansions(h200, rows, e)
  assert MOSAIC_GPU not in custom_calls(a100) and dense_expansions(a100, rows, e)
  assert moe_plans["h200"].peak < moe_plans["a100"].peak


def test_moe_step_on_two_gpus_runs_each_shards_rows(monkeypatch, tmp_path):
  """On a mesh of two H200s (fsdp=2, compiled deviceless), the MoE step's Mosaic GPU grouped
  matmuls take each GPU's own routed rows (T x 2: one row of the batch per GPU), and no buffer
  holds the whole batch's 2 x T x 2 routed rows (before moe.sparse_mlp's shard_map, XLA, unable
  to split the kernels' calls, gathered every routed row to both GPUs and each sorted them all)."""
  import dataclasses
  import types
  from jax.experimental import topologies
  from ftjax import step as step_lib

  with open(os.path.join(plan_lib.GPU_SPECS, plan_lib.GPU_TARGETS["h200"])) as f:
    target = f.read()
  monkeypatch.setenv(plan_lib.SKIP_CUDA_CHECK, "1")  # as plan_lib.gpu_device: no GPU here
  devices = topologies.get_topology_desc(platform="cuda", target_config=target,
                                         topology="1x1x2").devices
  mesh = sharding.make_mesh(types.SimpleNamespace(data=1, fsdp=2, tensor=1), devices)
  c = qwen3_30b_a3b_qlora.get_config()  # NF4 experts, LoRA on every linear, experts' included
  c.model.path = qwen3_30b_a3b_qlora.write_config_json(str(tmp_path), **TINY_MOE)
  c.model.embed_on_host, c.train.batch_size, c.data.seq_len = False, 2, T
  spec = hf_io.read_spec(c.model.path)
  adapters = plan_lib.abstract_adapters(c, spec)
  model, _ = plan_lib.abstract_model_and_state(c, spec, adapters)
  shaped = lambda tree, shardings: jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
  model = dataclasses.replace(
      model, params=shaped(model.params, sharding.param_shardings(mesh, model.params)),
      kernels=step_lib.kernels_for(c, "gpu", spec, devices[0].compute_capability))
  params = shaped(adapters.params, sharding.adapter_shardings(mesh, spec, adapters.params))
  batch = plan_lib.abstract_batch(2, T)
  batch = shaped(batch, {k: sharding.batch_sharding(mesh) for k in batch})
  grad = jax.jit(jax.value_and_grad(lambda p, model, batch: step_lib.loss_sum(
      p, adapters, model, batch, None, "none")[0]))
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    hlo = grad.lower(params, model, batch).compile().as_text()
  k = TINY_MOE["num_experts_per_tok"]
  kernel_rows = {int(m) for m in re.findall(
      r"= bf16\[(\d+),\d+\]\{1,0\} custom-call\([^\n]*custom_call_target=\"" + MOSAIC_GPU, hlo)}
  assert kernel_rows == {T * k}  # forward and dx: this GPU's rows
  assert not [s for s in re.findall(r"\[([\d,]+)\]", hlo) if str(2 * T * k) in s.split(",")]
