"""Several adapters in one run (named data.train sources) equal one run per source: the same
exported tensors, per-step losses and eval losses; a resume mid-run is bit-exact; bad sources and
unknown adapter names are one-line errors. Runs with lora.dropout 0 (dropout masks are drawn over
the whole batch, so they differ from a single run's)."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors.numpy

from ftjax import ckpt, data, export, train
from ftjax.config import defaults
from ftjax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))
import demo  # noqa: E402  (the demo recipe builds the tiny base and tokenizer)

STEPS = 6
NAMES = ("json", "tone")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """The demo base, and two train sources of different rows (and sizes), each with eval rows."""
  root = tmp_path_factory.mktemp("multi")
  base = str(root / "base")
  demo.build_base(base)
  with open(os.path.join(REPO, "configs/demo_data/train.jsonl")) as f:
    rows = f.read().splitlines()
  with open(os.path.join(REPO, "configs/demo_data/eval.jsonl")) as f:
    evals = f.read().splitlines()
  paths = {}
  for name, train_rows, eval_rows in (("json", rows[:120], evals[:10]),
                                      ("tone", rows[500:660], evals[10:24])):
    for kind, chosen in (("train", train_rows), ("eval", eval_rows)):
      paths[name, kind] = str(root / f"{name}_{kind}.jsonl")
      with open(paths[name, kind], "w") as f:
        f.write("\n".join(chosen) + "\n")
  return base, paths, root


def config(base, workdir, train_, eval_, **overrides):
  c = defaults()
  c.workdir, c.model.path, c.model.dtype = str(workdir), base, "float32"
  c.data.train, c.data.eval = train_, eval_
  c.data.seq_len, c.train.batch_size, c.train.steps, c.train.log_every = 64, 4, STEPS, 1
  c.train.remat, c.train.eval_every, c.mesh.fsdp = "none", 0, 1
  # a learning rate that moves the adapters well away from their init within a few steps, yet
  # keeps Adam's amplification of float rounding (on gradient entries near 0) below 1e-5
  c.optim.lr, c.optim.warmup_steps, c.ckpt.every, c.ckpt.keep = 3e-3, 1, 3, 3
  for key, value in overrides.items():
    section, name = key.split("__")
    c[section][name] = value
  return c


def metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def peft_tensors(path):
  return safetensors.numpy.load_file(os.path.join(path, "adapter_model.safetensors"))


def rel(x, y):
  return float(np.linalg.norm(x - y) / np.linalg.norm(y))


@pytest.fixture(scope="module", params=[dict(packing=False, grad_accum=1),
                                        dict(packing=True, grad_accum=2)],
                ids=["unpacked", "packed-accum2"])
def runs(files, request):
  """One run of both sources, and one run of each source alone, with the same config and seed."""
  base, paths, root = files
  where = root / "-".join(f"{k}{v}" for k, v in request.param.items())
  over = {f"{'data' if k == 'packing' else 'train'}__{k}": v for k, v in request.param.items()}
  multi = config(base, where / "multi", ",".join(f"{n}={paths[n, 'train']}" for n in NAMES),
                 ",".join(f"{n}={paths[n, 'eval']}" for n in NAMES), **over)
  train.run(multi)
  for n in NAMES:
    train.run(config(base, where / n, paths[n, "train"], paths[n, "eval"], **over))
  return where


def test_two_adapters_in_one_run_equal_two_single_runs(runs, tmp_path):
  export.export_peft(str(runs / "multi"), str(tmp_path / "all"))
  assert sorted(os.listdir(tmp_path / "all")) == sorted(NAMES + (export.MANIFEST,))  # one PEFT
  # dir per adapter, and the record of what the export wrote
  got_metrics = metrics(runs / "multi")
  trained = {}
  for n in NAMES:
    export.export_peft(str(runs / n), str(tmp_path / n))
    want, got = peft_tensors(tmp_path / n), peft_tensors(tmp_path / "all" / n)
    assert sorted(got) == sorted(want)
    for key in want:
      assert rel(got[key], want[key]) < 1e-5, (n, key, rel(got[key], want[key]))
    trained[n] = want
    alone = metrics(runs / n)
    assert all("/" not in k for line in alone for k in line)  # a one-adapter run's keys as ever
    for key, per in (("loss", "loss/" + n), ("grad_norm", "grad_norm/" + n),
                     ("eval_loss", "eval_loss/" + n)):
      want_v = [m[key] for m in alone if key in m]
      got_v = [m[per] for m in got_metrics if per in m]
      assert len(got_v) == len(want_v) >= 1, key
      np.testing.assert_allclose(got_v, want_v, rtol=1e-5, err_msg=per)
    with open(tmp_path / "all" / n / "README.md") as f:
      assert f"adapter: {n}" in f.read()
  lora_b = [k for k in trained["json"] if "lora_B" in k]
  for key in lora_b:  # the adapters learned, and learned different things
    assert np.linalg.norm(trained["json"][key]) > 1e-3
    assert rel(trained["json"][key], trained["tone"][key]) > 0.1
  losses = [m["loss/json"] for m in got_metrics if "loss/json" in m]
  assert losses[-1] < 0.9 * losses[0]

  export.export_peft(str(runs / "multi"), str(tmp_path / "one"), adapter="tone")
  assert os.path.isfile(tmp_path / "one" / "adapter_model.safetensors")
  one, all_tone = peft_tensors(tmp_path / "one"), peft_tensors(tmp_path / "all" / "tone")
  assert sorted(one) == sorted(all_tone)
  for key in one:
    np.testing.assert_array_equal(one[key], all_tone[key])


def _state(workdir, step):
  mngr = ckpt.manager(str(workdir), keep=0, read_only=True)
  state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  mngr.close()
  return state


def test_resume_mid_run_is_bit_exact(runs, files, tmp_path):
  """The multi run saved at steps 3 and 6; dropping step 6 and rerunning resumes at 3 and must
  reach step 6's state (adapters, per-adapter optimizer state, rng, data position) bit for bit."""
  base, paths, _ = files
  straight = _state(runs / "multi", STEPS)
  resumed = tmp_path / "resumed"
  shutil.copytree(runs / "multi", resumed)
  shutil.rmtree(resumed / "checkpoints" / str(STEPS))
  with open(runs / "multi" / "config.json") as f:
    saved = json.load(f)
  cfg = config(base, resumed, saved["data"]["train"], saved["data"]["eval"],
               data__packing=saved["data"]["packing"],
               train__grad_accum=saved["train"]["grad_accum"])
  train.run(cfg)
  again = _state(resumed, STEPS)
  leaves = lambda t: jax_leaves(t)
  assert len(leaves(again)) == len(leaves(straight)) > 4
  for x, y in zip(leaves(again), leaves(straight)):
    np.testing.assert_array_equal(x, y)
  for n in NAMES:  # steps 4..6 logged again, once each, with the straight run's losses
    key = f"loss/{n}"
    got = [(m["step"], m[key]) for m in metrics(resumed) if key in m]
    assert got == [(m["step"], m[key]) for m in metrics(runs / "multi") if key in m]
    assert [step for step, _ in got] == list(range(1, STEPS + 1))
  mngr_names = ckpt.workdir_adapter_names(str(resumed))
  assert mngr_names == list(NAMES)

  # the checkpoint means these two adapters: resuming it with other sources is refused
  other = config(base, resumed, f"json={paths['json', 'train']}", "")
  with pytest.raises(UserError, match=r"adapters names: \['json', 'tone'\] -> \['json'\]"):
    train.run(other)


