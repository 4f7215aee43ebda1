"""What in the data would make a fine-tune learn the wrong thing, found before any training.

Rows are read with data.load_rows and tokenized with data.encode_row and data.fit, as training
reads them, so sizes, truncation and masks are training's own. Each (split, source) is checked on
its own: a named source trains its own adapter, so the same prompt in two sources is no conflict.

  duplicates       the same row after whitespace normalization (the prompt and completion, the
                   text, or the whole conversation)
  conflicts        the same prompt (the conversation up to its last assistant turn) with different
                   completions: the model is taught both
  near_duplicates  Jaccard similarity of token 5-gram sets >= NEAR: MinHash signatures, candidates
                   from datasketch's LSH index, then the exact Jaccard of the two sets
  leakage          an eval row whose prompt equals, or is a near-duplicate of, a train row's
  empty_targets    a completion or assistant turn that is empty or whitespace only
  format_outliers  when >= 80% of completions are JSON objects or arrays, those that are not; when
                   >= 50 rows use <= 20 distinct completions (labels), the labels seen once
  template         (messages) roles that do not alternate, a conversation not ending on an
                   assistant turn
  same_sides       (preference) a pair whose chosen and rejected are the same: nothing to learn
  truncated        longer than data.seq_len (+1 for the first token, which nothing predicts)
  dropped          no trained token left within data.seq_len

A row is named {"split": "train", "line": 12}: 1-based line of a JSONL file (the row number for
other sources), with "source" when data.train or data.eval names several sources. A pair is
reported under its most specific finding only: an exact duplicate or a conflict is not also a
near-duplicate.

Preference rows (ftjax/pairs.py): a row is its prompt with its chosen reply (duplicates,
near-duplicates, leaks and formats read those; an empty side is an empty target); a conflict is
two pairs of one prompt that prefer opposite ways (a over b, and b over a).
"""
import collections
import dataclasses
import json
import os
import re

import numpy as np

from ftjax import data, pairs
from ftjax.errors import UserError

NEAR = 0.8            # 5-gram Jaccard at or above which two rows are near-duplicates
SHINGLE = 5           # tokens per shingle
NUM_PERM = 64         # MinHash permutations
# LSH bands x rows per band: a pair at Jaccard 0.8 shares a band with probability 0.99 (0.9: ~1,
# 0.5: 0.32); each candidate is then verified exactly.
LSH_BANDS = (12, 5)
NEAR_AUTO_ROWS = 200_000  # data.check=auto looks for near-duplicates below this many rows
JSON_SHARE, LABELS_MAX, LABELS_MIN_ROWS = 0.8, 20, 50
CHECKS = ("auto", "full", "strict", "off")
FINDINGS = ("truncated", "dropped", "duplicates", "near_duplicates", "conflicts", "leakage",
            "empty_targets", "format_outliers", "template", "same_sides")
# How each finding is counted for a user ("0 template" would say nothing).
WORDS = {"near_duplicates": "near duplicates", "empty_targets": "empty targets",
         "format_outliers": "format outliers", "template": "chat template problems",
         "same_sides": "pairs with the same or an empty side"}
# data.check=strict refuses to train on these
STRICT = ("conflicts", "leakage", "empty_targets", "same_sides")
_SEED = 1
_GENERATION = re.compile(r"{%-?\s*generation\s*-?%}")


def normalize(text: str) -> str:
  return " ".join(text.split())


def _key(ref: dict) -> tuple:
  return ref["split"], ref.get("source"), ref["line"]


@dataclasses.dataclass
class Row:
  ref: dict            # {"split", ["source"], "line"}
  whole: str           # the row, whitespace-normalized: exact duplicates share it
  asked: str           # what is asked, normalized (leakage); the text itself for data.format=text
  prompt: str | None   # key of conflicts; None where nothing is asked apart (text)
  answer: str | None   # the completion / last assistant reply, normalized; None when there is none
  empty_target: bool
  problems: list       # template problems (messages)
  raw: object          # the row as read, for --write_clean
  ids: list | None = None    # all its tokens, before truncation (preference: the chosen side)
  mask: list | None = None   # trained tokens
  rejected: str | None = None  # preference: the rejected reply, normalized


