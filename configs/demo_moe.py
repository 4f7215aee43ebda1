"""The demo on a mixture of experts: a tiny Mixtral upcycled from the demo's dense base.

  python -m ftjax.train --config=configs/demo_moe.py

The demo's tiny Llama base (runs/demo_base, built by configs/demo.py) made sparse (cached in
runs/demo_moe_base): its attention, embeddings and norms, and in each layer 4 experts that are
copies of its dense MLP behind a random router, top-2 (sparse upcycling). The top-2 weights sum to
one and the experts are equal, so before training it computes exactly the dense base's logits
(tests/test_moe.py checks this against transformers); each expert then gets its own LoRA pair
(all-linear), the router stays frozen, and metrics.jsonl logs each log step's expert load.
Everything else is the demo's recipe; bench/moe_vs_dense.py compares the two runs.
"""
import importlib.util
import json
import os
import shutil
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("demo", os.path.join(HERE, "demo.py"))
demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo)

BASE = "runs/demo_moe_base"


def build_moe_base(dense_path: str, path: str, n_experts: int = 4, top_k: int = 2,
                   router_std: float = 0.1):
  """The dense base at dense_path as a Mixtral at path: n_experts copies of each layer's MLP as
  its experts and a random router (normal(0, router_std); 0.1 is the demo's init), top_k of them
  per token. router_std=0: equal router logits, so every token takes experts 0 .. top_k - 1 (ties
  go to the lower index) with equal weights."""
  from safetensors.numpy import load_file, save_file
  if os.path.isdir(path):
    return path
  with open(os.path.join(dense_path, "config.json")) as f:
    cfg = json.load(f)
  cfg.update(model_type="mixtral", architectures=["MixtralForCausalLM"],
             num_local_experts=n_experts, num_experts_per_tok=top_k)
  weights = load_file(os.path.join(dense_path, "model.safetensors"))
  rng = np.random.default_rng(0)
  for i in range(cfg["num_hidden_layers"]):
    moe = f"model.layers.{i}.block_sparse_moe"
    weights[f"{moe}.gate.weight"] = rng.normal(
        0, router_std, (n_experts, cfg["hidden_size"])).astype(np.float32)
    for name, w in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
      dense = weights.pop(f"model.layers.{i}.mlp.{name}.weight")
      for e in range(n_experts):
        weights[f"{moe}.experts.{e}.{w}.weight"] = dense
  # written aside, then renamed: a concurrent run never sees a half-written base
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".demo_moe_base-", dir=parent)
  with open(os.path.join(tmp, "config.json"), "w") as f:
    json.dump(cfg, f)
  save_file(weights, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
  for name in os.listdir(dense_path):
    if name.startswith(("tokenizer", "special", "generation", "chat_template")):
      shutil.copy(os.path.join(dense_path, name), tmp)
  try:
    os.rename(tmp, path)
  except OSError:  # another process got there first
    shutil.rmtree(tmp, ignore_errors=True)
  return path


def get_config():
  c = demo.get_config()  # builds the dense base
  c.model.path = build_moe_base(demo.BASE, BASE)
  c.workdir = "runs/demo_moe"
  return c
