"""Everything GPU-specific, measured in one run on one GPU (written for an H200; a few minutes).

  python bench/gpu.py --target=h200    # no GPU: every case's step compiled for an H200 first
  python bench/gpu.py                  # all cases; appends the tables to bench/RESULTS.md
  python bench/gpu.py --only=8b-nf4,peft-8b,kernels --budget_s=300
  python bench/gpu.py --smoke          # no GPU: tiny shapes on CPU, checks that the script runs

--target=h200 (or h100, a100; in a Python 3.12 env with pip install -e '.[gpu-plan]') needs no GPU:
XLA:GPU compiles each ftjax case's train step for the card as `ftjax.plan --target` does (same
shapes, kernels and remat) and the kernels case's Pallas-Triton matmuls, and reports each plan's
peak against the card and the kernels the step holds. A case that fails there would fail on the
card; run it before a card is lent, so the card's minutes go to timing. Only a real card shows:
whether cuDNN accepts each attention graph it is given and the workspace it takes (decided when
the program loads), speed (tokens/s, MFU, kernel timings, the idle time per step), the allocator's
real peak (`peak_bytes_in_use`), load times, and everything about the PEFT peer (PyTorch).

Models are Llama-3-shaped (1B: D 2048, 16 layers; 8B: D 4096, 32 layers; 128k vocab) with RANDOM
weights built straight on the device (no files; throughput and memory do not depend on values),
quantized projections as random codes in ftjax's packed layout. Each case runs in its own process,
so each peak is its own (`peak_bytes_in_use` only ever grows) and JAX and PyTorch never share the
card. Cases:

  {1b,8b}-{bf16,nf4,int4}  ftjax LoRA (bf16 base) / QLoRA (nf4, int4 base): rank 16 on all 7
                           projections, AdamW, remat full, seq 2048, full (packed) rows
  8b-recipe                8b-nf4 with configs/llama3_8b_qlora.py's memory switches: the input
                           embedding on the host (batches carry its rows), remat "offload"
  1b-multi4                1b-bf16 training 4 adapters in one step (stacked, each its own --batch
                           rows, optimizer state and clipping): against 1b-bf16, what one run of 4
                           adapters gains over 4 runs one after another (the base batched once)
  peft-{1b,8b}             transformers + PEFT, bf16 base, sdpa attention, gradient checkpointing,
                           the same LoRA, fused AdamW: the peer, for the ratio
  kernels                  ftjax.kernels.matmul "triton" (Pallas) vs "xla" on the 8B projection
                           shapes, forward and the backward's dx, nf4 and int4, checked against XLA
  grouped                  ftjax.kernels.ragged_dot "mgpu" (JAX's Mosaic GPU kernels) vs XLA's
                           jax.lax.ragged_dot on Qwen3-30B-A3B's expert shapes (128 experts, 2048
                           tokens x top-8 routed at random): forward, dx and dw (LoRA factors on
                           experts, rank 4, padded to a block), values and times. NOT YET RUN on
                           a GPU: on CPU only Mosaic GPU's interpret mode has checked the values
  attn-{IMPL}-{LAYOUT}     the 8b-bf16 step with model.attention=IMPL (xla | cudnn | triton) on
                           LAYOUT rows: "packed" (documents of 64..1024 tokens at seq 2048,
                           segment ids) or "padded" (one document of seq/2..seq tokens per row,
                           then padding). tokens/s counts row positions, padding included, so
                           paths compare within a layout. cuDNN takes padded rows only.
  8b-load                  ftjax.load_hf of a random 8B-shaped bf16 checkpoint written to local
                           disk (--load_dir, kept for reruns): nf4 (QLoRA, quantized on the GPU)
                           and bf16 load seconds, the HBM peak of the nf4 load, and whether one
                           projection's GPU codes equal XLA:CPU's bit for bit

Reported: tokens/s, MFU, peak device memory (and what `ftjax.plan`'s compiler estimate said for
the same step), and the device idle time per step that reading each step's loss costs: the
per-step median with a read after every step, minus the time per step when steps are dispatched
back to back as ftjax.train's loop does. MFU counts what a LoRA step must compute per token, not 6N: the frozen base's
forward (2 x its matmul params, lm_head included, embedding lookup excluded) and activation
gradients (2x), 6 x adapter params, and causal attention (6 x layers x heads x head_dim x seq: QK^T
and PV forward, four products backward, half the square). Remat recomputation is not counted.
Peak: H200 bf16 dense 989 TFLOP/s. A case that fails (e.g. a kernel this jax cannot compile)
is reported with its error and the others still run. The training cases use model.attention
"auto" (cuDNN: their rows are one document each); --attention overrides it.
"""
import argparse
import dataclasses
import datetime
import functools
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PEAK_FLOPS = 989e12  # H200 SXM bf16 dense
RANK, ALPHA = 16, 16.0

_LLAMA3 = dict(model_type="llama", vocab_size=128256, num_attention_heads=32, num_key_value_heads=8,
               rms_norm_eps=1e-5, rope_theta=500000.0, hidden_act="silu",
               max_position_embeddings=8192, bos_token_id=128000, eos_token_id=128001)
MODELS = {
    "1b": dict(_LLAMA3, hidden_size=2048, num_hidden_layers=16, intermediate_size=8192,
               head_dim=64, tie_word_embeddings=True),
    "8b": dict(_LLAMA3, hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
               tie_word_embeddings=False),
    # --smoke: the same code on CPU in seconds
    "tiny": dict(_LLAMA3, vocab_size=512, hidden_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, intermediate_size=256,
                 tie_word_embeddings=False),
}
# In priority order: with --budget_s the tail is what gets skipped.
ATTENTION_CASES = ("attn-xla-packed", "attn-triton-packed", "attn-xla-padded", "attn-cudnn-padded",
                   "attn-triton-padded")
