"""Mixture of experts on a mesh: the sparse MLP routes, sorts and multiplies each batch shard's own
rows (moe.sparse_mlp's shard_map). On 8 forced CPU devices (one subprocess: this file run as a
script), a tiny Qwen3-MoE's loss and adapter gradients (LoRA on every linear, experts included)
equal one device's: float32 experts on a data x fsdp mesh, NF4 experts with two stacked adapters
(the router's too) under full remat, a mesh with a tensor axis, and a model mixing MoE and dense
MLP layers; and the compiled step holds no buffer sized by the global batch's tokens or routed
rows (before: every device sorted all N * k routed rows and all-reduced them), the grouped
matmuls take the shard's rows, NF4 experts are gathered as packed bytes, and each shard draws its
own LoRA-dropout masks.
"""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Global batch B x T tokens, top-2: N = 96 tokens and N * k = 192 routed rows, sizes that no
# weight of the tiny model has (dims 16, 32, 64, 128; 4 experts), so a buffer holding one of them
# holds the whole batch's tokens or rows.
B, T, TOP_K = 8, 12, 2
MODEL = dict(vocab_size=64, hidden_size=64, intermediate_size=64, moe_intermediate_size=64,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             num_experts=4, num_experts_per_tok=TOP_K, tie_word_embeddings=False)
# name -> (quant, stacked adapters, mesh (data, fsdp, tensor), remat, changes to MODEL)
CASES = {
    "lora": (None, False, (2, 4, 1), "none", {}),
    "nf4_stacked_remat": ("nf4", True, (4, 2, 1), "full", {}),
    "tensor": (None, False, (2, 2, 2), "none", {}),
    # MoE layers 0 and 2, a dense MLP in layer 1 (the unrolled layer loop)
    "mixed": (None, False, (2, 4, 1), "none", dict(num_hidden_layers=3, mlp_only_layers=[1])),
}


def write_base(path, **changes):
  """A random Qwen3-MoE checkpoint (numpy, no torch): weights wide enough that the tokens' routes
  differ."""
  sys.path.insert(0, os.path.join(REPO, "configs"))
  import qwen3_30b_a3b_qlora
  from safetensors.numpy import save_file
  from ftjax import hf_io
  qwen3_30b_a3b_qlora.write_config_json(path, **{**MODEL, **changes})
  spec = hf_io.read_spec(path)
  rng = np.random.default_rng(0)
  weights = {}
  for entry in hf_io.key_table(spec):
    for i in entry.layer_indices(spec.n_layers):
      for name in entry.names(i):
        w = rng.normal(0.0, 0.3, entry.file_shape(name))
        weights[name] = (w + ("norm" in name)).astype(np.float32)
  save_file(weights, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


def ragged_rows(jaxpr):
  """The row count of every grouped matmul (ragged_dot_general) in a jaxpr, nested ones too
  (inside a shard_map: the rows of one shard)."""
  import jax.extend
  rows = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "ragged_dot_general":
      rows.append(eqn.invars[0].aval.shape[0])
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      rows += ragged_rows(sub)
  return rows


def run_case(path, quant, stacked, mesh_sizes, remat):
  """One case's one-device and mesh results, and facts about the mesh step's program."""
  import types
  import jax
  import ftjax
  from ftjax import lora, sharding, step as step_lib

  def load(mesh=None):
    return ftjax.load_hf(path, dtype="float32", quant=quant, mesh=mesh, group_size=64)

  model = load()
  rng = np.random.default_rng(1)
  # every linear; stacked adapters take the router too (its LoRA reads each row's adapter)
  targets = "q_proj,k_proj,v_proj,o_proj,gate,gate_proj,up_proj,down_proj" if stacked else \
      "all-linear"

  def adapter(seed):  # b randomized, else the adapter is the identity
    ad = lora.init(model.spec, targets, 4, 8.0, jax.random.PRNGKey(seed))
    return lora.with_params(ad, jax.tree.map(
        lambda x: np.asarray(x) + rng.normal(0.0, 0.2, x.shape).astype(np.float32), ad.params))

  adapters = lora.stack({"one": adapter(1), "two": adapter(2)}) if stacked else adapter(1)
  tokens = rng.integers(3, MODEL["vocab_size"], (B, T))
  batch = {"tokens": tokens, "targets": np.roll(tokens, -1, 1),
           "loss_mask": np.ones(tokens.shape, np.float32), "segment_ids": np.ones_like(tokens)}
  if stacked:  # each adapter's rows and the base's, spread over the shards
    batch["adapter_ids"] = np.arange(B, dtype=np.int32) % 3 - 1

  def loss(params, model, batch):
    return step_lib.loss_sum(params, adapters, model, batch, None, remat)[0].sum()

  step = jax.jit(jax.value_and_grad(loss))
  want_loss, want_grads = step(adapters.params, model, batch)

  data, fsdp, tensor = mesh_sizes
  mesh = sharding.make_mesh(types.SimpleNamespace(data=data, fsdp=fsdp, tensor=tensor))
  sharded = load(mesh)
  params = jax.device_put(adapters.params,
                          sharding.adapter_shardings(mesh, model.spec, adapters.params))
  placed = jax.device_put(batch, sharding.batch_sharding(mesh))
  compiled = sharding.with_mesh(mesh, step).lower(params, sharded, placed).compile()
  got_loss, got_grads = compiled(params, sharded, placed)
  rel = lambda a, b: float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(b))
  out = dict(loss=[float(got_loss), float(want_loss)],
             grad_err=max(rel(a, b) for a, b in zip(jax.tree.leaves(got_grads),
                                                    jax.tree.leaves(want_grads))),
             grad_min=min(float(np.abs(g).max()) for g in jax.tree.leaves(want_grads)))

  hlo = compiled.as_text()
  shapes = re.findall(r"\[([\d,]+)\]", hlo)
  out["global_shapes"] = sorted({s for s in shapes if {"96", "192"} & set(s.split(","))})
  # the routing's argsort: a stable sort of (expert ids, positions)
  out["sorts"] = sorted(set(re.findall(r"= \(s32\[(\d+)\]\{0\}, s32\[\d+\]\{0\}\) sort\(", hlo)))
  out["gathers"] = sorted(set(re.findall(r"= (\w+\[[\d,]+\])\{[\d,]*\} all-gather\(", hlo)))
  with jax.set_mesh(mesh):
    out["ragged_rows"] = sorted(set(ragged_rows(jax.make_jaxpr(step)(params, sharded,
                                                                     placed).jaxpr)))
  with jax.set_mesh(mesh):  # the expert load: the shares of the whole batch, not of one shard
    got_load = jax.jit(ftjax.expert_load)(sharded, tokens)
  want_load = jax.jit(ftjax.expert_load)(model, tokens)
  out["load_err"] = float(np.abs(np.asarray(got_load) - np.asarray(want_load)).max())
  return out


