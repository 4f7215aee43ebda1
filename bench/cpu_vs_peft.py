"""The same LoRA SFT step in ftjax and in transformers + PEFT (PyTorch), on this machine's CPU.

  python bench/cpu_vs_peft.py [--append]      # ~75 s on 2 idle cores; --append: bench/RESULTS.md
  python bench/cpu_vs_peft.py --smoke         # tiny shapes, 2 steps: checks the script still runs
  python bench/cpu_vs_peft.py --layers=8      # deeper: the first layer's skipped input gradient
                                              # (ftjax computes none for it) then weighs 1/8

One Llama-shaped float32 model is built with transformers and saved with save_pretrained; ftjax
loads that directory with `ftjax.load_hf`, PEFT with `from_pretrained`. Both train rank-R LoRA on
every linear projection with AdamW (clip 1.0) on the same padded batches of random tokens (rows of
random length, padding at the end, no loss on padding), all in float32, each framework in its own
process (so each one's peak RSS is its own) with as many threads as there are cores. The two
processes take turns: round after round, each runs a few steps while the other waits, so load from
other work on the machine hits both alike. Step time is the median over all rounds but the first
(warmup; ftjax's compile happens before it). The first loss of each (adapters' b = 0, so the base
model's loss) must agree, which checks that both computed the same thing. Reported per framework:
median step time, real (non-padding) tokens/s, CPU-seconds per step (steadier than wall time when
other work shares the machine) and peak RSS (VmHWM from after the shared checkpoint is built).
"""
import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SHAPES = {
    # Matmuls dominate: D=768 and F=2048 over B*T=2048 positions, a Llama-3-like 4:1 GQA.
    "full": dict(hidden=768, layers=4, heads=12, kv_heads=4, mlp=2048, vocab=8192, batch=8,
                 seq=256, rank=16, rounds=5, steps=2),
    "smoke": dict(hidden=64, layers=2, heads=4, kv_heads=2, mlp=128, vocab=256, batch=2, seq=32,
                  rank=4, rounds=2, steps=1),
}
LR, ALPHA = 1e-4, 32.0


def cores() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


# ----------------------------------------------------------------------------- the shared inputs


def build(shape: dict, path: str, n_batches: int = 2):
  """A random float32 Llama checkpoint in `path` and padded batches of random tokens (this
  runs in the PyTorch worker, so the parent process imports neither framework)."""
  import torch
  import transformers
  cfg = transformers.LlamaConfig(
      vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["mlp"],
      num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
      num_key_value_heads=shape["kv_heads"], max_position_embeddings=shape["seq"] * 2,
      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
  torch.manual_seed(0)
  transformers.LlamaForCausalLM(cfg).float().save_pretrained(path)
  rng = np.random.default_rng(0)
  b, t = shape["batch"], shape["seq"]
  ids = rng.integers(3, shape["vocab"], (n_batches, b, t + 1)).astype(np.int32)
  lengths = rng.integers(t // 2, t + 1, (n_batches, b))  # real positions per row, then padding
  real = np.arange(t + 1)[None, None, :] < lengths[..., None]
  ids = np.where(real, ids, 0)
  np.savez(os.path.join(path, "batches.npz"), ids=ids, real=real)


def load_batches(path):
  """ids [n, B, T+1] and real [n, B, T+1]: position t predicts t+1 where both are real."""
  d = np.load(os.path.join(path, "batches.npz"))
  return d["ids"], d["real"]


# ----------------------------------------------------------------------------- the two workers


def ftjax_worker(path, shape, remat):
  import jax
  import functools
  import ftjax
  from ftjax import lora, optim, step as step_lib
  from ftjax.config import defaults

  model = ftjax.load_hf(path, dtype="float32")
  adapters = lora.init(model.spec, "all-linear", shape["rank"], ALPHA, jax.random.PRNGKey(0))
  cfg_optim = defaults().optim
  cfg_optim.lr, cfg_optim.warmup_steps, cfg_optim.schedule = LR, 0, "constant"
  cfg_optim.weight_decay, cfg_optim.clip_norm = 0.0, 1.0
  optimizer = optim.make_optimizer(cfg_optim, 1000)
  device = jax.local_devices()[0]
  # Committed to the device, like every later state: otherwise step 2 would compile again.
  state = jax.device_put(step_lib.init_state(adapters, optimizer, 0), device)
  # As ftjax.train jits it: the whole step is one program, the state donated.
  train_step = jax.jit(functools.partial(step_lib.train_step, adapters=adapters,
                                         optimizer=optimizer, grad_accum=1, remat=remat), donate_argnums=0)
  ids, real = load_batches(path)
  batches = []
  for i in range(len(ids)):
    target_ok = real[i, :, 1:] & real[i, :, :-1]
    batches.append(jax.device_put({
        "tokens": ids[i, :, :-1], "targets": ids[i, :, 1:],
        "loss_mask": target_ok.astype(np.float32),
        "segment_ids": real[i, :, :-1].astype(np.int32)}, device))

  def step(i):
    nonlocal state
    state, metrics = train_step(state, model, batches[i % len(batches)])
    return float(metrics["loss"])  # the host sync: the step is done when its loss is here

  return step


def peft_worker(path, shape, remat):
  import logging
  # bitsandbytes (which peft imports) warns on import that it could not fetch a CPU kernel from
  # the hub (transformers installs `kernels`); the bench uses no 4-bit layer
  logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
  import peft
  import torch
  import transformers

  torch.set_num_threads(cores())
  model = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                        attn_implementation="sdpa")
  if remat != "none":
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
  model = peft.get_peft_model(model, peft.LoraConfig(
      r=shape["rank"], lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear",
      task_type="CAUSAL_LM"))
  model.train()
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
  ids, real = load_batches(path)
  batches = []
  for i in range(len(ids)):
    # HF shifts labels inside the loss: labels[t] is the target of position t-1.
    inputs = torch.from_numpy(ids[i, :, :-1].astype(np.int64))
    mask = torch.from_numpy(real[i, :, :-1].astype(np.int64))
    labels = inputs.masked_fill(mask == 0, -100)
    batches.append(dict(input_ids=inputs, attention_mask=mask, labels=labels))

  def step(i):
    loss = model(**batches[i % len(batches)]).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())

  return step


