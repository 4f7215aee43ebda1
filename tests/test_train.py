"""The training loop: LoRA init, gradient flow, accumulation, learning, resume after SIGTERM."""
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ftjax
from ftjax import data, evaluation, hf_io, lora, optim, plan, prepare, step as step_lib, train
from ftjax.errors import UserError
from ftjax.config import defaults

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))
import demo  # noqa: E402  (the demo recipe builds the tiny base and tokenizer the tests share)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("demo_base"))
  demo.build_base(path)
  return path


def demo_config(base, workdir, **overrides):
  c = defaults()
  c.workdir, c.model.path, c.model.dtype = str(workdir), base, "float32"
  c.data.train = os.path.join(REPO, "configs/demo_data/train.jsonl")
  c.data.eval = os.path.join(REPO, "configs/demo_data/eval.jsonl")
  c.data.seq_len, c.train.batch_size, c.train.log_every = 64, 8, 1
  c.train.remat, c.train.eval_every, c.optim.warmup_steps = "none", 0, 5
  c.mesh.fsdp = 1
  for k, v in overrides.items():
    node = c
    *parents, leaf = k.split("__")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f]


def test_lora_init_equals_base_and_only_adapters_train(base):
  model = ftjax.load_hf(base, dtype="float32")
  tokens = np.random.default_rng(0).integers(3, 300, (2, 12))
  adapters = lora.init(model.spec, "all-linear", 8, 16.0, jax.random.PRNGKey(0))
  forward = jax.jit(ftjax.forward)
  np.testing.assert_array_equal(forward(model, tokens), forward(model, tokens, adapters))
  # a random b changes the output: the adapters are really applied
  noisy = lora.with_params(adapters, jax.tree.map(
      lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(1), x.shape), adapters.params))
  assert not np.allclose(forward(model, tokens), forward(model, tokens, noisy))

  optimizer = optim.make_optimizer(defaults().optim, 10)
  state = step_lib.init_state(adapters, optimizer, 0)
  adapter_shapes = sorted(x.shape for x in jax.tree.leaves(adapters.params))
  opt_shapes = sorted(x.shape for x in jax.tree.leaves(state["opt_state"]) if x.ndim)
  assert opt_shapes == sorted(adapter_shapes * 2)  # Adam's mu and nu, and no base leaf
  batch = {"tokens": tokens, "targets": np.roll(tokens, -1, 1),
           "loss_mask": np.ones(tokens.shape, np.float32), "segment_ids": np.ones_like(tokens)}
  grads = jax.grad(lambda a: step_lib.loss_sum(a, adapters, model, batch, None, "none")[0])(
      adapters.params)
  assert jax.tree.structure(grads) == jax.tree.structure(adapters.params)
  # b starts at zero, but its gradient does not: every adapter leaf gets trained
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads)[1::2])


def test_grad_accumulation_is_per_token(base):
  """4 micro-batches of 1 row equal 1 batch of 4 rows, with rows of very different lengths."""
  model = ftjax.load_hf(base, dtype="float32")
  tok = data.load_tokenizer(base)
  rows = data.load_rows(os.path.join(REPO, "configs/demo_data/train.jsonl"))[:4]
  rows[0] = {"prompt": rows[0]["prompt"], "completion": rows[0]["completion"] * 2}
  examples, _ = data.tokenize_rows(rows, tok, "prompt_completion", 64, "t")
  batch = data.assemble(examples, [[0], [1], [2], [3]], 64, tok.pad_id)
  key = jax.random.PRNGKey(3)
  adapters = lora.init(model.spec, "all-linear", 4, 8.0, key)
  adapters = lora.with_params(adapters, jax.tree.map(
      lambda x: x + 0.02 * jax.random.normal(key, x.shape), adapters.params))
  optimizer = optim.make_optimizer(defaults().optim, 10)
  results = []
  for accum in (1, 4):
    state = step_lib.init_state(adapters, optimizer, 0)
    fn = jax.jit(functools.partial(step_lib.train_step, adapters=adapters, optimizer=optimizer,
                                   grad_accum=accum, remat="full"))
    results.append(fn(state, model, batch))
  (s1, m1), (s4, m4) = results
  np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-5)
  np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-4)
  per_row = [float(m1["loss"])]  # per-micro-batch averaging would give a different loss:
  sums = [step_lib.loss_sum(adapters.params, adapters, model,
                            jax.tree.map(lambda x: x[i:i + 1], batch), None, "none")
          for i in range(4)]
  assert abs(np.mean([float(t / n) for t, n in sums]) - per_row[0]) > 1e-3
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               s1["adapters"], s4["adapters"])


