"""QLoRA on Llama-3-8B: NF4 base (double-quantized, as bitsandbytes), rank-16 LoRA on every linear.

  python -m ftjax.train --config=configs/llama3_8b_qlora.py --config.data.train=my.jsonl

model.path is a local Hugging Face checkpoint directory: put config.json, tokenizer.json and the
*.safetensors of meta-llama/Meta-Llama-3-8B (or -Instruct) in checkpoints/Meta-Llama-3-8B, e.g.
`huggingface-cli download meta-llama/Meta-Llama-3-8B --local-dir checkpoints/Meta-Llama-3-8B
--exclude "original/*"`. Weights are quantized while streaming in; the host never holds the model.

Memory before downloading anything (config.json alone is enough):

  python configs/llama3_8b_qlora.py /tmp/llama3_8b       # writes only config.json there
  python -m ftjax.plan --config=configs/llama3_8b_qlora.py --config.model.path=/tmp/llama3_8b

What to expect: add --target=tpu-v5e to ask libtpu's TPU compiler (no TPU needed): 5.85 GiB on one
v5e chip (base 4.33, adapters and AdamW 0.47, plus 0.5 GiB of layer inputs in host RAM), 5.89 GiB
with --config.quant.kernel=pallas; 4.27e10 FLOPs per token (full recompute; 3.19e10 without).
--target=h200 asks XLA:GPU's compiler for an H200 (no GPU needed: pip install -e '.[gpu-plan]' in
a Python 3.12 env): 5.82 GiB (temporaries 1.01; the same 0.5 GiB of layer inputs in pinned host
memory), of the 104.25 GiB JAX's allocator takes of the card. Without --target the local compiler
answers; on a CPU host that is 8.65 GiB (XLA:CPU keeps float32 copies of bf16 operands). Throughput and measured peak memory on a GPU come from
`python bench/gpu.py`; see bench/RESULTS.md.
"""
import json
import os
import sys

from ftjax.config import defaults

# The architecture of Meta-Llama-3-8B's config.json: all the planner and the benchmarks need.
HF_CONFIG = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=4096,
    intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0, hidden_act="silu",
    tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001, torch_dtype="bfloat16")


def write_config_json(path: str, **overrides) -> str:
  """Writes HF_CONFIG (with overrides) as path/config.json; returns path."""
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({**HF_CONFIG, **overrides}, f, indent=2)
  return path


def get_config():
  c = defaults()
  c.workdir = "runs/llama3_8b_qlora"
  c.model.path = "checkpoints/Meta-Llama-3-8B"
  c.model.dtype = "bfloat16"
  c.model.embed_on_host = True  # the 1 GiB input table stays in host RAM; batches carry rows
  c.quant.mode = "nf4"
  c.lora.rank = 16
  c.lora.alpha = 16.0
  c.lora.targets = "all-linear"
  c.data.format = "prompt_completion"
  c.data.seq_len = 2048
  c.data.packing = True
  c.train.batch_size = 1
  c.train.grad_accum = 1
  # Fixed, not "auto": the target is 6 GiB, not the device's size. Each layer is recomputed; its
  # input waits in host RAM (0.5 GiB).
  c.train.remat = "offload"
  c.train.steps = 1000
  c.train.eval_every = 200
  c.optim.lr = 2e-4
  c.optim.warmup_steps = 50
  c.mesh.fsdp = -1
  return c


if __name__ == "__main__":
  write_config_json(sys.argv[1] if len(sys.argv) > 1 else "/tmp/llama3_8b")
