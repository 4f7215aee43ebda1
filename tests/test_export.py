"""Export to PyTorch, checked against real PEFT and transformers.

Every adapter here has a random (non-zero) b, and each test asserts the adapter moved the logits, so
a tensor PEFT silently skipped (it loads with strict=False) cannot pass unnoticed.
"""
import copy
import json
import os
import subprocess
import sys

import jax
import numpy as np
import peft
import pytest
import safetensors
import safetensors.torch
import torch
import transformers

import ftjax
from ftjax import ckpt, export, hf_io, lora, peft_io
from ftjax.config import defaults
from ftjax.model import ModelSpec

from conftest import ARCHS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))
import demo  # noqa: E402  (builds the tiny llama base + tokenizer the training tests share)

RANK, ALPHA = 4, 8
TOKENS = np.random.default_rng(0).integers(3, 100, (2, 11)).astype(np.int32)


def random_adapters(spec, seed=0, **kw):
  """PEFT-style init, then a and b perturbed so the adapter changes the output."""
  adapters = lora.init(spec, "all-linear", RANK, ALPHA, jax.random.PRNGKey(seed), **kw)
  rng = np.random.default_rng(seed)  # numpy noise: no compile per leaf shape
  return lora.with_params(adapters, jax.tree.map(
      lambda x: np.asarray(x) + rng.normal(0.0, 0.1, x.shape).astype(np.float32),
      adapters.params))


def torch_logits(model, tokens):
  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def assert_close(got, want, rtol=1e-4):
  err = np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want))
  assert err < rtol, f"relative error {err:.2e}"


def assert_differs(got, want):
  assert np.max(np.abs(np.asarray(got) - want)) > 1e-2 * np.max(np.abs(want))


def load_torch(path):
  return transformers.AutoModelForCausalLM.from_pretrained(
      path, attn_implementation="eager", dtype=torch.float32).eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_export_matches_peft(arch, tiny_hf, tmp_path):
  hf_model, path = tiny_hf(arch)
  model = ftjax.load_hf(path, dtype="float32")
  adapters = random_adapters(model.spec)
  out = str(tmp_path / "adapter")
  peft_io.write_adapters(adapters, model.spec, out, path, card={"data": "x.jsonl", "steps": 3})

  # Our keys and shapes are exactly those PEFT saves for the same targets.
  reference = peft.get_peft_model(copy.deepcopy(hf_model), peft.LoraConfig(
      target_modules=list(model.spec.projections), r=RANK, lora_alpha=ALPHA))
  want = {k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(reference).items()}
  ours = safetensors.torch.load_file(os.path.join(out, "adapter_model.safetensors"))
  assert {k: tuple(v.shape) for k, v in ours.items()} == want
  with safetensors.safe_open(os.path.join(out, "adapter_model.safetensors"), "np") as f:
    assert f.metadata() == {"format": "pt"}
  with open(os.path.join(out, "adapter_config.json")) as f:
    assert json.load(f)["target_modules"] == list(model.spec.projections)

  base = torch_logits(hf_model, TOKENS)
  peft_model = peft.PeftModel.from_pretrained(hf_model, out).eval()
  result = peft_model.load_adapter(out, adapter_name="check")  # PEFT's own account of the load
  assert not result.missing_keys and not result.unexpected_keys
  ref = torch_logits(peft_model, TOKENS)
  got = ftjax.forward(model, TOKENS, adapters)
  assert_close(got, ref)
  assert_differs(ref, base)

  back = peft_io.read_adapters(out)  # and the directory reads back to the same adapters
  assert (back.rank, back.alpha, back.rslora) == (RANK, ALPHA, False)
  jax.tree.map(np.testing.assert_array_equal, back.params, adapters.params)


def test_rslora_adapter_saved_by_peft(tiny_hf, tmp_path):
  hf_model, path = tiny_hf("qwen3")
  base = torch_logits(hf_model, TOKENS)
  torch.manual_seed(1)
  peft_model = peft.get_peft_model(hf_model, peft.LoraConfig(
      target_modules=["q_proj", "v_proj", "down_proj"], r=RANK, lora_alpha=ALPHA,
      use_rslora=True, init_lora_weights=False)).eval()  # random B
  peft_model.save_pretrained(tmp_path / "adapter")
  ref = torch_logits(peft_model, TOKENS)
  adapters = ftjax.load_adapters(str(tmp_path / "adapter"))
  assert adapters.rslora and adapters.scale == ALPHA / RANK ** 0.5
  assert set(adapters.targets) == {"q_proj", "v_proj", "down_proj"}
  model = ftjax.load_hf(path, dtype="float32")
  peft_io.check_adapters(adapters, model.spec)
  assert_close(ftjax.forward(model, TOKENS, adapters), ref)
  assert_differs(ref, base)


