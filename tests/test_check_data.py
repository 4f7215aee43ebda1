"""python -m ftjax.check_data on planted problems: each is found, and nothing else.

Tokens are words (a WordLevel tokenizer trained here), so a planted near-duplicate's similarity is
set by how many words it changes. Similarities are checked against an exact Jaccard of 5-gram
tuples of the ids transformers' tokenizer gives, computed here without ftjax's shingles or MinHash.
"""
import json
import os
import random
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from ftjax import data, datacheck, prepare, train
from ftjax.config import defaults
from ftjax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WORDS = [f"w{i}" for i in range(1000)]
SEQ_LEN = 64


def _words(rng, n):
  return " ".join(rng.choice(WORDS) for _ in range(n))


def _label(rng):
  return json.dumps({"label": rng.choice(WORDS[:40])})


def _planted():
  """(train rows, eval rows, {finding: expected train/eval lines}) for prompt_completion."""
  rng = random.Random(0)
  train_rows = [{"prompt": _words(rng, 24), "completion": _label(rng)} for _ in range(60)]
  eval_rows = [{"prompt": _words(rng, 24), "completion": _label(rng)} for _ in range(6)]
  t = lambda line: ("train", line)
  e = lambda line: ("eval", line)
  # An exact duplicate, up to whitespace.
  train_rows[19] = {"prompt": "  " + train_rows[4]["prompt"].replace(" ", "\n "),
                    "completion": train_rows[4]["completion"] + " "}
  # Near-duplicates: 40 words and the completion, the second word changed (~0.9) ...
  long = _words(rng, 40).split()
  train_rows[21] = {"prompt": " ".join(long), "completion": _label(rng)}
  train_rows[22] = {"prompt": " ".join(long[:1] + ["w999"] + long[2:]),
                    "completion": train_rows[21]["completion"]}
  # ... and not: the first 27 words shared (~0.5).
  train_rows[24] = {"prompt": " ".join(long[:27] + _words(rng, 13).split()),
                    "completion": train_rows[21]["completion"]}
  # A conflict: the same prompt (up to whitespace), another answer.
  train_rows[30] = {"prompt": train_rows[29]["prompt"] + "  ",
                    "completion": json.dumps({"label": "other"})}
  # Leaks: an eval prompt equal to a train prompt, and one with its first word changed (~0.9).
  eval_rows[1]["prompt"] = train_rows[9]["prompt"]
  eval_rows[3]["prompt"] = "w998 " + train_rows[11]["prompt"].split(" ", 1)[1]
  # Truncated: a long completion (some of it still trained) and a long prompt (dropped).
  train_rows[39]["completion"] = json.dumps({"label": _words(rng, 45)})
  train_rows[40]["prompt"] = _words(rng, 70)
  train_rows[44]["completion"] = " \n "  # an empty target
  for line in (50, 51):  # not JSON, among JSON
    train_rows[line - 1]["completion"] = "label " + rng.choice(WORDS)
  expected = {
      "duplicates": [[t(5), t(20)]], "near_duplicates": [[t(22), t(23)]],
      "conflicts": [[t(30), t(31)]], "leakage": [[e(2), t(10)], [e(4), t(12)]],
      "truncated": [t(40), t(41)], "dropped": [t(41)], "empty_targets": [t(45)],
      "format_outliers": [t(50), t(51)], "template": []}
  return train_rows, eval_rows, expected


def _chats():
  """(rows, expected) for messages: labels from a small set, one seen once; two template faults."""
  rng = random.Random(1)
  rows = [{"messages": [{"role": "user", "content": _words(rng, 12)},
                        {"role": "assistant", "content": rng.choice(["yes", "no", "maybe"])}]}
          for _ in range(60)]
  rows[2]["messages"].insert(0, {"role": "system", "content": "answer yes or no"})  # fine
  rows[6]["messages"][1]["content"] = "perhaps"  # the only one
  rows[9]["messages"].append({"role": "user", "content": "and then?"})  # ends on the user
  rows[12]["messages"].insert(1, {"role": "user", "content": "hello?"})  # user, user, assistant
  expected = {"format_outliers": [("train", 7)], "template": [("train", 10), ("train", 13)]}
  return rows, expected


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast
  tk = Tokenizer(models.WordLevel(unk_token="<unk>"))
  tk.pre_tokenizer = pre_tokenizers.Whitespace()
  corpus = WORDS + ['{"label": "other"}', "label yes no maybe perhaps answer or hello and then ?",
                    "user assistant system"]
  tk.train_from_iterator(corpus, trainers.WordLevelTrainer(
      special_tokens=["<unk>", "</s>", "<|im_start|>", "<|im_end|>"]))
  hf = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", unk_token="<unk>")
  hf.chat_template = CHATML
  path = tmp_path_factory.mktemp("tok")
  hf.save_pretrained(str(path))
  return str(path)


