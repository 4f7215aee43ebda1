"""python -m ftjax.check_data --config=configs/NAME.py [--config.a.b=value ...] [--json=report.json]
                             [--show=N] [--write_clean=clean.jsonl]

Reads data.train and data.eval as training does (its loaders, tokenizer, chat template, masks and
data.seq_len) and reports what would make a fine-tune learn the wrong thing: duplicates,
near-duplicates, conflicting answers, eval rows leaking from train, empty targets, format
outliers, chat-template problems, truncation (ftjax/datacheck.py says how each is found).
Exit status 0: no findings; 2: findings (CI can gate on it); 1: bad input. The inputs are only read.
"""
import itertools
import json
import sys

from absl import app, flags
from ml_collections import config_flags
import numpy as np

from ftjax import data, datacheck
from ftjax.errors import UserError, parse_flags, run_cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file.", lock_config=True)
_JSON = flags.DEFINE_string("json", None, "Write the findings to this file as JSON.")
_SHOW = flags.DEFINE_integer("show", 0, "Print this many train examples, trained tokens marked.")
_CLEAN = flags.DEFINE_string("write_clean", None, "Write the train rows without exact duplicates, "
                             "empty targets and conflicting answers to this JSONL file.")
LIST = 10  # items printed per finding; --json has them all


def histogram(lengths, seq_len: int, width: int = 40, bins: int = 10) -> list[str]:
  """Example lengths (tokens) as terminal bars; bins past seq_len + 1 tokens are truncated."""
  lengths = np.asarray(lengths)
  edges = np.unique(np.linspace(lengths.min(), lengths.max() + 1, bins + 1).astype(int))
  counts, _ = np.histogram(lengths, edges)
  lines = []
  for lo, hi, n in zip(edges[:-1], edges[1:], counts):
    note = "  (truncated)" if hi - 1 > seq_len + 1 else ""
    bar = "█" * int(np.ceil(width * n / counts.max()))
    lines.append(f"  {lo:>6}-{hi - 1:<6} {bar:<{width}} {n}{note}")
  return lines


def print_report(report: dict, cfg):
  for name, path in report["sources"].items():
    print(f"{name}: {path}")
  for split in ("train", "eval"):
    if report["rows"][split]:
      print(f"{split}: {report['rows'][split]} rows, {report['tokens'][split]} tokens of which "
            f"{report['trained_tokens'][split]} trained (within data.seq_len)")
  lengths = report["lengths"]["train"]
  print(f"train example lengths in tokens (data.seq_len={cfg.data.seq_len}):")
  print("\n".join(histogram(lengths, cfg.data.seq_len)))
  above = np.mean(np.asarray(lengths) > cfg.data.seq_len + 1)
  print(f"  {above:.1%} above data.seq_len")
  if "generation_marks" in report:
    print("chat template: " + ("marks replies with {% generation %}" if report["generation_marks"]
                               else "no {% generation %} marks") +
          "; ftjax locates each assistant reply from rendered prefixes and token offsets")
  for key in datacheck.FINDINGS:
    items = report[key]
    print(f"{datacheck.WORDS.get(key, key)}: {len(items)}")
    for item in items[:LIST]:
      print("  " + datacheck.describe_item(item))
    if len(items) > LIST:
      print(f"  ... and {len(items) - LIST} more (--json=FILE lists every one)")
  n = datacheck.findings(report)
  print("no findings" if not n else f"{n} findings (exit status 2)")


def show(rows, tokenizer: data.Tokenizer, seq_len: int, n: int, color: bool):
  """The first n rows as training sees them, each run of trained tokens marked."""
  mark = (lambda t: f"\x1b[1;32m{t}\x1b[0m") if color else (lambda t: f"[[{t}]]")
  for r in rows[:n]:
    example, cut = data.fit(r.ids, r.mask, seq_len)
    ids, mask = (example.ids, example.target_mask) if example else (r.ids, [False] * len(r.ids))
    notes = (" (truncated to data.seq_len)" if cut else "") + (
        " (dropped: no trained token)" if example is None else "")
    print(f"--- {datacheck.ref_text(r.ref)}{notes}")
    text = ""
    for trained, run in itertools.groupby(zip(np.asarray(ids).tolist(), mask), lambda p: p[1]):
      piece = tokenizer.decode([i for i, _ in run])
      text += mark(piece) if trained else piece
    print(text)


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}")
  cfg = _CONFIG.value
  if cfg is None:
    raise UserError("--config=configs/NAME.py is required")
  tokenizer = data.load_tokenizer(cfg.tokenizer.path or cfg.model.path)
  groups = datacheck.load_groups(cfg)
  report = datacheck.check(cfg, tokenizer, groups)
  print_report(report, cfg)
  if _SHOW.value:
    show(groups[0].rows, tokenizer, cfg.data.seq_len, _SHOW.value, sys.stdout.isatty())
  if _JSON.value:
    with open(_JSON.value, "w", encoding="utf-8") as f:
      json.dump({k: v for k, v in report.items() if k != "lengths"}, f, indent=1)
    print(f"findings written to {_JSON.value} (every item of each, as JSON)")
  if _CLEAN.value:
    print(datacheck.write_clean(groups, _CLEAN.value))
  return 2 if datacheck.findings(report) else 0


if __name__ == "__main__":
  app.run(run_cli(main), flags_parser=parse_flags)
