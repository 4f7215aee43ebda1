"""README's first command, shortened: the demo recipe end to end through the CLIs, as a new user
on a machine without a TPU sees it (libtpu installed by the test extra, JAX_PLATFORMS unset, and
torch hidden as on a plain `pip install -e .`)."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Runs a module as `python -m` does, with torch invisible to transformers' availability check.
WITHOUT_TORCH = (
    "import importlib.util, runpy, sys\n"
    "find = importlib.util.find_spec\n"
    "importlib.util.find_spec = lambda name, *a, **k: None if name == 'torch' else find(name, *a, **k)\n"
    "sys.argv = sys.argv[1:]\n"
    "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n")


def test_demo_trains_then_generates(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  env["PYTHONPATH"] = REPO
  eval_file = tmp_path / "eval8.jsonl"
  with open(os.path.join(REPO, "configs/demo_data/eval.jsonl")) as f:
    eval_file.write_text("".join(f.readlines()[:8]))
  train = subprocess.run(
      [sys.executable, "-c", WITHOUT_TORCH, "ftjax.train", f"--config={REPO}/configs/demo.py",
       "--config.train.steps=6", "--config.train.eval_every=3", "--config.train.eval_generate=40",
       "--config.ckpt.every=3", f"--config.data.eval={eval_file}"],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
  assert train.returncode == 0, train.stderr[-3000:]
  # A clean console: nothing on stderr (no libtpu startup log, no "PyTorch was not found").
  assert train.stderr == "", train.stderr[-3000:]
  # the number of prompts decoded, not the config value (the eval file has 8 rows)
  assert "before training: exact match 0.0% on 8 eval prompts" in train.stdout
  assert "after training: exact match" in train.stdout
  assert "final eval_loss" in train.stdout
  workdir = tmp_path / "runs" / "demo"
  with open(workdir / "metrics.jsonl") as f:
    evals = [m["step"] for m in map(json.loads, f) if "eval_loss" in m]
  assert evals == [3, 6]  # the last step's eval is written once, not again as the final one
  assert {"3", "6"} <= set(os.listdir(workdir / "checkpoints"))
  gen = subprocess.run(
      [sys.executable, "-m", "ftjax.generate", f"--workdir={workdir}",
       "--prompt=my telly wont turn on asap", "--max_new_tokens=8"],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert gen.returncode == 0, gen.stderr[-3000:]
  assert gen.stderr == "", gen.stderr[-3000:]  # no orbax notes on reading the checkpoint
  completion = gen.stdout.strip("\n")
  assert completion and "telly" not in completion  # only the completion, not the prompt
  ev = subprocess.run(
      [sys.executable, "-c", WITHOUT_TORCH, "ftjax.eval", f"--workdir={workdir}",
       "--max_new_tokens=8", "--rows=3"], cwd=tmp_path, env=env, capture_output=True, text=True,
      timeout=300)
  assert ev.returncode == 0, ev.stderr[-3000:]
  report = json.loads((workdir / "eval.json").read_text())
  assert {v["rows"] for v in report["variants"].values()} == {3}  # --rows=3 of the file's 8
  assert report["data"].endswith("(first 3 of 8 rows)"), report["data"]
  assert ev.stderr == "", ev.stderr[-3000:]
  assert "exact match" in ev.stdout and f"written to {workdir / 'eval.json'}" in ev.stdout
  assert "'<s>" not in ev.stdout  # the samples' prompts are shown without the BOS


def _cli(cwd, module, *args):
  """python -m ftjax.MODULE ARGS in cwd, with this repo's ftjax."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  return subprocess.run([sys.executable, "-m", f"ftjax.{module}", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=600)


def test_demo_chat_trains_and_both_demos_check_clean(tmp_path):
  """The chat variant trains from its messages data; check_data finds nothing in either demo's
  shipped data (exit 0), and nothing was trained on a truncated conversation."""
  for name in ("demo", "demo_chat"):
    report = tmp_path / f"{name}.json"
    check = _cli(tmp_path, "check_data", f"--config={REPO}/configs/{name}.py", f"--json={report}")
    assert check.returncode == 0, (check.stdout + check.stderr)[-3000:]
    assert "no findings" in check.stdout
    assert check.stdout.splitlines()[-1] == (
        f"findings written to {report} (every item of each, as JSON)")
    assert json.loads(report.read_text())["duplicates"] == []
  train = _cli(tmp_path, "train", f"--config={REPO}/configs/demo_chat.py", "--config.train.steps=4",
               "--config.train.eval_every=0", "--config.train.eval_generate=2",
               "--config.ckpt.every=4")
  assert train.returncode == 0, train.stderr[-3000:]
  assert "0 truncated to data.seq_len" in train.stdout
  assert ("data check: 0 duplicates, 0 near duplicates, 0 conflicts, 0 leakage, 0 empty targets, "
          "0 format outliers, 0 chat template problems") in train.stdout
  # the eval prompt is the rendered conversation, shown without special tokens (<s>, </s>)
  assert "\\nassistant\\n' -> " in train.stdout
  assert "sample '<s>" not in train.stdout
  assert "after training: exact match" in train.stdout
  assert os.path.isdir(tmp_path / "runs" / "demo_chat" / "checkpoints" / "4")
