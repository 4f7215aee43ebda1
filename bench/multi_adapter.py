"""k adapters trained in one ftjax.train run against k runs one after another, on this CPU.

  python bench/multi_adapter.py [--append]   # ~3 min on 2 idle cores; --append: bench/RESULTS.md
  python bench/multi_adapter.py --smoke      # k=2, tiny shapes, 2 steps: checks the script runs

A Llama-shaped float32 base (random weights, built here with transformers) gets the demo's
tokenizer, and the demo's training data is split into k sources. Both sides run the same config
(rank 16 on all linear projections, batch B rows per adapter and step, packed seq T, S steps, no
eval, no checkpoint but the last): the multi run with `data.train=s0=...,s1=...`, one adapter per
source; the others with one source each, one after another. Each run is its own
`python -m ftjax.train` process, measured from start to exit (imports, loading, compile and
steps): wall time, CPU-seconds (steadier than wall time when other work shares the machine) and
peak RSS (ru_maxrss of that process, from os.wait4). The steady-state step is the median
tokens/s the run logged, all steps but the first (compile). The two sides' mean losses at the last
step must agree (each adapter equals its run alone), which checks that both trained the same.
"""
import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SHAPES = {
    "full": dict(hidden=512, layers=4, heads=8, kv_heads=4, mlp=1408, k=4, batch=4, seq=128,
                 steps=20),
    "smoke": dict(hidden=64, layers=2, heads=4, kv_heads=2, mlp=128, k=2, batch=2, seq=64,
                  steps=2),
}


def build(shape: dict, root: str) -> tuple[str, list[str]]:
  """The base checkpoint (with the demo tokenizer) and k source files; returns their paths."""
  sys.path.insert(0, os.path.join(REPO, "configs"))
  import demo
  import torch
  import transformers
  demo_base = os.path.join(root, "demo_base")
  demo.build_base(demo_base)  # only for its tokenizer, trained on the demo data
  base = os.path.join(root, "base")
  cfg = transformers.LlamaConfig(
      vocab_size=384, hidden_size=shape["hidden"], intermediate_size=shape["mlp"],
      num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
      num_key_value_heads=shape["kv_heads"], max_position_embeddings=2 * shape["seq"],
      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
  torch.manual_seed(0)
  transformers.LlamaForCausalLM(cfg).float().save_pretrained(base)
  for name in os.listdir(demo_base):
    if name.startswith(("tokenizer", "special_tokens")):
      shutil.copy(os.path.join(demo_base, name), base)
  with open(os.path.join(REPO, "configs/demo_data/train.jsonl")) as f:
    rows = f.read().splitlines()
  sources, per = [], len(rows) // shape["k"]
  for i in range(shape["k"]):
    sources.append(os.path.join(root, f"source{i}.jsonl"))
    with open(sources[-1], "w") as f:
      f.write("\n".join(rows[i * per:(i + 1) * per]) + "\n")
  return base, sources


def run(base: str, workdir: str, train: str, shape: dict) -> dict:
  """One ftjax.train process: wall and CPU seconds, peak RSS, and its logged metrics."""
  cmd = [sys.executable, "-m", "ftjax.train", f"--config={REPO}/configs/demo.py",
         f"--config.workdir={workdir}", f"--config.model.path={base}",
         f"--config.data.train={train}", "--config.data.eval=",
         f"--config.data.seq_len={shape['seq']}", f"--config.train.batch_size={shape['batch']}",
         f"--config.train.steps={shape['steps']}", "--config.train.log_every=1",
         "--config.train.eval_generate=0", "--config.train.eval_every=0",
         "--config.ckpt.every=100000", "--config.optim.warmup_steps=2"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  os.makedirs(workdir)
  with open(os.path.join(workdir, "log.txt"), "w+") as log:
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage
    wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
      log.seek(0)
      sys.exit(f"{' '.join(cmd)} failed:\n{log.read()[-3000:]}")
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f if '"loss"' in line]
  return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
          "peak_rss": usage.ru_maxrss * 1024,  # Linux reports KiB
          "tokens_per_s": statistics.median(m["tokens_per_s"] for m in lines[1:] or lines),
          "last": lines[-1]}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--smoke", action="store_true", help="tiny shapes, k=2, 2 steps")
  p.add_argument("--append", action="store_true", help="append the table to bench/RESULTS.md")
  args = p.parse_args()
  shape = SHAPES["smoke" if args.smoke else "full"]
  k, t_start = shape["k"], time.time()
  with tempfile.TemporaryDirectory() as root:
    base, sources = build(shape, root)
    names = [f"s{i}" for i in range(k)]
    multi = run(base, os.path.join(root, "multi"),
                ",".join(f"{n}={s}" for n, s in zip(names, sources)), shape)
    singles = [run(base, os.path.join(root, f"single{i}"), s, shape)
               for i, s in enumerate(sources)]
  # the multi run's adapter i is run i alone: their losses agree (to float rounding)
  for n, one in zip(names, singles):
    got, want = multi["last"][f"loss/{n}"], one["last"]["loss"]
    if abs(got - want) > 1e-4 * abs(want):
      sys.exit(f"adapter {n}: loss {got} in the multi run, {want} alone; they must agree")
  seq_wall = sum(r["wall_s"] for r in singles)
  seq_cpu = sum(r["cpu_s"] for r in singles)
  seq_rss = max(r["peak_rss"] for r in singles)
  one_tps = statistics.median(r["tokens_per_s"] for r in singles)
  mib = lambda b: f"{b / 2**20:,.0f}"
  text = "\n".join([
      f"Llama-shaped float32 base D {shape['hidden']}, {shape['layers']} layers, F "
      f"{shape['mlp']}, vocab 384; LoRA rank 16 all-linear; {shape['steps']} steps of "
      f"{shape['batch']} packed rows x {shape['seq']} per adapter; k = {k}; "
      f"{os.cpu_count()} cores.", "",
      "| | wall (s) | CPU (s) | peak RSS (MiB) | steady tokens/s |", "|---|---|---|---|---|",
      f"| {k} adapters in one run | {multi['wall_s']:.1f} | {multi['cpu_s']:.1f} | "
      f"{mib(multi['peak_rss'])} | {multi['tokens_per_s']:,.0f} |",
      f"| {k} runs one after another | {seq_wall:.1f} | {seq_cpu:.1f} | {mib(seq_rss)} (max) | "
      f"{one_tps:,.0f} (median) |", "",
      f"**one run / {k} runs: wall {seq_wall / multi['wall_s']:.2f}x faster, CPU "
      f"{seq_cpu / multi['cpu_s']:.2f}x less, peak RSS {multi['peak_rss'] / seq_rss:.2f}x, "
      f"steady-state tokens/s {multi['tokens_per_s'] / one_tps:.2f}x**"])
  print(text)
  if args.smoke:
    print("\nsmoke run: tiny shapes, the figures mean nothing")
  elif args.append:
    cmd = "python bench/multi_adapter.py " + " ".join(sys.argv[1:])
    with open(os.path.join(HERE, "RESULTS.md"), "a") as f:
      f.write(f"\n### Several adapters in one run, CPU, {datetime.date.today()}\n\n`{cmd}`; "
              f"{platform.processor() or platform.machine()}, Python "
              f"{platform.python_version()}; {time.time() - t_start:.0f}s\n\n{text}\n")


if __name__ == "__main__":
  main()