CASES = ("kernels", "grouped", "8b-nf4", "8b-recipe", "8b-bf16", "peft-8b", *ATTENTION_CASES,
         "8b-load", "1b-bf16", "1b-multi4", "peft-1b", "1b-nf4", "8b-int4", "1b-int4")
# the code paths, quickly (Pallas kernels in interpret mode)
SMOKE_CASES = ("kernels", "tiny-recipe", "tiny-load", "tiny-multi4", "peft-tiny", "attn-xla-padded",
               "attn-triton-packed")


# ----------------------------------------------------------------------------- shared helpers


def timed(fn, n):
  """Median seconds of n calls of fn (which must block until its work is done)."""
  times = []
  for _ in range(n):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def flops_per_token(cfg: dict, seq: int, adapter_params: int) -> float:
  """What a LoRA step computes per token (see the module docstring)."""
  d, f, l = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
  nh, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
  h = cfg.get("head_dim") or d // nh
  per_layer = d * nh * h * 2 + d * kv * h * 2 + 3 * d * f  # q, o; k, v; gate, up, down
  frozen = l * per_layer + d * cfg["vocab_size"]  # + the output projection
  attention = 6 * l * nh * h * seq
  return 4 * frozen + 6 * adapter_params + attention


# ----------------------------------------------------------------------------- ftjax cases


