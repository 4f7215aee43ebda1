"""python -m ftjax.eval --workdir=DIR [--data=eval.jsonl] [--prompt_prefix=FILE]: the base against
its adapters, on the same eval prompts, in one table (also written to DIR/eval.json).

Rows of the table: the base alone; with --prompt_prefix, the base behind a prompt (the file's text
as a system message for messages data, else put before each prompt: instructions or few-shot
examples, the prompting baseline); then each adapter. Columns: exact match of the greedy
completion with the reference, the share of completions that are valid JSON (when every reference
is JSON), and the eval loss (mean cross-entropy per target token, as training's eval_loss). Then a
few prompts side by side. On preference pairs (data.format=preference) the reference is the chosen
reply, the eval loss is the chosen reply's, and `prefers chosen` is the share of pairs whose chosen
reply the variant gives the higher log-probability (summed over its tokens). Prompt first; fine-tune when prompting cannot deliver the behaviour.
All variants decode together, in batches that mix adapters (one pass of the base per batch).
"""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from ftjax import data, pairs
from ftjax.errors import UserError
from ftjax.generate import Sources, decode, load_sources
from ftjax.model import forward

SAMPLES = 3  # prompts shown side by side


def with_prefix(row: dict, fmt: str, prefix: str) -> dict:
  """The row with the prompting baseline's prefix: a system message, or text before the prompt."""
  if fmt == "messages":
    messages = list(row["messages"])
    if messages and messages[0].get("role") == "system":
      messages[0] = dict(messages[0], content=prefix + "\n" + messages[0]["content"])
    else:
      messages.insert(0, {"role": "system", "content": prefix})
    return dict(row, messages=messages)
  if isinstance(row["prompt"], list):  # conversational preference rows
    return dict(row, prompt=with_prefix({"messages": row["prompt"]}, "messages", prefix)["messages"])
  return dict(row, prompt=prefix + row["prompt"])


@functools.partial(jax.jit, static_argnames=("stacked",))
def _nll(model, adapters, tokens, targets, ids, stacked):
  """Summed cross-entropy over each row's target positions and their count [B]; tokens [B, T + 1]."""
  logits = forward(model, tokens[:, :-1], adapters, adapter_ids=ids if stacked else None)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
  return jnp.sum(nll * targets[:, 1:], axis=1), jnp.sum(targets[:, 1:], axis=1)


def eval_loss(src: Sources, examples, adapter_id: int, batch_size: int) -> float:
  """Mean cross-entropy per target token of `examples` under one variant."""
  total, count = row_nll(src, examples, adapter_id, batch_size)
  return float(total.sum()) / max(float(count.sum()), 1.0)


