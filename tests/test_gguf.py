"""GGUF in: tiny random models written as llama.cpp's converter lays them out (its `gguf` writer,
its tensor-name map, its Q/K permutation and Gemma's +1 norms), loaded by ftjax and by
transformers' own GGUF loader: the logits agree, per architecture and per tensor type."""
import dataclasses
import json
import math
import os

import gguf
import jax
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as Q

import ftjax
from ftjax import export, gguf_export, gguf_vocab, hf_io, lora, model as model_lib, sampling
from ftjax.errors import UserError
from tests.conftest import build_hf

TOKENS = np.array([[1, 5, 17, 33, 60, 7, 99, 42, 3, 11]])
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
             "gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3"}
# What GGUF metadata can say: default rope, and for Gemma 2/3 head_dim = query_pre_attn_scalar
# (llama.cpp scales queries by key_length ** -0.5; transformers' GGUF config keeps 256).
OVERRIDES = {
    "llama": dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
    "mistral": dict(sliding_window=None),
    # transformers' GGUF config reads no head_dim for Qwen3 and keeps its default, 128 (as real
    # Qwen3 models have); ftjax reads attention.key_length.
    "qwen2": {}, "qwen3": dict(head_dim=128), "gemma": {},
    "gemma2": dict(num_attention_heads=2, num_key_value_heads=1, head_dim=256,
                   query_pre_attn_scalar=256, sliding_window=4, attn_logit_softcapping=50.0,
                   final_logit_softcapping=30.0),
    "gemma3_text": dict(num_attention_heads=2, num_key_value_heads=1, head_dim=256,
                        query_pre_attn_scalar=256, sliding_window=4, layer_types=None,
                        rope_parameters=None),
}