# ----------------------------------------------------------------------------- refusals

SMALL = ModelSpec(arch="llama", vocab=11, dim=8, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=4,
                  mlp_dim=12)


def _small_adapter_dir(tmp_path):
  out = str(tmp_path / "adapter")
  peft_io.write_adapters(random_adapters(SMALL), SMALL, out, "base")
  return out


def _edit(out, **changes):
  cfg_path = os.path.join(out, "adapter_config.json")
  with open(cfg_path) as f:
    cfg = json.load(f)
  cfg.update(changes)
  with open(cfg_path, "w") as f:
    json.dump(cfg, f)


@pytest.mark.parametrize("changes, message", [
    (dict(use_dora=True), "use_dora"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(bias="all"), "bias='all'"),
    (dict(rank_pattern={"q_proj": 8}), "rank_pattern"),
    (dict(fan_in_fan_out=True), "fan_in_fan_out"),
    (dict(target_modules=["q_proj", "lm_head"]), "'lm_head'"),
    (dict(peft_type="IA3"), "IA3"),
])
def test_unsupported_peft_configs_are_refused(tmp_path, changes, message):
  out = _small_adapter_dir(tmp_path)
  _edit(out, **changes)
  with pytest.raises(ftjax.UserError, match=message) as e:
    ftjax.load_adapters(out)
  assert "adapter_config.json" in str(e.value)


def test_unusable_tensors_are_refused(tmp_path):
  out = _small_adapter_dir(tmp_path)
  st_path = os.path.join(out, "adapter_model.safetensors")
  tensors = safetensors.torch.load_file(st_path)
  extra = dict(tensors, **{"base_model.model.lm_head.lora_A.weight": torch.zeros(RANK, 8)})
  safetensors.torch.save_file(extra, st_path, metadata={"format": "pt"})
  with pytest.raises(ftjax.UserError, match="lm_head.lora_A"):
    ftjax.load_adapters(out)
  del tensors[peft_io.tensor_name(0, "up_proj", "B")]  # layer 0 missing, layer 1 present
  safetensors.torch.save_file(tensors, st_path, metadata={"format": "pt"})
  with pytest.raises(ftjax.UserError, match="missing .*layers.0.mlp.up_proj.lora_B"):
    ftjax.load_adapters(out)
  os.remove(st_path)
  open(os.path.join(out, "adapter_model.bin"), "wb").close()
  with pytest.raises(ftjax.UserError, match="never unpickles.*safetensors"):
    ftjax.load_adapters(out)


def test_adapters_for_another_base_are_refused():
  adapters = random_adapters(SMALL)
  deeper = ModelSpec(**{**SMALL.__dict__, "n_layers": 3})
  with pytest.raises(ftjax.UserError, match="3 layers"):
    peft_io.check_adapters(adapters, deeper)
  fused = ModelSpec(**{**SMALL.__dict__, "arch": "phi3", "fused_projections": True})
  with pytest.raises(ftjax.UserError, match="phi3 model does not have"):
    peft_io.check_adapters(adapters, fused)


# ----------------------------------------------------------------------------- workdir exports


def make_workdir(workdir, base, adapters, step=3):
  """A workdir as train.py leaves it: config.json and an orbax checkpoint of the state."""
  c = defaults()
  c.workdir, c.model.path, c.model.dtype = str(workdir), base, "float32"
  c.data.train, c.train.steps = "train.jsonl", step
  c.lora.rank, c.lora.alpha = adapters.rank, adapters.alpha
  meta = {"config": json.loads(c.to_json_best_effort()), "lora": ckpt.lora_meta(adapters),
          "base": {}}
  mngr = ckpt.manager(str(workdir), keep=1)
  ckpt.save(mngr, {"adapters": adapters.params, "step": np.int32(step)}, meta, force=True)
  mngr.wait_until_finished()
  mngr.close()
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(meta["config"], f, indent=2)
  return str(workdir)