@dataclasses.dataclass
class Group:
  """One (split, source): its file and rows."""
  split: str
  source: str
  path: str
  rows: list


def describe(raw_rows, fmt: str, split: str, source: str | None, path: str) -> list[Row]:
  """The text-level view of each row (field errors name path:line, as training's do)."""
  rows = []
  for line, raw in enumerate(raw_rows, 1):
    ref = {"split": split, "line": line} if source is None else {
        "split": split, "source": source, "line": line}
    if fmt == pairs.FORMAT:
      rows.append(_describe_pair(raw, ref, f"{path}:{line}"))
      continue
    fields = data.row_fields(raw, fmt, f"{path}:{line}")
    if fmt == "text":
      text = normalize(fields[0])
      rows.append(Row(ref, text, text, None, None, not text, [], raw))
    elif fmt == "prompt_completion":
      prompt, answer = normalize(fields[0]), normalize(fields[1])
      rows.append(Row(ref, json.dumps([prompt, answer]), prompt, prompt, answer, not answer, [],
                      raw))
    else:
      turns = [(m["role"], normalize(m["content"])) for m in fields[0]]
      last = max((k for k, (role, _) in enumerate(turns) if role == "assistant"), default=None)
      prompt = json.dumps(turns[:last] if last is not None else turns)
      answer = turns[last][1] if last is not None else None
      empty = any(role == "assistant" and not text for role, text in turns)
      rows.append(Row(ref, json.dumps(turns), prompt, prompt, answer, empty,
                      _role_problems([r for r, _ in turns]), raw))
  return rows


def _describe_pair(raw, ref: dict, where: str) -> Row:
  prompt, chosen, rejected = pairs.pair_fields(raw, where)
  chat = isinstance(prompt, list)
  asked = (json.dumps([(m["role"], normalize(m["content"])) for m in prompt]) if chat
           else normalize(prompt))
  chosen, rejected = normalize(chosen), normalize(rejected)
  problems = _role_problems([m["role"] for m in prompt] + ["assistant"]) if chat else []
  return Row(ref, json.dumps([asked, chosen, rejected]), asked, asked, chosen,
             not chosen or not rejected, problems, raw, rejected=rejected)


def _lost(chosen, rejected, pair) -> int:
  """Trained tokens of both sides that fitting the pair into one row cut."""
  kept = 0 if pair is None else int(pair.chosen.target_mask.sum() + pair.rejected.target_mask.sum())
  return int(sum(chosen[1][1:]) + sum(rejected[1][1:])) - kept


def _role_problems(roles: list[str]) -> list[str]:
  """Turn order a chat template and the model expect: [system], user, assistant, user, ..."""
  problems = []
  body = roles[1:] if roles[0] == "system" else roles
  # Other roles (tool, function) follow their own protocol: only plain chats are held to it.
  if set(body) <= {"user", "assistant"} and any(
      role != ("user", "assistant")[k % 2] for k, role in enumerate(body)):
    problems.append("roles do not alternate (system first, then user, assistant, user, ...)")
  if roles[-1] != "assistant":
    problems.append("ends without an assistant turn (its last turns are not trained)")
  return problems


# --------------------------------------------------------------------------------------------------
# Text-level checks (cheap: no tokenizer)


def exact_duplicates(rows: list[Row]) -> list[list[dict]]:
  """[first, copy] for every row that repeats an earlier one."""
  first, pairs = {}, []
  for r in rows:
    if r.whole in first:
      pairs.append([first[r.whole].ref, r.ref])
    else:
      first[r.whole] = r
  return pairs


def _by_prompt(rows: list[Row]) -> dict[str, list[Row]]:
  groups = collections.defaultdict(list)
  for r in rows:
    if r.prompt is not None and r.answer is not None:
      groups[r.prompt].append(r)
  return groups


def conflicts(rows: list[Row]) -> list[list[dict]]:
  """[first, other] for each row that answers the first row's prompt differently."""
  found = []
  for group in _by_prompt(rows).values():
    if group[0].rejected is not None:  # preference: pairs of one prompt that prefer opposite ways
      first = {}
      for r in group:
        if (r.rejected, r.answer) in first:
          found.append([first[(r.rejected, r.answer)].ref, r.ref])
        first.setdefault((r.answer, r.rejected), r)
      continue
    found += [[group[0].ref, r.ref] for r in group[1:] if r.answer != group[0].answer]
  return found


