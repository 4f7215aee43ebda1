"""QLoRA on Qwen3-30B-A3B (a mixture of 128 experts, 8 per token): NF4 base, rank-4 LoRA on every
linear, the experts included (one low-rank pair per expert), on one accelerator.

  python -m ftjax.train --config=configs/qwen3_30b_a3b_qlora.py --config.data.train=my.jsonl

model.path is a local Hugging Face checkpoint directory: config.json, tokenizer.json and the
*.safetensors of Qwen/Qwen3-30B-A3B in checkpoints/Qwen3-30B-A3B (`huggingface-cli download
Qwen/Qwen3-30B-A3B --local-dir checkpoints/Qwen3-30B-A3B`). The per-expert tensors are stacked
[E, in, out] per layer and quantized while streaming in; the host never holds the model.

Memory before downloading anything (config.json alone is enough):

  python configs/qwen3_30b_a3b_qlora.py /tmp/qwen3_30b_a3b     # writes only config.json there
  python -m ftjax.plan --config=configs/qwen3_30b_a3b_qlora.py \\
      --config.model.path=/tmp/qwen3_30b_a3b --target=tpu-v6e

What to expect (2026-12-04, seq 2048, batch 1, remat full; bench/RESULTS.md): --target=tpu-v6e
plans 20.90 GiB: the NF4 base 14.97 GiB, adapters + AdamW 1.80 GiB, temporaries 4.13 GiB. Why
rank 4: every expert gets its own pair (128 experts x 48 layers), so the adapters grow fast with
the rank: rank 8 plans 24.19 GiB (adapters + AdamW 3.59, temporaries 5.62) and rank 16 29.63 GiB
(7.18 and 7.47: the float32 gradients and the compiler's bf16 copy of the factors come on top of
the optimizer state). Attention-only LoRA (lora.targets="q_proj,k_proj,v_proj,o_proj") is smaller
still but leaves the experts untouched. --target=tpu-v5e (16 GiB) cannot hold the base with
anything else (the compiler gives up, 36.4 GiB asked). --target=h200 (or h100) plans 18.75 GiB
(temporaries 1.98 GiB; run ftjax.plan from a Python env with jax[cuda12], the `gpu-plan` extra):
on Hopper GPUs the experts run as JAX's Mosaic GPU grouped-matmul kernels
(ftjax/kernels/grouped_gpu.py), where XLA:GPU's own ragged_dot (jax 0.11.2; still what an A100
gets) expands to a zero-padded product over all 128 experts, ~8 GiB per layer, 49.34 GiB in all.
The kernels' values are checked in Mosaic GPU's interpret mode only; bench/gpu.py's `grouped`
case checks them on a card (not yet run). FLOPs per token: 1.97e10 (full recompute), the ~3.3B
active parameters (top-8 of 128 experts), not the 30B.
"""
import json
import os
import sys

from ftjax.config import defaults

# The architecture of Qwen/Qwen3-30B-A3B's config.json: all the planner needs.
HF_CONFIG = dict(
    architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=151936,
    hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
    num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
    num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
    max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0, hidden_act="silu",
    tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645, torch_dtype="bfloat16")


def write_config_json(path: str, **overrides) -> str:
  """Writes HF_CONFIG (with overrides) as path/config.json; returns path."""
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({**HF_CONFIG, **overrides}, f, indent=2)
  return path


def get_config():
  c = defaults()
  c.workdir = "runs/qwen3_30b_a3b_qlora"
  c.model.path = "checkpoints/Qwen3-30B-A3B"
  c.model.dtype = "bfloat16"
  c.model.embed_on_host = True  # the 0.6 GiB input table stays in host RAM; batches carry rows
  c.quant.mode = "nf4"
  c.lora.rank = 4  # one pair per expert: rank 8 plans 24.2 GiB, rank 16 29.6 (see above)
  c.lora.alpha = 8.0
  c.lora.targets = "all-linear"  # attention and every expert (the router stays frozen)
  c.data.format = "prompt_completion"
  c.data.seq_len = 2048
  c.data.packing = True
  c.train.batch_size = 1
  c.train.grad_accum = 1
  c.train.remat = "full"  # each layer recomputed: the routed [N * 8, ...] activations are large
  c.train.steps = 1000
  c.train.eval_every = 200
  c.optim.lr = 2e-4
  c.optim.warmup_steps = 50
  c.mesh.fsdp = -1
  return c


if __name__ == "__main__":
  write_config_json(sys.argv[1] if len(sys.argv) > 1 else "/tmp/qwen3_30b_a3b")