def _permute(w, n_head):
  """llama.cpp convert_hf_to_gguf.py LlamaModel.permute (rope halves -> interleaved pairs)."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
      w.shape)


def _kquant_bytes(rows, cols, qtype, rng):
  """Random k-quant blocks with small, finite super-block scales (no Python quantizer exists)."""
  block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
  raw = rng.integers(0, 256, (rows, cols // block, nbytes), dtype=np.uint8)
  if qtype == Q.Q6_K:  # ql, qh, scales, then d
    raw[..., -2:] = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)
  else:  # Q4_K / Q5_K: d, dmin first
    raw[..., 0:2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    raw[..., 2:4] = np.frombuffer(np.float16(0.004).tobytes(), np.uint8)
  return raw.reshape(rows, -1)


def write_gguf(hf_model, path, name="tiny", types=None, seed=0, rope_freqs=None):
  """Writes `hf_model` as llama.cpp's converter would; `types`: {gguf tensor name: qtype};
  rope_freqs: the rope_freqs.weight tensor."""
  cfg = hf_model.config
  arch = GGUF_ARCH[cfg.model_type]
  head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
  if cfg.model_type == "mistral":
    name = "Mistral tiny"
  enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
  names = gguf.get_tensor_name_map(enum, cfg.num_hidden_layers)
  w = gguf.GGUFWriter(path, arch)
  w.add_name(name)
  w.add_block_count(cfg.num_hidden_layers)
  w.add_context_length(cfg.max_position_embeddings)
  w.add_embedding_length(cfg.hidden_size)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_head_count(cfg.num_attention_heads)
  w.add_head_count_kv(cfg.num_key_value_heads)
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  w.add_vocab_size(cfg.vocab_size)
  w.add_rope_freq_base(getattr(cfg, "rope_theta", None) or 10000.0)
  if arch == "llama":
    w.add_rope_dimension_count(head_dim)
  else:
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
  if arch in ("gemma2", "gemma3"):
    w.add_sliding_window(cfg.sliding_window)
  if arch == "gemma2":
    w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
    w.add_final_logit_softcapping(cfg.final_logit_softcapping)
  w.add_eos_token_id(2)
  rng = np.random.default_rng(seed)
  if rope_freqs is not None:
    w.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, np.float32))
  for hf_name, t in hf_model.state_dict().items():
    if arch.startswith("gemma") and hf_name == "lm_head.weight":
      continue
    if cfg.tie_word_embeddings and hf_name == "lm_head.weight":
      continue
    base, suffix = hf_name.rsplit(".", 1)
    gname = names.get_name(base) + "." + suffix
    x = t.detach().float().numpy()
    if arch == "llama" and gname.endswith(("attn_q.weight", "attn_k.weight")):
      heads = cfg.num_attention_heads if "attn_q" in gname else cfg.num_key_value_heads
      x = _permute(x, heads)
    if arch.startswith("gemma") and gname.endswith("norm.weight"):
      x = x + 1
    qtype = (types or {}).get(gname, Q.F32)
    if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_1):
      w.add_tensor(gname, _kquant_bytes(*x.shape, qtype, rng), raw_dtype=qtype)
    elif qtype in (Q.F32, Q.F16):
      w.add_tensor(gname, x.astype(np.float32 if qtype == Q.F32 else np.float16))
    else:
      w.add_tensor(gname, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(path)


def _hf_logits_from_gguf(path):
  hf = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
  with torch.no_grad():
    return hf(torch.tensor(TOKENS)).logits.numpy()


def _ftjax_logits(path):
  model = ftjax.load_hf(path, "float32")
  return np.asarray(model_lib.forward(model, TOKENS))


def _rel(a, b):
  return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text"])
def test_logits_match_transformers_gguf_loader(arch, tmp_path):
  hf = build_hf(arch, **OVERRIDES[arch])
  path = write_gguf(hf, tmp_path / f"{arch}.gguf")
  ours = _ftjax_logits(path)
  assert _rel(ours, _hf_logits_from_gguf(path)) < 1e-4
  with torch.no_grad():  # and the GGUF round trip lost nothing against the source model
    assert _rel(ours, hf(torch.tensor(TOKENS)).logits.numpy()) < 1e-4


def test_gemma_matches_its_source_model(tmp_path):
  # transformers' GGUF loader has no Gemma (1) architecture: compare with the model written.
  hf = build_hf("gemma")
  ours = _ftjax_logits(write_gguf(hf, tmp_path / "gemma.gguf"))
  with torch.no_grad():
    assert _rel(ours, hf(torch.tensor(TOKENS)).logits.numpy()) < 1e-4


TYPES_LAYER0 = {"attn_q": Q.Q4_K, "attn_k": Q.Q5_K, "attn_v": Q.Q6_K, "attn_output": Q.Q8_0,
                "ffn_gate": Q.Q4_0, "ffn_up": Q.Q4_1, "ffn_down": Q.BF16}


def test_every_tensor_type_dequantizes_as_transformers_does(tmp_path):
  # K-quants need rows of 256: one layer of each type, the next in F16, the embedding in Q8_0.
  hf = build_hf("llama", hidden_size=256, intermediate_size=256, head_dim=64,
                num_hidden_layers=2, **OVERRIDES["llama"])
  types = {f"blk.0.{k}.weight": v for k, v in TYPES_LAYER0.items()}
  types.update({f"blk.1.{k}.weight": Q.F16 for k in TYPES_LAYER0})
  types["token_embd.weight"] = Q.Q8_0
  path = write_gguf(hf, tmp_path / "types.gguf", types=types)
  got = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
  assert {got[k] for k in types} == set(TYPES_LAYER0.values()) | {Q.F16, Q.Q8_0}
  assert _rel(_ftjax_logits(path), _hf_logits_from_gguf(path)) < 1e-4
  # ...and nf4 from the dequantized GGUF is nf4 of the same weights from safetensors.
  model = ftjax.load_hf(path, "float32", quant="nf4", group_size=64)
  assert model.params["layers"]["q_proj"]["kernel"].q.shape[0] == 2


def test_a_directory_holding_one_gguf_loads_two_are_refused(tmp_path):
  hf = build_hf("qwen2")
  write_gguf(hf, tmp_path / "m.gguf")
  assert hf_io.read_spec(str(tmp_path)).arch == "qwen2"
  write_gguf(hf, tmp_path / "n.gguf")
  with pytest.raises(UserError, match="holds 2 GGUF files"):
    hf_io.read_spec(str(tmp_path))


def test_bad_ggufs_fail_with_one_line_naming_file_and_key(tmp_path):
  hf = build_hf("qwen3")
  path = write_gguf(hf, tmp_path / "ok.gguf")
  blob = open(path, "rb").read()
  cut = tmp_path / "cut.gguf"
  cut.write_bytes(blob[:len(blob) - 1000])
  with pytest.raises(UserError, match="cut.gguf: not a valid GGUF file or truncated at tensor "
                     r"output.weight \(its bytes end at"):
    ftjax.load_hf(str(cut))
  head = tmp_path / "head.gguf"  # cut inside the metadata: the last key read is named
  head.write_bytes(blob[:300])
  with pytest.raises(UserError, match="head.gguf: not a valid GGUF file or truncated after "
                     "metadata key 'qwen3.attention.head_count'"):
    hf_io.read_spec(str(head))
  other = tmp_path / "rwkv.gguf"
  w = gguf.GGUFWriter(other, "rwkv6")
  w.add_block_count(1)
  w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
  with pytest.raises(UserError, match="rwkv.gguf: general.architecture 'rwkv6' is not supported"):
    hf_io.read_spec(str(other))
  iq = tmp_path / "iq.gguf"  # Q8_1: llama.cpp's activation type, which gguf cannot dequantize
  write_gguf(hf, iq, types={"blk.1.ffn_up.weight": Q.Q8_1})
  with pytest.raises(UserError, match=r"iq.gguf: tensor blk.1.ffn_up.weight has GGUF type Q8_1"):
    ftjax.load_hf(str(iq))


# ----------------------------------------------------------------------------- GGUF out


def random_adapters(spec, seed=0, **kw):
  """PEFT-style init with b randomized too, so the adapter changes the output."""
  adapters = lora.init(spec, "all-linear", 4, 8.0, jax.random.PRNGKey(seed), **kw)
  rng = np.random.default_rng(seed)
  return lora.with_params(adapters, jax.tree.map(
      lambda x: np.asarray(x) + rng.normal(0.0, 0.1, x.shape).astype(np.float32),
      adapters.params))


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_merged_gguf_is_the_adapted_model_for_transformers(arch, tmp_path):
  # Llama: the Q/K permutation written back; Gemma 2: norms written plus one.
  base = write_gguf(build_hf(arch, **OVERRIDES[arch]), tmp_path / "base.gguf")
  model = ftjax.load_hf(base, "float32")
  adapters = random_adapters(model.spec, rslora=True)
  out = str(tmp_path / "merged.gguf")
  gguf_export.write_merged(base, adapters, out, "f32")
  want = np.asarray(model_lib.forward(model, TOKENS, adapters))
  assert _rel(_hf_logits_from_gguf(out), want) < 1e-4
  assert _rel(np.asarray(model_lib.forward(model, TOKENS)), want) > 1e-2  # the adapter matters


def test_lora_gguf_is_what_llama_cpp_adds(tmp_path):
  """llama.cpp's LoRA: W + alpha / r * B A, r read from the tensors, on its (permuted) layout."""
  base = write_gguf(build_hf("llama", **OVERRIDES["llama"]), tmp_path / "base.gguf")
  spec = hf_io.read_spec(base)
  adapters = random_adapters(spec, rslora=True)  # alpha / sqrt(r): folded into adapter.lora.alpha
  lora_file, merged = str(tmp_path / "adapter.gguf"), str(tmp_path / "merged.gguf")
  gguf_export.write_lora(adapters, spec, lora_file)
  gguf_export.write_merged(base, adapters, merged, "f32")
  r = gguf.GGUFReader(lora_file)
  assert r.fields["general.type"].contents() == "adapter"
  assert r.fields["adapter.type"].contents() == "lora"
  alpha = r.fields["adapter.lora.alpha"].contents()
  loras = {t.name: np.asarray(t.data) for t in r.tensors}
  assert len(loras) == 2 * 7 * spec.n_layers
  bases = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(base).tensors}
  for t in gguf.GGUFReader(merged).tensors:
    if t.name + ".lora_a" not in loras:
      np.testing.assert_array_equal(np.asarray(t.data), bases[t.name])
      continue
    a, b = loras[t.name + ".lora_a"], loras[t.name + ".lora_b"]
    assert a.shape[0] == b.shape[1] == 4
    np.testing.assert_allclose(bases[t.name] + alpha / b.shape[1] * (b @ a), np.asarray(t.data),
                               rtol=1e-5, atol=1e-5)