@pytest.fixture(scope="module")
def demo_workdir(tmp_path_factory):
  """The demo base (tiny tied llama + tokenizer) and a workdir with random adapters for it."""
  base = str(tmp_path_factory.mktemp("demo_base"))
  demo.build_base(base)
  adapters = random_adapters(hf_io.read_spec(base), seed=2)
  return make_workdir(tmp_path_factory.mktemp("workdir"), base, adapters), base, adapters


def _merged_equals_peft(workdir, base, tmp_path):
  """Exports both ways; the merged checkpoint's logits equal PEFT's (base + adapter)."""
  export.export_peft(workdir, str(tmp_path / "peft"))
  export.export_merged(workdir, str(tmp_path / "merged"))
  base_model = load_torch(base)
  base_logits = torch_logits(base_model, TOKENS)
  ref = torch_logits(peft.PeftModel.from_pretrained(base_model, str(tmp_path / "peft")), TOKENS)
  merged = load_torch(str(tmp_path / "merged"))
  assert_close(torch_logits(merged, TOKENS), ref)
  assert_differs(ref, base_logits)
  return merged


def test_merged_export_equals_peft(demo_workdir, tmp_path):
  workdir, base, _ = demo_workdir
  merged = _merged_equals_peft(workdir, base, tmp_path)
  out = tmp_path / "merged"
  with open(out / "config.json") as f:
    assert json.load(f)["dtype"] == "float32"
  assert merged.config.tie_word_embeddings
  assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()
  for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
               "model.safetensors.index.json"):
    assert (out / name).is_file(), name
  with open(tmp_path / "peft" / "README.md") as f:
    card = f.read()
  assert base in card and "train.jsonl" in card and "rank: 4" in card

  export.export_merged(workdir, str(tmp_path / "bf16"), dtype="bfloat16")
  with open(tmp_path / "bf16" / "config.json") as f:
    assert json.load(f)["dtype"] == "bfloat16"
  with safetensors.safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
    assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}


def test_merged_export_of_sharded_fused_base(tiny_hf, tmp_path):
  """Phi-3 (fused qkv_proj / gate_up_proj) from a checkpoint in many shards."""
  _, base = tiny_hf("phi3", max_shard_size="20KB")
  adapters = random_adapters(hf_io.read_spec(base), seed=3)
  workdir = make_workdir(tmp_path / "workdir", base, adapters)
  _merged_equals_peft(workdir, base, tmp_path)
  with open(os.path.join(base, "model.safetensors.index.json")) as f:
    src = json.load(f)["weight_map"]
  with open(tmp_path / "merged" / "model.safetensors.index.json") as f:
    assert json.load(f)["weight_map"] == src
  assert len(set(src.values())) > 2


def test_export_cli_peft(demo_workdir, tmp_path):
  workdir, base, adapters = demo_workdir
  out = tmp_path / "cli"
  proc = subprocess.run([sys.executable, "-m", "ftjax.export", f"--workdir={workdir}",
                         "--format=peft", f"--out={out}"], cwd=REPO, capture_output=True,
                        text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(os.listdir(out))
  with open(out / "adapter_config.json") as f:
    assert json.load(f)["base_model_name_or_path"] == base
  back = ftjax.load_adapters(str(out))
  jax.tree.map(np.testing.assert_array_equal, back.params, adapters.params)


# ----------------------------------------------------------------------------- generation


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_greedy_generation_matches_transformers(arch, tiny_hf, tmp_path):
  hf_model, path = tiny_hf(arch, eos_token_id=None)  # no eos: both run the full length
  model = ftjax.load_hf(path, dtype="float32")
  adapters = random_adapters(model.spec, seed=4)
  peft_io.write_adapters(adapters, model.spec, str(tmp_path / "adapter"), path)
  peft_model = peft.PeftModel.from_pretrained(hf_model, str(tmp_path / "adapter")).eval()
  prompt = TOKENS[:, :5]
  n = 8
  with torch.no_grad():
    want = peft_model.generate(input_ids=torch.as_tensor(prompt, dtype=torch.long),
                               attention_mask=torch.ones(prompt.shape, dtype=torch.long),
                               max_new_tokens=n, do_sample=False, pad_token_id=0)
  got = ftjax.generate(model, prompt, adapters=adapters, max_new_tokens=n)
  np.testing.assert_array_equal(np.asarray(got), want[:, prompt.shape[1]:].numpy())
  base_tokens = ftjax.generate(model, prompt, max_new_tokens=n)
  assert not np.array_equal(np.asarray(base_tokens), np.asarray(got))
