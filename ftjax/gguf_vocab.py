"""A Hugging Face tokenizer as GGUF metadata, as llama.cpp's convert_hf_to_gguf.py writes it.

Byte-level BPE (tokenizer.json: a BPE model behind a ByteLevel pre-tokenizer, as Llama 3, Qwen,
SmolLM and GPT-2 ship) is written as `tokenizer.ggml.model=gpt2`: every id's token (ids the
tokenizer lacks below the model's vocab as `[PAD{i}]`, unused), its type (added tokens control
when special, user-defined otherwise), the merges, the special ids, the chat template
(gguf.SpecialVocab reads those as the converter does) and add_bos / add_eos as the tokenizer
behaves.

llama.cpp has no regex engine for arbitrary pre-tokenizers: `tokenizer.ggml.pre` names one of
its built-in ones. Its converter picks the name by hashing how the tokenizer splits a probe text,
which only recognizes the released vocabularies it lists; ftjax reads the pre-tokenizer itself
from tokenizer.json and names the llama.cpp pre-tokenizer that splits the same way (llama.cpp's
llama-vocab.cpp), so a fine-tune's own or resized vocabulary is written too.

A sentencepiece tokenizer.model (Llama 2, Mistral v0.1, Gemma) is written as the converter's
`_create_vocab_sentencepiece` does: `tokenizer.ggml.model=llama`, each piece with its score and
type, added tokens from tokenizer_config.json. Anything else (another tokenizer.json model, a
pre-tokenizer llama.cpp has under another name) is refused with one line: convert_hf_to_gguf.py
knows more tokenizers than this.
"""
import json
import os

import gguf

from ftjax import data
from ftjax.errors import UserError

# Split regexes as tokenizer.json spells them (transformers' Llama 3 and Qwen2 tokenizers).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level(p: dict, use_regex: bool) -> bool:
  return (p.get("type") == "ByteLevel" and not p.get("add_prefix_space", False)
          and p.get("use_regex", True) == use_regex)


