"""python -m ftjax.eval --workdir=DIR [--data=eval.jsonl | --data=NAME=FILE,...]
                      [--prompt_prefix=FILE] [--rows=N]: the base against its adapters, on the
same eval prompts (the first N of each file with --rows), in one table (also written to
DIR/eval.json).

Rows of the table: the base alone; with --prompt_prefix, the base behind a prompt (the file's text
as a system message for messages data, else put before each prompt: instructions or few-shot
examples, the prompting baseline); then the adapter. A workdir of several adapters scores each on
its own eval source (data.eval's NAME=FILE, or --data=NAME=FILE,...), the base and prompted base
on each too, all in one table whose rows say the source ("json: base", "json: json"); one eval
file for all of them scores every adapter on it. Columns: exact match of the greedy
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
from ftjax.generate import Sources, adapter_names, decode, load_sources, workdir_config
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
  """Every variant (the base, the prompted base, each adapter) on `rows`."""
  return evaluate_sets(src, {"": (rows, list(src.names), f.data)}, fmt, prefix, f)


def evaluate_sets(src: Sources, sets: dict, fmt: str, prefix: str | None, f) -> dict:
  """{label: (rows, adapter names, where)} -> {"variants": {label: metrics}, "samples": [...]}:
  on each set's rows the base, the prompted base and the set's adapters. With one set labelled ""
  the variants are "base", "base + prompt" and the adapter names; else each is prefixed
  "LABEL: "."""
  variants = []  # (label, adapter index, rows, set label)
  for name, (rows, adapters, _) in sets.items():
    pre = f"{name}: " if name else ""
    variants.append((pre + "base", -1, rows, name))
    if prefix is not None:
      variants.append((pre + "base + prompt", -1, [with_prefix(r, fmt, prefix) for r in rows],
                       name))
    variants += [(pre + a, src.names.index(a), rows, name) for a in adapters]
  refs = {name: [data.prompt_and_reference(src.tokenizer, fmt, r)[1] for r in rows]
          for name, (rows, _, _) in sets.items()}
  prompts, ids = [], []
  for _, index, variant_rows, _ in variants:
    prompts += [data.prompt_and_reference(src.tokenizer, fmt, r)[0] for r in variant_rows]
    ids += [index] * len(variant_rows)
  texts = decode(src, prompts, ids, f)
  seq_len = max(len(p) for p in prompts) + max(
      len(src.tokenizer.encode(r)) for each in refs.values() for r in each) + 8
  report = {"variants": {}, "samples": []}
  outs, first = {}, 0
  for label, index, variant_rows, name in variants:
    outs[label] = texts[first:first + len(variant_rows)]
    first += len(variant_rows)
    metrics = {"exact_match": float(np.mean([o.strip() == r.strip()
                                             for o, r in zip(outs[label], refs[name])]))}
    if fmt == pairs.FORMAT:  # log-probabilities of both replies: which one the variant prefers
      prs, _ = pairs.tokenize_pairs(variant_rows, src.tokenizer, fmt, 2 * seq_len, sets[name][2])
      chosen, n = row_nll(src, [p.chosen for p in prs], index, f.batch_size)
      rejected, _ = row_nll(src, [p.rejected for p in prs], index, f.batch_size)
      metrics["prefers_chosen"] = float(np.mean(chosen < rejected))
      metrics["eval_loss"] = float(chosen.sum() / max(n.sum(), 1.0))
    else:
      examples, _ = data.tokenize_rows(variant_rows, src.tokenizer, fmt, seq_len, sets[name][2])
      metrics["eval_loss"] = eval_loss(src, examples, index, f.batch_size)
    metrics["rows"] = len(variant_rows)
    if name:
      metrics["data"] = sets[name][2]
    if all(_is_json(r) for r in refs[name]):
      metrics["valid_json"] = float(np.mean([_is_json(o) for o in outs[label]]))
    report["variants"][label] = metrics
  for name, (rows, _, _) in sets.items():
    for j in range(min(SAMPLES, len(rows))):
      prompt = data.prompt_and_reference(src.tokenizer, fmt, rows[j])[0]
      report["samples"].append({
          **({"data": name} if name else {}),
          "prompt": data.decode_prompt(src.tokenizer, prompt), "reference": refs[name][j],
          **{label: outs[label][j] for label, _, _, set_name in variants if set_name == name}})
  return report


def table(report: dict) -> str:
  cols = [c for c in ("exact_match", "valid_json", "prefers_chosen")
          if any(c in m for m in report["variants"].values())]
  width = max(len(label) for label in report["variants"]) + 2
  lines = ["variant".ljust(width) + "".join(f"{c.replace('_', ' '):>15}" for c in cols)
           + f"{'eval loss':>11}"]
  for label, m in report["variants"].items():
    lines.append(label.ljust(width) + "".join(f"{m[c]:>15.1%}" if c in m else f"{'-':>15}"
                                              for c in cols) + f"{m['eval_loss']:>11.4f}")
  for s in report["samples"]:
    lines.append("")
    for key, value in s.items():
      lines.append(f"  {key + ':':<{width}} {value!r}")
  return "\n".join(lines)


def eval_sets(spec: str | None, cfg: dict, names: tuple, where: str) -> dict:
  """The eval files and the adapters scored on each: {label: (paths, adapter names)}.

  spec: --data ("FILE[,FILE]", or "NAME=FILE,..." naming adapters); None: the workdir's
  data.eval. One adapter (or none) gets every file, joined, under the label "". Several adapters
  each get their own source, labelled by the adapter's name; one file shared by several adapters
  is scored once, labelled by its path."""
  if spec is None:
    text = (cfg.get("data") or {}).get("eval")
    if not text:
      raise UserError("--data=eval.jsonl: needed (the workdir's config has no data.eval)")
    if len(names) <= 1:
      return {"": (list(data.parse_sources(text, "data.eval").values()), list(names))}
    each = data.eval_sources(data.train_sources(cfg["data"]["train"]), text)
  elif len(names) <= 1:
    paths = [p.strip() for p in spec.split(",") if p.strip()]
    if all("=" in p and not os.path.exists(p) for p in paths):  # --data=default=FILE
      paths = list(data.parse_sources(spec, "--data").values())
    return {"": (paths, list(names))}
  else:
    if "=" not in spec or any(os.path.exists(p.strip()) for p in spec.split(",")):
      raise UserError(f"--data={spec}: {where} holds adapters {', '.join(names)}; say which "
                      f"adapter each file scores: --data={names[0]}=FILE,{names[1]}=FILE")
    each = data.parse_sources(spec, "--data")
    for name in each:
      if name not in names:
        raise UserError(f"--data={spec}: {where} has no adapter {name!r} (its adapters: "
                        f"{', '.join(names)})")
  by_path = {}
  for name, path in each.items():
    by_path.setdefault(path, []).append(name)
  return {(adapters[0] if len(adapters) == 1 else path): ([path], adapters)
          for path, adapters in by_path.items()}


def main(argv):
  from absl import flags, logging
  logging.set_verbosity(logging.ERROR)
  f = flags.FLAGS
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}")
  if f.rows is not None and f.rows < 1:
    raise UserError(f"--rows={f.rows}: score at least 1 row (leave it out for all)")
  prefix = None
  if f.prompt_prefix:
    if not os.path.isfile(f.prompt_prefix):
      raise UserError(f"--prompt_prefix={f.prompt_prefix}: not found")
    with open(f.prompt_prefix) as fh:
      prefix = fh.read()
  # Everything a user can get wrong is checked before the model loads.
  cfg = workdir_config(f.workdir) if f.workdir else {}
  names = adapter_names(f.workdir, f.adapters, f.step)
  if f.data is None and not f.workdir:
    raise UserError("--data=eval.jsonl: needed with --base")
  sets = {}
  for label, (paths, adapters) in eval_sets(f.data, cfg, names, f.workdir or "--adapters").items():
    rows = [dict(r) for path in paths for r in data.load_rows(path)]
    if not rows:
      raise UserError(f"{','.join(paths)}: no rows")
    where = ",".join(paths)
    if f.rows and f.rows < len(rows):
      rows, where = rows[:f.rows], f"{where} (first {f.rows} of {len(rows)} rows)"
    sets[label] = (rows, adapters, where)
  first = next(iter(sets.values()))[0][0]
  fmt = cfg["data"]["format"] if cfg else ("messages" if "messages" in first else
                                            pairs.FORMAT if "chosen" in first
                                            else "prompt_completion")
  if fmt not in ("prompt_completion", "messages", pairs.FORMAT):
    raise UserError(f"{f.workdir}: data.format={fmt}; eval compares completions, so it needs "
                    "prompt_completion, messages or preference data")
  src = load_sources(f.workdir, f.base, f.adapters, f.step)
  if f.max_new_tokens is None:
    refs = [data.prompt_and_reference(src.tokenizer, fmt, r)[1]
            for rows, _, _ in sets.values() for r in rows]
    f.max_new_tokens = max(len(src.tokenizer.encode(r)) for r in refs) + 8
  report = evaluate_sets(src, sets, fmt, prefix, f)
  wheres = {label: where for label, (_, _, where) in sets.items()}
  # one set is labelled "" (one adapter, or none), or by its path (one file for several)
  report.update(data=wheres[""] if list(wheres) == [""] else wheres, prompt_prefix=f.prompt_prefix)
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
  flags.DEFINE_string("data", None, "Eval rows (default: the workdir's data.eval); NAME=FILE,... "
                      "for a workdir of several adapters, each scored on its own file.")
  flags.DEFINE_string("prompt_prefix", None, "A file: system message or few-shot examples put "
                      "before each prompt, the prompting baseline.")
  flags.DEFINE_string("out", None, "Where eval.json goes (default: DIR/eval.json).")
  flags.DEFINE_integer("rows", None, "Score only the first N rows of each eval file (a quicker "
                       "look; default: every row).")
  app.run(run_cli(main), flags_parser=parse_flags)
