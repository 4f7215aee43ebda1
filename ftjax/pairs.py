"""Preference data (data.format=preference): rows -> (chosen, rejected) example pairs -> batches
in which a pair's two completions always sit side by side in one row.

Rows are {"prompt": str, "chosen": str, "rejected": str}, each side tokenized exactly as
prompt_completion tokenizes a row (prompt, then completion + eos; only the completion is a
target), or conversational: "prompt" a list of messages and "chosen" / "rejected" the assistant's
reply (a string, or a list of one assistant message), rendered with the chat template as
`messages` rows are, the reply (with its end of turn) the only target.

Batch layout (the data.py contract, nothing added): pair k of a row is segments 2k+1 (chosen)
and 2k+2 (rejected); without packing a row holds one pair, with packing as many whole pairs as
fit. So a pair is never split across rows, micro-batches, devices or steps, and the step finds
its two sides from segment_ids alone (step.pair_seqs). data.seq_len is the row: both sides fit in
it together (a pair too long is cut from the ends of its sides, the shorter side kept whole
where it can be).
"""
from typing import NamedTuple


from ftjax import data
from ftjax.errors import UserError

FORMAT = "preference"
FIELDS = ("prompt", "chosen", "rejected")


class Pair(NamedTuple):
  chosen: data.Example
  rejected: data.Example


def pair_fields(row, where: str) -> tuple:
  """(prompt, chosen, rejected) of a row, checked; chosen / rejected as strings. `where`: file:line."""
  if not isinstance(row, dict):
    raise UserError(f"{where}: row is not an object with fields {', '.join(FIELDS)}")
  for field in FIELDS:
    if field not in row or row[field] is None:
      raise UserError(f"{where}: row has no {field!r} field "
                      f"(format {FORMAT} needs {', '.join(FIELDS)})")
  prompt = row["prompt"]
  chat = isinstance(prompt, list)
  if chat:
    data._check_messages(prompt, where)  # pylint: disable=protected-access
  elif not isinstance(prompt, str):
    raise UserError(f"{where}: 'prompt' must be a string or a list of messages, got "
                    f"{type(prompt).__name__}")
  sides = [_reply(row[f], f, chat, where) for f in FIELDS[1:]]
  return (prompt, *sides)


def conversational(train: str) -> bool:
  """Whether a preference run's prompts are conversations (rendered by the chat template): its
  first data.train source's first row has a list of messages as its prompt. False when that row
  cannot be read (a moved file, a hub dataset): prompts are then plain text, as for string rows."""
  try:
    first = data.first_row(next(iter(data.train_sources(train).values())))
  except (UserError, OSError):
    return False
  return isinstance(first, dict) and isinstance(first.get("prompt"), list)


def _reply(value, field: str, chat: bool, where: str) -> str:
  if isinstance(value, str):
    return value
  if (chat and isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict)
      and value[0].get("role") == "assistant" and isinstance(value[0].get("content"), str)):
    return value[0]["content"]
  need = "a string or [{\"role\": \"assistant\", \"content\": str}]" if chat else "a string"
  raise UserError(f"{where}: {field!r} must be {need}, got {type(value).__name__}")


def _chat_side(tok: data.Tokenizer, prompt: list, reply: str, where: str):
  """(ids, target mask) of the conversation `prompt` + the assistant's `reply`: only the reply,
  with its end of turn, is a target (earlier assistant turns are context)."""
  import jinja2  # pylint: disable=g-import-not-at-top  (transformers' template engine)
  try:
    before = tok.render_chat(list(prompt), True)
    full = tok.render_chat(list(prompt) + [{"role": "assistant", "content": reply}], False)
  except jinja2.TemplateError as e:
    raise UserError(f"{where}: the chat template refused this conversation ({e})") from None
  if not full.startswith(before):
    raise UserError(f"{where}: the chat template renders the prompt differently once a reply "
                    "follows, so the reply cannot be located; use a template that renders each "
                    "turn the same way")
  start, end = len(before), len(full.rstrip())  # trailing layout after the end of turn: not trained
  ids, offsets = tok.encode_with_offsets(full)
  mask = [e > s and start <= s < end for s, e in offsets]
  full_ids = data._with_bos(tok, ids)  # pylint: disable=protected-access
  return full_ids, [False] * (len(full_ids) - len(ids)) + mask


