"""README's first command, shortened: the demo recipe end to end through the CLIs."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(cwd, module, *args):
  """python -m ftjax.MODULE ARGS in cwd, with this repo's ftjax."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  return subprocess.run([sys.executable, "-m", f"ftjax.{module}", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=600)


def test_demo_trains_then_generates(tmp_path):
  train = _cli(tmp_path, "train", f"--config={REPO}/configs/demo.py", "--config.train.steps=6",
               "--config.train.eval_every=3", "--config.train.eval_generate=4",
               "--config.ckpt.every=3")
  assert train.returncode == 0, train.stderr[-3000:]
  assert "before training: exact match 0.0% on 4 eval prompts" in train.stdout
  assert "after training: exact match" in train.stdout
  assert "final eval_loss" in train.stdout
  workdir = tmp_path / "runs" / "demo"
  assert {"3", "6"} <= set(os.listdir(workdir / "checkpoints"))
  gen = _cli(tmp_path, "generate", f"--workdir={workdir}", "--prompt=my telly wont turn on asap",
             "--max_new_tokens=8")
  assert gen.returncode == 0, gen.stderr[-3000:]
  completion = gen.stdout.strip("\n")
  assert completion and "telly" not in completion  # only the completion, not the prompt


def test_demo_chat_trains_and_both_demos_check_clean(tmp_path):
  """The chat variant trains from its messages data; check_data finds nothing in either demo's
  shipped data (exit 0), and nothing was trained on a truncated conversation."""
  for name in ("demo", "demo_chat"):
    check = _cli(tmp_path, "check_data", f"--config={REPO}/configs/{name}.py")
    assert check.returncode == 0, (check.stdout + check.stderr)[-3000:]
    assert "no findings" in check.stdout
  train = _cli(tmp_path, "train", f"--config={REPO}/configs/demo_chat.py", "--config.train.steps=4",
               "--config.train.eval_every=0", "--config.train.eval_generate=2",
               "--config.ckpt.every=4")
  assert train.returncode == 0, train.stderr[-3000:]
  assert "0 truncated to data.seq_len" in train.stdout
  assert "data check: 0 duplicates, 0 near duplicates, 0 conflicts, 0 leakage" in train.stdout
  assert "<s>assistant\\n" in train.stdout  # the eval prompt is the rendered conversation
  assert "after training: exact match" in train.stdout
  assert os.path.isdir(tmp_path / "runs" / "demo_chat" / "checkpoints" / "4")
