"""LoRA on Llama 3.1 8B Instruct, bf16, on one GPU (an H200; an 80 GB card recomputes: remat auto).

  huggingface-cli download meta-llama/Llama-3.1-8B-Instruct --local-dir checkpoints/llama3.1-8b
  python -m ftjax.train --config=configs/llama3_8b_lora.py --config.data.train=my_train.jsonl \
      --config.data.eval=my_eval.jsonl

Data: JSONL rows {"prompt": ..., "completion": ...}; the loss is on completions (and their eos) only.
Expect: the bf16 base (14.96 GiB) plus rank-16 all-linear adapters and their Adam state (0.47 GiB).
The whole step, compiled for an H200 by XLA:GPU without one (`pip install -e '.[gpu-plan]'` in a
Python 3.12 env; `python configs/llama3_8b_qlora.py /tmp/llama3_8b` writes the config.json):

  python -m ftjax.plan --config=configs/llama3_8b_lora.py --config.model.path=/tmp/llama3_8b \
      --target=h200

plans remat `none` (auto's choice) at 77.93 GiB of the 104.25 GiB JAX's allocator takes of the card
(0.75 of 139 GiB), 3.19e10 FLOPs per token; packed rows run the XLA attention path (cuDNN takes no
segment ids). With --config.model.attention=triton (Pallas-Triton, packed rows): 81.65 GiB; with
--config.data.packing=False (cuDNN's flash attention, one document per row): 78.63 GiB. Which of
them is fastest only a real card says (`python bench/gpu.py`; bench/RESULTS.md, "GPU plans").
At --config.data.seq_len=4096 auto recomputes (save_proj: 67.65 GiB, cuDNN 64.94, Triton 64.68);
on an H100 (--target=h100: 59.36 GiB for JAX) it takes save_proj already at seq 2048 (41.73 GiB).
Metrics go to runs/llama3_8b_lora/metrics.jsonl and TensorBoard; rerunning resumes. Afterwards:
  python -m ftjax.export --workdir=runs/llama3_8b_lora --format=peft --out=adapters/llama3_8b
"""
from ftjax.config import defaults


def get_config():
  c = defaults()
  c.workdir = "runs/llama3_8b_lora"
  c.model.path = "checkpoints/llama3.1-8b"
  c.model.dtype = "bfloat16"
  c.data.format = "prompt_completion"
  c.data.seq_len = 2048
  c.data.packing = True
  c.lora.rank = 16
  c.lora.alpha = 32.0
  c.lora.targets = "all-linear"
  c.train.steps = 1000
  c.train.batch_size = 8
  c.train.grad_accum = 2
  c.train.remat = "auto"  # the cheapest recompute that fits the device (ftjax.plan)
  c.train.eval_every = 200
  c.optim.lr = 2e-4
  c.optim.warmup_steps = 50
  c.ckpt.every = 200
  return c
