"""Tests for ftjax.data: masks, chat spans, packing, resumable batches, loaders and their errors.

Tokenizers are trained here on a few sentences (tokenizers BPE, sentencepiece), never downloaded.
"""
import io
import json

import numpy as np
import pytest

from ftjax import data
from ftjax.errors import UserError

CORPUS = [
    "hello world how are you", "the cat sat on the mat", "what is two plus two",
    "four is the answer", "you are a helpful assistant", "reply one reply two", "question answer",
] * 4

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _hf_tokenizer(path, *, adds_bos, template, pad_is_eos):
  """A byte-level BPE saved as a transformers tokenizer dir; Llama-like when adds_bos."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  from transformers import PreTrainedTokenizerFast
  specials = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
  tk = Tokenizer(models.BPE())
  tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tk.decoder = decoders.ByteLevel()
  tk.train_from_iterator(CORPUS, trainers.BpeTrainer(
      vocab_size=320, special_tokens=specials,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  if adds_bos:
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tk.token_to_id("<s>"))])
  kw = dict(bos_token="<s>", eos_token="</s>") if adds_bos else dict(eos_token="<|im_end|>")
  if pad_is_eos:
    kw["pad_token"] = kw["eos_token"]
  hf = PreTrainedTokenizerFast(tokenizer_object=tk, **kw)
  hf.chat_template = template
  hf.save_pretrained(str(path))
  return data.load_tokenizer(str(path))


@pytest.fixture(scope="module")
def chatml(tmp_path_factory):
  """Qwen-like: no BOS, eos = <|im_end|>, no pad token (falls back to eos)."""
  return _hf_tokenizer(tmp_path_factory.mktemp("chatml"), adds_bos=False, template=CHATML,
                       pad_is_eos=False)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  """Llama-like: adds BOS, pad == eos, and its chat template renders the BOS itself."""
  return _hf_tokenizer(tmp_path_factory.mktemp("llama"), adds_bos=True,
                       template="{{ bos_token }}" + CHATML, pad_is_eos=True)


@pytest.fixture(scope="module")
def spm_tok(tmp_path_factory):
  import sentencepiece as spm
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=60, model_type="bpe",
      unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, hard_vocab_limit=False)
  path = tmp_path_factory.mktemp("spm") / "tokenizer.model"
  path.write_bytes(model.getvalue())
  return data.load_tokenizer(str(path.parent))  # a dir with only tokenizer.model


def _trained_runs(tok, ex):
  """Decoded text of each maximal run of trained tokens."""
  runs, cur = [], []
  for i, m in zip(ex.ids.tolist(), ex.target_mask.tolist()):
    if m:
      cur.append(i)
    elif cur:
      runs.append(cur)
      cur = []
  if cur:
    runs.append(cur)
  return [tok.decode(r) for r in runs]


def _one(tok, fmt, row, seq_len=64):
  (ex,), stats = data.tokenize_rows([row], tok, fmt, seq_len, "mem")
  return ex, stats


# ------------------------------------------------------------------------------------------------
# Tokenizer properties and masks


def test_tokenizer_properties(chatml, llama):
  assert not chatml.add_bos and chatml.pad_id == chatml.eos_id
  assert chatml.eos_id == chatml.hf.convert_tokens_to_ids("<|im_end|>")
  assert llama.add_bos and llama.bos_id == llama.hf.convert_tokens_to_ids("<s>")
  assert llama.pad_id == llama.eos_id
  assert llama.vocab_size == len(llama.hf)
  assert llama.decode(llama.encode("hello world")) == "hello world"
  assert llama.bos_id not in llama.encode("hello world")


def test_prompt_completion_trains_completion_and_eos_with_pad_eq_eos(llama):
  row = {"prompt": "what is two plus two", "completion": " four"}
  ex, _ = _one(llama, "prompt_completion", row)
  head = [llama.bos_id] + llama.encode("what is two plus two")
  tail = llama.encode(" four") + [llama.eos_id]
  assert ex.ids.tolist() == head + tail
  assert ex.target_mask.tolist() == [False] * len(head) + [True] * len(tail)
  assert ex.ids[-1] == llama.pad_id and ex.target_mask[-1]  # the stop token is learned
  batch = data.Batches([ex], batch_size=1, seq_len=32, packing=False, seed=0,
                       pad_id=llama.pad_id)(0)
  n = len(ex.ids) - 1
  assert batch["targets"][0, n - 1] == llama.eos_id and batch["loss_mask"][0, n - 1] == 1.0
  assert batch["loss_mask"][0].sum() == len(tail) and batch["loss_mask"][0, n:].sum() == 0


def test_bos_once_and_never_trained(llama, chatml):
  ex, _ = _one(llama, "text", {"text": "the cat sat on the mat"})
  assert ex.ids[0] == llama.bos_id and (ex.ids == llama.bos_id).sum() == 1
  assert not ex.target_mask[0] and ex.target_mask[1:].all() and ex.ids[-1] == llama.eos_id
  msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
  ex, _ = _one(llama, "messages", {"messages": msgs})  # template renders BOS: not added again
  assert ex.ids[0] == llama.bos_id and (ex.ids == llama.bos_id).sum() == 1
  ex, _ = _one(chatml, "text", {"text": "the cat sat on the mat"})
  assert ex.ids.tolist() == chatml.encode("the cat sat on the mat") + [chatml.eos_id]
  assert not ex.target_mask[0] and ex.target_mask[1:].all()


def test_messages_chatml_trains_only_assistant_replies(chatml):
  msgs = [{"role": "system", "content": "you are a helpful assistant"},
          {"role": "user", "content": "what is two plus two"},
          {"role": "assistant", "content": "reply one"},
          {"role": "user", "content": "question"},
          {"role": "assistant", "content": "reply two"}]
  ex, stats = _one(chatml, "messages", {"messages": msgs})
  assert chatml.decode(ex.ids) == chatml.render_chat(msgs, False)
  assert _trained_runs(chatml, ex) == ["reply one<|im_end|>", "reply two<|im_end|>"]
  assert stats.target_tokens == int(ex.target_mask.sum())


def test_messages_with_template_bos(llama):
  msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
  ex, _ = _one(llama, "messages", {"messages": msgs})
  assert _trained_runs(llama, ex) == ["world<|im_end|>"]


def test_messages_errors(chatml, llama, spm_tok):
  with pytest.raises(UserError, match=r"mem:1: 'messages' must be"):
    _one(chatml, "messages", {"messages": [{"role": "user"}]})
  with pytest.raises(UserError, match="no chat_template"):
    _one(spm_tok, "messages", {"messages": [{"role": "user", "content": "hi"}]})


def test_prompt_ids(llama, chatml):
  assert data.prompt_ids(llama, "text", "hello") == [llama.bos_id] + llama.encode("hello")
  assert data.prompt_ids(chatml, "prompt_completion", "hello") == chatml.encode("hello")
  ids = data.prompt_ids(chatml, "messages", "hello")
  assert chatml.decode(ids) == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
  ids = data.prompt_ids(llama, "messages", "hello")
  assert ids[0] == llama.bos_id and ids.count(llama.bos_id) == 1


def test_truncation_dropping_and_all_dropped(chatml):
  long = " ".join(["the cat sat on the mat"] * 10)
  rows = [{"prompt": "hello", "completion": " world"},  # kept as is
          {"prompt": "hello", "completion": long},      # truncated, still has targets
          {"prompt": long, "completion": " world"}]     # prompt fills seq_len: dropped
  seq_len = 16
  examples, stats = data.tokenize_rows(rows, chatml, "prompt_completion", seq_len, "mem")
  assert (stats.rows, stats.truncated, stats.dropped) == (3, 2, 1)
  assert len(examples) == 2 and len(examples[1].ids) == seq_len + 1
  assert stats.tokens == sum(len(e.ids) for e in examples)
  assert stats.target_tokens == sum(int(e.target_mask.sum()) for e in examples)
  with pytest.raises(UserError, match=r"mem: all 2 rows were dropped: .*data.seq_len=16"):
    data.tokenize_rows(rows[2:] * 2, chatml, "prompt_completion", seq_len, "mem")


def test_missing_field_names_row_and_field(chatml):
  rows = [{"prompt": "a", "completion": "b"}, {"prompt": "a"}]
  with pytest.raises(UserError, match=r"^data/train.jsonl:2: row has no 'completion' field "
                     r"\(format prompt_completion needs prompt, completion\)$"):
    data.tokenize_rows(rows, chatml, "prompt_completion", 16, "data/train.jsonl")
  with pytest.raises(UserError, match="unknown"):
    data.tokenize_rows(rows, chatml, "chat", 16, "x")


# ------------------------------------------------------------------------------------------------
# Batches


def _examples(n, seed=0, max_len=12):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    k = int(rng.integers(2, max_len + 1))
    ids = rng.integers(5, 100, k).astype(np.int32)
    mask = rng.random(k) < 0.6
    mask[0], mask[-1] = False, True
    out.append(data.Example(ids, mask))
  return out


def _segments(batch, b):
  """(start, end) of each segment of row b, checking ids are 1, 2, ... then padding 0."""
  seg = batch["segment_ids"][b]
  spans, t = [], 0
  while t < len(seg) and seg[t]:
    end = t
    while end < len(seg) and seg[end] == seg[t]:
      end += 1
    assert seg[t] == len(spans) + 1
    spans.append((t, end))
    t = end
  assert not seg[t:].any() and not batch["loss_mask"][b, t:].any()
  return spans


def test_packing_matches_each_example_alone():
  examples = _examples(40)
  seq_len, pad = 16, 0
  packed = data.Batches(examples, batch_size=4, seq_len=seq_len, packing=True, seed=3, pad_id=pad)
  alone = {ex.ids.tobytes(): ex for ex in examples}
  seen = []
  for pos in range(packed.batches_per_epoch):
    batch = packed(pos)
    assert {k: (v.dtype, v.shape) for k, v in batch.items()} == {
        "tokens": (np.int32, (4, seq_len)), "targets": (np.int32, (4, seq_len)),
        "loss_mask": (np.float32, (4, seq_len)), "segment_ids": (np.int32, (4, seq_len))}
    for b in range(4):
      spans = _segments(batch, b)
      assert len(spans) >= 1
      for s, e in spans:
        ids = np.concatenate([batch["tokens"][b, s:e], batch["targets"][b, e - 1:e]])
        ex = alone[ids.astype(np.int32).tobytes()]
        # The first target of a packed example is ids[1] given ids[0], exactly as unpacked.
        assert batch["tokens"][b, s] == ex.ids[0] and batch["targets"][b, s] == ex.ids[1]
        np.testing.assert_array_equal(batch["targets"][b, s:e], ex.ids[1:])
        np.testing.assert_array_equal(batch["loss_mask"][b, s:e], ex.target_mask[1:])
        seen.append(ids.tobytes())
  # Best fit rows are nearly full, so this epoch drops few rows; none is seen twice.
  assert len(seen) == len(set(seen)) and len(seen) >= 0.8 * len(examples)


def test_unpacked_rows_are_padded_single_examples():
  examples = _examples(6)
  batches = data.Batches(examples, batch_size=3, seq_len=12, packing=False, seed=0, pad_id=7)
  assert batches.batches_per_epoch == 2
  seen = []
  for pos in range(2):
    batch = batches(pos)
    for b in range(3):
      n = int((batch["segment_ids"][b] == 1).sum())
      assert set(batch["segment_ids"][b, n:].tolist()) <= {0}
      assert (batch["tokens"][b, n:] == 7).all() and (batch["targets"][b, n:] == 7).all()
      seen.append(np.concatenate([batch["tokens"][b, :n], batch["targets"][b, n - 1:n]]).tobytes())
  assert sorted(seen) == sorted(ex.ids.tobytes() for ex in examples)


@pytest.mark.parametrize("packing", [False, True])
def test_batches_deterministic_resumable_and_sliced(packing):
  examples = _examples(30, seed=1)
  make = lambda seed: data.Batches(examples, batch_size=4, seq_len=16, packing=packing, seed=seed,
                                   pad_id=0)
  a, b = make(5), make(5)
  bpe = a.batches_per_epoch
  for pos in [3, 0, bpe + 1, 3 * bpe + 2]:  # out of order, as after a resume
    for k, v in a(pos).items():
      np.testing.assert_array_equal(v, b(pos)[k])
  epoch = lambda bat, e: np.concatenate([bat(e * bpe + i)["tokens"] for i in range(bpe)])
  assert not np.array_equal(epoch(a, 0), epoch(a, 1))
  assert not np.array_equal(a(0)["tokens"], make(6)(0)["tokens"])
  full = a(bpe + 2)
  parts = [a(bpe + 2, process_index=p, process_count=2) for p in range(2)]
  for k in full:
    np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), full[k])
  with pytest.raises(UserError, match="not divisible"):
    a(0, process_index=0, process_count=3)
  for e in range(20):  # every epoch fills every batch, whatever its packing came to
    assert a(e * bpe + bpe - 1)["loss_mask"].sum(axis=1).min() > 0


def test_batch_size_larger_than_epoch():
  with pytest.raises(UserError, match=r"batch_size=8 but an epoch yields only 5 rows"):
    data.Batches(_examples(5), batch_size=8, seq_len=16, packing=False, seed=0, pad_id=0)


# ------------------------------------------------------------------------------------------------
# Sentencepiece


def test_sentencepiece_text_and_prompt_completion(spm_tok):
  assert spm_tok.sp is not None and spm_tok.add_bos and spm_tok.bos_id == 1
  assert spm_tok.eos_id == 2 and spm_tok.pad_id == 2 and spm_tok.vocab_size >= 30
  assert spm_tok.decode(spm_tok.encode("the cat sat")) == "the cat sat"
  ex, _ = _one(spm_tok, "text", {"text": "the cat sat"})
  assert ex.ids.tolist() == [1] + spm_tok.encode("the cat sat") + [2]
  assert not ex.target_mask[0] and ex.target_mask[1:].all()
  row = {"prompt": "what is two plus two", "completion": "four"}
  ex, _ = _one(spm_tok, "prompt_completion", row)
  head = [1] + spm_tok.encode("what is two plus two")
  assert ex.target_mask.tolist() == [False] * len(head) + [True] * (len(ex.ids) - len(head))
  assert _trained_runs(spm_tok, ex)[0].startswith("four")
  assert data.prompt_ids(spm_tok, "prompt_completion", "hi") == [1] + spm_tok.encode("hi")


# ------------------------------------------------------------------------------------------------
# Loading rows and tokenizers


ROWS = [{"prompt": "hello", "completion": " world"}, {"prompt": "what is", "completion": " four"}]


def _write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def test_jsonl_json_parquet_and_saved_dir_load_the_same_rows(tmp_path):
  import datasets
  import pyarrow
  import pyarrow.parquet
  jsonl = _write_jsonl(tmp_path / "train.jsonl", ROWS)
  (tmp_path / "train.json").write_text(json.dumps(ROWS))
  pyarrow.parquet.write_table(pyarrow.Table.from_pylist(ROWS), tmp_path / "train.parquet")
  datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
  (tmp_path / "lines.json").write_text((tmp_path / "train.jsonl").read_text())
  assert data.load_rows(jsonl) == ROWS
  arrow = next((tmp_path / "saved").glob("*.arrow")).relative_to(tmp_path)
  for name in ["train.json", "lines.json", "train.parquet", "saved", str(arrow)]:
    assert list(data.load_rows(str(tmp_path / name))) == ROWS, name


def test_malformed_jsonl_line(tmp_path):
  path = tmp_path / "train.jsonl"
  path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n{\"prompt\": oops}\n")
  with pytest.raises(UserError, match=r"^.*train.jsonl:3: not valid JSON \("):
    data.load_rows(str(path))
  path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n")
  with pytest.raises(UserError, match=r"train.jsonl:2: blank line"):
    data.load_rows(str(path))
  path.write_text(json.dumps(ROWS[0]) + "\n\n\n")  # trailing blank lines are fine
  assert data.load_rows(str(path)) == ROWS[:1]


def test_cut_jsonl_line_names_the_cause_column(tmp_path):
  """A line cut mid-string: the parser's own message, once, at the column where the string
  starts (not 'at at', not the column of the newline)."""
  path = tmp_path / "train.jsonl"
  path.write_text(json.dumps(ROWS[0]) + "\n" + '{"prompt": "my telly is bro\n')
  with pytest.raises(UserError) as e:
    data.load_rows(str(path))
  assert str(e.value) == (f"{path}:2: not valid JSON (Unterminated string starting at column 12)")


def test_missing_files(tmp_path):
  with pytest.raises(UserError, match=r"nope/train.jsonl: data file not found"):
    data.load_rows(str(tmp_path / "nope" / "train.jsonl"))
  with pytest.raises(UserError, match=r"tok_missing: tokenizer not found"):
    data.load_tokenizer(str(tmp_path / "tok_missing"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(UserError, match=r"empty: no tokenizer.json"):
    data.load_tokenizer(str(tmp_path / "empty"))


def test_first_row_reads_no_further_and_fetches_nothing(tmp_path):
  """generate asks a preference workdir's training file for its first row only: a .jsonl is read
  no further (a bad line below it goes unnoticed), and a name that is no local file is not
  looked up on the hub."""
  path = tmp_path / "pairs.jsonl"
  path.write_text('{"prompt": [{"role": "user", "content": "hi"}]}\n{"prompt": "b"}\nnot json\n')
  assert data.first_row(str(path)) == {"prompt": [{"role": "user", "content": "hi"}]}
  with pytest.raises(UserError, match="pairs.jsonl:3"):
    data.load_rows(str(path))
  assert data.first_row("someone/some_dataset") is None