def format_outliers(rows: list[Row]) -> list[dict]:
  answers = [r for r in rows if r.answer]  # an empty one is an empty target already
  found = []
  is_json = [_is_json_container(r.answer) for r in answers]
  if answers and not all(is_json) and sum(is_json) >= JSON_SHARE * len(answers):
    found += [{**r.ref, "kind": "not JSON", "value": r.answer[:80]}
              for r, ok in zip(answers, is_json) if not ok]
  counts = collections.Counter(r.answer for r in answers)
  if len(answers) >= LABELS_MIN_ROWS and len(counts) <= LABELS_MAX:
    flagged = {_key(f) for f in found}
    found += [{**r.ref, "kind": "rare label", "value": r.answer[:80]} for r in answers
              if counts[r.answer] == 1 and _key(r.ref) not in flagged]
  return found


def _is_json_container(text: str) -> bool:
  if not text.startswith(("{", "[")):
    return False
  try:
    return isinstance(json.loads(text), (dict, list))
  except ValueError:
    return False


def exact_leaks(eval_rows: list[Row], train_rows: list[Row]) -> list[dict]:
  first = {}
  for r in train_rows:
    first.setdefault(r.asked, r)
  return [{"pair": [r.ref, first[r.asked].ref], "similarity": 1.0}
          for r in eval_rows if r.asked in first]


# --------------------------------------------------------------------------------------------------
# Near-duplicates: token 5-gram sets, MinHash, LSH


def _mix64(h: np.ndarray) -> np.ndarray:
  """splitmix64's finalizer: every input bit moves every output bit."""
  h = h ^ (h >> np.uint64(30))
  h = h * np.uint64(0xBF58476D1CE4E5B9)
  h = h ^ (h >> np.uint64(27))
  h = h * np.uint64(0x94D049BB133111EB)
  return h ^ (h >> np.uint64(31))


def _short_hash(ids) -> int:
  """A whole short sequence as one shingle, distinct from any 5-gram's hash (its length leads)."""
  h = len(ids) + 1
  for i in ids:
    h = (h * 0x100000001B3 + int(i) + 1) % 2**64
  return int(_mix64(np.asarray([h], np.uint64))[0])


class Shingles:
  """The token 5-gram sets of many sequences, as 64-bit hashes, all rows in one array (a row
  shorter than 5 tokens is one shingle of them all). Built for all rows in a few numpy calls."""

  def __init__(self, seqs: list):
    lens = np.fromiter((len(q) for q in seqs), np.int64, len(seqs))
    counts = np.where(lens >= SHINGLE, lens - SHINGLE + 1, 1)
    self.starts = np.concatenate([[0], np.cumsum(counts)])
    self.flat = np.empty(self.starts[-1], np.uint64)
    long = np.repeat(lens >= SHINGLE, counts)
    if long.any():
      ids = np.concatenate(seqs).astype(np.uint64)
      n = len(ids) - SHINGLE + 1
      h = ids[:n].copy()
      for k in range(1, SHINGLE):  # a polynomial of the 5 ids, then mixed
        h = h * np.uint64(0x100000001B3) + ids[k:k + n]
      row = np.repeat(np.arange(len(seqs)), lens)[:n]
      within = np.arange(n) - np.concatenate([[0], np.cumsum(lens)])[row] <= lens[row] - SHINGLE
      self.flat[long] = _mix64(h[within])
    self.flat[~long] = [_short_hash(q) for q, l in zip(seqs, lens) if l < SHINGLE]
    self._sets = {}

  def set(self, i: int) -> np.ndarray:
    if i not in self._sets:
      self._sets[i] = np.unique(self.flat[self.starts[i]:self.starts[i + 1]])
    return self._sets[i]

  def jaccard(self, i: int, other: "Shingles", j: int) -> float:
    a, b = self.set(i), other.set(j)
    inter = np.intersect1d(a, b, assume_unique=True).size
    return inter / (a.size + b.size - inter)

  def signatures(self) -> np.ndarray:
    """MinHash signatures uint32 [rows, NUM_PERM]: the min over each row's shingles of NUM_PERM
    affine permutations of their (already mixed) hashes, ~32k shingles per numpy call."""
    rng = np.random.default_rng(_SEED)
    a = (rng.integers(0, 2**31, NUM_PERM, dtype=np.uint64) * 2 + 1).astype(np.uint32)  # odd
    b = rng.integers(0, 2**32, NUM_PERM, dtype=np.uint64).astype(np.uint32)
    rows = len(self.starts) - 1
    out = np.empty((rows, NUM_PERM), np.uint32)
    r = 0
    while r < rows:
      end = max(r + 1, int(np.searchsorted(self.starts, self.starts[r] + (1 << 15), "right")) - 1)
      block = self.flat[self.starts[r]:self.starts[end]].astype(np.uint32)
      out[r:end] = np.minimum.reduceat(block[:, None] * a + b,
                                       self.starts[r:end] - self.starts[r], axis=0)
      r = end
    return out