def test_remat_policies_compute_the_same_step(base):
  """Every train.remat policy gives the step without remat (loss, gradient, update); "offload" also
  moves the layer inputs to pinned host memory in the accelerator lowering (XLA:CPU has no
  separate host memory, so only the TPU lowering, built here without a TPU, carries the move)."""
  from ftjax.model import REMAT_POLICIES
  model = ftjax.load_hf(base, dtype="float32")
  rng = np.random.default_rng(0)
  batch = {"tokens": rng.integers(3, 300, (2, 32)).astype(np.int32),
           "targets": rng.integers(3, 300, (2, 32)).astype(np.int32),
           "segment_ids": np.ones((2, 32), np.int32), "loss_mask": np.ones((2, 32), np.float32)}
  key = jax.random.PRNGKey(3)
  adapters = lora.init(model.spec, "all-linear", 4, 8.0, key)
  adapters = lora.with_params(adapters, jax.tree.map(
      lambda x: x + 0.02 * jax.random.normal(key, x.shape), adapters.params))
  optimizer = optim.make_optimizer(defaults().optim, 10)
  state = step_lib.init_state(adapters, optimizer, 0)
  results, tpu_text = {}, {}
  for remat in ("none", *REMAT_POLICIES):
    fn = jax.jit(functools.partial(step_lib.train_step, adapters=adapters, optimizer=optimizer,
                                   grad_accum=1, remat=remat))
    results[remat] = fn(state, model, batch)
    tpu_text[remat] = fn.trace(state, model, batch).lower(lowering_platforms=("tpu",)).as_text()
  ref_state, ref_metrics = results["none"]
  assert float(ref_metrics["grad_norm"]) > 0
  for remat, (new_state, metrics) in results.items():
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-6)
    np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 new_state["adapters"], ref_state["adapters"])
  assert "pinned_host" in tpu_text["offload"]
  assert all("pinned_host" not in tpu_text[r] for r in ("none", "full", "dots"))


def test_tiny_model_learns(base, tmp_path):
  cfg = demo_config(base, tmp_path, train__steps=60, optim__lr=3e-3)
  last = train.run(cfg)
  metrics = read_metrics(tmp_path)
  losses = [m["loss"] for m in metrics if "loss" in m]
  assert len(losses) == 60
  assert losses[-1] < losses[0] / 4
  assert last["eval_loss"] < losses[0] / 4
  assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(metrics[0])
  assert os.listdir(tmp_path / "tensorboard")
  with open(tmp_path / "config.json") as f:  # what ran, not "auto": the XLA attention on CPU
    assert json.load(f)["model"]["attention"] == "xla"
  # only what is trained is checkpointed: the adapters are tiny next to the base
  adapters = ftjax.load_adapters(str(tmp_path))
  assert adapters.rank == 16 and set(adapters.targets) == set(ftjax.load_hf(base).spec.projections)


