"""The forward pass against transformers' PyTorch logits, for every supported architecture."""
import json

import jax
import numpy as np
import pytest
import torch

import ftjax
from conftest import ARCHS, VOCAB


def rel_err(a, b):
  return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


def torch_logits(model, tokens):
  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(tokens))).logits.float().numpy()


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers(arch, tiny_hf):
  hf, path = tiny_hf(arch)
  tokens = np.random.default_rng(0).integers(3, VOCAB, (2, 14))  # longer than the windows
  model = ftjax.load_hf(path, dtype="float32")
  ours = jax.jit(ftjax.forward)(model, tokens)
  ref = torch_logits(hf, tokens)
  assert ours.dtype == np.float32 and ours.shape == ref.shape
  assert rel_err(ours, ref) < 1e-4


def test_packed_segments_equal_documents_alone(tiny_hf):
  _, path = tiny_hf("gemma2")  # sliding window + softcap: the hardest mask
  model = ftjax.load_hf(path, dtype="float32")
  rng = np.random.default_rng(1)
  a, b = rng.integers(3, VOCAB, (1, 9)), rng.integers(3, VOCAB, (1, 7))
  packed = np.concatenate([a, b], axis=1)
  segments = np.array([[1] * 9 + [2] * 7])
  out = np.asarray(ftjax.forward(model, packed, segment_ids=segments))
  alone_a = np.asarray(ftjax.forward(model, a))
  alone_b = np.asarray(ftjax.forward(model, b))
  np.testing.assert_allclose(out[:, :9], alone_a, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(out[:, 9:], alone_b, rtol=1e-4, atol=1e-4)
  # and without segment ids document b would see document a
  assert not np.allclose(np.asarray(ftjax.forward(model, packed))[:, 9:], alone_b, atol=1e-3)


def _rewrite_config_old_layout(path):
  """transformers < 5 wrote rope_theta + rope_scaling instead of rope_parameters."""
  with open(f"{path}/config.json") as f:
    cfg = json.load(f)
  rp = cfg.pop("rope_parameters")
  cfg["rope_theta"] = rp.pop("rope_theta")
  if rp.get("rope_type", "default") != "default":
    cfg["rope_scaling"] = rp
  with open(f"{path}/config.json", "w") as f:
    json.dump(cfg, f)


def test_old_config_layout_and_sharded_checkpoint(tiny_hf):
  hf, path = tiny_hf("llama", max_shard_size="20KB")
  import os
  assert os.path.exists(f"{path}/model.safetensors.index.json")
  tokens = np.random.default_rng(2).integers(3, VOCAB, (1, 12))
  new = np.asarray(ftjax.forward(ftjax.load_hf(path, dtype="float32"), tokens))
  _rewrite_config_old_layout(path)
  old_model = ftjax.load_hf(path, dtype="float32")
  assert old_model.spec.rope.kind == "llama3"
  old = np.asarray(ftjax.forward(old_model, tokens))
  np.testing.assert_array_equal(new, old)
  assert rel_err(new, torch_logits(hf, tokens)) < 1e-4


def test_tied_embeddings_not_duplicated(tiny_hf):
  _, path = tiny_hf("qwen2")
  model = ftjax.load_hf(path, dtype="float32")
  assert model.spec.tie_embeddings and "lm_head" not in model.params


def test_bfloat16_close_to_float32(tiny_hf):
  _, path = tiny_hf("llama")
  tokens = np.random.default_rng(3).integers(3, VOCAB, (1, 10))
  f32 = np.asarray(ftjax.forward(ftjax.load_hf(path, dtype="float32"), tokens))
  bf16_model = ftjax.load_hf(path)
  assert bf16_model.params["layers"]["q_proj"]["kernel"].dtype == jax.numpy.bfloat16
  bf16 = np.asarray(ftjax.forward(bf16_model, tokens))
  assert rel_err(bf16, f32) < 0.05