def row_nll(src: Sources, examples, adapter_id: int, batch_size: int):
  """(summed cross-entropy of each example's targets, their count), float64 [len(examples)]."""
  total, count = [], []
  for first in range(0, len(examples), batch_size):
    chunk = examples[first:first + batch_size]
    width = -(-max(len(e.ids) for e in chunk) // 32) * 32
    tokens = np.zeros((batch_size, width), np.int32)
    targets = np.zeros((batch_size, width), np.float32)
    for i, e in enumerate(chunk):
      tokens[i, :len(e.ids)], targets[i, :len(e.ids)] = e.ids, e.target_mask
    ids = np.full((batch_size,), adapter_id, np.int32)
    s, n = _nll(src.model, src.adapters, tokens, targets, ids,
                stacked=src.adapters is not None)
    total.append(np.asarray(s, np.float64)[:len(chunk)])
    count.append(np.asarray(n, np.float64)[:len(chunk)])
  return np.concatenate(total), np.concatenate(count)


def _is_json(text: str) -> bool:
  try:
    json.loads(text)
    return True
  except ValueError:
    return False


def evaluate(src: Sources, rows: list, fmt: str, prefix: str | None, f) -> dict:
  """Every variant on `rows`: {"variants": {label: metrics}, "samples": [...]}."""
  variants = [("base", -1, rows)]
  if prefix is not None:
    variants.append(("base + prompt", -1, [with_prefix(r, fmt, prefix) for r in rows]))
  variants += [(name, i, rows) for i, name in enumerate(src.names)]
  refs = [data.prompt_and_reference(src.tokenizer, fmt, r)[1] for r in rows]
  json_refs = all(_is_json(r) for r in refs)
  prompts, ids = [], []
  for _, index, variant_rows in variants:
    prompts += [data.prompt_and_reference(src.tokenizer, fmt, r)[0] for r in variant_rows]
    ids += [index] * len(rows)
  texts = decode(src, prompts, ids, f)
  seq_len = max(len(p) for p in prompts) + max(len(src.tokenizer.encode(r)) for r in refs) + 8
  report = {"variants": {}, "samples": []}
  for k, (label, index, variant_rows) in enumerate(variants):
    outs = texts[k * len(rows):(k + 1) * len(rows)]
    metrics = {"exact_match": float(np.mean([o.strip() == r.strip() for o, r in zip(outs, refs)]))}
    if fmt == pairs.FORMAT:  # log-probabilities of both replies: which one the variant prefers
      prs, _ = pairs.tokenize_pairs(variant_rows, src.tokenizer, fmt, 2 * seq_len, f.data)
      chosen, n = row_nll(src, [p.chosen for p in prs], index, f.batch_size)
      rejected, _ = row_nll(src, [p.rejected for p in prs], index, f.batch_size)
      metrics["prefers_chosen"] = float(np.mean(chosen < rejected))
      metrics["eval_loss"] = float(chosen.sum() / max(n.sum(), 1.0))
    else:
      examples, _ = data.tokenize_rows(variant_rows, src.tokenizer, fmt, seq_len, f.data)
      metrics["eval_loss"] = eval_loss(src, examples, index, f.batch_size)
    metrics["rows"] = len(rows)
    if json_refs:
      metrics["valid_json"] = float(np.mean([_is_json(o) for o in outs]))
    report["variants"][label] = metrics
  for j in range(min(SAMPLES, len(rows))):
    report["samples"].append({
        "prompt": src.tokenizer.decode(data.prompt_and_reference(src.tokenizer, fmt, rows[j])[0]),
        "reference": refs[j],
        **{label: texts[k * len(rows) + j] for k, (label, _, _) in enumerate(variants)}})
  return report


def table(report: dict) -> str:
  metrics = next(iter(report["variants"].values()))
  cols = [c for c in ("exact_match", "valid_json", "prefers_chosen") if c in metrics]
  width = max(len(label) for label in report["variants"]) + 2
  lines = ["variant".ljust(width) + "".join(f"{c.replace('_', ' '):>15}" for c in cols)
           + f"{'eval loss':>11}"]
  for label, m in report["variants"].items():
    lines.append(label.ljust(width) + "".join(f"{m[c]:>15.1%}" for c in cols)
                 + f"{m['eval_loss']:>11.4f}")
  for s in report["samples"]:
    lines.append("")
    for key, value in s.items():
      lines.append(f"  {key + ':':<{width}} {value!r}")
  return "\n".join(lines)


def main(argv):
  from absl import flags, logging
  logging.set_verbosity(logging.ERROR)
  f = flags.FLAGS
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}")
  prefix = None
  if f.prompt_prefix:
    if not os.path.isfile(f.prompt_prefix):
      raise UserError(f"--prompt_prefix={f.prompt_prefix}: not found")
    with open(f.prompt_prefix) as fh:
      prefix = fh.read()
  src = load_sources(f.workdir, f.base, f.adapters, f.step)
  if not f.data:
    if not src.cfg.get("data", {}).get("eval"):
      raise UserError("--data=eval.jsonl: needed (the workdir's config has no data.eval)")
    f.data = ",".join(data.parse_sources(src.cfg["data"]["eval"], "data.eval").values())
  rows = [dict(r) for path in f.data.split(",") for r in data.load_rows(path)]
  if not rows:
    raise UserError(f"--data={f.data}: no rows")
  fmt = src.fmt if src.cfg else ("messages" if "messages" in rows[0] else
                                 pairs.FORMAT if "chosen" in rows[0] else "prompt_completion")
  if fmt not in ("prompt_completion", "messages", pairs.FORMAT):
    raise UserError(f"{f.workdir}: data.format={fmt}; eval compares completions, so it needs "
                    "prompt_completion, messages or preference data")
  if f.max_new_tokens is None:
    refs = [data.prompt_and_reference(src.tokenizer, fmt, r)[1] for r in rows]
    f.max_new_tokens = max(len(src.tokenizer.encode(r)) for r in refs) + 8
  report = evaluate(src, rows, fmt, prefix, f)
  report.update(data=f.data, prompt_prefix=f.prompt_prefix)
  out = f.out or os.path.join(f.workdir or ".", "eval.json")
  with open(out, "w") as fh:
    json.dump(report, fh, indent=2)
  print(table(report))
  print(f"\nwritten to {out}")


if __name__ == "__main__":
  from absl import app, flags

  from ftjax.errors import parse_flags, run_cli
  from ftjax.generate import define_source_flags

  define_source_flags()
  flags.FLAGS.set_default("max_new_tokens", None)  # eval: the longest reference + 8
  flags.DEFINE_string("data", None, "Eval rows (default: the workdir's data.eval).")
  flags.DEFINE_string("prompt_prefix", None, "A file: system message or few-shot examples put "
                      "before each prompt, the prompting baseline.")
  flags.DEFINE_string("out", None, "Where eval.json goes (default: DIR/eval.json).")
  app.run(run_cli(main), flags_parser=parse_flags)