def test_gguf_export_refusals_are_one_line(tmp_path):
  base = write_gguf(build_hf("qwen2"), tmp_path / "base.gguf")
  spec = hf_io.read_spec(base)
  with pytest.raises(UserError, match="phi3 has no GGUF export"):
    gguf_export.write_lora(random_adapters(spec), dataclasses.replace(spec, arch="phi3"),
                           str(tmp_path / "x.gguf"), "base.gguf")
  with pytest.raises(UserError, match="--gguf_type='q4_k'"):
    gguf_export.write_merged(base, None, str(tmp_path / "y.gguf"), "q4_k")
  build_hf("phi3").save_pretrained(tmp_path / "phi3")  # and from a safetensors base
  with pytest.raises(UserError, match="phi3: model_type phi3 has no GGUF export"):
    gguf_export.write_merged(str(tmp_path / "phi3"), None, str(tmp_path / "z.gguf"), "f16")


def test_merged_safetensors_export_from_a_gguf_base(tmp_path):
  # export --format=merged from a GGUF base: a Hugging Face checkpoint transformers loads as is.
  base = write_gguf(build_hf("qwen3", **OVERRIDES["qwen3"]), tmp_path / "base.gguf")
  model = ftjax.load_hf(base, "float32")
  adapters = random_adapters(model.spec)
  export.merge_into(base, adapters, str(tmp_path / "merged"))
  hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged",
                                                         dtype=torch.float32).eval()
  with torch.no_grad():
    got = hf(torch.tensor(TOKENS)).logits.numpy()
  assert _rel(got, np.asarray(model_lib.forward(model, TOKENS, adapters))) < 1e-4


