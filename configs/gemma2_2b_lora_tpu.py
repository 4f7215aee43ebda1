"""LoRA on Gemma 2 2B on a TPU v5e-8 (one host, 8 chips), data-parallel x FSDP.

  huggingface-cli download google/gemma-2-2b-it --local-dir checkpoints/gemma2-2b
  python -m ftjax.train --config=configs/gemma2_2b_lora_tpu.py --config.data.train=train.jsonl

Gemma 2's attention soft-capping, alternating sliding-window layers and sandwich norms are handled
by the model; the 2.6B bf16 base is sharded over fsdp=8 (~0.7 GiB a chip). The global batch of 32
packed 2048-token rows is split over the 8 chips. On a multi-host slice, run the same command on
every worker (launch/tpu_vm.sh). Rerunning resumes from runs/gemma2_2b_lora/checkpoints; a
preempted VM's SIGTERM saves the current step first.
"""
from ftjax.config import defaults


def get_config():
  c = defaults()
  c.workdir = "runs/gemma2_2b_lora"
  c.model.path = "checkpoints/gemma2-2b"
  c.model.dtype = "bfloat16"
  c.data.format = "prompt_completion"
  c.data.seq_len = 2048
  c.lora.rank = 16
  c.lora.alpha = 16.0
  c.train.steps = 2000
  c.train.batch_size = 32
  c.train.remat = "auto"  # the cheapest recompute that fits the device (ftjax.plan)
  c.optim.lr = 1e-4
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1
  return c
