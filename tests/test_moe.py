"""Mixture-of-experts models (Mixtral, Qwen2-MoE, Qwen3-MoE) against transformers, PEFT and
bitsandbytes: logits, packing, greedy decoding, router ties, LoRA on experts and its exports, NF4
experts, the grouped matmul's residuals and FLOPs, and the refusals."""
import contextlib
import copy
import dataclasses
import io
import json
import os
import re
import sys

import bitsandbytes.functional as bnbf
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import safetensors.torch
import torch
import transformers
from jax.ad_checkpoint import print_saved_residuals

import ftjax
import ftjax.model
import ftjax.moe
from ftjax import export, lora, peft_io, quant, sharding
from ftjax import plan as plan_lib
from ftjax import step as step_lib
from conftest import build_hf
from ftjax.errors import UserError
from ftjax.linear import grouped_qdot, linear
from ftjax.sampling import generate

VOCAB = 97
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, intermediate_size=24, max_position_embeddings=128,
               bos_token_id=1, eos_token_id=None, pad_token_id=0, num_experts_per_tok=2)
# Several experts, top-k > 1; what is special: Qwen3's q/k norms and renormalized top-k,
# Qwen2-MoE's shared expert (sigmoid gate), biases and unnormalized top-k, Mixtral's w1/w2/w3.
MOE_CONFIGS = {
    "qwen3_moe": (transformers.Qwen3MoeConfig, dict(
        num_experts=5, moe_intermediate_size=16, head_dim=8, norm_topk_prob=True)),
    "qwen2_moe": (transformers.Qwen2MoeConfig, dict(
        num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=20,
        norm_topk_prob=False)),
    "mixtral": (transformers.MixtralConfig, dict(num_local_experts=4)),
}
MOE_ARCHS = tuple(MOE_CONFIGS)


def build_moe(arch, seed=0, **overrides):
  """A float32 transformers MoE model, weights spread wide so that routing differs between
  tokens and a wrong expert moves the logits a lot."""
  cls, extra = MOE_CONFIGS[arch]  # this file's dims override every one conftest's set
  return build_hf(arch, seed, configs={arch: (cls, {**_COMMON, **extra})}, **overrides)


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
  """Factory with a cache: moe_dir(arch) -> (torch model, checkpoint dir)."""
  made = {}

  def make(arch, **overrides):
    key = (arch, repr(sorted(overrides.items())))
    if key not in made:
      model = build_moe(arch, **overrides)
      path = tmp_path_factory.mktemp(arch)
      model.save_pretrained(path)
      made[key] = (model, str(path))
    return made[key]

  return make


def torch_logits(model, tokens):
  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def rel_err(a, b):
  return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


FORWARD = jax.jit(ftjax.forward)


# --- parity with transformers ------------------------------------------------------------------

EXPERT_LOAD = jax.jit(ftjax.expert_load)


def packed_logits_match_transformers(model, hf, seed, split):
  """Two rows of 12 tokens, row 0 packing two documents (segment ids) split at `split`: each
  document's logits equal transformers' on it alone. Returns the expert load [L_moe, E], whose
  rows sum to 1."""
  tokens = np.random.default_rng(seed).integers(3, VOCAB, (2, 12))
  segments = np.array([[1] * split + [2] * (12 - split), [1] * 12])
  got = np.asarray(FORWARD(model, tokens, None, segments))
  assert rel_err(got[1], torch_logits(hf, tokens[1:])[0]) < 1e-4
  assert rel_err(got[0, :split], torch_logits(hf, tokens[:1, :split])[0]) < 1e-4
  assert rel_err(got[0, split:], torch_logits(hf, tokens[:1, split:])[0]) < 1e-4
  load = np.asarray(EXPERT_LOAD(model, tokens, None, segments))
  np.testing.assert_allclose(load.sum(1), 1.0, rtol=1e-6)
  return load


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_logits_and_packing_match_transformers(arch, moe_dir):
  hf, path = moe_dir(arch)
  model = ftjax.load_hf(path, dtype="float32")
  assert model.params["layers"]["experts.gate_up_proj"]["kernel"].shape == (
      2, model.spec.n_experts, 32, 2 * model.spec.expert_dim)
  load = packed_logits_match_transformers(model, hf, seed=0, split=7)
  assert load.shape == (2, model.spec.n_experts)


