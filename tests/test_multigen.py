"""Many adapters in one decoding batch, against each row decoded alone and against transformers + PEFT
running each adapter; the generate CLI over PEFT dirs; chat stop tokens.

One tiny Llama (with a ChatML tokenizer trained here) and two random adapters serve the module.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import peft
import pytest
import torch

import ftjax
from ftjax import data, lora, peft_io
from ftjax.sampling import generate, generate_rows

from conftest import build_hf
from test_data import CHATML, _hf_tokenizer
from test_export import random_adapters

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEW = 7
PROMPTS = [[5, 9, 33, 7, 41, 12], [44, 8, 19, 3], [61, 2 + 70, 17, 29, 4], [13, 88, 40, 7, 6, 22],
           [101, 150, 8]]
IDS = [0, -1, 1, 1, 0]  # adapter of each prompt; -1: the base


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  root = tmp_path_factory.mktemp("multigen")
  base = str(root / "base")
  # vocab = the tokenizer's; no eos, so every row runs the full length against transformers
  hf = build_hf("llama", vocab_size=320, eos_token_id=None)
  hf.save_pretrained(base)
  tok = _hf_tokenizer(base, adds_bos=False, template=CHATML, pad_is_eos=False)
  model = ftjax.load_hf(base, dtype="float32")
  named = {"json": random_adapters(model.spec, seed=5), "tone": random_adapters(model.spec, seed=6)}
  dirs = {}
  for name, ad in named.items():
    dirs[name] = str(root / name)
    peft_io.write_adapters(ad, model.spec, dirs[name], base)
  mixed = generate_rows(model, PROMPTS, lora.stack(named), IDS, batch_size=4,
                        max_new_tokens=NEW)
  return dict(base=base, hf=hf, tok=tok, model=model, named=named, dirs=dirs, mixed=mixed)


def test_mixed_batch_equals_each_row_alone(env):
  model, named, names = env["model"], env["named"], list(env["named"])
  base_rows = []
  for prompt, i, got in zip(PROMPTS, IDS, env["mixed"]):
    # one row, with its adapter unstacked (the plain LoRA path); batch 1 keeps to two compiles
    alone = generate_rows(model, [prompt], named[names[i]] if i >= 0 else None, batch_size=1,
                          max_new_tokens=NEW)[0]
    np.testing.assert_array_equal(got, alone)
    base_rows.append(generate_rows(model, [prompt], batch_size=1, max_new_tokens=NEW)[0])
  # the adapters change what is decoded (else the comparison above could not fail)
  assert sum(not np.array_equal(g, b) for g, b in zip(env["mixed"], base_rows)) >= 3


def test_mixed_batch_equals_transformers_with_peft(env):
  """Each adapter exported to PEFT and run by transformers + PEFT decodes the same greedy tokens;
  the base rows equal transformers' own base."""
  names = list(env["named"])
  ref = peft.PeftModel.from_pretrained(env["hf"], env["dirs"][names[0]], adapter_name=names[0])
  ref.load_adapter(env["dirs"][names[1]], adapter_name=names[1])
  ref.eval()
  for prompt, i, got in zip(PROMPTS, IDS, env["mixed"]):
    kw = dict(input_ids=torch.as_tensor([prompt]), max_new_tokens=NEW, do_sample=False,
              pad_token_id=0)
    with torch.no_grad():
      if i < 0:
        with ref.disable_adapter():
          want = ref.generate(**kw)
      else:
        ref.set_adapter(names[i])
        want = ref.generate(**kw)
    np.testing.assert_array_equal(got, want[0, len(prompt):].numpy())


def test_chat_end_of_turn_stops_decoding(env):
  tok, model = env["tok"], env["model"]
  eot = data.end_of_turn_id(tok)
  assert eot == tok.hf.convert_tokens_to_ids("<|im_end|>")
  other = CHATML.replace("<|im_end|>", "<|im_start|>")  # a template closing turns with another token
  tok.hf.chat_template = other
  try:
    assert data.end_of_turn_id(tok) == tok.hf.convert_tokens_to_ids("<|im_start|>")
  finally:
    tok.hf.chat_template = CHATML
  prompt = np.asarray([PROMPTS[0]])
  free = np.asarray(generate(model, prompt, max_new_tokens=NEW))[0]
  stop = int(free[2])
  out = np.asarray(generate(model, prompt, max_new_tokens=NEW, stop_ids=(stop,), pad_id=0))[0]
  first = list(free).index(stop)
  np.testing.assert_array_equal(out[:first + 1], free[:first + 1])
  assert (out[first + 1:] == 0).all() and first + 1 < NEW


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "ftjax.generate", *args], cwd=REPO,
                        capture_output=True, text=True,
                        env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO))


