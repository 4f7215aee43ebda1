"""Preference tuning against TRL: the same tiny model, pairs and PEFT-saved starting adapter in
ftjax's step and TRL's DPOTrainer (DPO, IPO), TRL's ORPO / SimPO loss code on the same
log-probabilities; and what only ftjax has to say (the frozen reference, packing, QLoRA, several
adapters, preference data and its errors)."""
import functools
import json
import math
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import ftjax
from ftjax import ckpt, data, lora, objectives, optim, pairs, step as step_lib
from ftjax.config import defaults
from ftjax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))
import demo  # noqa: E402  (the tiny base and tokenizer the tests share)

SEQ = 160
LR = 5e-3


def _flip(completion: str) -> str:
  d = json.loads(completion)
  d["urgent"] = not d["urgent"]
  return json.dumps(d)


def toy_pairs(path, first, n):
  """Demo requests; chosen = the right JSON, rejected = the same with urgent flipped."""
  with open(path) as f:
    rows = [json.loads(l) for l in f][first:first + n]
  return [{"prompt": r["prompt"] + "\n", "chosen": r["completion"],
           "rejected": _flip(r["completion"])} for r in rows]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """(base dir, PEFT adapter dir with random A and B, 6 pairs)."""
  import peft
  import transformers
  root = tmp_path_factory.mktemp("dpo")
  base = str(root / "base")
  demo.build_base(base)
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
  config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                           init_lora_weights=False)  # random B: the start is not the base
  pm = peft.get_peft_model(model, config)
  with torch.no_grad():
    for name, p in pm.named_parameters():
      if "lora_" in name:
        p.mul_(0.3)
  adapter = str(root / "adapter")
  pm.save_pretrained(adapter)
  rows = toy_pairs(os.path.join(REPO, "configs/demo_data/train.jsonl"), 0, 6)
  rows[1]["chosen"] += " thanks"  # sides of different lengths
  return base, adapter, rows


def ftjax_cfg(base, adapter, objective="dpo", **preference):
  c = defaults()
  c.model.path, c.model.dtype, c.lora.init_from = base, "float32", adapter
  c.data.format, c.train.objective = "preference", objective
  c.optim.lr, c.optim.warmup_steps, c.optim.schedule, c.optim.clip_norm = LR, 0, "constant", 0.0
  for k, v in preference.items():
    c.preference[k] = v
  return c


def ftjax_run(cfg, rows, steps, model=None, packed_rows=None, grad_accum=1, seq=SEQ):
  """[(loss, metrics)] of `steps` train steps on all rows as one batch (one pair per row, or the
  given rows of pair indices), and the final state."""
  model = model or ftjax.load_hf(cfg.model.path, dtype="float32")
  tok = data.load_tokenizer(cfg.model.path)
  prs, _ = pairs.tokenize_pairs(rows, tok, "preference", seq, "t")
  layout = packed_rows or [[i] for i in range(len(prs))]
  batch = pairs.assemble(prs, layout, seq, tok.pad_id)
  adapters = ckpt.load_adapters(cfg.lora.init_from)
  optimizer = optim.make_optimizer(cfg.optim, steps)
  state = step_lib.init_state(adapters, optimizer, 0)
  objective = objectives.from_config(cfg)
  fn = jax.jit(functools.partial(step_lib.train_step, adapters=adapters, optimizer=optimizer,
                                 grad_accum=grad_accum, remat="none", objective=objective))
  out = []
  for _ in range(steps):
    state, m = fn(state, model, batch, adapters.params)
    m = jax.device_get(m)
    out.append((float(m["loss"]), {k: float(v) for k, v in m["objective"].items()}))
  return out, state


def trl_dpo(base, adapter, rows, steps, loss_type, beta, tmp):
  """TRL's DPOTrainer on the same adapter (loaded by PEFT), AdamW at a constant lr, every pair in
  one batch, float32 (TRL defaults to bf16): [(loss, rewards/margins)] per step."""
  import datasets
  import peft
  import transformers
  import trl
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
  model = peft.PeftModel.from_pretrained(model, adapter, is_trainable=True)
  tok = transformers.AutoTokenizer.from_pretrained(base)
  args = trl.DPOConfig(
      output_dir=str(tmp), per_device_train_batch_size=len(rows), max_steps=steps,
      learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
      max_grad_norm=0.0, beta=beta, loss_type=[loss_type], logging_steps=1, report_to=[],
      use_cpu=True, bf16=False, save_strategy="no", max_length=None, seed=0,
      disable_tqdm=True)
  trainer = trl.DPOTrainer(model=model, args=args, processing_class=tok,
                           train_dataset=datasets.Dataset.from_list(rows))
  trainer.train()
  logs = [h for h in trainer.state.log_history if "rewards/margins" in h]
  return [(h["loss"], h["rewards/margins"]) for h in logs]