def test_greedy_decoding_matches_transformers(moe_dir):
  """The KV-cache path on the MoE with the most parts (shared expert, biases); the layer itself is
  checked per architecture above."""
  hf, path = moe_dir("qwen2_moe")
  model = ftjax.load_hf(path, dtype="float32")
  prompt = np.random.default_rng(5).integers(3, VOCAB, (2, 4))
  ours = np.asarray(generate(model, prompt, max_new_tokens=6))
  with torch.no_grad():
    ref = hf.generate(torch.as_tensor(prompt), max_new_tokens=6, min_new_tokens=6,
                      do_sample=False, pad_token_id=0)[:, 4:].numpy()
  np.testing.assert_array_equal(ours, ref)


def test_router_ties(moe_dir, tmp_path):
  """Exact ties. Experts 0 = 1 and 2 = 3 (equal router rows), top-2 of 5: every token takes one
  tied pair, each with the same weight, as transformers does. A tie at the k-th place ftjax breaks
  toward the lower expert index (jax.lax.top_k); torch.topk's order there is implementation-
  defined (on CPU an introselect: top-3 of [.3, .3, .15, .15, .1] is [1, 0, 2], of
  [.1, .15, .15, .3, .3] is [4, 3, 2]), so there is no reference order to match."""
  hf, _ = moe_dir("qwen3_moe")
  hf = copy.deepcopy(hf)
  with torch.no_grad():
    for layer in hf.model.layers:  # expert 4's logit is the mean of the pairs': never above both
      w = layer.mlp.gate.weight
      w[1], w[3] = w[0], w[2]
      w[4] = (w[0] + w[2]) / 2
  hf.save_pretrained(tmp_path)
  model = ftjax.load_hf(str(tmp_path), dtype="float32")
  tokens = np.random.default_rng(1).integers(3, VOCAB, (2, 12))
  segments = np.ones_like(tokens)  # the shapes of the test above: its compiled forward
  assert rel_err(FORWARD(model, tokens, None, segments), torch_logits(hf, tokens)) < 1e-4
  load = np.asarray(EXPERT_LOAD(model, tokens, None, segments))
  np.testing.assert_array_equal(load[:, 0], load[:, 1])  # each token took a whole tied pair
  assert (load[:, 0] > 0).all() and (load[:, 2] > 0).all()

  spec = dataclasses.replace(model.spec, n_experts=5, top_k=3, norm_topk=False)
  probs = np.log(np.array([[.3, .3, .15, .15, .1], [.1, .15, .15, .3, .3]], np.float32))
  _, experts = ftjax.moe.route(spec, jnp.asarray(probs))
  assert [sorted(r) for r in np.asarray(experts).tolist()] == [[0, 1, 2], [1, 3, 4]]


# --- LoRA on experts, exports ------------------------------------------------------------------

RANK, ALPHA = 2, 4


def random_adapters(spec, targets, seed=0):
  adapters = lora.init(spec, targets, RANK, ALPHA, jax.random.PRNGKey(seed))
  rng = np.random.default_rng(seed)  # randomize b, else the adapter is the identity
  return lora.with_params(adapters, jax.tree.map(
      lambda x: np.asarray(x) + rng.normal(0.0, 0.2, x.shape).astype(np.float32),
      adapters.params))


def load_torch(path):
  return transformers.AutoModelForCausalLM.from_pretrained(
      path, attn_implementation="eager", dtype=torch.float32).eval()


@pytest.mark.parametrize("arch,targets", [("qwen2_moe", "all-linear"),
                                          ("mixtral", "q_proj,gate,down_proj")])