def _expected(env, prompt_ids, name):
  src_adapters = env["named"][name] if name else None
  new = generate_rows(env["model"], [prompt_ids], src_adapters, None, batch_size=1,
                      max_new_tokens=NEW, stop_ids=(data.end_of_turn_id(env["tok"]),))
  return data.decode_completion(env["tok"], new[0], (data.end_of_turn_id(env["tok"]),))


def test_cli_batch_over_peft_dirs(env, tmp_path):
  tok = env["tok"]
  messages = [{"role": "system", "content": "you are a helpful assistant"},
              {"role": "user", "content": "what is two plus two"}]
  rows = [{"prompt": "hello world", "adapter": "json"}, {"messages": messages, "adapter": "tone"},
          {"prompt": "the cat sat"}]
  (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  adapters = ",".join(f"{n}={d}" for n, d in env["dirs"].items())
  proc = _cli(f"--base={env['base']}", f"--adapters={adapters}", f"--max_new_tokens={NEW}",
              f"--input={tmp_path / 'in.jsonl'}", f"--output={tmp_path / 'out.jsonl'}",
              "--batch_size=2")
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
  # the base's tokenizer has a chat template (an instruct model's): a bare prompt is a user turn
  user = lambda text: data.chat_prompt_ids(tok, [{"role": "user", "content": text}])
  want = [_expected(env, user("hello world"), "json"),
          _expected(env, data.chat_prompt_ids(tok, messages), "tone"),
          _expected(env, user("the cat sat"), None)]
  assert [g["completion"] for g in got] == want
  assert got[1]["messages"] == messages and got[0]["adapter"] == "json"
  assert len(set(want)) == 3
  assert proc.stdout == f"wrote 3 completions to {tmp_path / 'out.jsonl'}\n"

  # --raw: the prompt as plain text, as before chat templates were applied
  raw = _expected(env, tok.encode("hello world"), "json")
  assert raw != want[0]
  proc = _cli(f"--base={env['base']}", f"--adapters=json={env['dirs']['json']}",
              f"--max_new_tokens={NEW}", "--raw", "--prompt=hello world")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout == raw + "\n"

  # one prompt with a system message: stdout is the completion and nothing else
  proc = _cli(f"--base={env['base']}", f"--adapters=tone={env['dirs']['tone']}",
              f"--max_new_tokens={NEW}", "--system=you are a helpful assistant",
              "--prompt=what is two plus two")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout == want[1] + "\n"

  # a row naming an adapter that was not loaded: one line naming the file, line and name
  (tmp_path / "bad.jsonl").write_text(json.dumps(rows[0]) + "\n" +
                                      json.dumps({"prompt": "x", "adapter": "jsno"}) + "\n")
  proc = _cli(f"--base={env['base']}", f"--adapters={adapters}", f"--input={tmp_path / 'bad.jsonl'}",
              f"--output={tmp_path / 'o.jsonl'}")
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == (
      f"error: {tmp_path / 'bad.jsonl'}:2: adapter 'jsno' was not loaded (loaded: json, tone)")


# ----------------------------------------------------------------------------- a messages workdir


@pytest.fixture(scope="module")
def workdir(env, tmp_path_factory):
  """A chat (messages) workdir over the module's base, with the "json" adapter as its own."""
  from test_export import make_workdir
  root = tmp_path_factory.mktemp("chat_workdir")
  rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
          for q, a in (("hello world", '{"a": 1}'), ("the cat sat on the mat", '{"b": [2]}'),
                       ("what is two plus two", '{"c": "four"}'))]
  (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  wd = make_workdir(root / "wd", env["base"], env["named"]["json"])
  with open(os.path.join(wd, "config.json")) as f:
    cfg = json.load(f)
  cfg["data"].update(format="messages", eval=str(root / "eval.jsonl"))
  with open(os.path.join(wd, "config.json"), "w") as f:
    json.dump(cfg, f)
  return wd, rows


def test_workdir_cli_messages_and_unknown_adapter(env, workdir, tmp_path):
  wd, _ = workdir
  conversation = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"},
                  {"role": "user", "content": "what is two plus two"}]
  (tmp_path / "conv.json").write_text(json.dumps(conversation))
  proc = _cli(f"--workdir={wd}", f"--messages={tmp_path / 'conv.json'}", f"--max_new_tokens={NEW}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout == _expected(env, data.chat_prompt_ids(env["tok"], conversation),
                                  "json") + "\n"
  proc = _cli(f"--workdir={wd}", "--adapter=jsno", "--prompt=hi")
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == (
      f"error: {wd}: has no adapter 'jsno' (its adapters: default)")


