"""Greedy decoding speed: `ftjax.generate` against transformers' `generate`, same model and prompts.

  python bench/generate_vs_hf.py [--shapes=small,0.5b] [--batches=1,8] [--rounds=2]
  python bench/generate_vs_hf.py --smoke      # tiny shapes: checks the script still runs

One random float32 Llama checkpoint per shape is written with save_pretrained; ftjax loads it with
`ftjax.load_hf`, transformers with `from_pretrained`. Each framework runs in its own process with 2
threads (torch.set_num_threads(2); XLA:CPU's pool is the machine's cores, 2 here), decodes
`--new` tokens (64) greedily after a `--prompt`-token (64) prompt of random ids, eos off so both
make every token, and the two processes take turns, round after round, so load from other work on
the machine hits both alike. Reported: tokens/s (new tokens of all rows / wall time of the whole
call, prefill included) as the best of the rounds after a warmup call (ftjax's compile happens in
the warmup), the ratio ftjax / transformers, and the ratio of CPU-seconds per call (transformers /
ftjax: steadier than wall time when other work shares the machine). Both must produce the same greedy tokens (checked
on the first row), so both compute the same thing.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SHAPES = {
    # The two Llama shapes: ~0.5B (hidden 1024, 24 layers) and ~0.17B (hidden 1024, 8).
    "0.5b": dict(hidden=1024, layers=24, heads=16, kv_heads=8, mlp=4096, vocab=32000),
    "small": dict(hidden=1024, layers=8, heads=16, kv_heads=8, mlp=4096, vocab=32000),
    "smoke": dict(hidden=64, layers=2, heads=4, kv_heads=2, mlp=128, vocab=256),
}


def build(shape: dict, path: str):
  import torch
  import transformers
  cfg = transformers.LlamaConfig(
      vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["mlp"],
      num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
      num_key_value_heads=shape["kv_heads"], max_position_embeddings=512,
      tie_word_embeddings=True, bos_token_id=1, eos_token_id=None, pad_token_id=0)
  torch.manual_seed(0)
  transformers.LlamaForCausalLM(cfg).float().save_pretrained(path)


def worker_torch(path, prompts, new, rounds_file):
  import torch
  import transformers
  torch.set_num_threads(2)
  model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  ids = torch.as_tensor(prompts)

  def run():
    with torch.no_grad():
      return model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                            pad_token_id=0)[:, ids.shape[1]:].numpy()

  return _rounds(run, rounds_file)


def worker_ftjax(path, prompts, new, rounds_file):
  import dataclasses
  sys.path.insert(0, REPO)
  import jax
  import ftjax
  model = ftjax.load_hf(path, dtype="float32")
  model = ftjax.Model(dataclasses.replace(model.spec, eos_ids=()), model.params)

  def run():
    return np.asarray(jax.block_until_ready(ftjax.generate(model, prompts, max_new_tokens=new)))

  return _rounds(run, rounds_file)


def _rounds(run, rounds_file):
  """Warm up, then one timed call per line the parent writes to `rounds_file` (turn-taking)."""
  out = run()
  print("ready", flush=True)
  times, cpu = [], []
  for line in sys.stdin:
    if line.strip() == "stop":
      break
    t0, c0 = time.perf_counter(), _cpu_seconds()
    run()
    times.append(time.perf_counter() - t0)
    cpu.append(_cpu_seconds() - c0)
    print("done", flush=True)
  with open(rounds_file, "w") as f:
    json.dump({"times": times, "cpu": cpu, "first_row": out[0].tolist()}, f)


def _cpu_seconds():
  r = resource.getrusage(resource.RUSAGE_SELF)  # all threads of this process
  return r.ru_utime + r.ru_stime


def measure(path, shape_name, batch, args):
  rng = np.random.default_rng(batch)
  prompts = rng.integers(3, SHAPES[shape_name]["vocab"], (batch, args.prompt)).astype(np.int32)
  np.save(os.path.join(path, f"prompts{batch}.npy"), prompts)
  procs, files = {}, {}
  for fw in ("ftjax", "torch"):
    files[fw] = os.path.join(path, f"{fw}{batch}.json")
    env = dict(os.environ, PYTHONPATH=REPO)
    procs[fw] = subprocess.Popen(
        [sys.executable, __file__, "--worker", fw, "--path", path, "--batch", str(batch),
         "--new", str(args.new), "--out", files[fw]], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True, env=env)
    assert procs[fw].stdout.readline().strip() == "ready", fw
  for _ in range(args.rounds):
    for fw in ("torch", "ftjax"):
      procs[fw].stdin.write("go\n")
      procs[fw].stdin.flush()
      assert procs[fw].stdout.readline().strip() == "done"
  result = {}
  for fw, p in procs.items():
    p.stdin.write("stop\n")
    p.stdin.flush()
    p.wait()
    with open(files[fw]) as f:
      result[fw] = json.load(f)
  same = result["ftjax"]["first_row"] == result["torch"]["first_row"]
  tps = {fw: batch * args.new / min(r["times"]) for fw, r in result.items()}
  cpu = {fw: min(r["cpu"]) for fw, r in result.items()}
  return tps, same, cpu, {fw: [round(t, 2) for t in r["times"]] for fw, r in result.items()}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--shapes", default="small,0.5b")
  p.add_argument("--batches", default="1,8")
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--prompt", type=int, default=64)
  p.add_argument("--new", type=int, default=64)
  p.add_argument("--smoke", action="store_true")
  p.add_argument("--worker")
  p.add_argument("--path")
  p.add_argument("--batch", type=int)
  p.add_argument("--out")
  args = p.parse_args()
  if args.worker:
    prompts = np.load(os.path.join(args.path, f"prompts{args.batch}.npy"))
    fn = worker_ftjax if args.worker == "ftjax" else worker_torch
    return fn(args.path, prompts, args.new, args.out)
  if args.smoke:
    args.shapes, args.rounds, args.prompt, args.new = "smoke", 1, 8, 8
  print(f"{'shape':>6} {'batch':>5} {'ftjax tok/s':>12} {'hf tok/s':>9} {'ratio':>6} "
        f"{'CPU-s ratio':>11} same-tokens")
  for shape_name in args.shapes.split(","):
    with tempfile.TemporaryDirectory() as path:
      subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {HERE!r}); "
                      f"import generate_vs_hf as g; g.build(g.SHAPES[{shape_name!r}], {path!r})"],
                     check=True)
      for batch in (int(b) for b in args.batches.split(",")):
        tps, same, cpu, times = measure(path, shape_name, batch, args)
        print(f"{shape_name:>6} {batch:>5} {tps['ftjax']:>12.1f} {tps['torch']:>9.1f} "
              f"{tps['ftjax'] / tps['torch']:>5.2f}x {cpu['torch'] / cpu['ftjax']:>10.2f}x "
              f"{same}   wall s {json.dumps(times)}", flush=True)


if __name__ == "__main__":
  main()