@pytest.mark.parametrize("loss_type,beta", [("sigmoid", 0.5), ("ipo", 0.5)])
def test_dpo_and_ipo_agree_with_trl(setup, loss_type, beta, tmp_path):
  base, adapter, rows = setup
  steps = 3
  theirs = trl_dpo(base, adapter, rows, steps, loss_type, beta, tmp_path)
  ours, _ = ftjax_run(ftjax_cfg(base, adapter, beta=beta, loss=loss_type), rows, steps)
  assert len(theirs) == steps
  for (loss, m), (t_loss, t_margin) in zip(ours, theirs):
    np.testing.assert_allclose(loss, t_loss, rtol=2e-4, atol=1e-5)
    np.testing.assert_allclose(m["rewards/margins"], t_margin, rtol=2e-3, atol=1e-4)
  # it learned something TRL also learned: the loss moved away from its start
  assert abs(ours[-1][0] - ours[0][0]) > 1e-3


def _torch_seq_logps(base, adapter, rows):
  """Per-pair summed completion log-probs and token counts from transformers + PEFT (float64
  sums), tokenized as TRL's DPO does (prompt + completion + eos, the completion the targets);
  adapter None: the base alone."""
  import peft
  import transformers
  model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
  if adapter is not None:
    model = peft.PeftModel.from_pretrained(model, adapter).eval()
  tok = transformers.AutoTokenizer.from_pretrained(base)
  out = {"chosen": [], "rejected": [], "chosen_n": [], "rejected_n": []}
  for row in rows:
    prompt = tok(row["prompt"])["input_ids"]
    for side in ("chosen", "rejected"):
      ids = tok(row["prompt"] + row[side] + tok.eos_token)["input_ids"]
      assert ids[:len(prompt)] == prompt
      with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
      logp = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
      out[side].append(float(logp[len(prompt) - 1:].sum()))
      out[side + "_n"].append(len(ids) - len(prompt))
  return {k: torch.tensor(v, dtype=torch.float64) for k, v in out.items()}


def test_orpo_and_simpo_losses_agree_with_trl(setup):
  """ftjax's step-0 ORPO and SimPO losses and metrics against TRL's own loss code
  (trl.experimental ORPOTrainer.odds_ratio_loss, CPOTrainer.cpo_loss with loss_type=simpo) fed
  with transformers + PEFT log-probabilities of the same pairs."""
  from trl.experimental.cpo import CPOTrainer
  from trl.experimental.orpo import ORPOTrainer
  base, adapter, rows = setup
  lp = _torch_seq_logps(base, adapter, rows)
  mean_c, mean_r = lp["chosen"] / lp["chosen_n"], lp["rejected"] / lp["rejected_n"]
  dev = types.SimpleNamespace(device="cpu")
  model = ftjax.load_hf(base, dtype="float32")

  beta = 0.3
  losses, chosen_r, rejected_r, ratio, _ = ORPOTrainer.odds_ratio_loss(
      types.SimpleNamespace(beta=beta, accelerator=dev), mean_c, mean_r)
  nll = -lp["chosen"].sum() / lp["chosen_n"].sum()  # TRL: a token mean over the batch's chosen
  [(loss, m)], _ = ftjax_run(ftjax_cfg(base, adapter, "orpo", beta=beta), rows, 1, model)
  np.testing.assert_allclose(loss, float(nll - losses.mean()), rtol=1e-5)
  np.testing.assert_allclose(m["nll_loss"], float(nll), rtol=1e-5)
  np.testing.assert_allclose(m["log_odds_ratio"], float(ratio), rtol=1e-5)
  np.testing.assert_allclose(m["rewards/margins"], float((chosen_r - rejected_r).mean()),
                             rtol=1e-4, atol=1e-6)

  beta, gamma, smooth = 2.0, 0.7, 0.1
  losses, chosen_r, rejected_r = CPOTrainer.cpo_loss(
      types.SimpleNamespace(beta=beta, simpo_gamma=gamma, label_smoothing=smooth, alpha=0.0,
                            loss_type="simpo", accelerator=dev), mean_c, mean_r)
  [(loss, m)], _ = ftjax_run(ftjax_cfg(base, adapter, "simpo", beta=beta, simpo_gamma=gamma,
                                       label_smoothing=smooth), rows, 1, model)
  np.testing.assert_allclose(loss, float(losses.mean()), rtol=1e-5)
  np.testing.assert_allclose(m["rewards/chosen"], float(chosen_r.mean()), rtol=1e-5)
  np.testing.assert_allclose(m["logps/rejected"], float(mean_r.mean()), rtol=1e-5)
  np.testing.assert_allclose(m["rewards/accuracies"],
                             float((chosen_r > rejected_r).double().mean()))


