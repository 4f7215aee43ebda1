"""Training data: rows -> token ids with a target mask -> deterministic, resumable batches.

Four stages, each a plain function or a small value:

  load_tokenizer(path)  a tokenizer.json / tokenizer_config.json dir (transformers, no remote code),
                        a GGUF file's vocabulary (converted by transformers) or a sentencepiece
                        .model, behind one small `Tokenizer` interface.
  load_rows(source)     .jsonl/.json/.parquet/.arrow, a saved dataset dir, or a hub dataset name.
  tokenize_rows(...)    rows of one format ("text", "prompt_completion", "messages") -> `Example`s
                        (ids, target_mask) + `Stats`; target_mask[i]: ids[i] is a trained target.
  Batches(...)          position -> this host's rows of the global batch. The position (batches
                        consumed, across epochs) is the only iterator state a checkpoint needs.

Several named sources (`data.train=json=a.jsonl,tone=b.jsonl`, one adapter each) batch side by
side (`stacked_batches`): each source's own Batches, concatenated per step in name order, with
`adapter_ids` int32 [B] saying whose row each is.

Batch contract (B rows, T = seq_len positions): `tokens`, `targets`, `segment_ids` int32 [B, T] and
`loss_mask` float32 [B, T]. An example of n ids fills n-1 positions: inputs ids[:-1],
targets ids[1:], mask target_mask[1:]; so no position ever predicts across an example boundary,
packed or not. Padding: tokens = targets = pad_id, loss_mask 0, segment 0.
Segments count 1, 2, ... within a row.
"""
import bisect
import dataclasses
import itertools
import json
import os
import re
from typing import Any, NamedTuple, Sequence

import numpy as np

from ftjax import gguf_io
from ftjax.errors import UserError

FORMATS = {
    "text": ("text",),
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
    "preference": ("prompt", "chosen", "rejected"),  # ftjax/pairs.py
}


# --------------------------------------------------------------------------------------------------
# Tokenizer