def random_params(abstract, seed: int):
  """Random on-device values for a tree of ShapeDtypeStructs and QArrays of them, built inside
  one jit (nothing on host). Scales are chosen so dequantized weights look like a trained
  model's (|w| up to ~0.08). Each leaf is generated a slice at a time (lax.map over its leading
  axis), so the float32 temporaries of a slice, not of the whole model, add to the device's peak
  memory, which this script reports."""
  import jax
  import jax.numpy as jnp
  from ftjax import quant

  def gen(sds, k, role):
    if role == "codes":  # packed 4-bit codes, int8 codes or nf4 absmax codes: any bits are valid
      if sds.dtype == jnp.int8:
        return jax.random.randint(k, sds.shape, -127, 128, jnp.int8)
      return jax.random.bits(k, sds.shape, jnp.uint8)
    if role == "scale":
      return jax.random.uniform(k, sds.shape, sds.dtype, 0.5, 1.0) * 0.08 / 7
    return (jax.random.normal(k, sds.shape, jnp.float32) * 0.02).astype(sds.dtype)

  def leaf(sds, k, role):
    if role == "norm":
      return jnp.ones(sds.shape, sds.dtype)
    shape = tuple(sds.shape)
    n = next((d for d in (32, 16, 8, 4, 2) if shape and shape[0] % d == 0), 1)
    if len(shape) < 2 or n == 1:
      return gen(sds, k, role)
    piece = jax.ShapeDtypeStruct((shape[0] // n,) + shape[1:], sds.dtype)
    out = jax.lax.map(lambda kk: gen(piece, kk, role), jax.random.split(k, n))
    return out.reshape(shape)

  def one(path, x, k):
    if isinstance(x, quant.QArray):
      ks = jax.random.split(k, 2)
      nf4 = x.kind == "nf4"
      return quant.QArray(
          leaf(x.q, ks[0], "codes"), leaf(x.scale, ks[1], "codes" if nf4 else "scale"),
          None if x.scale2 is None else jnp.full(x.scale2.shape, 0.02, jnp.float32),
          None if x.offset is None else jnp.full(x.offset.shape, 0.06, jnp.float32),
          x.kind, x.group_size, x.matrix_shape, x.dtype)
    name = "/".join(str(getattr(p, "key", p)) for p in path)
    return leaf(x, k, "norm" if "norm" in name else "weight")

  is_q = lambda x: isinstance(x, quant.QArray)

  @jax.jit
  def make(seed):
    # XLA's RngBitGenerator ("rbg"): compiles in a blink even for hundreds of leaves.
    key = jax.random.key(seed, impl="unsafe_rbg")
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract, is_leaf=is_q)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten([one(p, x, k) for (p, x), k in zip(leaves, keys)])

  return make(seed)


def segment_ids(layout, batch, seq, rng):
  """[batch, seq] segment ids: "full" rows of one document, "packed" documents of seq/32..seq/2
  tokens (the last one cut at seq), "padded" one document of seq/2..seq tokens then zeros."""
  import numpy as np
  seg = np.ones((batch, seq), np.int32)
  for row in seg:
    if layout == "packed":
      ends = np.cumsum(rng.integers(max(seq // 32, 1), seq // 2 + 1, seq))
      row[:] = 1 + np.searchsorted(ends, np.arange(seq), side="right")
    elif layout == "padded":
      row[rng.integers(seq // 2, seq + 1):] = 0
  return seg


def ftjax_case(model_name, mode, batch, seq, steps, warmup, backend, lean=False, k=1,
               attention="auto", layout="full", smoke=False):
  """One jitted train step timed; k > 1: k stacked adapters, each with its own `batch` rows."""
  import jax
  import numpy as np
  from ftjax import attention as attention_lib, hf_io, kernels, lora, optim, plan, quant
  from ftjax import step as step_lib
  from ftjax.config import defaults
  from ftjax.model import Kernels, Model

  cfg = MODELS[model_name]
  spec = hf_io.spec_from_config(cfg, model_name)
  qmode = None if mode == "bf16" else mode
  platform = jax.default_backend()
  step_kernels = Kernels(  # as step.kernels_for resolves them for ftjax.train
      attention=attention_lib.resolve(attention, "gpu" if smoke else platform, spec,
                                      packing=layout == "packed", dtype="bfloat16"),
      quant=kernels.platform_backend(backend, platform), interpret=smoke)
  if smoke and step_kernels.attention == "cudnn":  # no cuDNN on CPU: its XLA twin is tested
    step_kernels = dataclasses.replace(step_kernels, attention="xla")
  abstract = plan.abstract_model(spec, "bfloat16", qmode, defaults().quant.group_size,
                                 embed_on_host=lean)
  t0 = time.perf_counter()
  model = Model(spec, random_params(abstract.params, 0), step_kernels)
  adapters = lora.init(spec, "all-linear", RANK, ALPHA, jax.random.PRNGKey(1))
  if k > 1:
    adapters = lora.stack({f"adapter{i}": adapters for i in range(k)})
  cfg_optim = defaults().optim
  optimizer = optim.make_optimizer(cfg_optim, 1000)
  state = jax.jit(lambda a: step_lib.init_state(lora.with_params(adapters, a), optimizer, 0))(
      adapters.params)
  rng = np.random.default_rng(0)
  rows = batch * k
  tokens = rng.integers(0, spec.vocab, (rows, seq + 1)).astype(np.int32)
  host = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
          "loss_mask": np.ones((rows, seq), np.float32),
          "segment_ids": segment_ids(layout, rows, seq, rng)}
  if k > 1:
    host["adapter_ids"] = np.repeat(np.arange(k, dtype=np.int32), batch)
  data = jax.device_put(host)
  if lean:  # the rows the host looks up in its embedding table, as ftjax.train sends them
    data["embeds"] = jax.device_put((rng.normal(0, 0.02, (batch, seq, spec.dim))).astype(
        jax.numpy.bfloat16))
  # Committed to one device like every later state, so the compiled step accepts them all.
  model, state, data = jax.device_put((model, state, data), jax.local_devices()[0])
  jax.block_until_ready((model, state, data))
  build_s = time.perf_counter() - t0
  # The step exactly as ftjax.train jits it (state donated, remat full or offload).
  fn = jax.jit(functools.partial(step_lib.train_step, adapters=adapters, optimizer=optimizer,
                                 grad_accum=1, remat="offload" if lean else "full"),
               donate_argnums=0)
  t0 = time.perf_counter()
  compiled = fn.lower(state, model, data).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  predicted = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
               + mem.temp_size_in_bytes) if mem is not None else None
  box = {"state": state}

  def step():
    box["state"], metrics = compiled(box["state"], model, data)
    box["loss"] = float(metrics["loss"])

  for _ in range(warmup):
    step()
  step_s = timed(step, steps)  # each step read back (the loop before this round did that)
  if not np.isfinite(box["loss"]):
    raise RuntimeError(f"non-finite loss {box['loss']}")

  def dispatched():  # as ftjax.train's loop now runs: no read between steps, one wait at the end
    t = time.perf_counter()
    for _ in range(steps):
      box["state"], _ = compiled(box["state"], model, data)
    jax.block_until_ready(box["state"])
    return (time.perf_counter() - t) / steps
  async_s = dispatched()
  stats = jax.local_devices()[0].memory_stats() or {}
  # each token passes through one adapter's factors: 1/k of a stack's
  n_adapter = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(adapters.params)) // k
  tps = rows * seq / step_s
  return {"framework": "ftjax", "model": model_name,
          "mode": mode + (" (embed_on_host, remat offload)" if lean else "")
          + (f", {k} adapters x batch {batch}" if k > 1 else ""),
          "batch": batch, "seq": seq, "adapters": k,
          "step_s": step_s, "tokens_per_s": tps, "idle_per_step_s": step_s - async_s,
          "mfu": tps * flops_per_token(cfg, seq, n_adapter) / PEAK_FLOPS,
          "peak_bytes": stats.get("peak_bytes_in_use"), "predicted_bytes": predicted,
          "base_bytes": quant.nbytes(model.params), "compile_s": compile_s, "build_s": build_s,
          "loss": box["loss"], "backend": step_kernels.quant, "attention": step_kernels.attention,
          "layout": layout}


def kernels_case(smoke):
  """Pallas-Triton vs XLA dequant-matmuls on the 8B projection shapes (M = 2 x 2048 tokens)."""
  cfg = MODELS["8b"]
  d, f = cfg["hidden_size"], cfg["intermediate_size"]
  kvd = cfg["num_key_value_heads"] * d // cfg["num_attention_heads"]
  shapes = {"q_proj/o_proj": (d, d), "k_proj/v_proj": (d, kvd), "gate_proj/up_proj": (d, f),
            "down_proj": (f, d)}
  m, reps = 4096, 20
  if smoke:  # interpret mode on CPU: tiny, and only to see that it runs and agrees
    shapes, m, reps = {"tiny": (128, 64)}, 32, 1
  rows = []
  for kind in ("nf4", "int4"):
    for name, (k, n) in shapes.items():
      try:
        rows.append(_kernel_row(kind, name, k, n, m, reps, smoke))
      except Exception as e:  # an untested kernel failing on one shape keeps the other rows
        rows.append({"kind": kind, "proj": name, "shape": [k, n], "m": m,
                     "error": f"{type(e).__name__}: {str(e)[:300]}"})
  return {"framework": "kernels", "rows": rows}


def _kernel_row(kind, name, k, n, m, reps, smoke):
  """One projection shape: both backends, forward and backward dx, timed and compared."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from ftjax import kernels, quant
  from ftjax.kernels import triton

  w = random_params(quant.abstract((k, n), jnp.bfloat16, kind, 128), k + n)
  x = jax.random.normal(jax.random.PRNGKey(1), (m, k), jnp.bfloat16)
  g = jax.random.normal(jax.random.PRNGKey(2), (m, n), jnp.bfloat16)
  row = {"kind": kind, "proj": name, "shape": [k, n], "m": m, "flops": 2 * m * k * n,
         "triton_supported": bool(triton.supports(w))}
  out = {}
  for backend in ("xla", "triton"):
    for transpose, arg in ((False, x), (True, g)):
      fn = jax.jit(functools.partial(kernels.matmul, backend=backend, transpose=transpose,
                                     interpret=smoke))
      out[backend, transpose] = fn(arg, w).block_until_ready()
      row[f"{backend}_{'bwd' if transpose else 'fwd'}_ms"] = 1e3 * timed(
          lambda: fn(arg, w).block_until_ready(), reps)
  for transpose in (False, True):
    ref = np.asarray(out["xla", transpose], np.float32)
    got = np.asarray(out["triton", transpose], np.float32)
    row[f"rel_err_{'bwd' if transpose else 'fwd'}"] = float(
        np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))
  return row


def grouped_case(e=128, k=8, tokens=2048, d=2048, f=768, interpret=False):
  """Mosaic GPU vs XLA grouped matmuls on Qwen3-30B-A3B's experts (gate_up [E, D, 2F], down
  [E, F, D]; LoRA a [E, D, 4], b [E, 4, 2F]): each product's output and its grads in x and w,
  against XLA's ragged_dot with float32 accumulation (the reference), timed. Smaller shapes with
  interpret=True run it on CPU (Mosaic GPU's interpret mode, jax >= 0.11: not in --smoke)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from ftjax import kernels
  from ftjax.kernels import grouped_gpu

  experts = jax.random.randint(jax.random.PRNGKey(0), (tokens * k,), 0, e)
  sizes = jnp.bincount(experts, length=e).astype(jnp.int32)
  rows = []
  for name, (n_in, n_out) in {"gate_up_proj": (d, 2 * f), "down_proj": (f, d),
                              "lora a": (d, 4), "lora b": (4, 2 * f)}.items():
    ks = jax.random.split(jax.random.PRNGKey(n_in + n_out), 3)
    x = jax.random.normal(ks[0], (tokens * k, n_in), jnp.bfloat16)
    w = (jax.random.normal(ks[1], (e, n_in, n_out)) / np.sqrt(n_in)).astype(jnp.bfloat16)
    g = jax.random.normal(ks[2], (tokens * k, n_out), jnp.bfloat16)
    row = {"proj": name, "shape": [e, n_in, n_out], "m": tokens * k}
    if not grouped_gpu.supports(x, w):  # else kernels.ragged_dot would quietly run XLA's
      raise ValueError(f"{x.dtype} x {w.dtype}: not what the Mosaic GPU kernels take")
    try:
      out = {}
      for backend in ("xla", "mgpu"):
        dot = (lambda x, w: jax.lax.ragged_dot(x, w, sizes, preferred_element_type=jnp.float32)
               ) if backend == "xla" else functools.partial(
                   kernels.ragged_dot, group_sizes=sizes, backend="mgpu", interpret=interpret)

        def step(x, w, g, dot=dot):
          y, vjp = jax.vjp(dot, x, w)
          return (y,) + vjp(g.astype(y.dtype))

        fn = jax.jit(step)
        out[backend] = [np.asarray(a, np.float32) for a in fn(x, w, g)]
        fwd = jax.jit(dot)
        row[f"{backend}_fwd_ms"] = 1e3 * timed(lambda: fwd(x, w).block_until_ready(), 10)
        row[f"{backend}_step_ms"] = 1e3 * timed(
            lambda: jax.block_until_ready(fn(x, w, g)), 10)
      for part, ref, got in zip(("y", "dx", "dw"), out["xla"], out["mgpu"]):
        row[f"rel_err_{part}"] = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))
    except Exception as err:  # an untested kernel failing on one shape keeps the other rows
      row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
    rows.append(row)
  return {"framework": "grouped", "rows": rows}


def load_case(model_name, load_dir):
  """Load seconds of nf4 (first: the peak only grows) and bf16, and the device codes of one
  projection against XLA:CPU's (the same jitted quantizer; a GPU division or reduction that
  rounded differently would show here)."""
  import jax
  import numpy as np
  import ftjax
  from ftjax import hf_io, quant
  import ml_dtypes
  from load_memory import write_checkpoint  # bench/, this script's directory
  path = os.path.join(load_dir, f"ftjax_{model_name}")
  # Values tiled from one random block (loading does not depend on them): 16 GB in seconds.
  block = (np.random.default_rng(0).standard_normal(1 << 22, np.float32) * 0.02).astype(
      ml_dtypes.bfloat16)
  t0 = time.perf_counter()
  write_checkpoint(path, MODELS[model_name], lambda *shape: np.resize(block, shape), 8)
  write_s = time.perf_counter() - t0
  out = {"framework": "load", "model": model_name, "write_s": write_s,
         "file_bytes": sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path)
                           if n.endswith(".safetensors"))}
  for mode in ("nf4", "bf16"):
    t0 = time.perf_counter()
    model = ftjax.load_hf(path, "bfloat16", quant=None if mode == "bf16" else mode)
    jax.block_until_ready(model.params)
    out[f"{mode}_s"] = time.perf_counter() - t0
    if mode == "nf4":
      out["nf4_peak_bytes"] = (jax.local_devices()[0].memory_stats() or {}).get(
          "peak_bytes_in_use")
      out["nf4_params_bytes"] = quant.nbytes(model.params)
    del model
  name = "model.layers.0.mlp.gate_proj.weight"
  w = np.asarray(hf_io.open_checkpoint(path)[name].get(name)).T
  here = quant.quantize(jax.device_put(w), "nf4")
  cpu = quant.quantize(jax.device_put(w, jax.devices("cpu")[0]), "nf4")
  out["codes_differ"] = int(sum(np.sum(np.asarray(a) != np.asarray(b)) for a, b in
                                zip(jax.tree.leaves(here), jax.tree.leaves(cpu))))
  return out