def test_multi_adapter_workdir_writes_one_gguf_and_modelfile_per_adapter(tmp_path):
  base = write_gguf(build_hf("qwen2"), tmp_path / "base.gguf")
  spec = hf_io.read_spec(base)
  cfg = {"model": {"path": base}, "data": {"format": "prompt_completion"}}
  each = {"tone": random_adapters(spec, 1), "triage": random_adapters(spec, 2)}
  out = tmp_path / "out"
  gguf_export.export(cfg, each, str(out), "gguf_lora", "f16")
  assert (out / "base-f16.gguf").is_file()  # the base once, for both
  for name in each:
    modelfile = (out / name / "Modelfile").read_text().splitlines()
    assert modelfile == ["FROM ../base-f16.gguf", "ADAPTER ./adapter.gguf"]
    tensors = {t.name: t for t in gguf.GGUFReader(out / name / "adapter.gguf").tensors}
    np.testing.assert_allclose(
        np.asarray(tensors["blk.0.attn_v.weight.lora_a"].data),
        np.asarray(each[name].params["v_proj"]["a"][0]).T)
  gguf_export.export(cfg, each, str(out / "merged"), "gguf", "q8_0")
  r = gguf.GGUFReader(out / "merged" / "tone" / "model-q8_0.gguf")
  types = {t.name: t.tensor_type for t in r.tensors}
  assert types["blk.0.attn_q.weight"] == Q.Q8_0 and types["blk.0.attn_norm.weight"] == Q.F32
  assert types["blk.0.ffn_down.weight"] == Q.F16  # rows of 48: not whole q8_0 blocks, as llama.cpp
  assert (out / "merged" / "tone" / "Modelfile").read_text() == "FROM ./model-q8_0.gguf\n"


# ----------------------------------------------------------------------------- GGUF out from a
# Hugging Face (safetensors) base: the tokenizer written from tokenizer.json