def _write(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def _cfg(tokenizer_dir, train_path, eval_path="", fmt="prompt_completion"):
  c = defaults()
  c.tokenizer.path = tokenizer_dir
  c.data.train, c.data.eval, c.data.format, c.data.seq_len = train_path, eval_path, fmt, SEQ_LEN
  return c


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tokenizer_dir):
  tmp = tmp_path_factory.mktemp("planted")
  train_rows, eval_rows, expected = _planted()
  paths = _write(tmp / "train.jsonl", train_rows), _write(tmp / "eval.jsonl", eval_rows)
  return tmp, paths, train_rows, eval_rows, expected


def _refs(items):
  """Findings as comparable (split, line) tuples, pairs as lists of them."""
  def one(item):
    if isinstance(item, list):
      return [one(r) for r in item]
    if "pair" in item:
      return one(item["pair"])
    return item["split"], item["line"]
  return sorted(one(i) for i in items)


def _ids(tok, row):
  """Training's ids of a prompt_completion row, from transformers directly."""
  enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
  return enc(row["prompt"]) + enc(row["completion"]) + [tok.eos_token_id]


def _jaccard5(a, b):
  grams = lambda ids: {tuple(ids[i:i + 5]) for i in range(len(ids) - 4)}
  x, y = grams(a), grams(b)
  return len(x & y) / len(x | y)


def test_planted_problems_found_and_nothing_else(planted, tokenizer_dir):
  tmp, (train_path, eval_path), train_rows, eval_rows, expected = planted
  out = tmp / "report.json"
  clean = tmp / "clean.jsonl"
  before = (open(train_path).read(), open(eval_path).read())
  cfg = tmp / "cfg.py"
  cfg.write_text(
      "from ftjax.config import defaults\n"
      "def get_config():\n"
      "  c = defaults()\n"
      f"  c.tokenizer.path = {tokenizer_dir!r}\n"
      f"  c.data.train, c.data.eval = {train_path!r}, {eval_path!r}\n"
      f"  c.data.seq_len = {SEQ_LEN}\n"
      "  return c\n")
  run = subprocess.run(
      [sys.executable, "-m", "ftjax.check_data", f"--config={cfg}", f"--json={out}", "--show=1",
       f"--write_clean={clean}"],
      cwd=tmp, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True, timeout=300)
  assert run.returncode == 2, run.stderr[-3000:]
  report = json.loads(out.read_text())
  for key, rows in expected.items():
    assert _refs(report[key]) == sorted(rows), key
  assert report["rows"] == {"train": 60, "eval": 6}
  assert (open(train_path).read(), open(eval_path).read()) == before  # inputs untouched

  # Similarities: the exact Jaccard of 5-grams of transformers' ids.
  from transformers import AutoTokenizer
  tok = AutoTokenizer.from_pretrained(tokenizer_dir)
  (near,) = report["near_duplicates"]
  ref = _jaccard5(_ids(tok, train_rows[21]), _ids(tok, train_rows[22]))
  assert 0.85 < ref < 0.95 and near["similarity"] == pytest.approx(ref, abs=1e-4)
  far = _jaccard5(_ids(tok, train_rows[21]), _ids(tok, train_rows[24]))
  assert 0.4 < far < 0.6  # the planted non-duplicate really is at about 0.5, and not reported
  leak = report["leakage"][1]
  prompt = lambda row: tok(row["prompt"], add_special_tokens=False)["input_ids"]
  ref = _jaccard5(prompt(eval_rows[3]), prompt(train_rows[11]))
  assert 0.85 < ref < 0.95 and leak["similarity"] == pytest.approx(ref, abs=1e-4)
  assert report["leakage"][0]["similarity"] == 1.0
  (lost,) = [t["lost_trained_tokens"] for t in report["truncated"] if t["line"] == 40]
  assert 0 < lost < len(tok(train_rows[39]["completion"])["input_ids"])

  # The loss mask shown: the first row's completion (and eos), bracketed when not a terminal.
  assert "[[" + tok.decode(tok(train_rows[0]["completion"])["input_ids"]) + " </s>]]" in (
      run.stdout.replace("\n", " "))
  # --write_clean: without the copy, the empty target and the conflict's lone answer.
  cleaned = [json.loads(l) for l in clean.read_text().splitlines()]
  assert len(cleaned) == 57
  assert train_rows[19] not in cleaned and train_rows[44] not in cleaned
  assert train_rows[4] in cleaned and sum(r["prompt"].strip() == train_rows[29]["prompt"]
                                          for r in cleaned) == 1
  assert "dropped 1 duplicates, 1 empty targets, 1 conflicts" in run.stdout