# ----------------------------------------------------------------------------- the peer


def peft_case(model_name, batch, seq, steps, warmup):
  import peft
  import torch
  import transformers

  cuda = torch.cuda.is_available()
  device = "cuda" if cuda else "cpu"
  cfg = transformers.LlamaConfig(**{k: v for k, v in MODELS[model_name].items()
                                    if k != "model_type"})
  t0 = time.perf_counter()
  with torch.device(device):
    try:
      model = transformers.AutoModelForCausalLM.from_config(
          cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    except TypeError:  # transformers < 4.56 spells it torch_dtype
      model = transformers.AutoModelForCausalLM.from_config(
          cfg, torch_dtype=torch.bfloat16, attn_implementation="sdpa")
  model.config.use_cache = False
  model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
  model.enable_input_require_grads()
  model = peft.get_peft_model(model, peft.LoraConfig(
      r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear",
      task_type="CAUSAL_LM"))
  model.train()
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0, fused=cuda)
  gen = torch.Generator(device="cpu").manual_seed(0)
  ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen).to(device)
  build_s = time.perf_counter() - t0
  box = {}

  def step():
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    box["loss"] = float(loss.detach())  # synchronizes

  for _ in range(warmup):
    step()
  if cuda:
    torch.cuda.reset_peak_memory_stats()
  step_s = timed(step, steps)
  n_adapter = sum(p.numel() for p in params)
  tps = batch * seq / step_s
  return {"framework": "peft", "model": model_name, "mode": "bf16", "batch": batch, "seq": seq,
          "step_s": step_s, "tokens_per_s": tps,
          "mfu": tps * flops_per_token(MODELS[model_name], seq, n_adapter) / PEAK_FLOPS,
          "peak_bytes": torch.cuda.max_memory_allocated() if cuda else None,
          "build_s": build_s, "loss": box["loss"]}