def _minhashes(shingles: Shingles) -> list:
  from datasketch import LeanMinHash  # pylint: disable=g-import-not-at-top
  return [LeanMinHash(seed=_SEED, hashvalues=sig, scheme="affine32")
          for sig in shingles.signatures()]


def _lsh_index():
  from datasketch import MinHashLSH  # pylint: disable=g-import-not-at-top
  return MinHashLSH(num_perm=NUM_PERM, params=LSH_BANDS)


def near_duplicates(rows: list[Row]) -> list[dict]:
  """Pairs of rows whose token 5-gram Jaccard is >= NEAR, apart from exact duplicates and
  conflicts (same prompt), which are reported as such."""
  shingles = Shingles([r.ids for r in rows])
  index, hashes = _lsh_index(), _minhashes(shingles)
  seen, pairs = set(), []
  for i, r in enumerate(rows):
    if r.whole in seen:  # a copy: its twin stands for it
      continue
    seen.add(r.whole)
    for j in sorted(index.query(hashes[i])):
      if r.prompt is not None and r.prompt == rows[j].prompt:
        continue
      s = shingles.jaccard(i, shingles, j)
      if s >= NEAR:
        pairs.append({"pair": [rows[j].ref, r.ref], "similarity": round(s, 4)})
    index.insert(i, hashes[i], check_duplication=False)
  return pairs


def _asked_ids(row: Row, fmt: str) -> list:
  """The tokens before the last trained run: the prompt, or the conversation before its last
  reply (all of a text row)."""
  mask = np.asarray(row.mask, bool)
  starts = np.flatnonzero(mask & ~np.r_[False, mask[:-1]])
  return row.ids if fmt == "text" or not starts.size else row.ids[:starts[-1]]


def near_leaks(eval_rows: list[Row], train_rows: list[Row], fmt: str, skip: set) -> list[dict]:
  """Each eval row (not in `skip`, a set of _key) with its most similar train prompt, >= NEAR.
  The eval rows, fewer, are indexed; every distinct train prompt queries them."""
  queries = [r for r in eval_rows if _key(r.ref) not in skip]
  asked = Shingles([_asked_ids(r, fmt) for r in queries])
  index = _lsh_index()
  for i, m in enumerate(_minhashes(asked)):
    index.insert(i, m, check_duplication=False)
  train = Shingles([_asked_ids(r, fmt) for r in train_rows])
  best, seen = {}, set()
  for j, m in enumerate(_minhashes(train)):
    if train_rows[j].asked in seen:
      continue
    seen.add(train_rows[j].asked)
    for i in index.query(m):
      s = asked.jaccard(i, train, j)
      if s >= NEAR and s > best.get(i, (0.0,))[0]:
        best[i] = (s, j)
  return [{"pair": [queries[i].ref, train_rows[j].ref], "similarity": round(s, 4)}
          for i, (s, j) in sorted(best.items())]


# --------------------------------------------------------------------------------------------------
# The whole check