def test_conservative_dpo_matches_the_formula():
  """label_smoothing (cDPO; TRL 1.x dropped it from its sigmoid loss): float64 numpy."""
  rng = np.random.default_rng(0)
  pc, pr, rc, rr = (rng.normal(-20, 3, 5) for _ in range(4))
  n = np.full(5, 7.0)
  hp = objectives.Hyper(beta=0.2, label_smoothing=0.15)
  terms = objectives.dpo(objectives.Seqs(pc, pr, n, n), objectives.Seqs(rc, rr, n, n), hp)
  z = 0.2 * ((pc - rc) - (pr - rr))
  logsig = lambda x: -np.logaddexp(0.0, -x)
  np.testing.assert_allclose(terms.pair, -0.85 * logsig(z) - 0.15 * logsig(-z), rtol=1e-6)


def test_reference_is_frozen_and_step_zero_is_ln2(setup):
  """From a fresh adapter the reference is the base: at step 0 the DPO loss is ln 2 exactly and
  the margins 0 (eval step; the train step's forward, compiled inside the gradient, rounds within
  an ulp of it); the objective's gradient with respect to the reference is zero (stop_gradient:
  never computed), the policy's is not."""
  base, adapter, rows = setup
  model = ftjax.load_hf(base, dtype="float32")
  tok = data.load_tokenizer(base)
  prs, _ = pairs.tokenize_pairs(rows, tok, "preference", SEQ, "t")
  batch = pairs.assemble(prs, [[i] for i in range(len(prs))], SEQ, tok.pad_id)
  fresh = lora.init(model.spec, "all-linear", 4, 8.0, jax.random.PRNGKey(0))
  objective = objectives.from_config(ftjax_cfg(base, ""))
  sums = jax.jit(functools.partial(step_lib.eval_step, adapters=fresh, objective=objective))(
      fresh.params, model, batch)
  m = objectives.finish(sums)
  assert float(m["loss"]) == np.float32(math.log(2))
  assert float(m["rewards/margins"]) == 0.0 and float(sums["pairs"]) == len(rows)

  start = ckpt.load_adapters(adapter)
  loss = lambda p, ref: step_lib._pair_objective(  # pylint: disable=protected-access
      p, start, model, batch, None, "none", ref, objective, 6.0, 1.0)[0]
  loss0, (g_policy, g_ref) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(start.params,
                                                                              start.params)
  np.testing.assert_allclose(loss0, math.log(2), atol=2e-6)
  assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(g_ref))
  assert min(float(jnp.abs(x).max()) for x in jax.tree.leaves(g_policy)) > 0.0


def test_packed_and_accumulated_dpo_equal_one_pair_per_row(setup):
  """Pairs packed two to a row, or over 2 micro-batches: the same losses, metrics, adapters."""
  base, adapter, rows = setup
  cfg = ftjax_cfg(base, adapter)
  model = ftjax.load_hf(base, dtype="float32")
  plain, s1 = ftjax_run(cfg, rows, 1, model)
  packed, s2 = ftjax_run(cfg, rows, 1, model, packed_rows=[[0, 1], [2, 3], [4, 5]],
                         seq=2 * SEQ)
  accum, s3 = ftjax_run(cfg, rows, 1, model, grad_accum=2)
  for other, state in ((packed, s2), (accum, s3)):
    for (l1, m1), (l2, m2) in zip(plain, other):
      np.testing.assert_allclose(l1, l2, rtol=1e-5)
      for k in (k for k in m1 if k != "rewards/accuracies"):  # a threshold: noise flips it
        np.testing.assert_allclose(m1[k], m2[k], rtol=1e-4, atol=1e-6)
    # Adam's first step moves each factor by ~lr: 1e-4 is a fiftieth of it
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4),
                 s1["adapters"], state["adapters"])


