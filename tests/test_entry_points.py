"""export, generate and eval as a user runs them: what they refuse (exit 1, one line naming the
culprit, no traceback, nothing that was there changed), what they say they wrote, and eval's
scoring of each adapter on its own eval source (against a float64 cross-entropy of ftjax.forward).

One demo base and a few workdirs of random adapters (orbax checkpoints as training writes them,
no training) serve the module; model.path is relative, as a recipe's is, so the CLIs run from the
module's root.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import ftjax
from ftjax import ckpt, data, export, hf_io, lora
from ftjax.config import defaults

from test_export import random_adapters

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))
import demo  # noqa: E402

TRAIN = {"json": [{"prompt": "my telly is broken", "completion": '{"product": "tv"}'}],
         "intent": [{"prompt": "where is my parcel", "completion": "tracking"}]}
EVAL = {"json": [{"prompt": p, "completion": c} for p, c in (
            ("the laptop will not start", '{"product": "laptop"}'),
            ("phone screen cracked asap", '{"product": "phone", "urgent": true}'),
            ("my fridge is noisy", '{"product": "fridge"}'))],
        "intent": [{"prompt": p, "completion": c} for p, c in (
            ("cancel my order please", "cancel"), ("i want my money back", "refund"))]}


def _jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def save_workdir(path, adapters, steps, model_path="base", **data_keys):
  """A workdir as training leaves it: config.json and one orbax checkpoint per step."""
  c = defaults()
  c.workdir, c.model.path, c.model.dtype = str(path), model_path, "float32"
  c.lora.rank, c.lora.alpha = adapters.rank, adapters.alpha
  for key, value in data_keys.items():
    setattr(c.data, key, value)
  meta = {"config": json.loads(c.to_json_best_effort()), "lora": ckpt.lora_meta(adapters),
          "base": {}}
  mngr = ckpt.manager(str(path), keep=0)
  for step in steps:
    ckpt.save(mngr, {"adapters": adapters.params, "step": np.int32(step)}, meta, force=True)
    mngr.wait_until_finished()
  mngr.close()
  with open(path / "config.json", "w") as f:
    json.dump(meta["config"], f, indent=2)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  root = tmp_path_factory.mktemp("entry")
  demo.build_base(str(root / "base"))
  spec = hf_io.read_spec(str(root / "base"))
  for name in TRAIN:
    _jsonl(root / f"train_{name}.jsonl", TRAIN[name])
    _jsonl(root / f"eval_{name}.jsonl", EVAL[name])
  named = {"json": random_adapters(spec, seed=3), "intent": random_adapters(spec, seed=4)}
  save_workdir(root / "one", named["json"], (3, 6), train="train_json.jsonl",
               eval="eval_json.jsonl")
  save_workdir(root / "two", lora.stack(named), (3,),
               train="json=train_json.jsonl,intent=train_intent.jsonl",
               eval="json=eval_json.jsonl,intent=eval_intent.jsonl")
  save_workdir(root / "nobase", named["json"], (3,), model_path="missing_base",
               train="train_json.jsonl")
  # the newest checkpoint's arrays gone (a disk that lost them), the one before intact
  shutil.copytree(root / "one", root / "broken")
  data_dir = root / "broken" / "checkpoints" / "6" / "state" / "ocdbt.process_0" / "d"
  for name in os.listdir(data_dir):
    os.remove(data_dir / name)
  return dict(root=root, spec=spec, named=named)


def cli(env, module, *args):
  return subprocess.run([sys.executable, "-m", f"ftjax.{module}", *args], cwd=env["root"],
                        env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO),
                        capture_output=True, text=True, timeout=900)


def refused(proc, start: str, end: str = ""):
  """Exit 1 with one line on stderr (and nothing else), starting and ending as given."""
  assert proc.returncode == 1, (proc.stdout + proc.stderr)[-3000:]
  assert proc.stderr.count("\n") == 1, proc.stderr[-3000:]
  line = proc.stderr.rstrip("\n")
  assert line.startswith("error: " + start) and line.endswith(end), line


def snapshot(path) -> dict:
  """Every file under path: its bytes' digest and mtime."""
  out = {}
  for root, _, files in os.walk(path):
    for name in files:
      p = os.path.join(root, name)
      with open(p, "rb") as f:
        out[os.path.relpath(p, path)] = (hashlib.sha1(f.read()).hexdigest(),
                                         os.stat(p).st_mtime_ns)
  return out