def encode_pairs(rows, tok: data.Tokenizer, source_name: str):
  """Rows -> ((chosen ids, mask), (rejected ids, mask)) of each, before truncation."""
  for i, row in enumerate(rows, 1):
    where = f"{source_name}:{i}"
    prompt, chosen, rejected = pair_fields(row, where)
    if isinstance(prompt, list):
      yield _chat_side(tok, prompt, chosen, where), _chat_side(tok, prompt, rejected, where)
    else:
      p, c, r = tok.encode_many([prompt, chosen, rejected])
      make = data._prompt_completion_example  # pylint: disable=protected-access
      yield make(tok, p, c), make(tok, list(p), r)


def fit_pair(chosen, rejected, seq_len: int) -> tuple[Pair | None, bool]:
  """(the pair with both sides in one row of seq_len positions, or None when a side has no target
  left; whether it was cut). Each side fills len - 1 positions; a pair over seq_len cuts the
  longer side first, down to half the row, then the other."""
  (c_ids, c_mask), (r_ids, r_mask) = chosen, rejected
  nc, nr = len(c_ids) - 1, len(r_ids) - 1
  cut = nc + nr > seq_len
  if cut:
    half = seq_len // 2
    if nc <= half:
      nr = seq_len - nc
    elif nr <= half:
      nc = seq_len - nr
    else:
      nc, nr = half, seq_len - half
  c, _ = data.fit(c_ids, c_mask, max(nc, 0))
  r, _ = data.fit(r_ids, r_mask, max(nr, 0))
  if c is None or r is None:
    return None, cut
  return Pair(c, r), cut


def tokenize_pairs(rows, tokenizer: data.Tokenizer, fmt: str, seq_len: int,
                   source_name: str) -> tuple[list[Pair], data.Stats]:
  """data.tokenize_rows for preference rows: (pairs, stats); stats count pairs as rows and both
  sides' tokens."""
  del fmt  # always FORMAT: the signature is tokenize_rows'
  if seq_len < 2:
    raise UserError(f"data.seq_len={seq_len}: a preference row holds two completions; use at "
                    "least 2")
  pairs, n_rows, truncated, dropped, tokens, targets = [], 0, 0, 0, 0, 0
  for n_rows, (chosen, rejected) in enumerate(encode_pairs(rows, tokenizer, source_name), 1):
    pair, cut = fit_pair(chosen, rejected, seq_len)
    truncated += cut
    if pair is None:
      dropped += 1
      continue
    pairs.append(pair)
    tokens += len(pair.chosen.ids) + len(pair.rejected.ids)
    targets += int(pair.chosen.target_mask.sum() + pair.rejected.target_mask.sum())
  if not pairs:
    if not n_rows:
      raise UserError(f"{source_name}: no rows; point data.train / data.eval at a file with some")
    raise UserError(f"{source_name}: all {n_rows} pairs were dropped: a side has no target token "
                    f"within data.seq_len={seq_len} (one row holds both sides); raise "
                    "data.seq_len or shorten the prompts")
  return pairs, data.Stats(n_rows, truncated, dropped, tokens, targets)


def _flat(pairs, rows):
  """Rows of pair indices -> rows of example indices into [c0, r0, c1, r1, ...]."""
  return [[2 * i + side for i in row for side in (0, 1)] for row in rows]


def assemble(pairs, rows: list[list[int]], seq_len: int, pad_id: int) -> dict:
  """data.assemble for rows of pair indices: each pair's chosen, then its rejected, as segments."""
  examples = [e for p in pairs for e in p]
  return data.assemble(examples, _flat(pairs, rows), seq_len, pad_id)


class PairBatches(data.Batches):
  """data.Batches over pairs: shuffled and (with packing) best-fit packed as whole pairs."""

  def _size(self, pair) -> int:
    return len(pair.chosen.ids) - 1 + len(pair.rejected.ids) - 1

  def _assemble(self, rows):
    return assemble(self.examples, rows, self.seq_len, self.pad_id)


def eval_batches(pairs, **kwargs):
  """data.eval_batches for pairs: every pair once, in order, one per row; empty rows fill the
  last batch (they hold no pair, so they count for nothing)."""
  return data.eval_batches(pairs, assemble_rows=assemble, **kwargs)