def test_preference_rows_and_their_errors(setup, tmp_path):
  base, _, rows = setup
  tok = data.load_tokenizer(base)
  prs, stats = pairs.tokenize_pairs(rows, tok, "preference", SEQ, "t")
  # each side exactly as prompt_completion tokenizes it
  for side in ("chosen", "rejected"):
    ex, _ = data.tokenize_rows([{"prompt": r["prompt"], "completion": r[side]} for r in rows],
                               tok, "prompt_completion", SEQ, "t")
    for p, e in zip(prs, ex):
      np.testing.assert_array_equal(getattr(p, side).ids, e.ids)
      np.testing.assert_array_equal(getattr(p, side).target_mask, e.target_mask)
  assert stats.rows == 6 and stats.dropped == 0
  # conversational rows: the reply alone is trained, as `messages` data trains it
  chat = [{"prompt": [{"role": "user", "content": rows[0]["prompt"].strip()}],
           "chosen": [{"role": "assistant", "content": rows[0]["chosen"]}],
           "rejected": rows[0]["rejected"]}]
  (p,), _ = pairs.tokenize_pairs(chat, tok, "preference", 2 * SEQ, "c")
  (m,), _ = data.tokenize_rows([{"messages": chat[0]["prompt"] + chat[0]["chosen"]}], tok,
                               "messages", 2 * SEQ, "m")
  np.testing.assert_array_equal(p.chosen.ids, m.ids)
  np.testing.assert_array_equal(p.chosen.target_mask, m.target_mask)
  # a pair over the row is cut, both sides kept
  (cut,), s = pairs.tokenize_pairs(rows[:1], tok, "preference", 80, "t")
  assert s.truncated == 1 and len(cut.chosen.ids) - 1 + len(cut.rejected.ids) - 1 == 80
  with pytest.raises(UserError, match=r"^f.jsonl:2: row has no 'rejected' field"):
    pairs.tokenize_pairs([rows[0], {"prompt": "a", "chosen": "b"}], tok, "preference", SEQ,
                         "f.jsonl")
  cfg = ftjax_cfg(base, "", "dpoo")
  with pytest.raises(UserError, match=r"^train.objective='dpoo': unknown"):
    objectives.from_config(cfg)
  cfg = ftjax_cfg(base, "", "sft", beta=0.3)
  with pytest.raises(UserError, match=r"^preference.beta is set but train.objective=sft"):
    objectives.from_config(cfg)


def test_dpo_run_prefers_chosen_on_held_out_pairs(setup, tmp_path):
  """A learnable toy preference (the chosen reply signs off "thanks", the rejected "whatever"):
  a short DPO run from a fresh adapter prefers the chosen reply on held-out pairs."""
  from ftjax import train
  base, _, _ = setup
  for name, first, n in (("train", 0, 64), ("eval", 0, 16)):
    rows = toy_pairs(os.path.join(REPO, f"configs/demo_data/{name}.jsonl"), first, n)
    with open(tmp_path / f"{name}.jsonl", "w") as f:
      f.writelines(json.dumps(dict(r, chosen=r["chosen"] + " thanks",
                                   rejected=r["chosen"] + " whatever")) + "\n" for r in rows)
  c = ftjax_cfg(base, "", beta=0.5)
  c.workdir, c.data.train, c.data.eval = str(tmp_path / "w"), str(tmp_path / "train.jsonl"), str(
      tmp_path / "eval.jsonl")
  c.data.seq_len, c.data.packing, c.lora.rank, c.lora.alpha = SEQ, False, 4, 8.0
  c.train.steps, c.train.batch_size, c.train.eval_every, c.train.remat = 12, 8, 0, "none"
  c.mesh.fsdp, c.optim.lr = 1, 3e-3
  last = train.run(c)
  assert last["eval_rewards/accuracies"] >= 0.9 and last["eval_rewards/margins"] > 0
  with open(tmp_path / "w" / "metrics.jsonl") as f:
    logged = [json.loads(l) for l in f]
  assert {"rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"} <= set(logged[0])
  assert "eval_logps/chosen" in logged[-1]