def test_damaged_newest_checkpoint_is_one_line_naming_the_step_before(env):
  root = env["root"]
  before = snapshot(root / "broken")
  for module, args in (("export", ["--out=broken_export"]), ("generate", ["--prompt=hello"]),
                       ("eval", [])):
    proc = cli(env, module, "--workdir=broken", *args)
    refused(proc, "broken/checkpoints/6: cannot read the checkpoint: a file is missing or "
            "unreadable (", "it is damaged: use --step=3, the previous complete checkpoint")
  assert not (root / "broken_export").exists()
  assert snapshot(root / "broken") == before

  # as told: --step=3 decodes; --input/--output says what it wrote, and nothing else is printed
  _jsonl(root / "prompts.jsonl", [{"prompt": "the laptop will not start", "adapter": "default"},
                                  {"prompt": "my fridge is noisy"}])
  proc = cli(env, "generate", "--workdir=broken", "--step=3", "--input=prompts.jsonl",
             "--output=completions.jsonl", "--max_new_tokens=4")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout == "wrote 2 completions to completions.jsonl\n"
  assert proc.stderr == ""  # a clean console: no orbax read notes, no XLA log
  with open(root / "completions.jsonl") as f:
    assert [json.loads(line)["prompt"] for line in f] == [
        "the laptop will not start", "my fridge is noisy"]


def test_exports_never_write_over_what_they_did_not_write(env, monkeypatch):
  root = env["root"]
  monkeypatch.chdir(root)  # model.path is relative to where the recipe ran
  before = snapshot(root / "one")
  refused(cli(env, "export", "--workdir=one", "--format=merged", "--out=one"),
          "--out=one: is the training workdir (one); an export never writes there")
  assert snapshot(root / "one") == before
  (root / "mine").mkdir()
  (root / "mine" / "notes.txt").write_text("mine")
  refused(cli(env, "export", "--workdir=one", "--format=peft", "--out=mine"),
          "--out=mine: is not empty and holds files no export wrote (notes.txt)",
          "--overwrite to replace it whole")
  assert os.listdir(root / "mine") == ["notes.txt"]

  # an export's own directory may be exported into again, and holds that export alone
  export.export_peft("one", "again")
  assert "adapter_config.json" in os.listdir("again")
  export.export_merged("one", "again")
  export.export_merged("one", "fresh")
  assert sorted(os.listdir("again")) == sorted(os.listdir("fresh"))
  assert "adapter_config.json" not in os.listdir("again")
  with open(root / "again" / export.MANIFEST) as f:
    assert json.load(f)["format"] == "merged"
  export.export_peft("one", "mine", overwrite=True)  # replaced whole
  assert "notes.txt" not in os.listdir("mine")
  assert "adapter_model.safetensors" in os.listdir("mine")

  # several adapters: one line per directory written; the base recorded as an absolute path
  proc = cli(env, "export", "--workdir=two", "--format=peft", "--out=two_peft")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.splitlines() == [
      f"wrote peft export of two adapter {name} (checkpoint step 3) to two_peft/{name}"
      for name in ("json", "intent")]
  for name in ("json", "intent"):
    with open(root / "two_peft" / name / "adapter_config.json") as f:
      assert json.load(f)["base_model_name_or_path"] == str(root / "base")
    back = ftjax.load_adapters(str(root / "two_peft" / name))
    np.testing.assert_array_equal(back.params["q_proj"]["b"],
                                  env["named"][name].params["q_proj"]["b"])


def test_generate_refuses_bad_prompts_before_loading_the_base(env):
  """nobase's model.path does not exist: each refusal comes before the base would be read."""
  refused(cli(env, "generate", "--workdir=nobase", "--prompt="),
          "--prompt is empty; give the text to complete")
  refused(cli(env, "generate", "--workdir=nobase", "--prompt=hi", "--system=be brief"),
          "--system: nobase trains data.format=prompt_completion, which has no system message")
  _jsonl(env["root"] / "empty.jsonl", [{"prompt": "fine"}, {"prompt": "  "}])
  refused(cli(env, "generate", "--workdir=nobase", "--input=empty.jsonl", "--output=o.jsonl"),
          "empty.jsonl:2: 'prompt' is empty")
  assert not (env["root"] / "o.jsonl").exists()