def test_expert_lora_peft_export_merged_and_back(arch, targets, moe_dir, tmp_path):
  """Mixtral's case adapts the router too (named `gate`; its file is block_sparse_moe.gate)."""
  hf, path = moe_dir(arch)
  model = ftjax.load_hf(path, dtype="float32")
  adapters = random_adapters(model.spec, targets)
  assert "experts.down_proj" in adapters.params
  assert adapters.params["experts.down_proj"]["a"].shape == (2, model.spec.n_experts,
                                                             model.spec.expert_dim, RANK)
  tokens = np.random.default_rng(2).integers(3, VOCAB, (2, 9))
  ours = np.asarray(FORWARD(model, tokens, adapters))
  base = torch_logits(hf, tokens)
  assert rel_err(ours, base) > 1e-2  # the adapter reaches the output
  if "gate" in targets:  # the router's adapter alone moves the routing, so the logits
    assert adapters.params["gate"]["b"].shape == (2, RANK, model.spec.n_experts)
    router = lora.with_params(adapters, {"gate": adapters.params["gate"]})
    assert rel_err(FORWARD(model, tokens, router), base) > 1e-2
    assert "gate" not in lora.resolve_targets(model.spec, "all-linear")

  out = str(tmp_path / "adapter")
  peft_io.write_adapters(adapters, model.spec, out, path)
  cfg = json.load(open(os.path.join(out, "adapter_config.json")))
  # exactly the keys and shapes PEFT itself saves for these targets
  reference = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(
      r=RANK, lora_alpha=ALPHA, target_modules=cfg["target_modules"],
      target_parameters=cfg["target_parameters"]))
  want = {k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(reference).items()}
  saved = safetensors.torch.load_file(os.path.join(out, "adapter_model.safetensors"))
  assert {k: tuple(v.shape) for k, v in saved.items()} == want
  peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(hf), out).eval()
  assert rel_err(ours, torch_logits(peft_model, tokens)) < 1e-4
  gradients_equal_pefts(model, adapters, peft_model, tokens, tmp_path)

  back = peft_io.read_adapters(out)  # lora.init_from's reader
  jax.tree.map(np.testing.assert_allclose, back.params, adapters.params)

  merged = str(tmp_path / "merged")
  export.merge_into(path, adapters, merged)  # into every expert
  assert rel_err(torch_logits(load_torch(merged), tokens), ours) < 1e-4


def gradients_equal_pefts(model, adapters, peft_model, tokens, tmp_path):
  """The gradient of a loss on the logits w.r.t. every LoRA factor (the experts' too) equals
  torch's through PEFT's modules: ftjax's gradients, written by the PEFT exporter (a linear
  relayout), against PEFT's parameters' .grad, name by name."""
  weights = np.random.default_rng(10).normal(0, 1, (*tokens.shape, VOCAB)).astype(np.float32)
  loss = lambda p: jnp.sum(ftjax.forward(model, tokens, lora.with_params(adapters, p)) * weights)
  grads = jax.jit(jax.grad(loss))(adapters.params)
  where = str(tmp_path / "grads")
  peft_io.write_adapters(lora.with_params(adapters, grads), model.spec, where, "base")
  ours = safetensors.torch.load_file(os.path.join(where, "adapter_model.safetensors"))
  peft_model.zero_grad()
  for param in peft_model.parameters():
    param.requires_grad_(False)
  lora_params = {k: v for k, v in peft_model.named_parameters() if "lora_" in k}
  for v in lora_params.values():
    v.requires_grad_(True)
  logits = peft_model(torch.as_tensor(tokens, dtype=torch.long)).logits
  (logits * torch.as_tensor(weights)).sum().backward()
  theirs = {k.replace(".default", ""): v.grad.numpy() for k, v in lora_params.items()}
  assert set(theirs) == set(ours)
  for name, g in theirs.items():
    assert np.abs(g).max() > 0, name
    assert rel_err(ours[name].numpy(), g) < 1e-4, name


def test_targets_name_experts_and_refuse_on_dense():
  spec = ftjax.hf_io.spec_from_config(dict(
      model_type="qwen2_moe", hidden_size=32, num_attention_heads=4, num_hidden_layers=1,
      vocab_size=10, intermediate_size=8, moe_intermediate_size=8, num_experts=4,
      num_experts_per_tok=2, shared_expert_intermediate_size=8))
  assert lora.resolve_targets(spec, "gate_proj") == ("experts.gate_up_proj",
                                                     "shared_expert.gate_proj")
  assert lora.resolve_targets(spec, "experts.down_proj") == ("experts.down_proj",)
  assert "gate" not in lora.resolve_targets(spec, "all-linear")
  assert lora.resolve_targets(spec, "gate,q_proj") == ("q_proj", "gate")  # the router, named
  dense = ftjax.hf_io.spec_from_config(dict(
      model_type="qwen3", hidden_size=32, num_attention_heads=4, num_hidden_layers=1,
      vocab_size=10, intermediate_size=8))
  with pytest.raises(UserError, match=r"'experts.gate_up_proj'.*dense model"):
    lora.resolve_targets(dense, "q_proj,experts.gate_up_proj")
  with pytest.raises(UserError, match=r"\['gate'\].*dense model"):
    lora.resolve_targets(dense, "gate")