def test_data_check_reads_preference_rows(setup, tmp_path):
  """Same sides, an empty side and opposite preferences are found; strict refuses them."""
  from ftjax import datacheck
  base, _, rows = setup
  rows = [dict(r) for r in rows]
  rows[1]["rejected"] = rows[1]["chosen"]  # nothing to learn
  rows[2]["rejected"] = " "  # an empty side
  rows.append({"prompt": rows[0]["prompt"], "chosen": rows[0]["rejected"],
               "rejected": rows[0]["chosen"]})  # the opposite of row 1
  path = tmp_path / "p.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  c = ftjax_cfg(base, "")
  c.data.train, c.data.seq_len = str(path), SEQ
  tok = data.load_tokenizer(base)
  report = datacheck.check(c, tok, datacheck.load_groups(c))
  assert report["same_sides"] == [{"split": "train", "line": 2}]
  assert report["empty_targets"] == [{"split": "train", "line": 3}]
  assert report["conflicts"] == [[{"split": "train", "line": 1}, {"split": "train", "line": 7}]]
  assert report["duplicates"] == [] and report["near_duplicates"] == []
  c.data.check = "strict"
  with pytest.raises(UserError, match="data.check=strict"):
    datacheck.training_summary(c, tok)


def test_preference_config_errors(setup, tmp_path):
  from ftjax import hf_io, prepare
  base, adapter, _ = setup
  c = ftjax_cfg(base, adapter)
  c.workdir = str(tmp_path)
  c.data.format = "prompt_completion"
  with pytest.raises(UserError, match=r"^train.objective=dpo with data.format=prompt_completion"):
    prepare.check_config(c)
  c.data.format = "preference"
  prepare.check_config(c)
  with pytest.raises(UserError, match=r"its adapter has rank 4 but lora.rank=16"):
    prepare.make_adapters(c, hf_io.read_spec(base), None)
  c.lora.rank = 4
  assert prepare.make_adapters(c, hf_io.read_spec(base), None).rank == 4


def test_two_adapter_dpo_equals_each_alone_and_qlora_runs(setup):
  """Two stacked adapters, each on its own pairs in one batch, step as each does alone (its own
  pair normalization, reference and AdamW state); an NF4 base trains DPO from ln 2 downwards."""
  base, adapter, rows = setup
  cfg = ftjax_cfg(base, adapter)
  model = ftjax.load_hf(base, dtype="float32")
  tok = data.load_tokenizer(base)
  prs, _ = pairs.tokenize_pairs(rows, tok, "preference", SEQ, "t")
  halves = [pairs.assemble(prs, [[i] for i in idx], SEQ, tok.pad_id) for idx in ([0, 1, 2],
                                                                                  [3, 4, 5])]
  start = ckpt.load_adapters(adapter)
  optimizer = optim.make_optimizer(cfg.optim, 2)
  objective = objectives.from_config(cfg)
  step = lambda a: jax.jit(functools.partial(step_lib.train_step, adapters=a, optimizer=optimizer,
                                             grad_accum=1, remat="none", objective=objective))
  alone = step(start)
  singles = [alone(step_lib.init_state(start, optimizer, 0), model, b, start.params)
             for b in halves]
  both = lora.stack({"x": start, "y": start})
  batch = {k: np.concatenate([h[k] for h in halves]) for k in halves[0]}
  batch["adapter_ids"] = np.repeat(np.arange(2, dtype=np.int32), 3)
  state, m = step(both)(step_lib.init_state(both, optimizer, 0), model, batch, both.params)
  for k, (s1, m1) in enumerate(singles):
    np.testing.assert_allclose(m["per_adapter"]["loss"][k], m1["loss"], rtol=1e-5)
    np.testing.assert_allclose(m["per_adapter"]["rewards/margins"][k],
                               m1["objective"]["rewards/margins"], rtol=1e-4, atol=1e-6)
    mine = lora.unstack(lora.with_params(both, state["adapters"]))["xy"[k]].params
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4),
                 mine, s1["adapters"])

  nf4 = ftjax.load_hf(base, dtype="float32", quant="nf4")
  fresh = lora.init(nf4.spec, "all-linear", 4, 8.0, jax.random.PRNGKey(0))
  run = step(fresh)
  state = step_lib.init_state(fresh, optimizer, 0)
  losses = []
  for _ in range(2):
    state, m = run(state, nf4, halves[0])
    losses.append(float(m["loss"]))
  np.testing.assert_allclose(losses[0], math.log(2), atol=2e-6)
  assert losses[1] < losses[0]


