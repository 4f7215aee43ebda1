"""The defaults every recipe in configs/ starts from; each key is read in exactly one place.

A recipe's `get_config()` calls `defaults()` and overrides what it needs. The train entry point
locks the result, so a mistyped `--config.x=...` is an error instead of a silently ignored key.
"""
import math

import ml_collections

from ftjax.errors import UserError


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
  # Attention implementation (ftjax/attention.py): "auto" (splash on TPU; cuDNN on GPU for unpacked
  # bf16/fp16 rows it can express, else xla), "xla" (the reference), "splash" (TPU), "cudnn" (GPU,
  # data.packing=False only), "triton" (GPU, Pallas-Triton: packed rows; no window or soft-cap).
  c.model.attention = "auto"

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
  # ... or named sources, one adapter each, trained in one run: "json=a.jsonl,tone=b.jsonl"
  # (each adapter gets train.batch_size rows of its source per step)
  c.data.eval = ""  # one file (for every adapter), or the same names as data.train
  # text | prompt_completion | messages | preference (prompt/chosen/rejected pairs: ftjax/pairs.py)
  c.data.format = "prompt_completion"
  c.data.seq_len = 1024
  c.data.packing = True
  # Data checks at the start of training (python -m ftjax.check_data shows the rows): "auto" counts
  # duplicates, conflicts, leaks, empty targets, format and template problems, and near-duplicates
  # below 200k rows; "full": near-duplicates at any size; "strict": as auto, and conflicts, leaks
  # or empty targets stop the run before the base loads; "off".
  c.data.check = "auto"

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
  # sft (next-token loss on the targets) | dpo | orpo | simpo (data.format=preference; the losses
  # are ftjax/objectives.py's, TRL's formulas and metric names: rewards/margins, ...)
  c.train.objective = "sft"

  # Preference objectives only (ftjax/objectives.py); a changed key with train.objective=sft is an
  # error. DPO's reference is the model at step 0: the base, or lora.init_from's adapter.
  c.preference = ml_collections.ConfigDict()
  c.preference.beta = 0.1  # DPO's beta, ORPO's lambda, SimPO's beta
  c.preference.loss = "sigmoid"  # DPO: sigmoid (the DPO paper) | ipo (per-token-mean log ratios)
  c.preference.label_smoothing = 0.0  # conservative DPO (sigmoid) and SimPO: the flip rate
  c.preference.simpo_gamma = 0.5  # SimPO's target reward margin

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
  # Axis sizes: a number, -1 (all devices the other axes leave) or "auto": data parallel when the
  # planner says the base and one replica's step fit one device, else FSDP within each host
  # (plan.choose_mesh; the run's log line says which and why).
  auto = lambda: ml_collections.FieldReference("auto", field_type=object)  # int or "auto"
  c.mesh.data = auto()
  c.mesh.fsdp = auto()
  c.mesh.tensor = auto()
  # The device memory, in GiB, that "auto" plans against; 0: what the device reports (a CPU
  # reports none, and gets data parallelism). Set it to plan for a smaller card, or in tests.
  c.mesh.device_gib = 0.0
  return c


# ------------------------------------------------------------------------------------------------
# The range of every numeric key, checked before anything loads (prepare.check_config). Each row:
# (key, the test a value must pass, what the key needs: the message's fix). mesh.data/fsdp/tensor
# take "auto" as well and are checked where the mesh is chosen (plan.choose_mesh).

def _finite(lo, hi=math.inf, lo_open=False, hi_open=False):
  def ok(x):
    x = float(x)
    return (math.isfinite(x) and (x > lo if lo_open else x >= lo)
            and (x < hi if hi_open else x <= hi))
  return ok


_COUNT = lambda lo: lambda x: int(x) == x and x >= lo
RANGES = (
    ("seed", lambda x: 0 <= x < 2**32, "an integer from 0 to 2**32-1"),
    ("quant.group_size", _COUNT(1), "a positive integer, e.g. 64 or 128"),
    ("lora.rank", _COUNT(1), "a positive integer, e.g. 8 or 16"),
    ("lora.alpha", _finite(0, lo_open=True), "a finite number > 0, e.g. 2 * lora.rank"),
    ("lora.dropout", _finite(0, 1, hi_open=True),
     "a probability in [0, 1), e.g. 0.05 for 5%"),
    ("data.seq_len", _COUNT(2), "an integer >= 2 (tokens per row), e.g. 1024"),
    ("train.steps", _COUNT(1),
     "a positive number of optimizer steps (there are no epochs: one epoch is about "
     "rows / train.batch_size steps)"),
    ("train.batch_size", _COUNT(1), "a positive integer (sequences per optimizer step)"),
    ("train.grad_accum", _COUNT(1), "a positive integer (micro-batches per step)"),
    ("train.eval_every", _COUNT(0), "an integer >= 0 (0: evaluate only at the end)"),
    ("train.log_every", _COUNT(1), "a positive integer"),
    ("train.eval_generate", _COUNT(0), "an integer >= 0 (0: no exact match)"),
    ("optim.lr", _finite(0), "a finite number >= 0, e.g. 2e-4 (0: the adapters stay as they are)"),
    ("optim.warmup_steps", _COUNT(0), "an integer >= 0"),
    ("optim.weight_decay", _finite(0), "a finite number >= 0, e.g. 0.0 or 0.01"),
    ("optim.clip_norm", _finite(0), "a finite number >= 0 (0: no clipping), e.g. 1.0"),
    ("ckpt.every", _COUNT(1), "a positive integer"),
    ("ckpt.keep", _COUNT(0), "an integer >= 0 (0: keep every checkpoint)"),
    ("mesh.device_gib", _finite(0), "a finite number >= 0 (0: what the device reports)"),
    ("preference.beta", _finite(0, lo_open=True), "a finite number > 0, e.g. 0.1"),
    ("preference.label_smoothing", _finite(0, 0.5, hi_open=True),
     "a probability in [0, 0.5), e.g. 0.1 (0: plain DPO)"),
    ("preference.simpo_gamma", _finite(-math.inf), "a finite number, e.g. 0.5"),
)


def check_ranges(cfg):
  """Raises UserError naming the first numeric key out of its range, and what it needs."""
  for key, ok, need in RANGES:
    node = cfg
    for part in key.split("."):
      node = node[part]
    if isinstance(node, bool) or not ok(node):
      raise UserError(f"{key}={node!r}: must be {need}")