def test_stacked_adapters_per_row(moe_dir):
  """Several adapters in one batch (lora.stack, adapter_ids per row), as mixed-adapter decoding
  runs them: each row equals its adapter alone (-1: the base)."""
  _, path = moe_dir("qwen3_moe")
  model = ftjax.load_hf(path, dtype="float32")
  targets = "q_proj,v_proj,gate,gate_proj,down_proj"  # the router's too
  one, two = (random_adapters(model.spec, targets, seed=s) for s in (1, 2))
  stacked = lora.stack({"one": one, "two": two})
  tokens = np.random.default_rng(3).integers(3, VOCAB, (3, 6))
  both = np.asarray(jax.jit(ftjax.forward)(model, tokens, stacked, adapter_ids=[0, 1, -1]))
  alone = jax.jit(ftjax.forward)
  np.testing.assert_allclose(both[0], alone(model, tokens, one)[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(both[1], alone(model, tokens, two)[1], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(both[2], alone(model, tokens)[2], rtol=1e-5, atol=1e-5)


# --- quantized experts, the grouped matmul -----------------------------------------------------

def test_nf4_experts_match_bitsandbytes(tmp_path):
  hf = build_moe("qwen3_moe", hidden_size=64, moe_intermediate_size=64, num_hidden_layers=1,
                 num_experts=3, head_dim=16)
  hf.save_pretrained(tmp_path)
  model = ftjax.load_hf(str(tmp_path), dtype="float32", quant="nf4")
  qa = model.params["layers"]["experts.gate_up_proj"]["kernel"]
  assert isinstance(qa, quant.QArray) and qa.shape == (1, 3, 64, 128)
  assert not isinstance(model.params["layers"]["gate"]["kernel"], quant.QArray)  # router dense
  ours = np.asarray(quant.dequantize(qa))[0]
  codes = np.asarray(quant.unpack(jnp.asarray(qa.q), 64))[0]
  fused = hf.model.layers[0].mlp.experts.gate_up_proj.detach()  # [E, 2F, D], torch (out, in)
  for e in range(3):
    packed, state = bnbf.quantize_4bit(fused[e].contiguous(), blocksize=64, quant_type="nf4",
                                       compress_statistics=True)
    ref = bnbf.dequantize_4bit(packed, state).float().numpy().T
    np.testing.assert_allclose(ours[e], ref, rtol=1e-6, atol=0)
    p = packed.numpy().reshape(-1)
    np.testing.assert_array_equal(codes[e], np.stack([p >> 4, p & 15], 1).reshape(128, 64).T)


def test_quantized_grouped_matmul_keeps_no_dequantized_residual():
  e, n_in, n_out = 3, 128, 64
  rng = np.random.default_rng(4)
  qa = jax.device_put(quant.quantize(rng.normal(0, 0.1, (e, n_in, n_out)).astype(np.float32),
                                     "nf4"))
  x = jnp.asarray(rng.normal(0, 1, (10, n_in)), jnp.float32)
  a = jnp.asarray(rng.normal(0, 0.1, (e, n_in, 2)), jnp.float32)
  b = jnp.asarray(rng.normal(0, 0.1, (e, 2, n_out)), jnp.float32)
  sizes = jnp.array([4, 0, 6], jnp.int32)

  def loss(x, a, b, naive):
    w = quant.dequantize(qa) if naive else qa
    return jnp.sum(jnp.sin(linear(x, w, (a, b), group_sizes=sizes)))

  def residuals(naive):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      print_saved_residuals(lambda x, a, b: loss(x, a, b, naive), x, a, b)
    return out.getvalue().splitlines()

  weight_like = lambda line: re.match(rf"(f|bf)\d+\[{e},{n_in},{n_out}\]", line)
  assert any(map(weight_like, residuals(naive=True)))  # the check sees one when there is one
  assert not any(map(weight_like, residuals(naive=False)))
  # and the gradients equal those of the dequantized experts
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)
  for g, want in zip(grads(x, a, b, False), grads(x, a, b, True)):
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-6)
  # each row went through its own expert: rows 0-3 expert 0, rows 4-9 expert 2
  dense = np.asarray(quant.dequantize(qa))
  y = np.asarray(jax.jit(lambda x: linear(x, qa, group_sizes=sizes))(x))
  np.testing.assert_allclose(y[:4], np.asarray(x[:4]) @ dense[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(y[4:], np.asarray(x[4:]) @ dense[2], rtol=1e-5, atol=1e-5)


def test_quantized_grouped_matmul_dequantizes_slice_by_slice():
  """The quantized experts are dequantized one slice of output columns at a time: the same
  numbers as the whole dequantized stack (bit for bit, every mode, forward and transposed), the
  same FLOPs, and compiled (XLA:CPU, forward and backward) temporaries under half a bf16 copy of
  the stack, where dequantizing it whole keeps float32 copies (~10 GiB for one Qwen3-30B-A3B
  layer on TPU v5e before)."""
  rng = np.random.default_rng(7)
  e, n_in, n_out = 3, 256, 384
  sizes = jnp.array([4, 0, 6], jnp.int32)
  for mode in quant.MODES:
    qa = quant.quantize(rng.normal(0, 0.1, (e, n_in, n_out)).astype(np.float32), mode,
                        group_size=64)
    dense = quant.dequantize(qa)
    for transpose in (False, True):
      x = jnp.asarray(rng.normal(0, 1, (10, n_out if transpose else n_in)), jnp.float32)
      tiled = lambda x: grouped_qdot(x, qa, sizes, transpose, budget=e * 256 * 128)
      want = jax.lax.ragged_dot(x, jnp.swapaxes(dense, 1, 2) if transpose else dense, sizes)
      np.testing.assert_array_equal(jax.jit(tiled)(x), want)
      flops, _ = _matmul_flops(jax.make_jaxpr(tiled)(x).jaxpr, e)
      assert flops == 2 * 10 * n_in * n_out  # 3 (or 2) slices of 128, each counted
  e, n_in, n_out = 64, 2048, 2048  # compiled only: 2^28 weights, one 2^25-element slice a step
  qa = quant.abstract((e, n_in, n_out), jnp.bfloat16, "nf4")
  x = jax.ShapeDtypeStruct((64, n_in), jnp.bfloat16)
  sizes = jax.ShapeDtypeStruct((e,), jnp.int32)

  def temporaries(matmul):
    loss = lambda x, w, s: jnp.sum(matmul(x, w, s).astype(jnp.float32) ** 2)
    compiled = jax.jit(jax.grad(loss)).lower(x, qa, sizes).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  stack = e * n_in * n_out * 2  # the whole stack in bf16
  whole = lambda x, w, s: jax.lax.ragged_dot(x, quant.dequantize(w, x.dtype), s)
  assert temporaries(whole) > 2 * stack  # the check sees a float32 copy when there is one
  assert temporaries(lambda x, w, s: linear(x, w, group_sizes=s)) < stack / 2


def _matmul_flops(jaxpr, n_experts):
  """(grouped matmul FLOPs, the dense dots with an [E, ...] operand) over a jaxpr; a loop's body
  counts once per step."""
  flops, dense = 0, []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "scan":
      f, d = _matmul_flops(eqn.params["jaxpr"].jaxpr, n_experts)
      flops, dense = flops + f * eqn.params["length"], dense + d
      continue
    if eqn.primitive.name == "ragged_dot_general":
      (m, k), (_, _, n) = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
      flops += 2 * m * k * n
    if eqn.primitive.name == "dot_general":  # the router's [D, E] is 2-D; experts' are [E, ...]
      dense += [v.aval.shape for v in eqn.invars if v.aval.ndim > 2 and n_experts in v.aval.shape]
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      f, d = _matmul_flops(sub, n_experts)
      flops, dense = flops + f, dense + d
  return flops, dense


def test_grouped_matmul_flops_scale_with_top_k_not_experts():
  def flops(n_experts, top_k):
    spec = ftjax.hf_io.spec_from_config(dict(
        model_type="qwen3_moe", hidden_size=32, num_attention_heads=4, num_hidden_layers=1,
        vocab_size=10, intermediate_size=8, moe_intermediate_size=16, num_experts=n_experts,
        num_experts_per_tok=top_k, head_dim=8))
    params = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), ftjax.hf_io.abstract_params(
        spec, ftjax.hf_io.key_table(spec), jnp.float32))
    jaxpr = jax.make_jaxpr(ftjax.forward)(ftjax.Model(spec, params), jnp.zeros((2, 8), jnp.int32))
    return _matmul_flops(jaxpr.jaxpr, n_experts)

  n = 16  # tokens; per routed row: gate_up 32 x 32, down 16 x 32
  per_k = 2 * n * (32 * 32 + 16 * 32)
  assert flops(5, 2) == flops(37, 2) == (2 * per_k, [])  # no dense [tokens, E] x [E, in, out]
  assert flops(37, 4)[0] == 4 * per_k


# --- planner, sharding rules, refusals ---------------------------------------------------------

def test_sharding_rules_cover_experts_and_router(moe_dir):
  _, path = moe_dir("qwen2_moe")
  spec = ftjax.hf_io.read_spec(path)
  abstract = ftjax.hf_io.abstract_params(spec, ftjax.hf_io.key_table(spec), jnp.bfloat16, "int8")
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), sharding.AXES)
  shardings = sharding.param_shardings(mesh, abstract)  # raises on an uncovered parameter
  assert sharding.rule("layers/experts.gate_up_proj/kernel") == jax.sharding.PartitionSpec(
      None, "fsdp", "tensor")
  assert shardings["layers"]["gate"]["kernel"].spec == jax.sharding.PartitionSpec(None, None, None)
  adapters = random_adapters(spec, "all-linear")
  specs = sharding.adapter_shardings(mesh, spec, adapters.params)
  assert len(specs["experts.down_proj"]["a"].spec) == 4  # [L, E, in, R]