def load_groups(cfg) -> list[Group]:
  """Every (split, source) of the config, described; rows read as training reads them."""
  if not cfg.data.train:
    raise UserError("data.train is empty: set it to a .jsonl/.json/.parquet file, a saved "
                    "dataset dir, or a hub dataset name")
  sources = {"train": data.parse_sources(cfg.data.train, "data.train"),
             "eval": data.parse_sources(cfg.data.eval, "data.eval")}
  named = max(len(s) for s in sources.values()) > 1
  groups = []
  for split, by_name in sources.items():
    for name, path in by_name.items():
      raw = data.load_rows(path)
      groups.append(Group(split, name, path, describe(raw, cfg.data.format, split,
                                                      name if named else None, path)))
  return groups


def _train_for(groups: list[Group], g: Group) -> list[Row]:
  """The train rows an eval source may leak from: its namesake's, or all when none shares its
  name."""
  train = [t for t in groups if t.split == "train"]
  same = [t for t in train if t.source == g.source]
  return [r for t in (same or train) for r in t.rows]


def check(cfg, tokenizer, groups: list[Group], *, tokens: bool = True, near: bool = True) -> dict:
  """The report on `groups` (load_groups(cfg)); see the module docstring. `tokens`: tokenize
  (sizes, truncation, near checks); `near`: near-duplicates and near leaks (needs tokens)."""
  fmt, seq_len = cfg.data.format, cfg.data.seq_len
  report = {"rows": {"train": 0, "eval": 0}, "tokens": {"train": 0, "eval": 0},
            "trained_tokens": {"train": 0, "eval": 0}, "lengths": {"train": [], "eval": []},
            **{k: [] for k in FINDINGS}, "sources": {}}
  for g in groups:
    report["rows"][g.split] += len(g.rows)
    report["sources"][f"{g.split}:{g.source}" if g.source else g.split] = g.path
    if tokens:
      if fmt == pairs.FORMAT:  # fitted as pairs (one row holds both sides); read as chosen
        encoded = pairs.encode_pairs((r.raw for r in g.rows), tokenizer, g.path)
        fitted = ((c, rj, pairs.fit_pair(c, rj, seq_len)) for c, rj in encoded)
        encoded = ((c[0], c[1], (None if p is None else p.chosen, cut,
                                 _lost(c, rj, p))) for c, rj, (p, cut) in fitted)
      else:
        encoded = ((ids, mask, None) for ids, mask in
                   data.encode_rows((r.raw for r in g.rows), tokenizer, fmt, g.path))
      for r, (ids, mask, fit) in zip(g.rows, encoded):
        r.ids, r.mask = np.asarray(ids, np.int32), np.asarray(mask, np.bool_)
        example, cut, lost = fit or (*data.fit(r.ids, r.mask, seq_len),
                                     int(sum(r.mask[seq_len + 1:])))
        report["lengths"][g.split].append(len(r.ids))
        if cut:
          report["truncated"].append({**r.ref, "tokens": len(r.ids), "lost_trained_tokens": lost})
        if example is None:
          report["dropped"].append(r.ref)
        else:
          report["tokens"][g.split] += len(example.ids)
          report["trained_tokens"][g.split] += int(example.target_mask.sum())
    report["duplicates"] += exact_duplicates(g.rows)
    report["conflicts"] += conflicts(g.rows)
    report["empty_targets"] += [r.ref for r in g.rows if r.empty_target]
    report["same_sides"] += [r.ref for r in g.rows
                             if r.rejected is not None and r.answer == r.rejected]
    report["format_outliers"] += format_outliers(g.rows)
    report["template"] += [{**r.ref, "problem": p} for r in g.rows for p in r.problems]
    if near and tokens:
      report["near_duplicates"] += near_duplicates(g.rows)
  for g in groups:
    if g.split == "eval":
      train = _train_for(groups, g)
      leaks = exact_leaks(g.rows, train)
      if near and tokens:
        leaks += near_leaks(g.rows, train, fmt, {_key(p["pair"][0]) for p in leaks})
      report["leakage"] += sorted(leaks, key=lambda p: p["pair"][0]["line"])
  if fmt == "messages" and tokenizer.hf is not None and tokenizer.hf.chat_template:
    report["generation_marks"] = bool(_GENERATION.search(tokenizer.hf.chat_template))
  return report


def findings(report: dict) -> int:
  return sum(len(report[k]) for k in FINDINGS)


