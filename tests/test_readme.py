"""README's commands, top to bottom, as a new user runs them in a fresh clone.

Every `python -m ftjax.*` command of README's bash blocks runs in order, in a directory laid out
like the repo (so `configs/...`, `runs/...` and `exports/...` resolve as they do for a user), and
must exit 0; so must the multi-process launcher (`launch/local_multiprocess.sh`, with the
environment its line sets), whose console must not carry gloo's connection lines. Only two things
differ, to keep this minutes: training runs (the launcher's too) are capped at a few steps and
decode a few eval prompts, decoding at a few tokens, `ftjax.eval` on a few rows (the overrides
are appended, so they win),
and `ftjax.plan` (compiled in tests/test_plan.py) is left to its own tests.
"""
import os
import re
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPS = {"ftjax.train": ["--config.train.steps=4", "--config.train.eval_generate=2",
                       "--config.train.eval_every=0"],
        "ftjax.generate": ["--max_new_tokens=16"], "ftjax.eval": ["--max_new_tokens=16", "--rows=4"]}


LAUNCHER = "launch/local_multiprocess.sh"


def readme_commands() -> list[str]:
  with open(os.path.join(REPO, "README.md")) as f:
    text = f.read()
  commands = []
  for block in re.findall(r"```bash\n(.*?)```", text, re.S):
    for line in block.replace("\\\n", " ").splitlines():
      line = line.split(" #")[0].strip()
      for part in line.split("&&"):  # `pip install -e . && python -m ftjax.train ...`
        part = part.strip()
        if part.startswith("python -m ftjax.") and not part.startswith("python -m ftjax.plan"):
          commands.append(part)
        elif LAUNCHER in part:
          commands.append(part)
  return commands


def test_readme_commands_run_in_order(tmp_path):
  commands = readme_commands()
  assert any(c.startswith("python -m ftjax.train --config=configs/demo.py") for c in commands)
  assert any(LAUNCHER in c for c in commands)
  for name in ("configs", "launch"):
    os.symlink(os.path.join(REPO, name), tmp_path / name)
  env = dict(os.environ, PYTHONPATH=REPO)
  for command in commands:
    argv, run_env = shlex.split(command), dict(env)
    while "=" in argv[0]:  # `DEVICES_PER_PROCESS=2 launch/...`: the line's environment
      key, _, value = argv.pop(0).partition("=")
      run_env[key] = value
    if argv[0] == LAUNCHER:  # its processes run `python -m ftjax.train` with this python
      run_env["PYTHON"] = sys.executable
      argv += CAPS["ftjax.train"]
    else:
      argv[0] = sys.executable
      argv += CAPS.get(argv[2], [])
    out = subprocess.run(argv, cwd=tmp_path, env=run_env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, (command, out.stdout[-2000:], out.stderr[-3000:])
    if argv[0] == LAUNCHER:
      assert "after training: exact match" in out.stdout, out.stdout[-3000:]
      assert "[Gloo]" not in out.stdout + out.stderr, out.stdout[-3000:]
    if argv[2] == "ftjax.export" and "--format=peft" in command:
      assert re.search(r"checkpoint step \d+", out.stdout), out.stdout
      out_dir = next(a for a in argv if a.startswith("--out="))[len("--out="):]
      written = list((tmp_path / out_dir).glob("**/adapter_model.safetensors"))  # one per adapter
      assert written
      for path in written:
        mode = os.stat(path).st_mode & 0o777
        assert mode & 0o044 == 0o044, oct(mode)  # readable by a server running as another user