@pytest.mark.parametrize("change,message", [
    (dict(num_experts=4), r"unexpected tensor model\.layers\.0\.mlp\.experts\.4\..*expert count"),
    (dict(num_experts=6), r"missing tensor model\.layers\.0\.mlp\.experts\.5\."),
    (dict(num_experts_per_tok=7), r"num_experts_per_tok=7 exceeds the 5 experts"),
    (dict(mlp_only_layers=[2]), r"mlp_only_layers=\[2\] must list layer indices in \[0, 2\)"),
    (dict(decoder_sparse_step=3), r"decoder_sparse_step=3 leaves no layer a mixture of experts"),
    (dict(decoder_sparse_step=2), r"missing tensor model\.layers\.0\.mlp\.down_proj\.weight"),
])
def test_bad_moe_configs_are_refused_in_one_line(change, message, moe_dir, tmp_path):
  _, path = moe_dir("qwen3_moe")
  for name in os.listdir(path):
    os.symlink(os.path.join(path, name), tmp_path / name)
  cfg = json.load(open(os.path.join(path, "config.json")))
  cfg.pop("num_local_experts", None)
  os.unlink(tmp_path / "config.json")
  with open(tmp_path / "config.json", "w") as f:
    json.dump({**cfg, "num_experts": 5, **change}, f)
  with pytest.raises(UserError, match=message) as err:
    ftjax.load_hf(str(tmp_path), dtype="float32")
  assert "\n" not in str(err.value)