def training_summary(cfg, tokenizer) -> str:
  """The one line training prints at start: counts of the same checks (data.check says which).
  Raises UserError under data.check=strict when there are conflicts, leaks or empty targets."""
  mode = cfg.data.check
  if mode not in CHECKS:
    raise UserError(f"data.check={mode!r}: use one of {', '.join(CHECKS)}")
  if mode == "off":
    return "data check: off (data.check=off)"
  groups = load_groups(cfg)
  near = mode == "full" or sum(len(g.rows) for g in groups) < NEAR_AUTO_ROWS
  report = check(cfg, tokenizer, groups, tokens=near, near=near)
  counts = {k: len(report[k]) for k in FINDINGS if k not in ("truncated", "dropped")}
  line = "data check: " + ", ".join(f"{n} {WORDS.get(k, k)}" for k, n in counts.items()
                                    if near or k != "near_duplicates")
  bad = [k for k in STRICT if counts[k]]
  if mode == "strict" and bad:
    first = report[bad[0]][0]
    raise UserError(f"data.check=strict: {', '.join(f'{counts[k]} {k}' for k in bad)} (first: "
                    f"{describe_item(first)}); fix the data (python -m ftjax.check_data "
                    "--config=... shows each, --write_clean writes a cleaned copy) or set "
                    "data.check=auto")
  if not near:
    line += (f"; near-duplicates not checked (over {NEAR_AUTO_ROWS} rows: data.check=full checks "
             "them)")
  return line + ("; python -m ftjax.check_data --config=... lists them" if any(counts.values())
                 else "")


# --------------------------------------------------------------------------------------------------
# Presenting and cleaning


def ref_text(ref: dict) -> str:
  where = f"{ref['split']}[{ref['source']}]" if "source" in ref else ref["split"]
  return f"{where}:{ref['line']}"


def describe_item(item) -> str:
  if isinstance(item, list):  # a pair
    return " and ".join(ref_text(r) for r in item)
  if "pair" in item:
    return f"{' and '.join(ref_text(r) for r in item['pair'])} (similarity {item['similarity']})"
  extra = {k: v for k, v in item.items() if k not in ("split", "source", "line")}
  return ref_text(item) + (f" ({', '.join(f'{k} {v!r}' for k, v in extra.items())})"
                           if extra else "")


def clean_rows(rows: list[Row]) -> tuple[list, dict]:
  """The rows without exact duplicates, empty targets and, per conflicting prompt, all but its
  most frequent answer (the first seen on a tie); and how many of each were dropped."""
  keep_answer = {p: collections.Counter(r.answer for r in g).most_common(1)[0][0]
                 for p, g in _by_prompt(rows).items()}
  seen, kept, dropped = set(), [], {"duplicates": 0, "empty_targets": 0, "conflicts": 0}
  for r in rows:
    if r.whole in seen:
      dropped["duplicates"] += 1
    elif r.empty_target:
      dropped["empty_targets"] += 1
    elif r.rejected is not None:  # preference: several pairs per prompt are the norm
      if r.answer == r.rejected:
        dropped["same_sides"] = dropped.get("same_sides", 0) + 1
      else:
        kept.append(r.raw)
    elif r.prompt in keep_answer and r.answer is not None and r.answer != keep_answer[r.prompt]:
      dropped["conflicts"] += 1
    else:
      kept.append(r.raw)
    seen.add(r.whole)
  return kept, dropped


def write_clean(groups: list[Group], path: str) -> str:
  """Writes clean_rows of each train source to `path` (PATH.NAME.jsonl for several); says what."""
  said = []
  train = [g for g in groups if g.split == "train"]
  inputs = {os.path.realpath(g.path) for g in groups}
  for g in train:
    out = path if len(train) == 1 else "{0}.{2}{1}".format(*os.path.splitext(path), g.source)
    if os.path.realpath(out) in inputs:
      raise UserError(f"--write_clean={out}: that is an input file, which the check never "
                      "changes; write the cleaned rows elsewhere")
    kept, dropped = clean_rows(g.rows)
    with open(out, "w", encoding="utf-8") as f:
      f.writelines(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in kept)
    said.append(f"wrote {len(kept)} of {len(g.rows)} rows to {out}; dropped "
                + ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in dropped.items()))
  return "\n".join(said)