def jax_leaves(tree):
  import jax
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_adapter_names_of_workdirs(runs):
  assert ckpt.workdir_adapter_names(str(runs / "json")) == ["default"]
  one, _ = ckpt.load_workdir_adapters(str(runs / "json"), name="default")
  assert not one.stacked
  both, _ = ckpt.load_workdir_adapters(str(runs / "multi"))
  assert both.names == NAMES and both.params["q_proj"]["a"].shape[1] == 2
  tone, _ = ckpt.load_workdir_adapters(str(runs / "multi"), name="tone")
  np.testing.assert_array_equal(tone.params["q_proj"]["b"], both.params["q_proj"]["b"][:, 1])
  with pytest.raises(UserError, match=r"--adapter=default: .*multi.* has json, tone"):
    ckpt.load_workdir_adapters(str(runs / "multi"), name="default")
  with pytest.raises(UserError, match=r"--adapter=tone: .* has default"):
    ckpt.load_workdir_adapters(str(runs / "json"), name="tone")


def test_export_cli_unknown_adapter_is_one_line(runs, tmp_path):
  proc = subprocess.run([sys.executable, "-m", "ftjax.export", f"--workdir={runs / 'multi'}",
                         "--adapter=nope", f"--out={tmp_path / 'x'}"], cwd=REPO,
                        capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode != 0
  last = proc.stderr.strip().splitlines()[-1]
  assert "--adapter=nope" in last and "json, tone" in last and "Traceback" not in proc.stderr
  assert not os.path.exists(tmp_path / "x")


@pytest.mark.parametrize("train_, eval_, words", [
    ("json=a.jsonl,b.jsonl", "", "'b.jsonl' has no name"),
    ("json=a.jsonl,json=b.jsonl", "", "two sources named 'json'"),
    ("a b=a.jsonl,c=b.jsonl", "", "source name 'a b' must be letters"),
    ("json=a.jsonl,tone=b.jsonl", "json=e.jsonl", "data.eval='json=e.jsonl': names json, but "
     "data.train has json, tone"),
    ("a.jsonl", "json=e.jsonl", "data.train has no named sources"),
])
def test_bad_sources_are_one_line(train_, eval_, words):
  with pytest.raises(UserError) as e:
    data.eval_sources(data.train_sources(train_), eval_)
  assert words in str(e.value) and "\n" not in str(e.value)


def test_one_unnamed_eval_file_serves_every_adapter():
  assert data.eval_sources(data.train_sources("json=a.jsonl,tone=b.jsonl"), "e.jsonl") == {
      "json": "e.jsonl", "tone": "e.jsonl"}
  assert data.eval_sources(data.train_sources("a.jsonl"), "e.jsonl") == {"": "e.jsonl"}
  assert data.eval_sources(data.train_sources("json=a,tone=b"), "tone=f,json=e") == {
      "json": "e", "tone": "f"}  # keyed and ordered like data.train


def test_plan_counts_every_adapter(files):
  """ftjax.plan compiles the step the run compiles: two adapters hold twice the adapter bytes
  and optimizer state of one, and twice the batch."""
  from ftjax import plan
  base, paths, root = files
  one = plan.plan(config(base, root / "p1", paths["json", "train"], ""))
  two = plan.plan(config(base, root / "p2", f"json={paths['json', 'train']},"
                         f"tone={paths['tone', 'train']}", ""))
  for key in ("adapters", "optimizer state"):
    assert two.categories[key] == 2 * one.categories[key], key
  assert two.categories["base params"] == one.categories["base params"]
  assert two.categories["batch, step, rng"] > 1.9 * one.categories["batch, step, rng"]