@dataclasses.dataclass(frozen=True)
class Tokenizer:
  """The few things training and generation need from a tokenizer, whichever library backs it.

  `hf` is a transformers tokenizer, `sp` a sentencepiece processor; exactly one is set.
  """
  path: str
  bos_id: int | None
  add_bos: bool
  eos_id: int
  pad_id: int
  vocab_size: int
  hf: Any = None
  sp: Any = None

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, no special tokens added."""
    if self.sp is not None:
      return list(self.sp.encode(text))
    return list(self.hf(text, add_special_tokens=False)["input_ids"])

  def encode_many(self, texts: list[str]) -> list[list[int]]:
    """encode() of each text, in one call into the tokenizer library (much less overhead)."""
    if self.sp is not None:
      return [list(ids) for ids in self.sp.encode(texts)]
    return [list(ids) for ids in self.hf(texts, add_special_tokens=False)["input_ids"]]

  def decode(self, ids: Sequence[int]) -> str:
    ids = [int(i) for i in ids]
    if self.sp is not None:
      return self.sp.decode(ids)
    return self.hf.decode(ids, skip_special_tokens=False)

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and their character spans in `text`; needs a fast (tokenizer.json) tokenizer."""
    if self.hf is None or not getattr(self.hf, "is_fast", False):
      raise UserError(f"{self.path}: data.format=messages needs a fast tokenizer (tokenizer.json) "
                      "to map tokens to characters; point tokenizer.path at a dir with "
                      "tokenizer.json")
    enc = self.hf(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

  def render_chat(self, messages: list[dict], add_generation_prompt: bool) -> str:
    """The conversation as the tokenizer's chat template writes it (sandboxed Jinja)."""
    if self.hf is None or not self.hf.chat_template:
      raise UserError(f"{self.path}: tokenizer has no chat_template, which data.format=messages "
                      "needs; use a tokenizer with one (in tokenizer_config.json or "
                      "chat_template.jinja)")
    return self.hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def load_tokenizer(path: str) -> Tokenizer:
  """A transformers tokenizer dir (local files only, no remote code) or a sentencepiece .model."""
  if not os.path.exists(path):
    raise UserError(f"{path}: tokenizer not found; set tokenizer.path to a dir with tokenizer.json "
                    "or to a sentencepiece .model file")
  gguf_file = gguf_io.find(path)
  if gguf_file:  # transformers converts the GGUF's vocabulary, merges and chat template
    return _load_transformers(os.path.dirname(os.path.abspath(gguf_file)),
                              os.path.basename(gguf_file))
  if os.path.isfile(path):
    if not path.endswith(".model"):
      raise UserError(f"{path}: not a tokenizer; give a dir with tokenizer.json or a .model file")
    return _load_sentencepiece(path)
  hf_files = ("tokenizer.json", "tokenizer_config.json")
  if any(os.path.exists(os.path.join(path, f)) for f in hf_files):
    return _load_transformers(path)
  if os.path.exists(os.path.join(path, "tokenizer.model")):
    return _load_sentencepiece(os.path.join(path, "tokenizer.model"))
  raise UserError(f"{path}: no tokenizer.json, tokenizer_config.json or tokenizer.model here")


def _load_transformers(path: str, gguf_file: str | None = None) -> Tokenizer:
  import transformers  # pylint: disable=g-import-not-at-top  (slow import; only when used)
  # A GGUF's tokenizer through the fast tokenizer itself: AutoTokenizer first rebuilds the model's
  # config through transformers' GGUF checkpoint loader, which refuses to run without torch (a
  # plain `pip install ftjax` has none); the fast tokenizer converts the file's vocabulary alone.
  cls = transformers.PreTrainedTokenizerFast if gguf_file else transformers.AutoTokenizer
  try:
    hf = cls.from_pretrained(
        path, trust_remote_code=False, local_files_only=True, gguf_file=gguf_file)
  except (OSError, ValueError, KeyError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserError(f"{path}: cannot load tokenizer ({first})") from None
  if hf.eos_token_id is None:
    raise UserError(f"{path}/tokenizer_config.json: tokenizer has no eos_token; set \"eos_token\"")
  bos = hf.bos_token_id
  # Follow the tokenizer's post-processor: Llama adds BOS, Qwen does not, whatever bos_token says.
  probe = hf("a")["input_ids"]
  add_bos = bos is not None and len(probe) > 0 and probe[0] == bos
  pad = hf.pad_token_id if hf.pad_token_id is not None else hf.eos_token_id
  return Tokenizer(path=path, bos_id=bos, add_bos=add_bos, eos_id=hf.eos_token_id, pad_id=pad,
                   vocab_size=len(hf), hf=hf)


def _load_sentencepiece(path: str) -> Tokenizer:
  import sentencepiece  # pylint: disable=g-import-not-at-top
  try:
    sp = sentencepiece.SentencePieceProcessor(model_file=path)
  except (OSError, RuntimeError) as e:
    raise UserError(f"{path}: not a sentencepiece model ({str(e).strip()[:200]})") from None
  if sp.eos_id() < 0:
    raise UserError(f"{path}: sentencepiece model has no eos piece; retrain it with eos_id set")
  bos = sp.bos_id() if sp.bos_id() >= 0 else None
  pad = sp.pad_id() if sp.pad_id() >= 0 else sp.eos_id()
  # A bare .model carries no post-processor; the models that ship one (Llama, Gemma) prepend BOS.
  return Tokenizer(path=path, bos_id=bos, add_bos=bos is not None, eos_id=sp.eos_id(), pad_id=pad,
                   vocab_size=sp.get_piece_size(), sp=sp)


def _with_bos(tokenizer: Tokenizer, ids: list[int]) -> list[int]:
  """Prepends BOS when the tokenizer adds one and the text (e.g. a chat template) did not."""
  if tokenizer.add_bos and (not ids or ids[0] != tokenizer.bos_id):
    return [tokenizer.bos_id] + ids
  return ids


def prompt_ids(tokenizer: Tokenizer, fmt: str, prompt_text: str) -> list[int]:
  """A user prompt formatted as training formatted the part before the targets."""
  _check_format(fmt)
  if fmt == "messages":
    return chat_prompt_ids(tokenizer, [{"role": "user", "content": prompt_text}])
  return _with_bos(tokenizer, tokenizer.encode(prompt_text))


def chat_prompt_ids(tokenizer: Tokenizer, messages, where: str = "messages") -> list[int]:
  """A conversation so far, rendered by the chat template up to the assistant's next turn."""
  _check_messages(messages, where)
  return _with_bos(tokenizer, tokenizer.encode(tokenizer.render_chat(list(messages), True)))


def end_of_turn_id(tokenizer: Tokenizer) -> int | None:
  """The token the chat template closes an assistant turn with (Qwen's <|im_end|>, Gemma's
  <end_of_turn>): what training on messages taught the model to stop with. None without a
  template, or when the turn ends in plain text."""
  if tokenizer.hf is None or not tokenizer.hf.chat_template:
    return None
  reply = "ftjax-reply"
  messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": reply}]
  text = tokenizer.render_chat(messages, False)
  after = text[text.rindex(reply) + len(reply):].strip()
  ids = tokenizer.encode(after) if after else []
  if not ids or ids[0] not in tokenizer.hf.all_special_ids + list(
      tokenizer.hf.added_tokens_decoder):
    return None
  return int(ids[0])


# --------------------------------------------------------------------------------------------------
# Rows

_LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow")


def parse_sources(text: str, key: str = "data.train") -> dict[str, str]:
  """`a.jsonl` -> {"": "a.jsonl"} (one unnamed source); `json=a.jsonl,tone=b.jsonl` -> named
  sources, one adapter each, in the order given."""
  parts = [p.strip() for p in text.split(",") if p.strip()]
  if len(parts) == 1 and ("=" not in parts[0] or os.path.exists(parts[0])):
    return {"": parts[0]}  # a path that exists wins: sweep dirs are named like lr=2e-3/
  sources = {}
  for part in parts:
    name, eq, path = (s.strip() for s in part.partition("="))
    if not eq or not name or not path:
      raise UserError(f"{key}={text!r}: {part!r} has no name; with several sources write "
                      "name=path for each (json=a.jsonl,tone=b.jsonl)")
    if name in sources:
      raise UserError(f"{key}={text!r}: two sources named {name!r}; give each its own name")
    sources[name] = path
  return sources


# An adapter's name becomes a metrics key (loss/NAME) and an export directory (--out/NAME).
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def train_sources(text: str) -> dict[str, str]:
  """data.train -> {name: path}: {"": path} for one unnamed source (one adapter, no adapter axis),
  else one adapter per named source, in the order given."""
  sources = parse_sources(text, "data.train")
  for name in sources:
    if name and not _ADAPTER_NAME.fullmatch(name):
      raise UserError(f"data.train={text!r}: source name {name!r} must be letters, digits, '_', "
                      "'.' or '-' (it names the adapter's metrics and export directory)")
  return sources


def eval_sources(train: dict[str, str], text: str) -> dict[str, str]:
  """data.eval -> {adapter name: eval path}, keyed and ordered like `train` ({} without eval).

  One unnamed eval file serves every adapter; named eval sources must name exactly the adapters
  of data.train, each once.
  """
  if not text:
    return {}
  sources = parse_sources(text, "data.eval")
  if list(sources) == [""]:
    return {name: sources[""] for name in train}
  if set(sources) != set(train):
    trained = ", ".join(n for n in train if n) or "no named sources (one unnamed file)"
    raise UserError(f"data.eval={text!r}: names {', '.join(sources)}, but data.train has "
                    f"{trained}; name the same adapters in data.eval, or give one unnamed eval "
                    "file for all of them")
  return {name: sources[name] for name in train}


def stacked_batches(named: dict):
  """{name: Batches} -> position -> each source's batch at `position`, concatenated in the dict's
  order, with `adapter_ids` int32 [rows]: row r belongs to the adapter of index adapter_ids[r].
  Each source batches exactly as it would alone (its own Batches, the run's seed), so each
  adapter sees the rows a run on its data alone would see."""
  def batch(position: int, process_index: int = 0, process_count: int = 1) -> dict:
    parts = [b(position, process_index, process_count) for b in named.values()]
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    out["adapter_ids"] = np.concatenate(
        [np.full(len(p["tokens"]), i, np.int32) for i, p in enumerate(parts)])
    return out
  return batch


def load_rows(source: str):
  """Rows as a list of dicts (local files) or a datasets.Dataset (saved dirs, hub names)."""
  if os.path.isdir(source):
    return _load_saved_dataset(source)
  if os.path.isfile(source):
    if source.endswith(".jsonl"):
      return _read_jsonl(source)
    if source.endswith(".json"):
      return _read_json(source)
    if source.endswith(".parquet"):
      import pyarrow.parquet  # pylint: disable=g-import-not-at-top
      return pyarrow.parquet.read_table(source).to_pylist()
    if source.endswith(".arrow"):
      import datasets  # pylint: disable=g-import-not-at-top
      return datasets.Dataset.from_file(source)
    raise UserError(f"{source}: unknown data file type; use .jsonl, .json, .parquet or .arrow")
  # Anything that looks like a path is a missing file, not a hub name to go looking for.
  looks_local = source.endswith(_LOCAL_SUFFIXES) or source.startswith((".", "/", "~"))
  if looks_local or source.count("/") > 1:
    raise UserError(f"{source}: data file not found; check data.train / data.eval")
  return _load_hub(source)


_BOM = b"\xef\xbb\xbf"  # editors and Excel start UTF-8 files with one


def _decode(raw: bytes, path: str, line_no: int) -> str:
  """A line's bytes as text; a byte that is not UTF-8 is named by line and column."""
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    col = len(raw[:e.start].decode("utf-8", "replace")) + 1
    raise UserError(f"{path}:{line_no}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {col}); "
                    "save the file as UTF-8") from None


def first_row(source: str) -> dict | None:
  """The first row of a local data file, reading no further in a .jsonl; None for a source that
  is not a local file (a hub name is never fetched for this) or holds no rows."""
  if not os.path.isfile(source):
    return None
  if source.endswith(".jsonl"):
    return next(_iter_jsonl(source), None)
  rows = load_rows(source)
  return rows[0] if len(rows) else None


def _read_jsonl(path: str) -> list[dict]:
  return list(_iter_jsonl(path))


def _iter_jsonl(path: str):
  blank = None
  with open(path, "rb") as f:
    for line_no, raw in enumerate(f, 1):
      line = _decode(raw[len(_BOM):] if line_no == 1 and raw.startswith(_BOM) else raw, path,
                     line_no)
      if not line.strip():
        blank = blank or line_no
        continue
      if blank:  # Trailing blank lines are harmless; inside, they would shift every row number.
        raise UserError(f"{path}:{blank}: blank line between rows; remove it")
      try:
        row = json.loads(line.rstrip("\r\n"))  # the newline is layout: a cut line ends at its text
      except json.JSONDecodeError as e:
        raise UserError(f"{path}:{line_no}: not valid JSON ({_json_error(e)})") from None
      if not isinstance(row, dict):
        raise UserError(f"{path}:{line_no}: not a JSON object; write one {{...}} per line")
      yield row


def _json_error(e: json.JSONDecodeError) -> str:
  """The parser's message with its column: 'Unterminated string starting at column 12'."""
  return f"{e.msg} column {e.colno}" if e.msg.endswith(" at") else f"{e.msg} at column {e.colno}"


def _read_json(path: str) -> list[dict]:
  with open(path, "rb") as f:
    raw = f.read().removeprefix(_BOM)
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    line_no = raw.count(b"\n", 0, e.start) + 1
    _decode(raw.splitlines(keepends=True)[line_no - 1], path, line_no)  # raises, naming it
    raise
  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    if e.msg == "Extra data":  # JSON lines under a .json name: read it as such, for line numbers.
      return _read_jsonl(path)
    raise UserError(f"{path}:{e.lineno}: not valid JSON ({_json_error(e)})") from None
  if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
    raise UserError(f"{path}: expected a JSON list of objects (or JSON lines)")
  return data


def _load_saved_dataset(path: str):
  import datasets  # pylint: disable=g-import-not-at-top
  try:
    ds = datasets.load_from_disk(path)
  except FileNotFoundError as e:
    raise UserError(f"{path}: not a saved dataset dir (datasets.save_to_disk) ({e})") from None
  if isinstance(ds, datasets.DatasetDict):
    if "train" not in ds:
      raise UserError(f"{path}: saved DatasetDict has no 'train' split (has {list(ds)})")
    ds = ds["train"]
  return ds


def _load_hub(name: str):
  import datasets  # pylint: disable=g-import-not-at-top
  try:
    return datasets.load_dataset(name, split="train")
  except Exception as e:  # pylint: disable=broad-except  (a bad name or no network: user's to fix)
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    raise UserError(f"{name}: not a local file or dir, and loading it as a hub dataset "
                    f"(split train) failed ({first})") from None


# --------------------------------------------------------------------------------------------------
# Tokenize


class Example(NamedTuple):
  ids: np.ndarray          # int32 [n]
  target_mask: np.ndarray  # bool [n]; target_mask[0] is always False (nothing predicts it)


@dataclasses.dataclass(frozen=True)
class Stats:
  rows: int = 0
  truncated: int = 0      # longer than seq_len + 1 tokens, cut to it
  dropped: int = 0        # no target token left (after truncation)
  tokens: int = 0         # in kept examples
  target_tokens: int = 0  # in kept examples


def _check_format(fmt: str):
  if fmt not in FORMATS:
    raise UserError(f"data.format={fmt!r}: unknown; use one of {', '.join(FORMATS)}")


def row_fields(row, fmt: str, where: str) -> list:
  """The fields format `fmt` reads from `row`, checked (types included); `where` is file:line."""
  _check_format(fmt)
  if not isinstance(row, dict):
    raise UserError(f"{where}: row is not an object with fields {', '.join(FORMATS[fmt])}")
  for field in FORMATS[fmt]:
    if field not in row or row[field] is None:
      raise UserError(f"{where}: row has no {field!r} field "
                      f"(format {fmt} needs {', '.join(FORMATS[fmt])})")
  values = [row[f] for f in FORMATS[fmt]]
  if fmt == "messages":
    _check_messages(values[0], where)
    return values
  for name, value in zip(FORMATS[fmt], values):
    if not isinstance(value, str):
      raise UserError(f"{where}: {name!r} must be a string, got {type(value).__name__}")
  return values


def _text_example(tok: Tokenizer, text_ids: list[int]):
  body = text_ids + [tok.eos_id]  # eos ends each document, so the model learns to stop.
  ids = _with_bos(tok, body)
  mask = [False] * (len(ids) - len(body)) + [True] * len(body)
  return ids, mask


def _prompt_completion_example(tok: Tokenizer, prompt_ids: list[int], completion_ids: list[int]):
  head = _with_bos(tok, prompt_ids)
  # The closing eos is a target even when pad_id == eos_id; masking it makes models that never stop.
  tail = completion_ids + [tok.eos_id]
  return head + tail, [False] * len(head) + [True] * len(tail)


def _assistant_spans(tok: Tokenizer, messages: list[dict], full: str, where: str):
  """Character spans [start, end) of each assistant reply (with its end-of-turn) in `full`.

  Found by rendering prefixes: the reply starts where `messages[:k]` + generation prompt ends, and
  ends where `messages[:k+1]` ends. Works for any template, with or without {% generation %}
  markers.
  """
  spans = []
  for k, m in enumerate(messages):
    if m["role"] != "assistant":
      continue
    before = tok.render_chat(messages[:k], True)
    upto = tok.render_chat(messages[:k + 1], False)
    if not (upto.startswith(before) and full.startswith(upto)):
      raise UserError(f"{where}: the chat template renders message {k} differently depending on "
                      "what follows it, so its assistant reply cannot be located; use a template "
                      "that renders each turn the same way")
    # Trailing whitespace after the end-of-turn (ChatML's "\n") is layout, not the reply.
    end = len(upto.rstrip())
    if end > len(before):
      spans.append((len(before), end))
  return spans


def _check_messages(messages, where: str):
  if (not isinstance(messages, list) or not messages or
      not all(isinstance(m, dict) and isinstance(m.get("role"), str) and
              isinstance(m.get("content"), str) for m in messages)):
    raise UserError(f"{where}: 'messages' must be a non-empty list of "
                    "{\"role\": str, \"content\": str} objects")


def _messages_example(tok: Tokenizer, messages: list[dict], where: str):
  import jinja2  # pylint: disable=g-import-not-at-top  (transformers' template engine)
  try:
    full = tok.render_chat(messages, False)
    spans = _assistant_spans(tok, messages, full, where)
  except jinja2.TemplateError as e:
    raise UserError(f"{where}: the chat template refused this conversation ({e})") from None
  ids, offsets = tok.encode_with_offsets(full)
  starts = [s for s, _ in spans]
  mask = []
  for (s, e) in offsets:
    # A token is trained when it starts inside a reply: it is (part of) what the assistant writes.
    j = bisect.bisect_right(starts, s) - 1
    mask.append(e > s and j >= 0 and s < spans[j][1])
  full_ids = _with_bos(tok, ids)
  mask = [False] * (len(full_ids) - len(ids)) + mask
  return full_ids, mask


def encode_rows(rows, tokenizer: Tokenizer, fmt: str, source_name: str, chunk: int = 512):
  """Rows -> (ids, target mask) of each, before truncation; errors name source_name:row."""
  rows = iter(rows)
  first = 1
  while block := list(itertools.islice(rows, chunk)):
    fields = [row_fields(row, fmt, f"{source_name}:{first + i}") for i, row in enumerate(block)]
    if fmt == "messages":
      yield from (_messages_example(tokenizer, f[0], f"{source_name}:{first + i}")
                  for i, f in enumerate(fields))
    else:  # one tokenizer call for the texts of the whole block
      ids = iter(tokenizer.encode_many([text for f in fields for text in f]))
      make = _text_example if fmt == "text" else _prompt_completion_example
      yield from (make(tokenizer, *(next(ids) for _ in f)) for f in fields)
    first += len(block)


def fit(ids: list[int], mask: list[bool], seq_len: int) -> tuple[Example | None, bool]:
  """(the example cut to seq_len + 1 ids, or None when no target is left; whether it was cut)."""
  cut = len(ids) > seq_len + 1
  ids, mask = ids[:seq_len + 1], np.array(mask[:seq_len + 1], np.bool_)  # a copy: it is changed
  mask[:1] = False  # nothing predicts the first token
  if not mask.any():
    return None, cut
  return Example(np.asarray(ids, np.int32), mask), cut


def tokenize_rows(rows, tokenizer: Tokenizer, fmt: str, seq_len: int,
                  source_name: str) -> tuple[list[Example], Stats]:
  """Rows of format `fmt` -> examples of at most seq_len + 1 ids (seq_len positions) and stats."""
  _check_format(fmt)
  if seq_len < 1:
    raise UserError(f"data.seq_len={seq_len}: must be at least 1")
  examples, n_rows, truncated, dropped, tokens, targets = [], 0, 0, 0, 0, 0
  for n_rows, (ids, mask) in enumerate(encode_rows(rows, tokenizer, fmt, source_name), 1):
    example, cut = fit(ids, mask, seq_len)
    truncated += cut
    if example is None:
      dropped += 1
      continue
    examples.append(example)
    tokens += len(example.ids)
    targets += int(example.target_mask.sum())
  if not examples:
    if not n_rows:
      raise UserError(f"{source_name}: no rows; point data.train / data.eval at a file with some")
    raise UserError(f"{source_name}: all {n_rows} rows were dropped: no target tokens within "
                    f"data.seq_len={seq_len} (the prompts fill it); raise data.seq_len or shorten "
                    "the prompts")
  return examples, Stats(n_rows, truncated, dropped, tokens, targets)


# --------------------------------------------------------------------------------------------------
# Batches


def _best_fit(sizes: np.ndarray, capacity: int) -> list[list[int]]:
  """Greedy best-fit of items (in the given order) into rows of `capacity`; returns item indices.

  Rows are kept in buckets by free space, with a sorted list of the free-space values in use, so
  each item costs a bisect instead of a scan over all rows.
  """
  rows: list[list[int]] = []
  buckets: dict[int, list[int]] = {}  # free space -> row ids with that much free
  free_values: list[int] = []         # sorted keys of non-empty buckets
  for item, size in enumerate(sizes.tolist()):
    k = bisect.bisect_left(free_values, size)
    if k == len(free_values):
      row, free = len(rows), capacity
      rows.append([])
    else:
      free = free_values[k]
      row = buckets[free].pop()
      if not buckets[free]:
        del buckets[free]
        free_values.pop(k)
    rows[row].append(item)
    free -= size
    if free > 0:
      if free not in buckets:
        buckets[free] = []
        bisect.insort(free_values, free)
      buckets[free].append(row)
  return rows


class Batches:
  """position -> batch, deterministic in (examples, seed, position): resuming needs only position.

  Epoch e = position // batches_per_epoch shuffles the examples with default_rng((seed, e)); with
  packing it then packs them (best fit, examples never split) and shuffles the rows. Like drop_last,
  rows past batches_per_epoch * batch_size are left out of that epoch; batches_per_epoch comes from
  epoch 0, and an epoch whose packing came out shorter reuses its first rows to fill up.
  """

  def __init__(self, examples: Sequence[Example], *, batch_size: int, seq_len: int, packing: bool,
               seed: int, pad_id: int, name: str = "data"):
    if batch_size < 1:
      raise UserError(f"train.batch_size={batch_size}: must be at least 1")
    self.examples = list(examples)
    self.batch_size, self.seq_len, self.packing = batch_size, seq_len, packing
    self.seed, self.pad_id = seed, pad_id
    self._sizes = np.asarray([self._size(e) for e in self.examples], np.int64)
    if len(self._sizes) and self._sizes.max() > seq_len:
      raise ValueError(f"an example has {self._sizes.max() + 1} ids, over seq_len + 1; "
                       "tokenize_rows should have truncated it")
    self._cache = (None, None)
    rows = len(self._rows(0))
    if batch_size > rows:
      raise UserError(f"{name}: train.batch_size={batch_size} but an epoch yields only {rows} rows "
                      f"({len(self.examples)} examples, packing={packing}, "
                      f"seq_len={seq_len}); lower train.batch_size or add data")
    self.batches_per_epoch = rows // batch_size

  def _size(self, example) -> int:
    """Positions an item fills (pairs.PairBatches: both sides of a pair)."""
    return len(example.ids) - 1

  def _assemble(self, rows: list[list[int]]) -> dict:
    return assemble(self.examples, rows, self.seq_len, self.pad_id)

  def _rows(self, epoch: int) -> list[list[int]]:
    """Example indices of each row of `epoch`, in order (cached: batches walk an epoch in order)."""
    if self._cache[0] == epoch:
      return self._cache[1]
    rng = np.random.default_rng((self.seed, epoch))
    order = rng.permutation(len(self.examples))
    if self.packing:
      packed = _best_fit(self._sizes[order], self.seq_len)
      rows = [[int(order[i]) for i in packed[r]] for r in rng.permutation(len(packed))]
    else:
      rows = [[int(i)] for i in order]
    self._cache = (epoch, rows)
    return rows

  def __call__(self, position: int, process_index: int = 0, process_count: int = 1) -> dict:
    """Rows [process_index * B/P, (process_index + 1) * B/P) of global batch `position`."""
    if self.batch_size % process_count:
      raise UserError(f"train.batch_size={self.batch_size} is not divisible by the "
                      f"{process_count} processes; make it a multiple of {process_count}")
    epoch, step = divmod(position, self.batches_per_epoch)
    rows = self._rows(epoch)
    per_host = self.batch_size // process_count
    first = step * self.batch_size + process_index * per_host
    # Cycling only matters for an epoch that packed into fewer rows than epoch 0.
    chosen = [rows[i % len(rows)] for i in range(first, first + per_host)]
    return self._assemble(chosen)


def assemble(examples, rows: list[list[int]], seq_len: int, pad_id: int) -> dict:
  """The batch arrays for rows of example indices (see the module docstring for the layout)."""
  shape = (len(rows), seq_len)
  tokens = np.full(shape, pad_id, np.int32)
  targets = np.full(shape, pad_id, np.int32)
  loss_mask = np.zeros(shape, np.float32)
  segment_ids = np.zeros(shape, np.int32)
  for b, row in enumerate(rows):
    t = 0
    for seg, i in enumerate(row, 1):
      ex = examples[i]
      n = len(ex.ids) - 1
      tokens[b, t:t + n] = ex.ids[:-1]
      targets[b, t:t + n] = ex.ids[1:]
      loss_mask[b, t:t + n] = ex.target_mask[1:]
      segment_ids[b, t:t + n] = seg
      t += n
  return {"tokens": tokens, "targets": targets, "loss_mask": loss_mask,
          "segment_ids": segment_ids}


def eval_batches(examples, *, batch_size: int, seq_len: int, pad_id: int, process_index: int = 0,
                 process_count: int = 1, adapter_id: int | None = None, assemble_rows=None):
  """Every example exactly once, in order, one per row; the last batch is filled with empty rows
  (loss_mask 0), so the eval loss is over the whole set whatever its size. adapter_id: every
  row's `adapter_ids` (stacked adapters). assemble_rows: how rows of examples become arrays
  (pairs.py passes its own for preference pairs)."""
  assemble_rows = assemble_rows or assemble
  per_host = batch_size // process_count
  for first in range(0, len(examples), batch_size):
    rows = [[i] if i < len(examples) else [] for i in range(first, first + batch_size)]
    mine = rows[process_index * per_host:(process_index + 1) * per_host]
    batch = assemble_rows(examples, mine, seq_len, pad_id)
    if adapter_id is not None:
      batch["adapter_ids"] = np.full(len(mine), adapter_id, np.int32)
    yield batch


def prompt_and_reference(tokenizer: Tokenizer, fmt: str, row) -> tuple[list[int], str]:
  """(prompt ids, reference completion) of an eval row, to score generations by exact match."""
  if fmt == "prompt_completion":
    return prompt_ids(tokenizer, fmt, row["prompt"]), row["completion"]
  if fmt == "preference":  # the chosen reply is the reference
    if isinstance(row["prompt"], list):
      reply = row["chosen"] if isinstance(row["chosen"], str) else row["chosen"][0]["content"]
      return chat_prompt_ids(tokenizer, row["prompt"]), reply
    return prompt_ids(tokenizer, fmt, row["prompt"]), row["chosen"]
  if fmt == "messages":
    messages = list(row["messages"])
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return chat_prompt_ids(tokenizer, messages[:last]), messages[last]["content"]
  raise UserError(f"train.eval_generate needs data.format prompt_completion or messages, not {fmt}")


def decode_completion(tokenizer: Tokenizer, ids, stop_ids=()) -> str:
  """Generated ids -> text, cut at the first eos (or other stop id), without special tokens."""
  ids = [int(i) for i in ids]
  stops = {tokenizer.eos_id, *stop_ids}
  ids = ids[:next((i for i, t in enumerate(ids) if t in stops), len(ids))]
  if tokenizer.sp is not None:
    return tokenizer.sp.decode(ids)
  return tokenizer.hf.decode(ids, skip_special_tokens=True)


def decode_prompt(tokenizer: Tokenizer, ids) -> str:
  """Prompt ids -> the text to show a user: without special tokens (the BOS, a chat template's
  turn markers), which decode_completion drops from completions too."""
  ids = [int(i) for i in ids]
  if tokenizer.sp is not None:
    return tokenizer.sp.decode(ids)
  return tokenizer.hf.decode(ids, skip_special_tokens=True)