CORPUS = ["hello world, how are you today?", "the cat sat on the mat 1234 times",
          "It's 42, isn't it", "what is two plus two? four!", "reply one\nreply two\n\n  indented",
          "naïve café über"] * 3
SPLITS = {  # the pre-tokenizers of Llama 3, Qwen2, GPT-2 and SmolLM, as tokenizer.json has them
    "llama-bpe": ("split", gguf_vocab.LLAMA3_SPLIT), "qwen2": ("split", gguf_vocab.QWEN2_SPLIT),
    "gpt-2": ("bytelevel", None), "smollm": ("digits", None)}
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXTS = ["hello world, how are you?", "It's 2024: 12345 cats sat!", "  two\n\nlines  ",
         "<|im_start|>user\nhi<|im_end|>\n", "café naïve 😀"]


def bpe_tokenizer(path, pre, adds_bos=False):
  """A byte-level BPE trained here with `pre`'s pre-tokenizer, saved as a transformers dir."""
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  kind, regex = SPLITS[pre]
  tk = Tokenizer(models.BPE(ignore_merges=pre == "llama-bpe"))
  if kind == "split":
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  elif kind == "digits":
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
  else:
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tk.decoder = decoders.ByteLevel()
  specials = ["<|begin_of_text|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
  tk.train_from_iterator(CORPUS, trainers.BpeTrainer(
      vocab_size=300, special_tokens=specials,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  if adds_bos:
    tk.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)])
  hf = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tk, bos_token="<|begin_of_text|>", eos_token="<|im_end|>",
      pad_token="<|endoftext|>")
  hf.chat_template = CHATML
  hf.save_pretrained(str(path))
  return hf


def hf_dir(tmp_path, arch, pre, adds_bos=False, **overrides):
  """A tiny model of `arch` (vocab beyond the tokenizer's: [PAD] rows) with `pre`'s tokenizer."""
  hf = build_hf(arch, vocab_size=320, bos_token_id=0, eos_token_id=3, pad_token_id=1, **overrides)
  path = tmp_path / f"{arch}-{pre}"
  hf.save_pretrained(path)
  return hf, bpe_tokenizer(path, pre, adds_bos), str(path)


def converter_rope_freqs(rope, dim):
  """llama.cpp convert_hf_to_gguf.py LlamaModel's rope_freqs loop, on transformers' parameters."""
  base, factor = rope["rope_theta"], rope["factor"]
  low, high, old = rope["low_freq_factor"], rope["high_freq_factor"], rope[
      "original_max_position_embeddings"]
  out = []
  for freq in 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)):
    wavelen = 2 * math.pi / freq
    if wavelen < old / high:
      out.append(1)
    elif wavelen > old / low:
      out.append(factor)
    else:
      smooth = (old / wavelen - low) / (high - low)
      out.append(1 / ((1 - smooth) / factor + smooth))
  return np.array(out, np.float32)


def test_gguf_from_safetensors_is_read_back_by_transformers(tmp_path):
  """Qwen2 (tied embeddings, biases) from safetensors: names, shapes and the tokenizer's keys as
  llama.cpp's converter writes them; transformers' GGUF loader gives the same logits, and its
  tokenizer (built from the file) the same ids and chat template as the original's."""
  hf, tok, base = hf_dir(tmp_path, "qwen2", "qwen2")
  out = str(tmp_path / "q.gguf")
  gguf_export.write_merged(base, None, out, "f32")
  r = gguf.GGUFReader(out)
  field = lambda k: r.fields[k].contents()
  shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in r.tensors}
  assert shapes["token_embd.weight"] == (320, 32) and "output.weight" not in shapes
  assert shapes["blk.2.attn_k.bias"] == (16,) and shapes["blk.0.ffn_down.weight"] == (32, 48)
  assert len(shapes) == 2 + 3 * 12
  assert (field("tokenizer.ggml.model"), field("tokenizer.ggml.pre")) == ("gpt2", "qwen2")
  tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
  assert len(tokens) == 320 and tokens[len(tok):] == [f"[PAD{i}]" for i in range(len(tok), 320)]
  assert types[tok.convert_tokens_to_ids("<|im_end|>")] == gguf.TokenType.CONTROL
  assert tokens[:len(tok)] == tok.convert_ids_to_tokens(list(range(len(tok))))
  assert len(field("tokenizer.ggml.merges")) == len(json.load(open(f"{base}/tokenizer.json"))[
      "model"]["merges"])
  assert field("tokenizer.ggml.eos_token_id") == 3 and field("tokenizer.ggml.padding_token_id") == 1
  assert field("tokenizer.ggml.add_bos_token") is False
  assert field("tokenizer.chat_template") == CHATML
  np.testing.assert_allclose(_hf_logits_from_gguf(out), hf(torch.tensor(TOKENS)).logits.detach(),
                             rtol=1e-4, atol=1e-4)
  theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="q.gguf")
  for text in TEXTS:
    assert theirs(text)["input_ids"] == tok(text)["input_ids"], text
  msgs = [{"role": "user", "content": "hi"}]
  assert theirs.apply_chat_template(msgs, tokenize=False) == tok.apply_chat_template(
      msgs, tokenize=False)