# --- MoE and dense MLP layers in one model ------------------------------------------------------

# transformers' rule: layer i is a MoE unless in mlp_only_layers or (i + 1) % decoder_sparse_step
MIXED = {"qwen2_moe": (dict(num_hidden_layers=4, decoder_sparse_step=2), (1, 3)),
         "qwen3_moe": (dict(num_hidden_layers=3, mlp_only_layers=[1]), (0, 2))}


@pytest.mark.parametrize("arch", tuple(MIXED))
def test_mixed_moe_and_dense_layers_match_transformers(arch, moe_dir):
  """decoder_sparse_step / mlp_only_layers: each MLP stacked over the layers that hold it; logits
  with packing, greedy tokens (the KV cache path) and the expert load of each MoE layer."""
  overrides, sparse = MIXED[arch]
  hf, path = moe_dir(arch, **overrides)
  model = ftjax.load_hf(path, dtype="float32")
  spec, layers = model.spec, model.params["layers"]
  assert spec.sparse_layers == sparse
  assert layers["gate_proj"]["kernel"].shape[0] == spec.n_layers - len(sparse)
  assert layers["experts.gate_up_proj"]["kernel"].shape[0] == layers["gate"]["kernel"].shape[0] \
      == len(sparse)
  load = packed_logits_match_transformers(model, hf, seed=7, split=5)
  assert load.shape == (len(sparse), spec.n_experts)  # one row per MoE layer

  prompt = np.random.default_rng(7).integers(3, VOCAB, (2, 4))
  with torch.no_grad():
    ref = hf.generate(torch.as_tensor(prompt), max_new_tokens=5, min_new_tokens=5,
                      do_sample=False, pad_token_id=0)[:, 4:].numpy()
  np.testing.assert_array_equal(np.asarray(generate(model, prompt, max_new_tokens=5)), ref)