# ------------------------------------------------- a DPO workdir: resume, export, ftjax.eval


def _workdir_cfg(base, adapter, workdir, rows_path, steps):
  c = ftjax_cfg(base, adapter)
  c.workdir, c.data.train, c.data.eval = str(workdir), str(rows_path), ""
  c.data.seq_len, c.data.packing, c.lora.rank = SEQ, False, 4
  c.train.steps, c.train.batch_size, c.train.log_every = steps, 4, 1
  c.train.eval_every, c.train.eval_generate, c.train.remat, c.mesh.fsdp = 0, 0, "none", 1
  c.ckpt.every = 1000
  return c


@pytest.fixture(scope="module")
def dpo_runs(setup, tmp_path_factory):
  """DPO from the PEFT adapter (also the reference), 4 steps straight and 2 + a resume to 4:
  (straight workdir, resumed workdir, rows file)."""
  from ftjax import train
  base, adapter, _ = setup
  root = tmp_path_factory.mktemp("dpo_runs")
  rows_path = root / "pairs.jsonl"
  rows_path.write_text("".join(json.dumps(r) + "\n" for r in toy_pairs(
      os.path.join(REPO, "configs/demo_data/train.jsonl"), 10, 16)))
  straight, resumed = root / "straight", root / "resumed"
  train.run(_workdir_cfg(base, adapter, straight, rows_path, 4))
  train.run(_workdir_cfg(base, adapter, resumed, rows_path, 2))
  train.run(_workdir_cfg(base, adapter, resumed, rows_path, 4))
  return straight, resumed, rows_path


def _metrics(workdir):
  with open(workdir / "metrics.jsonl") as f:
    return {m["step"]: m for m in map(json.loads, f) if "loss" in m}


def test_dpo_resume_equals_uninterrupted(dpo_runs):
  """Stopped at step 2 and resumed to 4: every step's loss and TRL metric is the uninterrupted
  run's, bitwise (adapters, AdamW state, data position and the init_from reference restored)."""
  straight, resumed, _ = dpo_runs
  want, got = _metrics(straight), _metrics(resumed)
  assert sorted(got) == sorted(want) == [1, 2, 3, 4]
  for s in want:
    for k in ("loss", "rewards/margins", "rewards/chosen", "logps/rejected"):
      assert got[s][k] == want[s][k], (s, k)
  # step 1 is the reference itself; after it the policy has moved: a resume that took its
  # checkpoint's adapters as the reference would log ln 2 again at step 3
  assert abs(want[1]["loss"] - math.log(2)) < 2e-6 and abs(want[1]["rewards/margins"]) < 1e-6
  assert all(abs(want[s]["loss"] - math.log(2)) > 1e-3 for s in (2, 3, 4))
  jax.tree.map(np.testing.assert_array_equal, ckpt.load_adapters(str(straight)).params,
               ckpt.load_adapters(str(resumed)).params)


def test_dpo_workdir_exports_and_eval_prefers_chosen(setup, dpo_runs, tmp_path):
  """A preference workdir exports (PEFT: its adapter; merged: logits of base + that adapter in
  PEFT); `ftjax.eval` on its pairs reports, for the base and each adapter, the share of pairs
  whose chosen reply has the higher summed log-probability, as transformers + PEFT compute it."""
  import transformers
  from ftjax import eval as eval_lib, export
  from ftjax.generate import load_sources
  base, adapter, _ = setup
  straight, _, rows_path = dpo_runs
  export.export_peft(str(straight), str(tmp_path / "peft"))
  export.export_merged(str(straight), str(tmp_path / "merged"))
  jax.tree.map(np.testing.assert_array_equal, ckpt.load_adapters(str(tmp_path / "peft")).params,
               ckpt.load_adapters(str(straight)).params)
  tokens = torch.tensor([data.load_tokenizer(base).encode("hi my phone is broken asap")])
  import peft
  with torch.no_grad():
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))(tokens)
    ref = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(
        base, dtype=torch.float32), str(tmp_path / "peft"))(tokens)
  np.testing.assert_allclose(merged.logits.numpy(), ref.logits.numpy(), rtol=1e-4, atol=1e-4)

  rows = [json.loads(l) for l in rows_path.read_text().splitlines()][:6]
  src = load_sources(base=base, adapters=f"start={adapter},dpo={tmp_path / 'peft'}")
  f = types.SimpleNamespace(batch_size=18, max_new_tokens=4, temperature=0.0, top_p=1.0, seed=0,
                            data=str(rows_path))
  report = eval_lib.evaluate(src, rows, "preference", None, f)["variants"]
  assert set(report) == {"base", "start", "dpo"}
  for label, path in (("base", None), ("start", adapter), ("dpo", str(tmp_path / "peft"))):
    lp = _torch_seq_logps(base, path, rows)
    margins = (lp["chosen"] - lp["rejected"]).numpy()
    assert np.abs(margins).min() > 1e-3  # no tie a rounding could flip
    assert report[label]["prefers_chosen"] == float(np.mean(margins > 0)), label
    np.testing.assert_allclose(report[label]["eval_loss"],
                               float(-lp["chosen"].sum() / lp["chosen_n"].sum()), rtol=1e-4)
  # DPO moved its preference towards the chosen replies (these pairs are its training data)
  assert report["dpo"]["eval_loss"] != report["start"]["eval_loss"]