def test_chat_labels_and_template(tmp_path, tokenizer_dir):
  rows, expected = _chats()
  cfg = _cfg(tokenizer_dir, _write(tmp_path / "chats.jsonl", rows), fmt="messages")
  tok = data.load_tokenizer(tokenizer_dir)
  report = datacheck.check(cfg, tok, datacheck.load_groups(cfg))
  assert report["rows"] == {"train": 60, "eval": 0}
  assert [f["value"] for f in report["format_outliers"]] == ["perhaps"]
  for key in datacheck.FINDINGS:
    assert _refs(report[key]) == sorted(expected.get(key, [])), key
  assert [p["problem"].split(" (")[0] for p in report["template"]] == [
      "ends without an assistant turn", "roles do not alternate"]
  assert report["generation_marks"] is False
  # The trained tokens are training's: the same ids and mask as tokenize_rows.
  examples, stats = data.tokenize_rows(rows, tok, "messages", SEQ_LEN, "chats")
  assert report["trained_tokens"]["train"] == stats.target_tokens
  assert report["tokens"]["train"] == stats.tokens


def test_clean_data_no_findings_and_named_sources(tmp_path, tokenizer_dir):
  rng = random.Random(2)
  rows = lambda n: [{"prompt": _words(rng, 20), "completion": _label(rng)} for _ in range(n)]
  a, b, ev = rows(30), rows(30), rows(5)
  b[3] = dict(a[3], completion=json.dumps({"label": "other"}))  # another adapter: no conflict
  ev[0] = dict(b[7])  # leaks into source b
  paths = [_write(tmp_path / f"{n}.jsonl", r) for n, r in (("a", a), ("b", b), ("ev", ev))]
  tok = data.load_tokenizer(tokenizer_dir)
  cfg = _cfg(tokenizer_dir, paths[0], paths[2])
  assert datacheck.findings(datacheck.check(cfg, tok, datacheck.load_groups(cfg))) == 0
  cfg = _cfg(tokenizer_dir, f"a={paths[0]},b={paths[1]}", paths[2])
  report = datacheck.check(cfg, tok, datacheck.load_groups(cfg))
  assert report["rows"] == {"train": 60, "eval": 5}
  assert report["leakage"] == [{"pair": [{"split": "eval", "source": "", "line": 1},
                                         {"split": "train", "source": "b", "line": 8}],
                                "similarity": 1.0}]
  assert datacheck.findings(report) == 1


def test_bad_row_names_file_line_and_field(tmp_path, tokenizer_dir):
  path = _write(tmp_path / "bad.jsonl", [{"prompt": "w1", "completion": "w2"}, {"prompt": "w1"}])
  cfg = _cfg(tokenizer_dir, path)
  with pytest.raises(UserError, match=r"bad.jsonl:2: row has no 'completion' field"):
    datacheck.load_groups(cfg)


def test_strict_refuses_conflicts_before_the_base_loads(planted, tokenizer_dir, tmp_path,
                                                        monkeypatch):
  import transformers
  _, (train_path, eval_path), *_ = planted
  model_dir = tmp_path / "model"
  transformers.LlamaConfig(vocab_size=1100, hidden_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, intermediate_size=48,
                           head_dim=16).save_pretrained(model_dir)
  cfg = _cfg(tokenizer_dir, train_path, eval_path)
  cfg.workdir, cfg.model.path, cfg.train.batch_size, cfg.mesh.fsdp = str(tmp_path / "w"), str(
      model_dir), 2, 1
  loads = []
  monkeypatch.setattr(prepare.hf_io, "load_hf", lambda *a, **k: loads.append(1))
  cfg.data.check = "strict"
  with pytest.raises(UserError, match=r"data.check=strict: 1 conflicts, 2 leakage, "
                     r"1 empty_targets \(first: train:30 and train:31\)"):
    train.run(cfg)
  assert not loads
  cfg.data.check = "auto"
  summary = datacheck.training_summary(cfg, data.load_tokenizer(tokenizer_dir))
  assert summary.startswith("data check: 1 duplicates, 1 near duplicates, 1 conflicts, 2 leakage")


def test_unknown_check_level_and_clean_over_input(planted, tokenizer_dir):
  tmp, (train_path, eval_path), *_ = planted
  cfg = _cfg(tokenizer_dir, train_path, eval_path)
  cfg.data.check = "paranoid"
  with pytest.raises(UserError, match="data.check='paranoid': use one of auto, full, strict, off"):
    datacheck.training_summary(cfg, data.load_tokenizer(tokenizer_dir))
  before = open(train_path).read()
  with pytest.raises(UserError, match="that is an input file"):
    datacheck.write_clean(datacheck.load_groups(cfg), train_path)
  assert open(train_path).read() == before


def test_auto_skips_near_duplicates_on_large_data_full_does_not(planted, tokenizer_dir,
                                                               monkeypatch):
  _, (train_path, eval_path), *_ = planted
  cfg = _cfg(tokenizer_dir, train_path, eval_path)
  tok = data.load_tokenizer(tokenizer_dir)
  monkeypatch.setattr(datacheck, "NEAR_AUTO_ROWS", 50)  # the planted data has 66 rows
  auto = datacheck.training_summary(cfg, tok)
  assert "near duplicates" not in auto and "near-duplicates not checked" in auto
  assert "1 leakage" in auto  # only the exact leak: the near one needs tokens
  cfg.data.check = "full"
  full = datacheck.training_summary(cfg, tok)
  assert "1 near duplicates" in full and "2 leakage" in full