def test_mixed_layers_lora_exports_quantization_and_gradients(moe_dir, tmp_path):
  """LoRA on a mixed model's every projection (the dense MLP's, the experts', the shared
  expert's): PEFT loads the export with equal logits, the merged export equals ftjax's forward,
  the directory reads back (with the base's spec: which layers hold what); quantized loading fills
  each layer's slot; every factor gets a gradient, equal under full remat."""
  hf, path = moe_dir("qwen2_moe", **MIXED["qwen2_moe"][0])
  model = ftjax.load_hf(path, dtype="float32")
  spec = model.spec
  adapters = random_adapters(spec, "all-linear")
  assert adapters.params["gate_proj"]["a"].shape == (2, 32, RANK)  # layers 0 and 2
  assert adapters.params["experts.down_proj"]["a"].shape == (2, spec.n_experts, 16, RANK)
  tokens = np.random.default_rng(8).integers(3, VOCAB, (2, 9))
  ours = np.asarray(FORWARD(model, tokens, adapters))
  assert rel_err(ours, torch_logits(hf, tokens)) > 1e-2

  out = str(tmp_path / "adapter")
  peft_io.write_adapters(adapters, spec, out, path)
  peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(hf), out).eval()
  assert rel_err(ours, torch_logits(peft_model, tokens)) < 1e-4
  gradients_equal_pefts(model, adapters, peft_model, tokens, tmp_path)
  back = peft_io.read_adapters(out, spec)
  jax.tree.map(np.testing.assert_allclose, back.params, adapters.params)
  with pytest.raises(UserError, match=r"missing .*layers\.1\.mlp\.gate_proj"):
    peft_io.read_adapters(out)  # without the spec: every target in every layer
  merged = str(tmp_path / "merged")
  export.merge_into(path, adapters, merged)
  assert rel_err(torch_logits(load_torch(merged), tokens), ours) < 1e-4

  int8 = ftjax.load_hf(path, dtype="float32", quant="int8")  # NF4 needs in >= 64: test_nf4_*
  for name in ("gate_proj", "experts.down_proj"):  # slot j of the stack holds layers_of(name)[j]
    w = model.params["layers"][name]["kernel"]
    np.testing.assert_array_equal(quant.dequantize(int8.params["layers"][name]["kernel"]),
                                  quant.dequantize(quant.quantize(w, "int8")))

  gradients_reach_every_factor_under_remat(model, adapters, tokens)


