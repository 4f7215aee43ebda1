"""The demo on a tiny Mixtral against the demo on its dense base of the same active size, on CPU.

  python bench/moe_vs_dense.py [--steps=N] [--append]   # ~8 min on 2 cores
  python bench/moe_vs_dense.py --smoke                  # 4 steps: checks the script runs

configs/demo.py (a Llama-shaped base) and configs/demo_moe.py (that base upcycled: 4 experts,
each a copy of its MLP, top-2 behind a random router, so the same function before training)
train with the same recipe, LoRA on all linear projections (every expert) and a frozen router,
each as its own `python -m ftjax.train` process; a third run has the router's weights zeroed
(every token takes experts 0 and 1, weight 1/2 each: routing taken out of the comparison). The
table has each run's loss at the last step,
final eval loss, greedy exact match of the JSON on the demo's 40 eval prompts before and after
training, its wall time, and the MoE run's expert load at the last log step (the largest and
smallest share of routed tokens any expert took: 0.25 each when balanced). The question is
whether LoRA on the experts learns the task as it does on the dense base.
"""
import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def run(recipe: str, root: str, steps: int, name: str = "", *flags: str) -> dict:
  """One ftjax.train process in scratch dir `root`: its last logged metrics and wall time."""
  workdir = os.path.join(root, "runs", name or os.path.splitext(recipe)[0])
  cmd = [sys.executable, "-m", "ftjax.train", f"--config={REPO}/configs/{recipe}", *flags,
         f"--config.workdir={workdir}", f"--config.train.steps={steps}",
         f"--config.train.eval_every={steps}", f"--config.ckpt.every={steps}",
         f"--config.optim.warmup_steps={min(20, steps // 4)}", "--config.train.remat=auto"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  t = time.perf_counter()
  proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)  # bases in root
  wall = time.perf_counter() - t
  if proc.returncode:
    sys.exit(f"{' '.join(cmd)} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    metrics = [json.loads(line) for line in f]
  last = lambda key: [m[key] for m in metrics if key in m][-1]
  em = {m["step"]: m["exact_match"] for m in metrics if "exact_match" in m}
  out = {"wall_s": wall, "loss": last("loss"), "eval_loss": last("eval_loss"),
         "em_before": em.get(0), "em_after": em.get(steps)}
  if any("expert_load_max" in m for m in metrics):
    out["load"] = (last("expert_load_max"), last("expert_load_min"))
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=400, help="the demo recipe's 400 by default")
  p.add_argument("--smoke", action="store_true", help="4 steps: checks the script runs")
  p.add_argument("--append", action="store_true", help="append the table to bench/RESULTS.md")
  args = p.parse_args()
  steps = 4 if args.smoke else args.steps
  sys.path.insert(0, os.path.join(REPO, "configs"))
  import demo_moe
  with tempfile.TemporaryDirectory() as root:
    dense = run("demo.py", root, steps)  # builds root/runs/demo_base
    moe = run("demo_moe.py", root, steps)
    uniform = demo_moe.build_moe_base(os.path.join(root, demo_moe.demo.BASE),
                                      os.path.join(root, "runs", "zero_router"), router_std=0.0)
    fixed = run("demo_moe.py", root, steps, "moe_zero_router", f"--config.model.path={uniform}")
  pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"
  rows = [f"| {name} | {r['loss']:.3f} | {r['eval_loss']:.3f} | {pct(r['em_before'])} | "
          f"{pct(r['em_after'])} | {r['wall_s']:.0f} |" for name, r in
          (("dense (demo.py)", dense), ("Mixtral, 4 experts top-2 (demo_moe.py)", moe),
           ("the same, router zeroed (experts 0 and 1 for every token)", fixed))]
  text = "\n".join([
      f"The demo recipe, {steps} steps of 16 packed rows x 96, LoRA rank 16 all-linear, "
      f"remat=auto, float32; {os.cpu_count()} cores.", "",
      "| base | loss, last step | eval loss | exact match before | after | wall (s) |",
      "|---|---|---|---|---|---|", *rows, "",
      f"**MoE / dense: eval loss {moe['eval_loss'] / dense['eval_loss']:.2f}x, exact match "
      f"{pct(moe['em_after'])} vs {pct(dense['em_after'])}, wall time "
      f"{moe['wall_s'] / dense['wall_s']:.2f}x**; the MoE's expert load at the last log step: "
      f"largest share {moe['load'][0]:.3f}, smallest {moe['load'][1]:.3f} (0.25 each when "
      f"balanced); router zeroed / dense: eval loss "
      f"{fixed['eval_loss'] / dense['eval_loss']:.2f}x, exact match {pct(fixed['em_after'])}"])
  print(text)
  if args.smoke:
    print("\nsmoke run: 4 steps, the figures mean nothing")
  elif args.append:
    cmd = "python bench/moe_vs_dense.py " + " ".join(sys.argv[1:])
    with open(os.path.join(HERE, "RESULTS.md"), "a") as f:
      f.write(f"\n### The demo on a mixture of experts and on its dense base, CPU, "
              f"{datetime.date.today()}\n\n`{cmd}`\n\n{text}\n")


if __name__ == "__main__":
  main()
