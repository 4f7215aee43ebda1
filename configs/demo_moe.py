"""The demo on a mixture of experts: a tiny Mixtral with the demo base's active size.

  python -m ftjax.train --config=configs/demo_moe.py

The demo's tiny Llama base (runs/demo_base, built by configs/demo.py) turned into a Mixtral
(cached in runs/demo_moe_base): its attention, embeddings and norms, and in each layer a router
and 4 experts of half the dense MLP's width, top-2, so each token runs as many MLP weights as on
the dense base. LoRA reaches every expert (all-linear), the router stays frozen, and metrics.jsonl
logs each log step's expert load. Everything else is the demo's recipe; bench/moe_vs_dense.py
compares the two runs.
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


def build_moe_base(dense_path: str, path: str, n_experts: int = 4, top_k: int = 2):
  """The dense base at dense_path as a Mixtral at path: n_experts experts of mlp_dim / top_k each
  (normal(0, 0.1), the demo's init), so top_k of them make the dense base's MLP width."""
  from safetensors.numpy import load_file, save_file
  if os.path.isdir(path):
    return path
  with open(os.path.join(dense_path, "config.json")) as f:
    cfg = json.load(f)
  width = cfg["intermediate_size"] // top_k
  cfg.update(model_type="mixtral", architectures=["MixtralForCausalLM"], intermediate_size=width,
             num_local_experts=n_experts, num_experts_per_tok=top_k)
  weights = load_file(os.path.join(dense_path, "model.safetensors"))
  rng = np.random.default_rng(0)
  d = cfg["hidden_size"]
  for i in range(cfg["num_hidden_layers"]):
    for name in ("gate_proj", "up_proj", "down_proj"):
      del weights[f"model.layers.{i}.mlp.{name}.weight"]
    moe = f"model.layers.{i}.block_sparse_moe"
    weights[f"{moe}.gate.weight"] = rng.normal(0, 0.1, (n_experts, d)).astype(np.float32)
    for e in range(n_experts):
      for w, shape in (("w1", (width, d)), ("w3", (width, d)), ("w2", (d, width))):
        weights[f"{moe}.experts.{e}.{w}.weight"] = rng.normal(0, 0.1, shape).astype(np.float32)
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