def pre_tokenizer(tj: dict, where: str) -> str:
  """llama.cpp's name for tokenizer.json's byte-level pre-tokenizer (`tokenizer.ggml.pre`)."""
  pre = tj.get("pre_tokenizer") or {}
  steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
  ignore_merges = bool((tj.get("model") or {}).get("ignore_merges"))
  if len(steps) == 1 and _byte_level(steps[0], True):
    return "gpt-2"  # GPT-2's own regex, inside ByteLevel
  if (len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits")
      and _byte_level(steps[1], True)):
    return "smollm"  # digits one by one, then GPT-2's regex (SmolLM, StarCoder)
  if (len(steps) == 2 and steps[0].get("type") == "Split" and _byte_level(steps[1], False)
      and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert")):
    regex = (steps[0].get("pattern") or {}).get("Regex")
    if regex == LLAMA3_SPLIT:  # llama-bpe also looks whole words up before merging
      return "llama-bpe" if ignore_merges else "smaug-bpe"
    if regex == QWEN2_SPLIT and not ignore_merges:
      return "qwen2"
  raise UserError(f"{where}: pre_tokenizer {json.dumps(pre)[:160]} is not one ftjax names for "
                  "llama.cpp (GPT-2, SmolLM, Llama 3, Qwen2 splits); export --format=merged and "
                  "convert that with llama.cpp's convert_hf_to_gguf.py")


def _looks_special(text: str) -> bool:
  """Added tokens llama.cpp's converter marks control although not flagged special."""
  return (text in ("<pad>", "<mask>") or (text.startswith("<|") and text.endswith("|>"))
          or (text.startswith("<unused") and text.endswith(">")))


_REFUSED = ("ftjax writes byte-level BPE (tokenizer.json) and sentencepiece (tokenizer.model) "
            "tokenizers to GGUF; export --format=merged and convert that with llama.cpp's "
            "convert_hf_to_gguf.py")


def write(w: gguf.GGUFWriter, path: str, n_vocab: int, eot: int | None = None):
  """Writes the tokenizer at `path` (a Hugging Face tokenizer dir, or a sentencepiece .model)
  into `w` for a model of n_vocab rows. eot: the end of turn llama.cpp stops at, when training
  taught one."""
  spm = path if path.endswith(".model") else os.path.join(path, "tokenizer.model")
  tj_path = os.path.join(path, "tokenizer.json")
  tj = None
  if os.path.isfile(tj_path):
    with open(tj_path, encoding="utf-8") as f:
      tj = json.load(f)
  model = (tj or {}).get("model") or {}
  sentencepiece_json = model.get("byte_fallback") or model.get("type") != "BPE"
  if os.path.isfile(spm) and (tj is None or sentencepiece_json):
    _sentencepiece(w, spm, path, n_vocab, eot)
    return
  if tj is None:
    raise UserError(f"{path}: no tokenizer.json or tokenizer.model; {_REFUSED}")
  if model.get("type") != "BPE" or model.get("byte_fallback"):
    kind = model.get("type") if model.get("type") != "BPE" else "BPE with byte_fallback"
    raise UserError(f"{tj_path}: a {kind} tokenizer without its tokenizer.model; {_REFUSED}")
  pre = pre_tokenizer(tj, tj_path)
  tok = data.load_tokenizer(path)
  hf = tok.hf
  by_id = {i: t for t, i in hf.get_vocab().items()}
  if max(by_id) >= n_vocab:
    raise UserError(f"{path}: token id {max(by_id)} is beyond the model's {n_vocab} embedding rows")
  added = hf.added_tokens_decoder
  tokens, types = [], []
  for i in range(n_vocab):
    if i not in by_id:
      tokens.append(f"[PAD{i}]")
      types.append(gguf.TokenType.UNUSED)
    elif i in added:
      text = by_id[i]
      if not added[i].normalized:  # llama.cpp matches added tokens in their normalized form
        text = hf.decode(hf.encode(text, add_special_tokens=False))
      special = added[i].special or _looks_special(text)
      tokens.append(text)
      types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
    else:
      tokens.append(by_id[i])
      types.append(gguf.TokenType.NORMAL)
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre(pre)
  w.add_token_list(tokens)
  w.add_token_types(types)
  _specials(w, gguf.SpecialVocab(path, load_merges=True, n_vocab=n_vocab), tok, eot)


def _specials(w, special: gguf.SpecialVocab, tok: data.Tokenizer, eot: int | None):
  """Special ids, add_bos / add_eos as the tokenizer behaves (not as llama.cpp's per-tokenizer
  defaults: llama-bpe adds BOS), the chat template."""
  if eot is not None:
    special.special_token_ids["eot"] = eot
  special.special_token_ids.setdefault("eos", tok.eos_id)
  if tok.bos_id is not None:
    special.special_token_ids.setdefault("bos", tok.bos_id)
  probe = tok.hf("a")["input_ids"] if tok.hf is not None else []
  special.add_special_token["bos"] = tok.add_bos
  special.add_special_token["eos"] = bool(probe) and probe[-1] == tok.eos_id
  special.add_to_gguf(w, quiet=True)


def _sentencepiece(w, model_file: str, path: str, n_vocab: int, eot: int | None):
  """A sentencepiece model as llama.cpp's converter writes it (tokenizer.ggml.model=llama)."""
  import sentencepiece  # pylint: disable=g-import-not-at-top  (only for this tokenizer kind)
  try:
    sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
  except (OSError, RuntimeError, ValueError) as e:
    raise UserError(f"{model_file}: not a sentencepiece model ({str(e).strip()[:120]})") from None
  if sp.vocab_size() > n_vocab:
    raise UserError(f"{model_file}: {sp.vocab_size()} pieces for the model's {n_vocab} embedding "
                    "rows")
  tokens = [f"[PAD{i}]" for i in range(n_vocab)]
  scores = [-10000.0] * n_vocab
  types = [gguf.TokenType.UNUSED] * n_vocab
  for i in range(sp.vocab_size()):
    tokens[i], scores[i] = sp.IdToPiece(i), sp.GetScore(i)
    types[i] = (gguf.TokenType.UNKNOWN if sp.IsUnknown(i) else gguf.TokenType.CONTROL
                if sp.IsControl(i) else gguf.TokenType.UNUSED if sp.IsUnused(i) else
                gguf.TokenType.BYTE if sp.IsByte(i) else gguf.TokenType.NORMAL)
  config = os.path.join(os.path.dirname(model_file), "tokenizer_config.json")
  if os.path.isfile(config):  # tokens added on top of the sentencepiece model
    with open(config, encoding="utf-8") as f:
      added = json.load(f).get("added_tokens_decoder") or {}
    for i, t in ((int(i), t) for i, t in added.items() if int(i) < n_vocab):
      special = t.get("special") or _looks_special(t["content"])
      tokens[i] = t["content"] if special else t["content"].replace("\u2581", " ")
      types[i] = gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED
      scores[i] = -1000.0
  w.add_tokenizer_model("llama")
  w.add_tokenizer_pre("default")
  w.add_token_list(tokens)
  w.add_token_scores(scores)
  w.add_token_types(types)
  # The model's add_dummy_prefix (llama.cpp's add_space_prefix), seen in how it splits "a".
  w.add_add_space_prefix(sp.encode("a", out_type=str)[0].startswith("\u2581"))
  special = gguf.SpecialVocab(os.path.dirname(model_file), n_vocab=n_vocab)
  for kind, i in (("unk", sp.unk_id()), ("pad", sp.pad_id())):
    if i >= 0:
      special.special_token_ids.setdefault(kind, i)
  _specials(w, special, data.load_tokenizer(path), eot)