def test_llama3_rope_round_trips_as_rope_freqs(tmp_path):
  """A Llama 3.1-style rope: written as the converter's rope_freqs.weight, read back into the
  llama3 rope_scaling transformers uses (logits equal to the source model's), merged or not."""
  hf, _, base = hf_dir(tmp_path, "llama", "llama-bpe", adds_bos=True)
  out = str(tmp_path / "l.gguf")
  adapters = random_adapters(hf_io.read_spec(base))
  gguf_export.write_merged(base, adapters, out, "f32")
  freqs = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(out).tensors}["rope_freqs.weight"]
  rope = hf.config.rope_parameters
  np.testing.assert_allclose(freqs, converter_rope_freqs(rope, 16), rtol=1e-6)
  assert 1.0 < np.unique(freqs).size  # the tiny rope has every kind of frequency but one
  cfg = hf_io.read_config(out)
  assert cfg["rope_scaling"]["rope_type"] == "llama3" and cfg["rope_scaling"]["factor"] == 8.0
  again = str(tmp_path / "again.gguf")  # a GGUF base's rope_freqs written back as they were
  gguf_export.write_merged(out, None, again, "f32")
  np.testing.assert_allclose({t.name: np.asarray(t.data) for t in gguf.GGUFReader(again).tensors}[
      "rope_freqs.weight"], freqs, rtol=1e-6)
  want = np.asarray(model_lib.forward(ftjax.load_hf(base, "float32"), TOKENS, adapters))
  assert _rel(_ftjax_logits(out), want) < 1e-4
  # The scaling matters here: the same weights under the default rope are far off.
  assert _rel(np.asarray(model_lib.forward(ftjax.load_hf(base, "float32"), TOKENS)), want) > 1e-2
  with torch.no_grad():  # the round trip without the adapter: transformers' own llama3 rope
    gguf_export.write_merged(base, None, str(tmp_path / "b.gguf"), "f32")
    assert _rel(_ftjax_logits(str(tmp_path / "b.gguf")), hf(torch.tensor(TOKENS)).logits.numpy()
                ) < 1e-4


def test_rope_freqs_that_are_not_llama3_are_refused(tmp_path):
  hf = build_hf("llama", **OVERRIDES["llama"])
  path = write_gguf(hf, tmp_path / "odd.gguf", rope_freqs=np.linspace(1.0, 3.0, 8))
  with pytest.raises(UserError, match="odd.gguf: tensor rope_freqs.weight: the factors are not a "
                     "llama3 rope scaling"):
    hf_io.read_spec(path)