# ----------------------------------------------------------------------------- --target: no GPU


def case_config(name, args, tmp):
  """The ftjax.config of training case `name`, as ftjax_case builds its step (None for cases that
  are not an ftjax train step: PEFT, loading, the kernels)."""
  from ftjax.config import defaults
  if name in ("kernels", "grouped") or name.endswith("-load") or name.startswith("peft-"):
    return None
  attention, layout = args.attention, "full"
  if name.startswith("attn-"):
    model, mode, (_, attention, layout) = "tiny" if args.smoke else "8b", "bf16", name.split("-")
  else:
    model, mode = name.split("-")
  lean = mode == "recipe"
  k = int(mode[len("multi"):]) if mode.startswith("multi") else 1
  path = os.path.join(tmp, model)
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(dict(MODELS[model], architectures=["LlamaForCausalLM"]), f)
  c = defaults()
  c.model.path, c.model.dtype, c.model.embed_on_host = path, "bfloat16", lean
  c.model.attention = attention
  c.quant.mode = "nf4" if lean else "none" if mode == "bf16" or k > 1 else mode
  c.quant.kernel = "xla" if args.backend == "xla" else "pallas"
  c.lora.rank, c.lora.alpha, c.lora.targets = RANK, ALPHA, "all-linear"
  c.data.seq_len, c.data.packing = 128 if args.smoke else args.seq, layout == "packed"
  c.train.batch_size, c.train.grad_accum = 1 if args.smoke else args.batch, 1
  c.train.remat = "offload" if lean else "full"
  if k > 1:
    c.data.train = ",".join(f"adapter{i}=a{i}.jsonl" for i in range(k))
  return c


def plan_cases(names, args) -> str:
  """--target: each case compiled for the card, no GPU needed; a markdown table."""
  from ftjax import plan as plan_lib
  lines = [f"Each case's step compiled for {args.target} by XLA:GPU (no GPU; `ftjax.plan "
           f"--target={args.target}`, capacity = JAX's allocator share of the card), batch "
           + ("1 x seq 128 (--smoke: tiny shapes)" if args.smoke else f"{args.batch} x seq {args.seq}")
           + ":", "",
           "| case | attention | quantized matmuls | remat | peak (GiB) | fits | Pallas-Triton "
           "kernels | cuDNN calls | compile (s) |", "|---|---|---|---|---|---|---|---|---|"]
  with tempfile.TemporaryDirectory() as tmp:
    for name in names:
      cfg = case_config(name, args, tmp)
      t = time.time()
      try:
        if name == "kernels":
          lines.append(f"| kernels | - | triton | - | - | - | {plan_kernels(args)} | - | "
                       f"{time.time() - t:.0f} |")
          continue
        if cfg is None:
          lines.append(f"| {name} | only on a real card | | | | | | | |")
          continue
        p = plan_lib.plan(cfg, args.target, say=lambda l: print(f"{name}: {l}", flush=True))
        hlo = p.hlo
        triton = sorted(set(re.findall(r'name = "(\w+)"', hlo)))
        cudnn = sorted({c.split("$")[1] for c in re.findall(r'"(__cudnn\$\w+)"', hlo)})
        from ftjax import hf_io, step as step_lib
        kernels = step_lib.kernels_for(cfg, "gpu", hf_io.read_spec(cfg.model.path))
        lines.append(f"| {name} | {kernels.attention} | {kernels.quant if cfg.quant.mode != 'none' else '-'} | "
                     f"{p.remat} | {p.peak / 2**30:.2f} | {'yes' if p.fits else 'NO'} | "
                     f"{', '.join(triton) or '-'} | {', '.join(cudnn) or '-'} | "
                     f"{time.time() - t:.0f} |")
      except Exception as e:  # one case that does not compile must not hide the others
        lines.append(f"| {name} | failed: {type(e).__name__}: {str(e)[:200]} | | | | | | | |")
      print(lines[-1], flush=True)
  return "\n".join(lines)