def untied_copy(base, path):
  """The demo base with an output head of its own (a copy of the embedding, perturbed)."""
  from safetensors.numpy import load_file, save_file
  shutil.copytree(base, path)
  with open(os.path.join(path, "config.json")) as f:
    config = json.load(f)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({**config, "tie_word_embeddings": False}, f)
  weights = load_file(os.path.join(path, "model.safetensors"))
  embedding = weights["model.embed_tokens.weight"]
  weights["lm_head.weight"] = embedding + np.random.default_rng(1).normal(
      0, 0.01, embedding.shape).astype(np.float32)
  save_file(weights, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
  return str(path)


def test_embedding_on_host_trains_identically(base, tmp_path):
  """model.embed_on_host: the device holds no embedding table, batches carry their rows, and
  losses, eval and greedy decoding equal the run with the table on the device."""
  untied = untied_copy(base, tmp_path / "untied")
  model = ftjax.load_hf(untied, dtype="float32", embed_on_host=True)
  assert "embed" not in model.params and "lm_head" in model.params
  table = hf_io.host_embedding(untied, "float32")
  assert isinstance(table, np.ndarray) and table.shape == (model.spec.vocab, model.spec.dim)
  runs = {}
  for on_host in (False, True):
    workdir = tmp_path / f"host_{on_host}"
    cfg = demo_config(untied, workdir, train__steps=4, train__eval_generate=4,
                      model__embed_on_host=on_host)
    last = train.run(cfg)
    runs[on_host] = ([m["loss"] for m in read_metrics(workdir) if "loss" in m], last)
  (losses_dev, last_dev), (losses_host, last_host) = runs[False], runs[True]
  assert len(losses_host) == 4 and losses_host[-1] != losses_host[0]
  np.testing.assert_allclose(losses_host, losses_dev, rtol=1e-6)
  np.testing.assert_allclose(last_host["eval_loss"], last_dev["eval_loss"], rtol=1e-6)
  assert last_host["exact_match"] == last_dev["exact_match"]
  with pytest.raises(UserError, match="tie_word_embeddings"):
    ftjax.load_hf(base, dtype="float32", embed_on_host=True)  # the demo base is tied


def _train_cmd(base, workdir, steps):
  return [sys.executable, "-m", "ftjax.train", f"--config={REPO}/configs/demo.py",
          f"--config.workdir={workdir}", f"--config.model.path={base}",
          f"--config.tokenizer.path={base}", f"--config.train.steps={steps}",
          "--config.train.log_every=1", "--config.train.eval_generate=0",
          "--config.train.batch_size=8", "--config.ckpt.every=1000", "--config.data.eval="]


@pytest.fixture(scope="module")
def straight_run(base, tmp_path_factory):
  """An uninterrupted 24-step run of the CLI: (its metrics, its stdout)."""
  workdir = tmp_path_factory.mktemp("straight")
  out = subprocess.run(_train_cmd(base, workdir, 24), check=True, env=dict(
      os.environ, JAX_PLATFORMS="cpu"), cwd=REPO, capture_output=True, text=True)
  return read_metrics(workdir), out.stdout


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_and_resume_matches_uninterrupted(sig, base, straight_run, tmp_path):
  """SIGTERM (preemption) and Ctrl-C both save the step in flight and exit 0; the resumed run
  then logs every step exactly once, with the uninterrupted run's losses."""
  steps = 24
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  interrupted = tmp_path / "interrupted"
  proc = subprocess.Popen(_train_cmd(base, interrupted, steps), env=env, cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while time.time() < deadline:  # wait until a few steps are logged, then interrupt
    path = interrupted / "metrics.jsonl"
    if path.exists() and len(path.read_text().splitlines()) >= 5:
      break
    time.sleep(0.2)
  t_kill = time.time()
  proc.send_signal(sig)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, out + err
  assert time.time() - t_kill < 30
  name = "SIGINT" if sig == signal.SIGINT else "SIGTERM"
  assert f"{name}: saved step" in out and "Traceback" not in err, out + err
  saved = [m["step"] for m in read_metrics(interrupted)][-1]
  assert saved < steps
  subprocess.run(_train_cmd(base, interrupted, steps), check=True, env=env, cwd=REPO,
                 capture_output=True)
  want_metrics, straight_out = straight_run
  logged = [m["step"] for m in read_metrics(interrupted) if "loss" in m]
  assert logged == list(range(1, steps + 1))  # every step once: nothing repeated or missing
  got = {m["step"]: m["loss"] for m in read_metrics(interrupted) if "loss" in m}
  want = {m["step"]: m["loss"] for m in want_metrics if "loss" in m}
  assert got == want  # bitwise: adapters, optimizer, rng and data position all restored
  # stdout is not a terminal: one plain line per log step, with that step's own loss and lr
  lines = [l for l in straight_out.splitlines() if l.startswith("step ")]
  assert len(lines) == steps
  for line, m in zip(lines, want_metrics):
    assert line.startswith(f"step {m['step']}/{steps} loss {m['loss']:.4f} lr {m['lr']:.2e}"), line


def test_training_starts_from_a_peft_adapter(base, tmp_path):
  """lora.init_from: a PEFT adapter dir seeds the adapters (shape and values), then training goes on."""
  from ftjax import peft_io
  model = ftjax.load_hf(base, dtype="float32")
  key = jax.random.PRNGKey(7)
  seed = lora.init(model.spec, "q_proj,v_proj", 4, 8.0, key, rslora=True)
  seed = lora.with_params(seed, jax.tree.map(
      lambda x: 0.05 * jax.random.normal(key, x.shape), seed.params))
  peft_io.write_adapters(seed, model.spec, str(tmp_path / "peft"), base)
  cfg = demo_config(base, tmp_path / "run", train__steps=1, lora__init_from=str(tmp_path / "peft"),
                    data__eval="", optim__lr=0.0, optim__warmup_steps=0)
  adapters = prepare.make_adapters(cfg, model.spec, key)
  assert (adapters.rank, adapters.alpha, adapters.rslora, adapters.targets) == (
      4, 8.0, True, ("q_proj", "v_proj"))
  jax.tree.map(np.testing.assert_array_equal, adapters.params, seed.params)
  train.run(cfg)  # one step at lr 0 keeps the seeded adapters: what was loaded is what trains
  trained = ftjax.load_adapters(str(tmp_path / "run"))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7), trained.params, seed.params)