def test_tokenizers_llama_cpp_cannot_name_are_refused_in_one_line(tmp_path):
  hf = build_hf("qwen2")
  hf.save_pretrained(tmp_path / "m")
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers
  tk = Tokenizer(models.BPE())
  tk.pre_tokenizer = pre_tokenizers.Whitespace()
  tk.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=60, special_tokens=["</s>"]))
  transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>").save_pretrained(
      tmp_path / "m")
  with pytest.raises(UserError, match=r'm/tokenizer.json: pre_tokenizer \{"type": "Whitespace"\} '
                     "is not one ftjax names for llama.cpp"):
    gguf_export.write_merged(str(tmp_path / "m"), None, str(tmp_path / "x.gguf"), "f16")
  spm = tmp_path / "spm"
  spm.mkdir()
  (spm / "tokenizer.model").write_bytes(b"not a model")
  with pytest.raises(UserError, match="spm/tokenizer.model: not a sentencepiece model"):
    gguf_export.write_merged(str(tmp_path / "m"), None, str(tmp_path / "x.gguf"), "f16",
                             tokenizer=str(spm))


# ----------------------------------------------------------------------------- llama.cpp itself

try:
  import llama_cpp
except ImportError:  # CI: it builds llama.cpp from source, too slow there
  llama_cpp = None
needs_llama_cpp = pytest.mark.skipif(llama_cpp is None, reason="llama-cpp-python is not installed; "
                                     "bench/llama_cpp_decode.py runs the same check where it is")


def _llama(path, **kw):
  # float32 KV cache (llama.cpp's default is f16, which would round the keys and values)
  return llama_cpp.Llama(model_path=path, n_ctx=64, n_threads=2, verbose=False, seed=0,
                         type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, **kw)


@needs_llama_cpp
def test_llama_cpp_tokenizes_every_pre_tokenizer_as_transformers(tmp_path):
  for pre in SPLITS:
    _, tok, base = hf_dir(tmp_path, "qwen2", pre)
    out = str(tmp_path / f"{pre}.gguf")
    gguf_export.write_merged(base, None, out, "f16")
    llm = _llama(out, vocab_only=True)
    for text in TEXTS:
      assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok(text)["input_ids"], (
          pre, text)


def spm_model(path, vocab_size=316):
  """A Llama 2-style sentencepiece BPE (byte fallback, no whitespace folding) trained here."""
  import io
  import sentencepiece as spm
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=vocab_size, model_type="bpe",
      unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
      normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2,
      hard_vocab_limit=False)
  path.mkdir(exist_ok=True)
  (path / "tokenizer.model").write_bytes(model.getvalue())
  return spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))


@needs_llama_cpp
def test_llama_cpp_tokenizes_a_sentencepiece_model_as_sentencepiece(tmp_path):
  sp = spm_model(tmp_path / "spm")
  build_hf("llama", vocab_size=320, **OVERRIDES["llama"]).save_pretrained(tmp_path / "m")
  out = str(tmp_path / "spm.gguf")
  gguf_export.write_merged(str(tmp_path / "m"), None, out, "f16", tokenizer=str(tmp_path / "spm"))
  r = gguf.GGUFReader(out)
  assert r.fields["tokenizer.ggml.model"].contents() == "llama"
  assert r.fields["tokenizer.ggml.scores"].contents()[:sp.vocab_size()] == pytest.approx(
      [sp.GetScore(i) for i in range(sp.vocab_size())])
  llm = _llama(out, vocab_only=True)
  for text in TEXTS[:3] + ["café naïve \u2603 \U0001F600"]:  # the last two by byte fallback
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == sp.encode(text), text
  assert llm.tokenize(b"hi", add_bos=True)[0] == 1