def plan_kernels(args) -> str:
  """The kernels case's Triton matmuls (8B projection shapes, nf4 and int4, forward and dx)
  compiled for the card: how many hold a Pallas-Triton kernel, of how many."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  from ftjax import kernels, plan as plan_lib, quant
  device, _ = plan_lib.target_device(args.target)
  mesh = jax.sharding.Mesh([[[device]]], ("data", "fsdp", "tensor"))
  on = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P()))
  cfg = MODELS["8b"]
  d, f = cfg["hidden_size"], cfg["intermediate_size"]
  kvd = cfg["num_key_value_heads"] * d // cfg["num_attention_heads"]
  shapes, m = (((128, 64),), 32) if args.smoke else (((d, d), (d, kvd), (d, f), (f, d)), 4096)
  found = total = 0
  for kind in ("nf4", "int4"):
    for k, n in shapes:
      w = jax.tree.map(on, quant.abstract((k, n), jnp.bfloat16, kind, 128))
      for transpose, rows in ((False, k), (True, n)):
        x = on(jax.ShapeDtypeStruct((m, rows), jnp.bfloat16))
        fn = jax.jit(functools.partial(kernels.matmul, backend="triton", transpose=transpose))
        with jax.set_mesh(mesh):
          text = fn.lower(x, w).compile().as_text()
        found += "__gpu$xla.gpu.triton" in text
        total += 1
  return f"{found} of {total} matmuls"


# ----------------------------------------------------------------------------- orchestration


def run_cases(names, args):
  """Runs cases in this process (the worker side); one JSON result per case on stdout."""
  for name in names:
    try:
      seq, batch = (32, 1) if args.smoke else (args.seq, args.batch)
      steps, warmup = (1, 1) if args.smoke else (args.steps, 2)
      if name == "kernels":
        out = kernels_case(args.smoke)
      elif name == "grouped":
        out = grouped_case()
      elif name.endswith("-load") and args.smoke:
        with tempfile.TemporaryDirectory() as tmp:
          out = load_case(name[:-len("-load")], tmp)
      elif name.endswith("-load"):
        out = load_case(name[:-len("-load")], args.load_dir)
      elif name.startswith("peft-"):
        out = peft_case(name[len("peft-"):], batch, seq, steps, warmup)
      elif name.startswith("attn-"):
        _, impl, layout = name.split("-")
        out = ftjax_case("tiny" if args.smoke else "8b", "bf16", batch, seq, steps, warmup,
                         args.backend, attention=impl, layout=layout, smoke=args.smoke)
      else:
        model, mode = name.split("-")
        lean = mode == "recipe"
        k = int(mode[len("multi"):]) if mode.startswith("multi") else 1
        out = ftjax_case(model, "nf4" if lean else "bf16" if k > 1 else mode, batch, seq, steps,
                         warmup, args.backend, lean, k, attention=args.attention, smoke=args.smoke)
      out["case"] = name
    except Exception as e:  # one failing case (an untested kernel, an OOM) must not lose the rest
      out = {"case": name, "error": f"{type(e).__name__}: {str(e)[:500]}",
             "traceback": traceback.format_exc()[-3000:]}
    print("@@" + json.dumps(out), flush=True)


def spawn(groups, args, timeout):
  """Runs each group of cases in its own worker process, all groups at once; their results."""
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", TOKENIZERS_PARALLELISM="false",
             TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore::FutureWarning",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  if args.smoke:
    env["JAX_PLATFORMS"] = "cpu"
  procs = []
  for names in groups:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", f"--only={','.join(names)}",
           f"--seq={args.seq}", f"--batch={args.batch}", f"--steps={args.steps}",
           f"--backend={args.backend}", f"--attention={args.attention}",
           f"--load_dir={args.load_dir}"] + (
               ["--smoke"] if args.smoke else [])
    procs.append((names, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True, env=env, cwd=REPO)))
  results, deadline = [], time.time() + timeout
  for names, proc in procs:
    try:
      stdout, err = proc.communicate(timeout=max(deadline - time.time(), 1))
    except subprocess.TimeoutExpired:
      proc.kill()
      stdout, _ = proc.communicate()
      err = f"timed out after {timeout:.0f}s"
    got = [json.loads(l[2:]) for l in stdout.splitlines() if l.startswith("@@")]
    done = {r["case"] for r in got}
    results += got + [{"case": n, "error": f"worker died: {err[-1500:]}"} for n in names
                      if n not in done]
  return results


def gib(b):
  return "-" if b is None else f"{b / 2**30:.2f}"


def tables(results, args) -> str:
  train = [r for r in results if r.get("framework") in ("ftjax", "peft")
           and not r["case"].startswith("attn-")]
  batch, seq = (train[0]["batch"], train[0]["seq"]) if train else (args.batch, args.seq)
  lines = [f"LoRA rank {RANK} (alpha {ALPHA:g}) on all 7 projections, AdamW, batch {batch} x "
           f"seq {seq} full rows, random weights and tokens; ftjax remat=full (offload in recipe rows) "
           f"(kernel backend {args.backend}); PEFT: bf16, sdpa, gradient checkpointing. MFU as "
           f"defined in bench/gpu.py (4N frozen + 6 x adapters + causal attention; "
           f"peak {PEAK_FLOPS / 1e12:.0f} TFLOP/s).", "",
           "| model | framework | base | tokens/s | MFU | peak memory (GiB) | "
           "ftjax.plan estimate (GiB) | step (s) | compile (s) | idle per step, synced (ms) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in train:
    idle = f"{r['idle_per_step_s'] * 1e3:.1f}" if "idle_per_step_s" in r else "-"
    lines.append(f"| {r['model']} | {r['framework']} | {r['mode']} | {r['tokens_per_s']:,.0f} | "
                 f"{r['mfu']:.1%} | {gib(r['peak_bytes'])} | {gib(r.get('predicted_bytes'))} | "
                 f"{r['step_s']:.3f} | {r.get('compile_s', 0):.0f} | {idle} |")
  for m in ("1b", "8b", "tiny"):
    ours = [r for r in train if r["model"] == m and r["framework"] == "ftjax" and
            r["mode"] == "bf16"]
    peer = [r for r in train if r["model"] == m and r["framework"] == "peft"]
    if ours and peer:
      lines.append(f"\n**{m} bf16 LoRA, ftjax / PEFT tokens/s: "
                   f"{ours[0]['tokens_per_s'] / peer[0]['tokens_per_s']:.2f}x**")
    one = [r for r in ours if r.get("adapters", 1) == 1]
    multi = [r for r in train if r["model"] == m and r.get("adapters", 1) > 1]
    if one and multi:
      k = multi[0]["adapters"]
      lines.append(f"\n**{m}: {k} adapters in one run / {k} runs one after another (tokens/s): "
                   f"{multi[0]['tokens_per_s'] / one[0]['tokens_per_s']:.2f}x**")
  lines += attention_table([r for r in results if r["case"].startswith("attn-") and "error" not in r])
  kern = [r for r in results if r.get("framework") == "kernels"]
  for k in kern:
    lines += ["", "| quant | projection [in, out] | M | XLA fwd (ms) | Triton fwd (ms) | "
              "fwd speedup | XLA bwd dx (ms) | Triton bwd dx (ms) | bwd speedup | "
              "max rel. diff |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in k["rows"]:
      if "error" in r:
        lines.append(f"| {r['kind']} | {r['proj']} {r['shape']} | {r['m']} | failed: "
                     f"{r['error'][:200]} | | | | | | |")
        continue
      note = "" if r["triton_supported"] else " (Triton unsupported: fell back to XLA)"
      lines.append(
          f"| {r['kind']} | {r['proj']} {r['shape']}{note} | {r['m']} | {r['xla_fwd_ms']:.3f} | "
          f"{r['triton_fwd_ms']:.3f} | {r['xla_fwd_ms'] / r['triton_fwd_ms']:.2f}x | "
          f"{r['xla_bwd_ms']:.3f} | {r['triton_bwd_ms']:.3f} | "
          f"{r['xla_bwd_ms'] / r['triton_bwd_ms']:.2f}x | "
          f"{max(r['rel_err_fwd'], r['rel_err_bwd']):.1e} |")
  for k in (r for r in results if r.get("framework") == "grouped"):
    lines += ["", "Grouped matmuls (experts), Mosaic GPU vs XLA's ragged_dot, bf16, M routed rows; "
              "step = forward + dx + dw; diff relative to XLA (float32 accumulation):", "",
              "| product [E, in, out] | M | XLA fwd (ms) | mgpu fwd (ms) | XLA step (ms) | "
              "mgpu step (ms) | max rel. diff y / dx / dw |", "|---|---|---|---|---|---|---|"]
    for r in k["rows"]:
      if "error" in r:
        lines.append(f"| {r['proj']} {r['shape']} | {r['m']} | failed: {r['error'][:200]} | | | "
                     "| |")
        continue
      lines.append(f"| {r['proj']} {r['shape']} | {r['m']} | {r['xla_fwd_ms']:.3f} | "
                   f"{r['mgpu_fwd_ms']:.3f} | {r['xla_step_ms']:.3f} | {r['mgpu_step_ms']:.3f} | "
                   f"{r['rel_err_y']:.1e} / {r['rel_err_dx']:.1e} / {r['rel_err_dw']:.1e} |")
  for r in (r for r in results if r.get("framework") == "load"):
    lines += ["", f"{r['model']} checkpoint ({r['file_bytes'] / 1e9:.1f} GB bf16 on local disk, "
              f"written in {r['write_s']:.0f}s, so in the page cache): ftjax.load_hf seconds",
              "", "| nf4 (quantized on the device) | bf16 | nf4 / bf16 | nf4 params (GiB) | "
              "nf4 load peak (GiB) | nf4 codes differing from XLA:CPU's |",
              "|---|---|---|---|---|---|",
              f"| {r['nf4_s']:.1f} | {r['bf16_s']:.1f} | {r['nf4_s'] / r['bf16_s']:.2f}x | "
              f"{gib(r['nf4_params_bytes'])} | {gib(r['nf4_peak_bytes'])} | {r['codes_differ']} |"]
  errors = [r for r in results if "error" in r]
  if errors:
    lines += ["", "Failed or skipped:"] + [f"- {r['case']}: {r['error'][:300]}" for r in errors]
  return "\n".join(lines)


def attention_table(rows) -> list[str]:
  """The attn-* cases: per batch layout, each path's tokens/s and peak against the XLA path."""
  if not rows:
    return []
  out = ["", f"Attention paths, {rows[0]['model']} bf16 LoRA step (remat full), batch "
         f"{rows[0]['batch']} x seq {rows[0]['seq']}; tokens/s of row positions (padding included):",
         "", "| rows | model.attention | tokens/s | vs xla | MFU | peak memory (GiB) | step (s) |",
         "|---|---|---|---|---|---|---|"]
  for r in rows:
    base = [x for x in rows if x["layout"] == r["layout"] and x["attention"] == "xla"]
    ratio = f"{r['tokens_per_s'] / base[0]['tokens_per_s']:.2f}x" if base else "-"
    out.append(f"| {r['layout']} | {r['attention']} | {r['tokens_per_s']:,.0f} | {ratio} | "
               f"{r['mfu']:.1%} | {gib(r['peak_bytes'])} | {r['step_s']:.3f} |")
  return out


