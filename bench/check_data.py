"""How long `python -m ftjax.check_data` takes on 100k generated rows of ~200 tokens.

  python bench/check_data.py [--rows=100000]

Generates prompt_completion rows (Zipf-distributed made-up words, a JSON completion) with planted
exact duplicates, near-duplicates, conflicts and eval leaks, trains a byte-level BPE on them, and
times the whole check (read, tokenize, every check, near-duplicates included) against two peers
measured in the same run: training's own tokenization of the train rows (data.tokenize_rows),
and exact pairwise 5-gram Jaccard on a 2000-row sample, scaled to all pairs.
"""
import argparse
import json
import os
import random
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ftjax import data, datacheck  # pylint: disable=g-import-not-at-top
from ftjax.config import defaults  # pylint: disable=g-import-not-at-top


def make_rows(n: int, rng: random.Random, words: list[str], weights) -> list[dict]:
  def text(k):
    return " ".join(rng.choices(words, weights, k=k))
  rows = [{"prompt": text(120), "completion": json.dumps({"answer": text(12)})} for _ in range(n)]
  for i in rng.sample(range(n), n // 100):  # 1% exact copies
    rows[i] = dict(rows[rng.randrange(n)])
  for i in rng.sample(range(n), n // 100):  # 1% near copies: one word changed
    src = rows[rng.randrange(n)]
    words_ = src["prompt"].split()
    words_[rng.randrange(len(words_))] = rng.choice(words)
    rows[i] = {"prompt": " ".join(words_), "completion": src["completion"]}
  for i in rng.sample(range(n), n // 200):  # 0.5% conflicts
    rows[i] = {"prompt": rows[rng.randrange(n)]["prompt"],
               "completion": json.dumps({"answer": "x"})}
  return rows


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--rows", type=int, default=100_000)
  args = parser.parse_args()
  rng = random.Random(0)
  letters = "abcdefghijklmnopqrstuvwxyz"
  words = sorted({"".join(rng.choices(letters, k=rng.randint(2, 9))) for _ in range(6000)})
  weights = 1.0 / np.arange(1, len(words) + 1)  # Zipf
  train_rows = make_rows(args.rows, rng, words, weights)
  eval_rows = make_rows(1000, rng, words, weights)
  for i in range(0, 1000, 50):  # 2% of eval prompts taken from train
    eval_rows[i]["prompt"] = train_rows[rng.randrange(args.rows)]["prompt"]

  with tempfile.TemporaryDirectory() as tmp:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator((r["prompt"] for r in train_rows[:5000]), trainers.BpeTrainer(
        vocab_size=4000, special_tokens=["</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>").save_pretrained(tmp)
    paths = {}
    for split, rows in (("train", train_rows), ("eval", eval_rows)):
      paths[split] = os.path.join(tmp, f"{split}.jsonl")
      with open(paths[split], "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    cfg = defaults()
    cfg.tokenizer.path, cfg.data.train, cfg.data.eval = tmp, paths["train"], paths["eval"]
    cfg.data.seq_len = 512
    tokenizer = data.load_tokenizer(tmp)

    t0, c0 = time.perf_counter(), time.process_time()
    report = datacheck.check(cfg, tokenizer, datacheck.load_groups(cfg))
    t_check, c_check = time.perf_counter() - t0, time.process_time() - c0

    t0, c0 = time.perf_counter(), time.process_time()
    examples, stats = data.tokenize_rows(data.load_rows(paths["train"]), tokenizer,
                                         "prompt_completion", cfg.data.seq_len, "train")
    t_tokenize, c_tokenize = time.perf_counter() - t0, time.process_time() - c0

  sample = [np.asarray(e.ids) for e in examples[:2000]]
  grams = [{tuple(ids[i:i + 5]) for i in range(len(ids) - 4)} for ids in sample]
  t0 = time.perf_counter()
  for i in range(len(grams)):
    for j in range(i):
      len(grams[i] & grams[j]) / len(grams[i] | grams[j])
  t_pairs = (time.perf_counter() - t0) * (args.rows / len(grams)) ** 2

  print(f"{args.rows} train rows, {stats.tokens / args.rows:.0f} tokens per row on average")
  print("found: " + ", ".join(f"{len(report[k])} {k}" for k in datacheck.FINDINGS))
  print(f"check_data, everything: {t_check:.1f} s ({c_check:.1f} s of CPU time)")
  print(f"peer, data.tokenize_rows of the train rows: {t_tokenize:.1f} s ({c_tokenize:.1f} s CPU); "
        f"check / tokenize = {t_check / t_tokenize:.2f}x ({c_check / c_tokenize:.2f}x in CPU time)")
  print(f"peer, exact pairwise Jaccard of all pairs (from a 2000-row sample): {t_pairs:.0f} s "
        f"({t_pairs / t_check:.0f}x the check)")


if __name__ == "__main__":
  main()
