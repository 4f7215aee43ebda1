"""Peak host memory while loading a ~1 GB bf16 checkpoint, against the checkpoint's size.

  python bench/load_memory.py [--dir=/tmp/ftjax_1gb]

Builds (once) a random Llama-shaped checkpoint of ~1.07 GB in bf16, in two safetensors shards, then
loads it in a fresh process per mode (bf16, int8, int4, nf4) and samples the process's anonymous
RSS (RssAnon: memory the process owns, excluding the memory-mapped checkpoint pages, which the OS
can drop at will) every 2 ms. On CPU the "device" is host memory too, so the loaded params count
in the figure; the point is that the peak stays about the loaded size plus one layer's tensor,
never a second copy of the model. The peers are the checkpoint's file size (memory) and the bf16
load of the same run (time: each mode's wall and CPU seconds over bf16's; quantizing runs on the
device, so on a GPU host it overlaps nothing with the CPU, and on this CPU it should cost little).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time

import numpy as np

CONFIG = dict(model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632,
              num_hidden_layers=9, num_attention_heads=16, num_key_value_heads=4,
              rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
              torch_dtype="bfloat16", eos_token_id=2)


def build(path):
  rng = np.random.default_rng(0)
  write_checkpoint(path, CONFIG, lambda *shape: rng.standard_normal(shape, np.float32) * 0.02, 2)


def write_checkpoint(path, config, weight, n_files):
  """A Llama-shaped bf16 safetensors checkpoint of `config` in `path`, unless one is there:
  weight(*shape) gives each matrix's values; the layers split evenly over n_files files."""
  import ml_dtypes
  from safetensors.numpy import save_file
  if os.path.exists(os.path.join(path, "config.json")):  # written last: the files are complete
    return
  os.makedirs(path, exist_ok=True)
  c, bf16 = config, ml_dtypes.bfloat16
  d, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
  layers = c["num_hidden_layers"]
  h = c.get("head_dim") or d // c["num_attention_heads"]
  q, kv = c["num_attention_heads"] * h, c["num_key_value_heads"] * h
  w = lambda *shape: np.asarray(weight(*shape)).astype(bf16, copy=False)
  shards = [{} for _ in range(n_files)]
  shards[0].update({"model.embed_tokens.weight": w(v, d), "model.norm.weight": np.ones(d, bf16)})
  if not c.get("tie_word_embeddings"):
    shards[-1]["lm_head.weight"] = w(v, d)
  for i in range(layers):
    p = f"model.layers.{i}."
    shards[i * n_files // layers].update({
        p + "self_attn.q_proj.weight": w(q, d), p + "self_attn.k_proj.weight": w(kv, d),
        p + "self_attn.v_proj.weight": w(kv, d), p + "self_attn.o_proj.weight": w(d, q),
        p + "mlp.gate_proj.weight": w(f, d), p + "mlp.up_proj.weight": w(f, d),
        p + "mlp.down_proj.weight": w(d, f), p + "input_layernorm.weight": np.ones(d, bf16),
        p + "post_attention_layernorm.weight": np.ones(d, bf16)})
  weight_map = {}
  for j, shard in enumerate(shards):
    name = f"model-{j + 1:05d}-of-{n_files:05d}.safetensors"
    save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
    weight_map.update({k: name for k in shard})
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
    json.dump({"metadata": {}, "weight_map": weight_map}, fh)
  with open(os.path.join(path, "config.json"), "w") as fh:
    json.dump(dict(c, torch_dtype="bfloat16"), fh)


def rss_anon():
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("RssAnon:"):
        return int(line.split()[1]) * 1024
  return 0


def cpu_seconds():
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def measure(path, mode):
  """Runs in the child: loads once, prints a JSON line."""
  import jax
  import ftjax
  from ftjax import quant
  jax.numpy.zeros(1).block_until_ready()  # backend up before the baseline
  base, peak, stop = rss_anon(), [0], threading.Event()

  def sample():
    while not stop.is_set():
      peak[0] = max(peak[0], rss_anon())
      time.sleep(0.002)

  t = threading.Thread(target=sample, daemon=True)
  t.start()
  t0, cpu0 = time.time(), cpu_seconds()
  model = ftjax.load_hf(path, dtype="bfloat16", quant=None if mode == "bf16" else mode)
  jax.block_until_ready(model.params)
  seconds, cpu = time.time() - t0, cpu_seconds() - cpu0
  stop.set()
  t.join()
  peak[0] = max(peak[0], rss_anon())
  print(json.dumps({"mode": mode, "seconds": seconds, "cpu_seconds": cpu,
                    "params_bytes": quant.nbytes(model.params),
                    "peak_over_baseline": peak[0] - base, "after_over_baseline": rss_anon() - base}))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--dir", default="/tmp/ftjax_1gb")
  ap.add_argument("--child", default=None)
  args = ap.parse_args()
  if args.child:
    return measure(args.dir, args.child)
  build(args.dir)
  size = sum(os.path.getsize(os.path.join(args.dir, f)) for f in os.listdir(args.dir)
             if f.endswith(".safetensors"))
  print(f"checkpoint: {size / 1e9:.3f} GB bf16 in 2 shards ({args.dir})")
  print("| mode | load s | / bf16 | CPU s | / bf16 | params GB | peak RssAnon GB | peak / file size "
        "| peak - params GB |")
  print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
  first = None
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout's ftjax
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p))
  for mode in ("bf16", "int8", "int4", "nf4"):
    out = subprocess.run([sys.executable, __file__, f"--dir={args.dir}", f"--child={mode}"],
                         capture_output=True, text=True, check=True, env=env)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    first = first or r
    print(f"| {mode} | {r['seconds']:.1f} | {r['seconds'] / first['seconds']:.2f}x | "
          f"{r['cpu_seconds']:.1f} | {r['cpu_seconds'] / first['cpu_seconds']:.2f}x | "
          f"{r['params_bytes'] / 1e9:.3f} | "
          f"{r['peak_over_baseline'] / 1e9:.3f} | {r['peak_over_baseline'] / size:.2f} | "
          f"{(r['peak_over_baseline'] - r['params_bytes']) / 1e9:.3f} |", flush=True)


if __name__ == "__main__":
  main()