def worker(name, path, shape, remat):
  """Set up, then run steps when the parent says so; answers on stdout lines starting with @@.
  The PyTorch worker first builds the checkpoint both load (so the parent imports neither)."""
  if name == "peft":
    build(shape, path)
    say({"built": True})
    reset_peak_rss()  # the peak RSS is the training's, not the building's
  t0 = time.perf_counter()
  step = (ftjax_worker if name == "ftjax" else peft_worker)(path, shape, remat)
  t1 = time.perf_counter()
  first_loss = step(0)  # ftjax compiles here
  say({"setup_s": t1 - t0, "first_step_s": time.perf_counter() - t1, "first_loss": first_loss})
  i = 1
  for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "quit":
      break
    times, cpu, losses = [], [], []
    for _ in range(int(cmd[1])):
      t, c = time.perf_counter(), time.process_time()
      losses.append(step(i))
      times.append(time.perf_counter() - t)
      cpu.append(time.process_time() - c)
      i += 1
    say({"times": times, "cpu": cpu, "losses": losses})
  say({"max_rss_bytes": peak_rss()})


def reset_peak_rss():
  """Linux: writing 5 to clear_refs resets the process's high-water mark (VmHWM)."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
  except OSError:
    pass


def peak_rss() -> int:
  """Peak resident memory in bytes: VmHWM (resettable) where there is /proc, else ru_maxrss."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def say(obj):
  print("@@" + json.dumps(obj), flush=True)


# ----------------------------------------------------------------------------- the parent


class Worker:

  def __init__(self, name, path, args):
    cmd = [sys.executable, os.path.abspath(__file__), f"--worker={name}", f"--dir={path}",
           f"--remat={args.remat}", f"--layers={args.layers}"] + (["--smoke"] if args.smoke else [])
    env = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false",
               TRANSFORMERS_VERBOSITY="error", HF_HUB_DISABLE_PROGRESS_BARS="1",
               PYTHONWARNINGS="ignore::FutureWarning",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    self.name = name
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 env=env, cwd=REPO)

  def read(self):
    for line in self.proc.stdout:
      if line.startswith("@@"):
        return json.loads(line[2:])
    raise RuntimeError(f"{self.name} worker exited with {self.proc.wait()} (see its stderr)")

  def send(self, text):
    self.proc.stdin.write(text + "\n")
    self.proc.stdin.flush()


def shape_of(args) -> dict:
  shape = dict(SHAPES["smoke" if args.smoke else "full"])
  shape["layers"] = args.layers or shape["layers"]
  return shape


