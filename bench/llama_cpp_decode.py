"""llama.cpp (llama-cpp-python) decodes ftjax's GGUF exports as ftjax does: greedy tokens compared.

  pip install llama-cpp-python   # builds llama.cpp from source (measured: over 40 min on 2 busy cores)
  python bench/llama_cpp_decode.py --workdir=runs/smollm2_json [--prompts=20] [--max_new_tokens=32]

Writes the workdir's first adapter as --format=gguf in f32, f16 and q8_0 and as --format=gguf_lora
(with an f32 base) under --out, decodes the first --prompts eval conversations greedily with ftjax
(the float32 base plus the adapter) and with llama.cpp from each file, and prints per export: the
prompts whose tokens are identical up to the end of turn, and the share of tokens before the
first difference. f32 and the LoRA pair should be identical (float32 on both sides, summation
orders aside); f16 and q8_0 round the weights, so a reply may part ways at a near tie.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import llama_cpp  # noqa: E402

from ftjax import data, export, gguf_export, sampling  # noqa: E402
from ftjax.generate import load_sources  # noqa: E402  (ftjax.generate is also the function)


def until_stop(ids, stops):
  for i, t in enumerate(ids):
    if t in stops:
      return ids[:i + 1]
  return ids


def llama_cpp_greedy(prompts, n, stops, **kw):
  llm = llama_cpp.Llama(n_ctx=512, n_threads=os.cpu_count(), verbose=False, **kw)
  out = []
  for prompt in prompts:
    llm.reset()
    ids = []
    for tok in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
      ids.append(int(tok))
      if len(ids) == n or tok in stops:
        break
    out.append(ids)
  return out


def agreement(got, want):
  same = sum(g == w for g, w in zip(got, want))
  prefix = [next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), min(len(g), len(w)))
            / max(len(w), 1) for g, w in zip(got, want)]
  return same, sum(prefix) / len(prefix)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--workdir", default="runs/smollm2_json")
  p.add_argument("--out", default="exports/llama_cpp_bench")
  p.add_argument("--prompts", type=int, default=20)
  p.add_argument("--max_new_tokens", type=int, default=32)
  a = p.parse_args()
  src = load_sources(workdir=a.workdir)
  cfg, each, step = export.read_workdir(a.workdir)
  name, adapters = next(iter(each.items()))
  with open(cfg["data"]["eval"]) as f:
    rows = [json.loads(line) for line in f][:a.prompts]
  prompts = [data.chat_prompt_ids(src.tokenizer, r["messages"][:-1]) for r in rows]
  stops = set(src.model.spec.eos_ids) | set(src.stop_ids)
  want = sampling.generate_rows(src.model, prompts, src.adapters,
                                [0] * len(prompts) if src.adapters.stacked else None,
                                max_new_tokens=a.max_new_tokens, stop_ids=src.stop_ids)
  want = [until_stop([int(t) for t in w], stops) for w in want]
  results = {}
  for t in ("f32", "f16", "q8_0"):
    gguf_export.export(cfg, {name: adapters}, os.path.join(a.out, t), "gguf", t)
    got = llama_cpp_greedy(prompts, a.max_new_tokens, stops,
                           model_path=os.path.join(a.out, t, name, f"model-{t}.gguf"))
    results[f"merged {t}"] = agreement([until_stop(g, stops) for g in got], want)
  gguf_export.export(cfg, {name: adapters}, os.path.join(a.out, "lora"), "gguf_lora", "f32")
  base = [f for f in os.listdir(os.path.join(a.out, "lora"))
          if f.endswith(".gguf") and f != "adapter.gguf"][0]
  got = llama_cpp_greedy(prompts, a.max_new_tokens, stops,
                         model_path=os.path.join(a.out, "lora", base),
                         lora_path=os.path.join(a.out, "lora", name, "adapter.gguf"))
  results["base f32 + lora"] = agreement([until_stop(g, stops) for g in got], want)
  print(f"{a.workdir} (step {step}), {len(prompts)} eval prompts, up to {a.max_new_tokens} tokens")
  print(f"{'export':<18}{'identical':>10}{'tokens before a difference':>28}")
  for k, (same, share) in results.items():
    print(f"{k:<18}{same:>6}/{len(prompts):<3}{share:>27.1%}")


if __name__ == "__main__":
  main()