def _loop_reads(cfg, monkeypatch) -> int:
  """How many arrays the training loop itself reads back from the device (not orbax, not eval)."""
  from jax._src import array
  value = array.ArrayImpl._value
  reads = []

  def counted(self):
    frame = sys._getframe(1)
    while frame and "/ftjax/" not in frame.f_code.co_filename.replace(os.sep, "/"):
      frame = frame.f_back  # up to the first ftjax frame: who asked for the value
    if frame and frame.f_code.co_name == "train_loop":
      reads.append(frame.f_lineno)
    return value.fget(self)

  monkeypatch.setattr(array.ArrayImpl, "_value", property(counted))
  try:
    last = train.run(cfg)
  finally:
    monkeypatch.undo()
  return len(reads), last


def test_loop_reads_the_device_only_at_its_log_points(base, tmp_path, monkeypatch):
  """Between log, eval and checkpoint points the loop never waits for the device: the arrays it
  reads back do not grow with the number of steps (a bool() of each step's output would). Losses
  equal those of a run that logs every step."""
  counts = {}
  for steps in (3, 9):
    cfg = demo_config(base, tmp_path / str(steps), train__steps=steps, train__log_every=steps,
                      ckpt__every=steps, data__eval="")
    counts[steps], last = _loop_reads(cfg, monkeypatch)
  assert 0 < counts[3] == counts[9], counts
  assert [m["step"] for m in read_metrics(tmp_path / "9")] == [9]
  every = train.run(demo_config(base, tmp_path / "every", train__steps=9, data__eval=""))
  assert last["loss"] == every["loss"]


def test_eval_runs_in_training_micro_batches(base, tmp_path):
  """Eval pushes batch_size / grad_accum rows per forward (what training fits), with the same
  loss as whole batches."""
  cfg = demo_config(base, tmp_path, train__grad_accum=4)
  mesh, _ = plan.choose_mesh(cfg)
  assert evaluation.eval_rows(cfg, mesh) == 2
  model = ftjax.load_hf(base, dtype="float32")
  adapters = lora.init(model.spec, "all-linear", 4, 8.0, jax.random.PRNGKey(0))
  adapters = lora.with_params(adapters, jax.tree.map(
      lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(1), x.shape), adapters.params))
  tok = data.load_tokenizer(base)
  examples, _ = data.tokenize_rows(data.load_rows(cfg.data.eval)[:10], tok, cfg.data.format, 64,
                                   "eval")
  fn, rows = evaluation.eval_step_fn(adapters, mesh), []
  counting = lambda a, m, b: rows.append(b["tokens"].shape[0]) or fn(a, m, b)
  losses = [evaluation.evaluate(counting, adapters.params, model, data.eval_batches(
      examples, batch_size=size, seq_len=64, pad_id=tok.pad_id), mesh) for size in (2, 8)]
  assert set(rows[:5]) == {2} and set(rows[5:]) == {8}
  np.testing.assert_allclose(losses[0], losses[1], rtol=1e-6)