def run(args) -> dict:
  shape = shape_of(args)
  shape["rounds"] = args.rounds or shape["rounds"]
  shape["steps"] = args.steps or shape["steps"]
  with tempfile.TemporaryDirectory() as path:
    peer = Worker("peft", path, args)
    peer.read()  # the checkpoint and batches are written
    ids, real = load_batches(path)
    workers = [Worker("ftjax", path, args), peer]
    results = {w.name: dict(w.read(), times=[], cpu=[], losses=[]) for w in workers}
    for r in range(shape["rounds"]):
      for w in workers if r % 2 == 0 else workers[::-1]:
        w.send(f"run {shape['steps']}")
        out = w.read()
        if r > 0:  # round 0 is warmup
          results[w.name]["times"] += out["times"]
          results[w.name]["cpu"] += out["cpu"]
        results[w.name]["losses"] += out["losses"]
    for w in workers:
      w.send("quit")
      results[w.name].update(w.read())
      w.proc.wait()
  tokens = float(real[:, :, 1:].sum()) / len(real)  # real (non-padding) positions per batch
  for r in results.values():
    r["step_s"] = statistics.median(r["times"])
    r["cpu_s"] = statistics.median(r["cpu"])
    r["tokens_per_s"] = tokens / r["step_s"]
  return {"shape": shape, "tokens_per_batch": tokens, "cores": cores(), "remat": args.remat,
          "results": results, "ratio": results["peft"]["step_s"] / results["ftjax"]["step_s"],
          "cpu_ratio": results["peft"]["cpu_s"] / results["ftjax"]["cpu_s"]}


def versions() -> str:
  import importlib.metadata as md
  names = ["jax", "jaxlib", "torch", "transformers", "peft"]
  return ", ".join(f"{n} {md.version(n)}" for n in names) + f", Python {platform.python_version()}"


def table(out) -> str:
  s, res = out["shape"], out["results"]
  lines = [
      f"Llama-shaped float32 model: D={s['hidden']}, L={s['layers']}, N={s['heads']}, "
      f"K={s['kv_heads']}, F={s['mlp']}, V={s['vocab']}; batch {s['batch']} x seq {s['seq']} "
      f"padded ({out['tokens_per_batch']:.0f} real tokens per batch); LoRA rank {s['rank']} on all "
      f"7 projections; AdamW; {out['cores']} CPU threads each; ftjax remat={out['remat']}; "
      f"median of {len(res['ftjax']['times'])} steps after warmup, alternating rounds.",
      "",
      "| framework | step time (s) | tokens/s | CPU-seconds per step | peak RSS (GiB) | "
      "first loss | setup + 1st step (s) |",
      "|---|---|---|---|---|---|---|"]
  for name, label in (("ftjax", "ftjax (JAX)"), ("peft", "transformers + PEFT (PyTorch)")):
    r = res[name]
    lines.append(f"| {label} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | {r['cpu_s']:.2f} | "
                 f"{r['max_rss_bytes'] / 2**30:.2f} | {r['first_loss']:.4f} | "
                 f"{r['setup_s'] + r['first_step_s']:.1f} |")
  lines += ["", f"**ftjax / PEFT speed: {out['ratio']:.2f}x** (PEFT step time / ftjax step time; "
            f"by CPU-seconds per step, which other load on the machine disturbs less: "
            f"{out['cpu_ratio']:.2f}x)"]
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--smoke", action="store_true", help="tiny shapes, 2 steps")
  p.add_argument("--append", action="store_true", help="append the table to bench/RESULTS.md")
  p.add_argument("--remat", default="none", choices=["none", "full", "dots"],
                 help="ftjax train.remat; anything but none turns on PEFT's gradient checkpointing")
  p.add_argument("--rounds", type=int, default=0)
  p.add_argument("--steps", type=int, default=0, help="steps per round")
  p.add_argument("--layers", type=int, default=0, help="decoder layers (default: the shape's)")
  p.add_argument("--worker", help=argparse.SUPPRESS)
  p.add_argument("--dir", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.worker:
    return worker(args.worker, args.dir, shape_of(args), args.remat)
  out = run(args)
  text = table(out)
  print(text)
  first = [out["results"][n]["first_loss"] for n in ("ftjax", "peft")]
  if abs(first[0] - first[1]) > 1e-3 * abs(first[1]):
    sys.exit(f"first losses differ: ftjax {first[0]} vs PEFT {first[1]}: not the same computation")
  if args.append:
    cmd = "python bench/cpu_vs_peft.py " + " ".join(sys.argv[1:])
    with open(os.path.join(HERE, "RESULTS.md"), "a") as f:
      f.write(f"\n### CPU: ftjax vs PEFT, {datetime.date.today()}\n\n`{cmd}` on "
              f"{platform.processor() or platform.machine()}; {versions()}\n\n{text}\n")


if __name__ == "__main__":
  main()