def versions(device) -> str:
  import importlib.metadata as md
  out = []
  for n in ("jax", "jaxlib", "torch", "transformers", "peft"):
    try:
      out.append(f"{n} {md.version(n)}")
    except md.PackageNotFoundError:
      out.append(f"{n} -")
  return f"{device}; " + ", ".join(out) + f", Python {platform.python_version()}"


def local_gpu() -> str | None:
  """The GPU's name, asked in a child process so this one never initializes a backend."""
  probe = ("import jax; d = jax.devices()[0]; "
           "print(d.device_kind if d.platform == 'gpu' else '')")
  try:
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=120).stdout.strip().splitlines()
  except subprocess.TimeoutExpired:
    return None
  return out[-1] if out and out[-1] else None


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, nothing appended")
  p.add_argument("--only", default="", help=f"comma-separated subset of {CASES}")
  p.add_argument("--seq", type=int, default=2048)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--steps", type=int, default=5, help="timed steps (after 2 warmup steps)")
  p.add_argument("--backend", default="xla", help="ftjax.kernels backend for the training cases")
  p.add_argument("--attention", default="auto", help="model.attention of the training cases "
                 "(the attn-* cases set their own)")
  p.add_argument("--budget_s", type=float, default=540, help="skip cases not started by then")
  p.add_argument("--no_append", action="store_true", help="do not append to bench/RESULTS.md")
  p.add_argument("--load_dir", default="/tmp", help="where the load case writes its checkpoint")
  p.add_argument("--target", default="", help="h200 (h100, a100): compile every case for that "
                 "GPU, no GPU needed (jax[cuda12]), and report the plans instead of timing")
  p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args()
  allowed = SMOKE_CASES if args.smoke else CASES
  names = [n for n in args.only.split(",") if n] or list(allowed)
  unknown = [n for n in names if n not in allowed]
  if unknown:
    sys.exit(f"unknown cases {unknown}; choose from {allowed}")
  if args.worker:
    return run_cases(names, args)
  if args.target:
    t_start = time.time()
    text = plan_cases(names, args)
    print(text)
    if not args.no_append and not args.smoke:
      with open(os.path.join(HERE, "RESULTS.md"), "a") as f:
        f.write(f"\n### GPU plan, {datetime.date.today()}\n\n`python bench/gpu.py "
                f"{' '.join(sys.argv[1:])}`; {versions('no GPU')}; {time.time() - t_start:.0f}s"
                f"\n\n{text}\n")
    return

  t_start = time.time()
  gpu = None if args.smoke else local_gpu()
  if gpu is None and not args.smoke:
    sys.exit("no GPU found. Run with --smoke to check the script on CPU; every figure (tokens/s, "
             "MFU, peak memory, the PEFT ratio, the Pallas kernel timings) is still to be taken "
             "on a GPU.")
  results = []
  if args.smoke:  # two processes at once: the JAX side and the PyTorch side
    groups = [[n for n in names if not n.startswith("peft")], [n for n in names
                                                               if n.startswith("peft")]]
    results += spawn([g for g in groups if g], args, 600)
  else:
    for name in names:
      left = args.budget_s - (time.time() - t_start)
      if left < 20:
        results.append({"case": name, "error": f"skipped: --budget_s={args.budget_s:.0f} spent"})
        continue
      results += spawn([[name]], args, left)
      brief = {k: v for k, v in results[-1].items() if k not in ("rows", "traceback")}
      print(f"[{time.time() - t_start:5.0f}s] {name}: {json.dumps(brief)}", flush=True)
  text = tables(results, args)
  print(text)
  cmd = "python bench/gpu.py " + " ".join(sys.argv[1:])
  section = (f"\n### GPU, {datetime.date.today()}\n\n`{cmd}`; {versions(gpu or 'CPU (smoke)')}; "
             f"{time.time() - t_start:.0f}s\n\n{text}\n")
  out_dir = os.environ.get("OUT")
  if out_dir:  # on a remote machine only $OUT comes back: the section to append, and the raw data
    with open(os.path.join(out_dir, "gpu_results.json"), "w") as f:
      json.dump(results, f, indent=1)
    with open(os.path.join(out_dir, "gpu_results.md"), "w") as f:
      f.write(section)
  if args.smoke:
    print("\nsmoke run on CPU: every figure above is meaningless; still to be taken on a GPU: "
          "tokens/s, MFU and peak memory of LoRA bf16 / QLoRA nf4 / int4 (1B, 8B), the PEFT "
          "ratio, the Pallas (Triton) vs XLA kernel timings, the 8B load times and the attention "
          "paths (xla, cudnn, triton; packed and padded rows).")
    return
  if not args.no_append:
    with open(os.path.join(HERE, "RESULTS.md"), "a") as f:
      f.write(section)


if __name__ == "__main__":
  main()