def test_export_writes_the_end_of_turn_into_generation_config(env, workdir, tmp_path):
  import transformers
  from ftjax import export
  wd, _ = workdir
  eot = data.end_of_turn_id(env["tok"])
  for fmt in ("merged", "peft"):
    out = str(tmp_path / fmt)
    (export.export_merged if fmt == "merged" else export.export_peft)(wd, out)
    assert transformers.GenerationConfig.from_pretrained(out).eos_token_id == [eot]


def test_eval_compares_base_prompt_and_adapters(env, workdir, tmp_path):
  """Eval loss against transformers (+ PEFT for the adapter); exact match and valid JSON against
  the completions decoded here; then the CLI's table and eval.json."""
  import types
  from ftjax import eval as ev
  from ftjax.generate import load_sources
  wd, rows = workdir
  src = load_sources(workdir=wd)
  f = types.SimpleNamespace(batch_size=4, max_new_tokens=NEW, temperature=0.0, top_p=1.0, seed=0,
                            data="eval.jsonl")
  base_out = ev.decode(src, [data.prompt_and_reference(src.tokenizer, "messages", r)[0]
                             for r in rows[:1]], [-1], f)[0]
  rows = [dict(rows[0], messages=[rows[0]["messages"][0],
                                  {"role": "assistant", "content": base_out}])] + rows[1:]
  report = ev.evaluate(src, rows, "messages", "answer in JSON", f)
  assert list(report["variants"]) == ["base", "base + prompt", "default"]
  assert report["variants"]["base"]["exact_match"] == pytest.approx(1 / 3)
  assert "valid_json" not in report["variants"]["base"]  # not every reference is JSON

  seq = max(len(e.ids) for e in data.tokenize_rows(rows, src.tokenizer, "messages", 512, "m")[0])
  examples, _ = data.tokenize_rows(rows, src.tokenizer, "messages", seq, "m")
  ref = peft.PeftModel.from_pretrained(env["hf"], env["dirs"]["json"]).eval()

  def torch_loss(model):
    total = count = 0.0
    for e in examples:
      with torch.no_grad():
        logits = model(torch.as_tensor(e.ids[None, :-1].astype(np.int64))).logits[0]
      nll = torch.nn.functional.cross_entropy(logits, torch.as_tensor(e.ids[1:].astype(np.int64)),
                                              reduction="none").numpy()
      total, count = total + float(nll @ e.target_mask[1:]), count + float(e.target_mask[1:].sum())
    return total / count

  with ref.disable_adapter():
    want_base = torch_loss(ref)
  want_adapter = torch_loss(ref)
  assert report["variants"]["base"]["eval_loss"] == pytest.approx(want_base, rel=1e-4)
  assert report["variants"]["default"]["eval_loss"] == pytest.approx(want_adapter, rel=1e-4)
  assert abs(want_adapter - want_base) > 1e-2
  prefixed = report["variants"]["base + prompt"]["eval_loss"]
  assert abs(prefixed - want_base) > 1e-3  # the prefix reached the prompts

  (tmp_path / "prefix.txt").write_text("answer in JSON")
  proc = subprocess.run(
      [sys.executable, "-m", "ftjax.eval", f"--workdir={wd}", f"--max_new_tokens={NEW}",
       f"--prompt_prefix={tmp_path / 'prefix.txt'}"], cwd=REPO, capture_output=True, text=True,
      env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO))
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(wd, "eval.json")) as fh:
    saved = json.load(fh)
  outs = [s["default"] for s in saved["samples"]]
  assert saved["variants"]["default"]["valid_json"] == pytest.approx(
      np.mean([ev._is_json(o) for o in outs]))
  assert set(saved["variants"]) == {"base", "base + prompt", "default"}
  assert "exact match" in proc.stdout and "valid json" in proc.stdout and "default" in proc.stdout


def test_adapters_of_another_rank_cannot_share_a_batch(env, tmp_path):
  from ftjax.errors import UserError
  from ftjax.generate import load_sources
  other = lora.init(env["model"].spec, "all-linear", 2, 4.0, jax.random.PRNGKey(0))
  peft_io.write_adapters(other, env["model"].spec, str(tmp_path / "r2"), env["base"])
  with pytest.raises(UserError, match=rf"^{tmp_path / 'r2'}: adapter 'r2': .* rank 2 .* differ "
                                      r"from 'json'"):
    load_sources(base=env["base"], adapters=f"json={env['dirs']['json']},r2={tmp_path / 'r2'}")