def test_plan_counts_each_layers_own_mlp():
  """flops_per_token on a mixed model against XLA's count of its forward (the layers run
  unrolled, so XLA counts each; one expert, top-1, so the CPU's masked grouped matmul does no
  extra work): the reference forward's share of the count is one forward."""
  spec = ftjax.hf_io.spec_from_config(dict(
      model_type="qwen2_moe", hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
      num_hidden_layers=4, vocab_size=512, intermediate_size=512, moe_intermediate_size=256,
      num_experts=1, num_experts_per_tok=1, shared_expert_intermediate_size=384,
      decoder_sparse_step=2))
  params = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), ftjax.hf_io.abstract_params(
      spec, ftjax.hf_io.key_table(spec), jnp.float32))
  t = 64
  compiled = jax.jit(ftjax.forward).lower(ftjax.Model(spec, params),
                                          jnp.zeros((2, t), jnp.int32)).compile()
  cost = compiled.cost_analysis()
  xla = (cost[0] if isinstance(cost, list) else cost)["flops"] / (2 * t)
  count = lambda ref: plan_lib.flops_per_token(spec, "q_proj", 4, t, "none", causal=False,
                                                 reference=ref)
  forward = count("base") - count("")
  assert 1.0 < xla / forward < 1.03, (xla, forward)
  dense_everywhere = dataclasses.replace(spec, dense_mlp_layers=(0, 1, 2, 3), n_experts=0)
  assert abs(plan_lib.flops_per_token(dense_everywhere, "q_proj", 4, t, "none") - count("")) \
      > 0.05 * count("")  # the MLPs' difference shows


# --- training ------------------------------------------------------------------------------------

def gradients_reach_every_factor_under_remat(model, adapters, tokens):
  """The train step's loss gives every adapter factor a gradient, and full remat the same."""
  batch = {"tokens": tokens, "targets": np.roll(tokens, -1, 1),
           "loss_mask": np.ones(tokens.shape, np.float32), "segment_ids": np.ones_like(tokens)}
  grad = jax.jit(jax.grad(lambda p, remat: step_lib.loss_sum(p, adapters, model, batch, None,
                                                             remat)[0]), static_argnums=1)
  ref = grad(adapters.params, "none")
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(ref))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-5 * np.abs(b).max()),
               grad(adapters.params, "full"), ref)


def test_gradients_reach_experts_under_every_remat(moe_dir):
  """The train step's loss through the MoE: every adapter factor gets a gradient (experts' and
  shared expert's included), and full remat recomputes the same numbers. (The demo run on a
  Mixtral base, configs/demo_moe.py and bench/moe_vs_dense.py, covers train.run and remat=auto; it
  takes minutes, too long for the suite. The expert-load log lines: the last test.)"""
  _, path = moe_dir("qwen2_moe")
  model = ftjax.load_hf(path, dtype="float32")
  adapters = random_adapters(model.spec, "down_proj")  # the experts' and the shared expert's
  tokens = np.random.default_rng(6).integers(3, VOCAB, (2, 12))
  gradients_reach_every_factor_under_remat(model, adapters, tokens)


def test_upcycled_demo_base_and_expert_load_logging(tmp_path):
  """configs/demo_moe.py's Mixtral, the demo base's MLP copied into 4 experts (top-2 weights sum
  to one), gives transformers' logits of the dense base. train.run on it writes each log step's
  expert load (the largest and smallest share of routed tokens any expert of any layer took) to
  metrics.jsonl, and only at log steps: shares of the E = 4 experts, top-2, so the largest is at
  least 1/4 and the smallest at most."""
  from ftjax import train
  from ftjax.config import defaults
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs"))
  import demo
  import demo_moe
  demo.build_base(str(tmp_path / "dense"))
  base = demo_moe.build_moe_base(str(tmp_path / "dense"), str(tmp_path / "moe"))
  tokens = np.random.default_rng(9).integers(3, 384, (2, 10))
  upcycled = np.asarray(FORWARD(ftjax.load_hf(base, dtype="float32"), tokens, None,
                                np.ones_like(tokens)))
  assert rel_err(upcycled, torch_logits(load_torch(str(tmp_path / "dense")), tokens)) < 1e-5
  c = defaults()
  c.workdir, c.model.path, c.model.dtype = str(tmp_path / "run"), base, "float32"
  c.data.train, c.data.seq_len = os.path.join(demo.HERE, "demo_data", "train.jsonl"), 64
  c.train.steps, c.train.batch_size, c.train.log_every, c.train.eval_every = 3, 2, 2, 0
  c.train.remat, c.ckpt.every, c.mesh.fsdp, c.lora.rank, c.data.check = "none", 10, 1, 2, "off"
  train.run(c)
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    logged = [m for m in map(json.loads, f) if "loss" in m]
  assert [m["step"] for m in logged] == [2, 3]  # log_every=2, and the last step
  for m in logged:
    assert 0.25 <= m["expert_load_max"] <= 1 and 0 <= m["expert_load_min"] <= 0.25
