"""The defaults every recipe in configs/ starts from; each key is read in exactly one place.

A recipe's `get_config()` calls `defaults()` and overrides what it needs. The train entry point
locks the result, so a mistyped `--config.x=...` is an error instead of a silently ignored key.
"""
import ml_collections


def defaults() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.workdir = ""  # checkpoints, metrics.jsonl, TensorBoard events, config.json
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.path = ""  # a Hugging Face model directory (config.json + *.safetensors)
  c.model.dtype = "bfloat16"  # storage and compute dtype of the frozen base
  # Keep the input embedding table in host RAM and send each batch's rows with it (untied output
  # heads only): vocab x dim less on the device, e.g. 1 GiB for Llama 3 8B.
  c.model.embed_on_host = False

  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.path = ""  # defaults to model.path; a dir with tokenizer.json, or a sentencepiece .model

  c.quant = ml_collections.ConfigDict()
  c.quant.mode = "none"  # none | int8 | int4 | nf4 (QLoRA)
  c.quant.group_size = 128  # int4 group along the input dim (nf4 always uses 64, as bitsandbytes)
  # The dequantize-matmul: "xla" (dequantize, then XLA's dot) or "pallas" (fused Pallas kernels:
  # Triton on GPU, Mosaic on TPU; XLA elsewhere). XLA stays the default until timed on hardware.
  c.quant.kernel = "xla"

  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 16
  c.lora.alpha = 32.0
  c.lora.dropout = 0.0
  c.lora.targets = "all-linear"  # or "q_proj,v_proj,..."
  c.lora.rslora = False  # scale alpha / sqrt(rank) instead of alpha / rank
  c.lora.init_from = ""  # a PEFT adapter dir or an ftjax workdir to start from

  c.data = ml_collections.ConfigDict()
  c.data.train = ""  # .jsonl / .json / .parquet / .arrow, a saved dataset dir, or a hub name
  c.data.eval = ""
  c.data.format = "prompt_completion"  # text | prompt_completion | messages
  c.data.seq_len = 1024
  c.data.packing = True

  c.train = ml_collections.ConfigDict()
  c.train.steps = 1000
  c.train.batch_size = 8  # global, in sequences, per optimizer step
  c.train.grad_accum = 1  # micro-batches per step (batch_size must divide by it)
  c.train.eval_every = 200  # 0: only at the end
  c.train.log_every = 10
  # Recompute in the backward pass. "auto": the planner's cheapest policy that fits the device
  # (ftjax/plan.py; on CPU, the host's available RAM); or one of none | save_proj (keep the
  # projections' and attention's outputs) | dots | full | offload (full, layer inputs in host RAM).
  c.train.remat = "auto"
  c.train.skip_nonfinite = False  # skip and count non-finite steps instead of stopping
  c.train.eval_generate = 0  # greedy-decode this many eval prompts before and after: exact match

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 2e-4
  c.optim.warmup_steps = 50
  c.optim.schedule = "cosine"  # cosine | linear | constant (after warmup)
  c.optim.weight_decay = 0.0
  c.optim.clip_norm = 1.0  # 0: no clipping

  c.ckpt = ml_collections.ConfigDict()
  c.ckpt.every = 100
  c.ckpt.keep = 3

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1  # -1: all devices not used by the other axes
  c.mesh.fsdp = -1
  c.mesh.tensor = 1
  return c