def _cross_entropy(model, adapters, rows, tokenizer) -> float:
  """Mean cross-entropy per target token in float64 from ftjax.forward's logits, row by row."""
  examples, _ = data.tokenize_rows(rows, tokenizer, "prompt_completion", 128, "eval")
  total = count = 0.0
  for e in examples:
    n = len(e.ids) - 1
    padded = np.zeros((1, 64), np.int32)  # one shape, one compile (causal: the tail is unseen)
    padded[0, :n] = e.ids[:-1]
    logits = np.asarray(ftjax.forward(model, padded, adapters), np.float64)[0, :n]
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    nll = -logp[np.arange(n), e.ids[1:]]
    total, count = total + float(nll @ e.target_mask[1:]), count + float(e.target_mask[1:].sum())
  return total / count


def test_eval_scores_each_adapter_on_its_own_source(env):
  root = env["root"]
  refused(cli(env, "eval", "--workdir=two", "--data=eval_json.jsonl"),
          "--data=eval_json.jsonl: two holds adapters json, intent; say which adapter each file "
          "scores: --data=json=FILE,intent=FILE")
  (root / "prefix.txt").write_text("Answer in JSON. ")
  proc = cli(env, "eval", "--workdir=two", "--max_new_tokens=4", "--prompt_prefix=prefix.txt")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stderr == ""  # a clean console
  with open(root / "two" / "eval.json") as f:
    report = json.load(f)
  variants = report["variants"]
  assert list(variants) == [f"{src}: {v}" for src in ("json", "intent")
                            for v in ("base", "base + prompt", src)]
  for label, m in variants.items():
    src = label.split(":")[0]
    assert m["rows"] == len(EVAL[src]) and m["data"] == f"eval_{src}.jsonl"
    assert ("valid_json" in m) == (src == "json")  # only the JSON source's references are JSON
  model = ftjax.load_hf(str(root / "base"), dtype="float32")
  tokenizer = data.load_tokenizer(str(root / "base"))
  for src in ("json", "intent"):
    want = _cross_entropy(model, env["named"][src], EVAL[src], tokenizer)
    assert variants[f"{src}: {src}"]["eval_loss"] == pytest.approx(want, rel=1e-4)
    base = _cross_entropy(model, None, EVAL[src], tokenizer)
    assert variants[f"{src}: base"]["eval_loss"] == pytest.approx(base, rel=1e-4)
    assert abs(want - base) > 1e-2  # the adapter moved the loss, so the comparison can fail
  assert [s["data"] for s in report["samples"]] == ["json"] * 3 + ["intent"] * 2
  assert [s["reference"] for s in report["samples"]] == [
      r["completion"] for src in ("json", "intent") for r in EVAL[src]]
  assert not any(s["prompt"].startswith("<s>") for s in report["samples"])  # no special tokens
  assert "json: base + prompt" in proc.stdout and "intent: intent" in proc.stdout


def test_demo_base_builds_without_the_tokenizer_trainers_bars(tmp_path):
  """The demo's first run trains its tokenizer; on a terminal the trainer would draw four progress
  bars of its own before the run's one."""
  import pty
  code = (f"import sys; sys.path.insert(0, {os.path.join(REPO, 'configs')!r}); import demo; "
          f"demo.build_base({str(tmp_path / 'base')!r})")
  master, slave = pty.openpty()
  proc = subprocess.Popen([sys.executable, "-c", code], stdout=slave, stderr=slave,
                          env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO))
  os.close(slave)
  out = b""
  while True:
    try:
      chunk = os.read(master, 4096)
    except OSError:  # the terminal closed: the child is done
      break
    if not chunk:
      break
    out += chunk
  os.close(master)
  assert proc.wait(timeout=600) == 0, out[-3000:]
  assert os.path.isfile(tmp_path / "base" / "model.safetensors")
  assert out.decode(errors="replace").strip() == "", out[-3000:]


def test_xla_cpp_log_is_quiet_on_cpu(tmp_path):
  """XLA's C++ log (its "Very slow compile?" alarm after two minutes of compiling, an ERROR line)
  stays off the console on a CPU-only run; made to speak here by a dump directory it cannot
  create, which it reports with ERROR lines of the same log."""
  code = "import ftjax, jax, jax.numpy as jnp; print(jax.jit(lambda x: x * 2)(jnp.ones(3)).sum())"
  (tmp_path / "file").write_text("")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             XLA_FLAGS=f"--xla_dump_to={tmp_path / 'file' / 'dump'}")
  env.pop("TF_CPP_MIN_LOG_LEVEL", None)
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0 and proc.stdout == "6.0\n", proc.stderr[-3000:]
  assert proc.stderr == "", proc.stderr[-3000:]