def test_qlora_dpo_equals_dpo_on_the_dequantized_base(setup):
  """NF4 base: the DPO loss and its gradient (policy and reference both on the quantized base)
  equal those on a float32 base holding the dequantized weights."""
  from ftjax import quant
  base, adapter, rows = setup
  nf4 = ftjax.load_hf(base, dtype="float32", quant="nf4")
  is_q = lambda x: isinstance(x, quant.QArray)
  assert any(is_q(x) for x in jax.tree.leaves(nf4, is_leaf=is_q))
  dense = jax.tree.map(lambda x: quant.dequantize(x, jnp.float32) if is_q(x) else x, nf4,
                       is_leaf=is_q)
  tok = data.load_tokenizer(base)
  prs, _ = pairs.tokenize_pairs(rows, tok, "preference", SEQ, "t")
  batch = pairs.assemble(prs, [[i] for i in range(len(prs))], SEQ, tok.pad_id)
  start = ckpt.load_adapters(adapter)
  objective = objectives.from_config(ftjax_cfg(base, adapter, beta=0.5))
  # the policy one AdamW-sized step away from its reference, so the loss is not ln 2
  policy = jax.tree.map(lambda p: p + 1e-2 * jnp.sign(p), start.params)
  loss = lambda p, model: step_lib._pair_objective(  # pylint: disable=protected-access
      p, start, model, batch, None, "none", start.params, objective, 6.0, 1.0)[0]
  grad = jax.jit(jax.value_and_grad(loss))
  (l_q, g_q), (l_d, g_d) = grad(policy, nf4), grad(policy, dense)
  assert abs(float(l_q) - math.log(2)) > 1e-3
  np.testing.assert_allclose(l_q, l_d, rtol=1e-5)
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g_d))
  assert scale > 0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * scale),
               g_q, g_d)


def test_generate_formats_prompts_as_the_pairs_were(setup, tmp_path):
  """A preference workdir's bare prompt: a user turn of the chat template when its pairs'
  prompts were conversations, plain text when they were strings (the demo tokenizer has a chat
  template either way), exactly as the pairs' own prompts were tokenized."""
  from ftjax.generate import prompt_format
  base, _, rows = setup
  tok = data.load_tokenizer(base)
  chat = [{"prompt": [{"role": "user", "content": r["prompt"]}], "chosen": r["chosen"],
           "rejected": r["rejected"]} for r in rows[:2]]
  for name, rs, want in (("text", rows[:2], "prompt_completion"), ("chat", chat, "messages")):
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rs))
    fmt = prompt_format({"data": {"format": "preference", "train": f"x={path}"}})
    assert fmt == want
    (pair,), _ = pairs.tokenize_pairs(rs[:1], tok, "preference", SEQ, name)
    ids = data.prompt_ids(tok, fmt, rows[0]["prompt"])
    np.testing.assert_array_equal(pair.chosen.ids[:len(ids)], ids)
    assert not pair.chosen.target_mask[:len(ids)].any() and pair.chosen.target_mask[len(ids)]
  assert prompt_format({"data": {"format": "preference", "train": str(tmp_path / "gone.jsonl")}}
                       ) == "prompt_completion"
  assert prompt_format({"data": {"format": "messages"}}) == "messages"
