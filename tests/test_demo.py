"""README's first command, shortened: the demo recipe end to end through the CLIs."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_trains_then_generates(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  train = subprocess.run(
      [sys.executable, "-m", "ftjax.train", f"--config={REPO}/configs/demo.py",
       "--config.train.steps=6", "--config.train.eval_every=3", "--config.train.eval_generate=4",
       "--config.ckpt.every=3"],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
  assert train.returncode == 0, train.stderr[-3000:]
  assert "before training: exact match 0.0% on 4 eval prompts" in train.stdout
  assert "after training: exact match" in train.stdout
  assert "final eval_loss" in train.stdout
  workdir = tmp_path / "runs" / "demo"
  assert {"3", "6"} <= set(os.listdir(workdir / "checkpoints"))
  gen = subprocess.run(
      [sys.executable, "-m", "ftjax.generate", f"--workdir={workdir}",
       "--prompt=my telly wont turn on asap", "--max_new_tokens=8"],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert gen.returncode == 0, gen.stderr[-3000:]
  completion = gen.stdout.strip("\n")
  assert completion and "telly" not in completion  # only the completion, not the prompt