@needs_llama_cpp
def test_llama_cpp_decodes_the_export_from_safetensors_as_ftjax(tmp_path):
  """Llama with llama3 rope (rope_freqs) and a BOS-adding Llama 3 tokenizer, merged with an
  adapter: llama.cpp's logits and greedy tokens are ftjax's."""
  _, tok, base = hf_dir(tmp_path, "llama", "llama-bpe", adds_bos=True)
  model = ftjax.load_hf(base, "float32")
  adapters = random_adapters(model.spec)
  out = str(tmp_path / "m.gguf")
  gguf_export.write_merged(base, adapters, out, "f32")
  llm = _llama(out, logits_all=True)
  prompt = llm.tokenize(b"hello world, how are you?", add_bos=True, special=True)
  assert prompt == tok("hello world, how are you?")["input_ids"] and prompt[0] == 0
  llm.eval(prompt)
  theirs = np.asarray(llm.scores[:len(prompt)])
  ours = np.asarray(model_lib.forward(model, np.array([prompt]), adapters))[0]
  assert _rel(theirs, ours) < 1e-4
  llm.reset()
  greedy = [int(t) for _, t in zip(range(8), llm.generate(prompt, temp=0.0, top_k=1,
                                                           repeat_penalty=1.0, reset=True))]
  want = [int(t) for t in sampling.generate_rows(model, [prompt], adapters, max_new_tokens=8)[0]]
  stop = want.index(3) + 1 if 3 in want else len(want)  # ftjax stops at eos, llama.cpp goes on
  assert greedy[:stop] == want[:stop] and stop >= 3
  # ...and the base + LoRA GGUF pair, as --format=gguf_lora writes it from this base.
  pair = str(tmp_path / "base.gguf"), str(tmp_path / "adapter.gguf")
  gguf_export.write_merged(base, None, pair[0], "f32")
  gguf_export.write_lora(adapters, model.spec, pair[1])
  llm = _llama(pair[0], lora_path=pair[1], logits_all=True)
  llm.eval(prompt)
  assert _rel(np.asarray(llm.scores[:len(prompt)]), ours) < 1e-4


def test_chat_workdir_on_a_safetensors_base_exports_both_formats(tmp_path):
  """export's gguf/gguf_lora for a chat fine-tune of a safetensors base with its own
  tokenizer.path: the end of turn as llama.cpp's eot and Ollama's stop, the base GGUF once."""
  _, tok, base = hf_dir(tmp_path, "qwen2", "gpt-2")
  tok_dir = tmp_path / "tok"
  tok.save_pretrained(tok_dir)
  cfg = {"model": {"path": base}, "tokenizer": {"path": str(tok_dir)},
         "data": {"format": "messages"}}
  each = {"chat": random_adapters(hf_io.read_spec(base))}
  gguf_export.export(cfg, each, str(tmp_path / "m"), "gguf", "f16")
  r = gguf.GGUFReader(tmp_path / "m" / "chat" / "model-f16.gguf")
  assert r.fields["tokenizer.ggml.eot_token_id"].contents() == 3
  assert r.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
  assert (tmp_path / "m" / "chat" / "Modelfile").read_text().splitlines() == [
      "FROM ./model-f16.gguf", 'PARAMETER stop "<|im_end|>"']
  gguf_export.export(cfg, each, str(tmp_path / "l"), "gguf_lora", "f16")
  assert (tmp_path / "l" / "qwen2-gpt-2-f16.gguf").is_file()
  assert (tmp_path / "l" / "chat" / "Modelfile").read_text().splitlines()[:2] == [
      "FROM ../qwen2-gpt-2-f16.gguf", "ADAPTER ./adapter.gguf"]


@needs_llama_cpp
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2",
                                  "gemma3_text"])
def test_llama_cpp_runs_each_architecture_exported_from_safetensors(arch, tmp_path):
  """Every architecture ftjax writes, from a safetensors base with a sentencepiece tokenizer:
  llama.cpp's logits are the source model's. Gemma's tolerance is llama.cpp's: its CPU GELU rounds
  its input to float16 and reads a table (GGML_GELU_FP16 in ggml-cpu's vec.h)."""
  overrides = {} if arch == "llama" else OVERRIDES[arch]  # llama with its llama3 rope
  hf = build_hf(arch, vocab_size=320, **overrides)
  hf.save_pretrained(tmp_path / arch)
  spm_model(tmp_path / arch)
  out = str(tmp_path / f"{arch}.gguf")
  gguf_export.write_merged(str(tmp_path / arch), None, out, "f32")
  llm = _llama(out, logits_all=True)
  llm.eval(TOKENS[0].tolist())
  with torch.no_grad():
    want = hf(torch.tensor(TOKENS)).logits[0].numpy()
  assert _rel(np.asarray(llm.scores[:TOKENS.shape[1]]), want) < (
      3e-3 if arch.startswith("gemma") else 1e-4)
