"""KV-cache generation against transformers' greedy generate and against our own full forward."""
import numpy as np
import pytest
import torch

import ftjax
from ftjax.sampling import generate
from conftest import VOCAB


@pytest.mark.parametrize("arch", ["mistral", "gemma3_text"])  # sliding windows + per-layer rope
def test_greedy_matches_transformers(arch, tiny_hf):
  hf, path = tiny_hf(arch, eos_token_id=None)  # no eos: compare all 12 tokens
  model = ftjax.load_hf(path, dtype="float32")
  prompt = np.random.default_rng(0).integers(3, VOCAB, (2, 5))
  ours = np.asarray(generate(model, prompt, max_new_tokens=12))
  with torch.no_grad():
    ref = hf.generate(torch.as_tensor(prompt), max_new_tokens=12, do_sample=False,
                      min_new_tokens=12, pad_token_id=0)[:, 5:].numpy()
  np.testing.assert_array_equal(ours, ref)


def test_left_padded_batch_equals_rows_alone(tiny_hf):
  _, path = tiny_hf("llama", eos_token_id=None)
  model = ftjax.load_hf(path, dtype="float32")
  rng = np.random.default_rng(1)
  a, b = rng.integers(3, VOCAB, (1, 6)), rng.integers(3, VOCAB, (1, 4))
  batch = np.concatenate([a, np.concatenate([[[0, 0]], b], axis=1)])
  mask = np.ones_like(batch, bool)
  mask[1, :2] = False
  both = np.asarray(generate(model, batch, max_new_tokens=6, prompt_mask=mask))
  np.testing.assert_array_equal(both[0], np.asarray(generate(model, a, max_new_tokens=6))[0])
  np.testing.assert_array_equal(both[1], np.asarray(generate(model, b, max_new_tokens=6))[0])


def test_stops_at_eos_and_samples(tiny_hf):
  _, path = tiny_hf("qwen3", eos_token_id=None)
  model = ftjax.load_hf(path, dtype="float32")
  prompt = np.random.default_rng(2).integers(3, VOCAB, (1, 5))
  greedy = np.asarray(generate(model, prompt, max_new_tokens=8))[0]
  import dataclasses
  stop_at = int(greedy[3])
  stopping = ftjax.Model(dataclasses.replace(model.spec, eos_ids=(stop_at,)), model.params)
  out = np.asarray(generate(stopping, prompt, max_new_tokens=8, pad_id=0))[0]
  first = list(greedy).index(stop_at)
  np.testing.assert_array_equal(out[:first + 1], greedy[:first + 1])
  assert (out[first + 1:] == 0).all()
  import jax
  samples = {tuple(np.asarray(generate(model, prompt, max_new_tokens=8, temperature=1.5,
                                       key=jax.random.PRNGKey(s)))[0]) for s in range(4)}
  assert len(samples) > 1  # sampling actually samples


@pytest.mark.parametrize("mode", ["int8", "int4", "nf4"])
def test_decode_sized_quantized_matmul_is_blockwise_and_exact(mode):
  """Decode-sized products dequantize block by block (never the whole matrix); the result equals
  a float64 product with the whole dequantized matrix."""
  import jax
  import jax.numpy as jnp
  from ftjax import kernels, quant
  rng = np.random.default_rng(3)
  w = quant.quantize(rng.normal(0, 0.1, (1024, 96)).astype(np.float32), mode, 64)
  x = rng.normal(0, 1, (2, 3, 1024)).astype(np.float32)
  want = x.astype(np.float64) @ np.asarray(quant.dequantize(w, jnp.float32), np.float64)
  hlo = jax.jit(kernels.reference).lower(x, w).as_text()
  assert "while" in hlo  # the block loop, not one dequantized [1024, 96] operand
  got = np.asarray(jax.jit(kernels.reference)(x, w))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_ftjax_generate_is_still_the_function_once_the_cli_module_is_imported(tiny_hf):
  """Importing ftjax.generate (the CLI, as ftjax.eval does) rebinds the package attribute to the
  module; the module calls through, so user code calling ftjax.generate(...) keeps working."""
  import ftjax.generate as cli  # pylint: disable=import-outside-toplevel
  assert ftjax.generate is cli
  _, path = tiny_hf("llama", eos_token_id=None)
  model = ftjax.load_hf(path, dtype="float32")
  prompt = np.random.default_rng(2).integers(3, VOCAB, (1, 5))
  np.testing.assert_array_equal(np.asarray(ftjax.generate(model, prompt, max_new_tokens=4)),
                                np.asarray(generate(model, prompt, max_new_tokens=4)))
