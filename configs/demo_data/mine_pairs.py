"""Mines configs/demo_dpo.py's preference pairs from the demo's SFT adapter's own mistakes.

  python -m ftjax.train --config=configs/demo.py     # the SFT adapter, in runs/demo
  python configs/demo_data/mine_pairs.py [runs/demo]  # writes pref_train.jsonl, pref_eval.jsonl

Each pair is a request, its right JSON triage as `chosen`, and as `rejected` what the SFT adapter
itself answered wrongly: the mistakes it still makes, not made-up ones.
- pref_train.jsonl: the adapter's greedy decodes of the demo's 1000 training requests and of
  FRESH new requests (make_data's generator, another seed; none a near-duplicate of an eval
  request, at make_data's margin), kept where they differ from the reference.
- pref_eval.jsonl: the demo's 100 held-out eval requests (eval.jsonl, in order): `rejected` is the
  greedy decode where it is wrong, else the first wrong one of SAMPLES decodes at temperature 1 (a
  mistake the adapter makes with some probability); requests it never gets wrong are left out.
  So exact match on pref_eval's prompts is the demo's own eval set (less those few).
Deterministic for a given adapter (greedy decodes; samples from a fixed key).
"""
import json
import os
import random
import sys

import jax

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import make_data  # noqa: E402  (the demo's request generator and near-duplicate index)

from ftjax import data  # noqa: E402
from ftjax.generate import load_sources  # noqa: E402
from ftjax.sampling import generate_rows  # noqa: E402

FRESH = 4000   # new requests decoded beside the training ones
SAMPLES = 8    # temperature-1 decodes per eval request whose greedy decode is right
SEED = 3       # make_data used 0 (demo), 1 (chat) and 2


def read(name: str) -> list[dict]:
  with open(os.path.join(HERE, name)) as f:
    return [json.loads(line) for line in f]


def fresh_rows(n: int, seen: set, held_out: list[dict]) -> list[dict]:
  """n new requests: no prompt seen before, none near a held-out prompt."""
  near = make_data.NearIndex()
  for r in held_out:
    near.add(near.shingles(r["prompt"]))
  rng, rows = random.Random(SEED), []
  while len(rows) < n:
    row = make_data.example(rng)
    if row["prompt"] in seen or near.most_similar(near.shingles(row["prompt"])) >= make_data.MARGIN:
      continue
    seen.add(row["prompt"])
    rows.append(row)
  return rows


def decode(src, rows, temperature=0.0, seed=0) -> list[str]:
  tok = src.tokenizer
  prompts = [data.prompt_ids(tok, "prompt_completion", r["prompt"]) for r in rows]
  longest = max(len(tok.encode(r["completion"])) for r in rows)
  out = generate_rows(src.model, prompts, src.adapters, [0] * len(prompts), batch_size=64,
                      max_new_tokens=longest + 8, temperature=temperature,
                      key=jax.random.PRNGKey(seed))
  return [data.decode_completion(tok, ids).strip() for ids in out]


def pair(row: dict, rejected: str) -> dict:
  return {"prompt": row["prompt"], "chosen": row["completion"], "rejected": rejected}


def main(workdir: str = "runs/demo"):
  src = load_sources(workdir)
  train, held_out = read("train.jsonl"), read("eval.jsonl")
  rows = train + fresh_rows(FRESH, {r["prompt"] for r in train + held_out}, held_out)
  mined = [pair(r, out) for r, out in zip(rows, decode(src, rows)) if out != r["completion"]]
  print(f"train: {len(mined)} wrong greedy decodes of {len(rows)} requests "
        f"({sum(r['prompt'] in {t['prompt'] for t in train} for r in mined)} of the "
        f"{len(train)} the adapter was trained on)")
  greedy = decode(src, held_out)
  samples = [decode(src, held_out, 1.0, seed) for seed in range(SAMPLES)]
  evals, from_greedy = [], 0
  for i, row in enumerate(held_out):
    wrong = [out for out in [greedy[i]] + [s[i] for s in samples] if out != row["completion"]]
    from_greedy += greedy[i] != row["completion"]
    if wrong:
      evals.append(pair(row, wrong[0]))
  print(f"eval: {len(evals)} of {len(held_out)} held-out requests ({from_greedy} wrong greedy, the "
        f"rest wrong in one of {SAMPLES} samples)")
  for name, out in (("pref_train.jsonl", mined), ("pref_eval.jsonl", evals)):
    make_data.write(os.path.join(HERE, name), out)


if __name__ == "__main__":
  main(*sys.argv[1:])