def dropout_spread(path):
  """Every row of the batch the same tokens, one row per shard, LoRA (with dropout) on the experts
  only: (the rows' largest difference with a dropout key, without one)."""
  import types
  import jax
  import ftjax
  from ftjax import lora, sharding
  from ftjax.model import hidden_states
  mesh = sharding.make_mesh(types.SimpleNamespace(data=2, fsdp=4, tensor=1))
  model = ftjax.load_hf(path, dtype="float32", mesh=mesh)
  adapters = lora.init(model.spec, "gate_proj,up_proj,down_proj", 4, 8.0, jax.random.PRNGKey(0),
                       dropout=0.5)
  rng = np.random.default_rng(2)
  adapters = lora.with_params(adapters, jax.tree.map(
      lambda x: np.asarray(x) + rng.normal(0.0, 0.2, x.shape).astype(np.float32), adapters.params))
  tokens = jax.device_put(np.repeat(rng.integers(3, MODEL["vocab_size"], (1, T)), B, axis=0),
                          sharding.batch_sharding(mesh))
  run = sharding.with_mesh(mesh, jax.jit(hidden_states))
  spread = lambda h: float(np.abs(np.asarray(h) - np.asarray(h)[:1]).max())
  return (spread(run(model, tokens, adapters, dropout_key=jax.random.PRNGKey(3))),
          spread(run(model, tokens, adapters)))


def worker(out_dir):
  results = {}
  for name, (*case, changes) in CASES.items():
    path = os.path.join(out_dir, "base_" + "_".join(map(str, changes)))
    if not os.path.isdir(path):
      write_base(path, **changes)
    results[name] = run_case(path, *case)
  results["dropout_spread"] = dropout_spread(os.path.join(out_dir, "base_"))
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(results, f)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  out = tmp_path_factory.mktemp("moe_mesh")
  path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
  # LLVM does not optimize: XLA:CPU compiles in half the time; both sides of each comparison run
  # in the one process, so they share the flag
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=path,
             XLA_FLAGS="--xla_force_host_platform_device_count=8 "
                       "--xla_backend_optimization_level=0")
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(out)], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  with open(out / "results.json") as f:
    return json.load(f)


@pytest.mark.parametrize("case", CASES)
def test_mesh_step_equals_one_device(results, case):
  r = results[case]
  got, want = r["loss"]
  assert abs(got - want) <= 1e-5 * abs(want), (case, got, want)
  assert r["grad_min"] > 0  # every factor gets a gradient (the experts' included)
  assert r["grad_err"] < 1e-5, (case, r["grad_err"])
  assert r["load_err"] < 1e-6, (case, r["load_err"])


@pytest.mark.parametrize("case", CASES)
def test_each_shard_routes_its_own_rows(results, case):
  """No buffer of the compiled step holds the global batch's N = 96 tokens or 192 routed rows;
  the routing's argsort and the grouped matmuls (forward and backward) take the shard's rows."""
  quant, _, (data, fsdp, _), *_ = CASES[case]
  r = results[case]
  local = B * T * TOP_K // (data * fsdp)
  assert r["global_shapes"] == [], (case, r["global_shapes"])
  assert r["sorts"] == [str(local)], (case, r["sorts"])
  assert r["ragged_rows"] == [local], (case, r["ragged_rows"])
  if quant:  # FSDP gathers the NF4 experts' packed bytes (down_proj's [E, F/2, D] codes: its D
    # is sharded over fsdp), never a dequantized [E, in, out] stack
    assert any(re.fullmatch(r"u8\[(1,)?4,32,64\]", s) for s in r["gathers"]), r["gathers"]
    assert not [s for s in r["gathers"] if re.search(r"4,64,(64|128)\]", s)], r["gathers"]


def test_each_shard_draws_its_own_dropout_masks(results):
  """Identical rows, one per shard, differ only through LoRA dropout on the experts: each shard's
  routed rows get their own masks (sharding.shard_key), not one mask repeated on every shard."""
  with_key, without = results["dropout_spread"]
  assert without == 0.0 and with_key > 1e-3, (with_key, without)


if __name__ == "__main__":
  worker(sys.argv[1])
