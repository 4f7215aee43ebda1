"""python -m ftjax.generate: completions from a base model and its adapters; stdout holds only them.

  --workdir=DIR [--adapter=NAME] --prompt=TEXT [--system=TEXT]     one prompt (a training workdir)
  --workdir=DIR [--adapter=NAME] --messages=FILE.json              a conversation so far
  --workdir=DIR --input=prompts.jsonl --output=out.jsonl           many rows, many adapters at once
  --base=HF_DIR [--adapters=NAME=DIR,...] [--raw] ...               PEFT adapter dirs, no workdir

Prompts are formatted the way training formatted them (DIR/config.json's data.format: with
messages, and preference pairs whose prompts are conversations, --prompt is one user turn). With
--base, a tokenizer that has a chat template (an instruct model's) gets --prompt as one user turn
too, and --raw feeds it as plain text. Input rows are {"prompt": TEXT, "adapter": NAME} or
{"messages": [...], "adapter": NAME}; a row without "adapter" decodes with the base alone. Every
adapter named is stacked into one batch (lora.stack), so rows of different adapters decode
together. With a chat template the token that closes an assistant turn stops decoding, as eos
does.
"""
import dataclasses
import json
import os
import sys
import types

import jax

from ftjax import ckpt, data, hf_io, lora, pairs, peft_io
from ftjax.errors import UserError
from ftjax import sampling
from ftjax.sampling import generate_rows


@dataclasses.dataclass(frozen=True)
class Sources:
  """What decoding needs: the base, its tokenizer, the named adapters stacked (or None)."""
  model: object
  tokenizer: data.Tokenizer
  fmt: str                # how a bare prompt is formatted (prompt_format of the workdir)
  adapters: object        # lora.Adapters stacked over `names`, or None
  names: tuple            # adapter names, in stacking order
  stop_ids: tuple         # beyond the model's eos: the chat template's end of turn
  cfg: dict               # the workdir's config.json ({} for --base)


def adapter_dirs(adapters: str | None) -> dict[str, str]:
  """--adapters "NAME=DIR,..." -> {name: dir}; one unnamed DIR is "default"."""
  named = data.parse_sources(adapters, "--adapters") if adapters else {}
  return {n or ckpt.DEFAULT_ADAPTER: path for n, path in named.items()}


def adapter_names(workdir=None, adapters=None, step=None) -> tuple:
  """The adapters a workdir holds, or those --adapters names, without loading anything."""
  return tuple(ckpt.workdir_adapter_names(workdir, step) if workdir else adapter_dirs(adapters))


def workdir_config(workdir: str) -> dict:
  """A training workdir's config.json (read before anything slow, to refuse early)."""
  cfg_path = os.path.join(workdir, "config.json")
  if not os.path.isfile(cfg_path):
    raise UserError(f"{cfg_path}: not found; --workdir must be a training workdir")
  with open(cfg_path) as fh:
    return json.load(fh)


def prompt_format(cfg: dict) -> str:
  """How a workdir formats a bare prompt: its data.format, except that preference pairs format it
  as their prompts were (a user turn of the chat template for conversational pairs, else text)."""
  fmt = (cfg.get("data") or {}).get("format")
  if fmt != pairs.FORMAT:
    return fmt
  return "messages" if pairs.conversational(cfg["data"].get("train") or "") else "prompt_completion"


def load_sources(workdir=None, base=None, adapters=None, step=None, dtype="float32",
                 raw=False) -> Sources:
  """A training workdir (its base, tokenizer and every adapter it holds), or an HF base directory
  with PEFT adapter dirs `adapters` ("NAME=DIR,..."; one unnamed DIR is "default"). A bare prompt
  to a base whose tokenizer has a chat template is one user turn, unless `raw`."""
  if (workdir is None) == (base is None):
    raise UserError("give --workdir=DIR (a training workdir) or --base=HF_DIR (with "
                    "--adapters=NAME=DIR,... for PEFT adapters), not both")
  if workdir is not None:
    if adapters:
      raise UserError("--adapters=NAME=DIR goes with --base; a workdir brings its own adapters")
    if raw:
      raise UserError("--raw goes with --base; a workdir formats prompts as its training did")
    cfg = workdir_config(workdir)
    named = {n: ckpt.load_workdir_adapters(workdir, step, n)[0]
             for n in ckpt.workdir_adapter_names(workdir, step)}
    where = {n: workdir for n in named}
    model = hf_io.load_hf(cfg["model"]["path"], cfg["model"]["dtype"], cfg["quant"]["mode"],
                          group_size=cfg["quant"]["group_size"])
    tokenizer = data.load_tokenizer(cfg["tokenizer"]["path"] or cfg["model"]["path"])
    fmt = prompt_format(cfg)
  else:
    cfg = {}
    where = adapter_dirs(adapters)
    spec = hf_io.read_spec(base)
    named = {n: peft_io.read_adapters(path, spec) for n, path in where.items()}
    tokenizer = data.load_tokenizer(base)
    chat = tokenizer.hf is not None and bool(tokenizer.hf.chat_template)
    fmt = "messages" if chat and not raw else "prompt_completion"
    model = hf_io.load_hf(base, dtype)
  for n, ad in named.items():
    peft_io.check_adapters(ad, model.spec, where[n])
  stacked = None
  if named:
    try:
      stacked = lora.stack(named)
    except UserError as e:
      bad = next(n for n in named if f"adapter {n!r}" in str(e))
      raise UserError(f"{where[bad]}: {e}") from None
  eot = data.end_of_turn_id(tokenizer) if fmt == "messages" or base is not None else None
  return Sources(model, tokenizer, fmt, stacked, tuple(named), () if eot is None else (eot,), cfg)


def adapter_index(names: tuple, name, where: str) -> int:
  """The row of adapter `name` in the stacked adapters; -1 for None (the base)."""
  if name is None:
    return -1
  if name not in names:
    raise UserError(f"{where}: adapter {name!r} was not loaded (loaded: "
                    f"{', '.join(names) or 'none'})")
  return names.index(name)


def _row_adapter(row):
  return row.get("adapter") if isinstance(row, dict) else None


def check_row(row, where: str):
  """An input row is {"prompt": TEXT} or {"messages": [...]}: checked before anything slow."""
  if not isinstance(row, dict) or not ("prompt" in row or "messages" in row):
    raise UserError(f"{where}: a row needs a 'prompt' (text) or 'messages' (a conversation)")
  if "messages" not in row:
    if not isinstance(row["prompt"], str):
      raise UserError(f"{where}: 'prompt' must be a string")
    if not row["prompt"].strip():
      raise UserError(f"{where}: 'prompt' is empty; give the text to complete")


def row_prompt(src: Sources, row, where: str) -> list[int]:
  """The prompt ids of an input row: {"prompt": TEXT} or {"messages": [...]}."""
  check_row(row, where)
  if "messages" in row:
    return data.chat_prompt_ids(src.tokenizer, row["messages"], where)
  return data.prompt_ids(src.tokenizer, src.fmt, row["prompt"])


def decode(src: Sources, prompts, ids, f) -> list[str]:
  out = generate_rows(src.model, prompts, src.adapters, ids, batch_size=f.batch_size,
                      max_new_tokens=f.max_new_tokens, temperature=f.temperature, top_p=f.top_p,
                      key=jax.random.PRNGKey(f.seed), stop_ids=src.stop_ids)
  return [data.decode_completion(src.tokenizer, row, src.stop_ids) for row in out]


def _read_rows(path: str) -> list[tuple[str, dict]]:
  if not os.path.isfile(path):
    raise UserError(f"--input={path}: not found")
  rows = []
  with open(path) as fh:
    for n, line in enumerate(fh, 1):
      if line.strip():
        try:
          rows.append((f"{path}:{n}", json.loads(line)))
        except json.JSONDecodeError as e:
          raise UserError(f"{path}:{n}: not a JSON object ({e.msg})") from None
  return rows


def _single_prompt(src: Sources, f) -> list[int]:
  if f.messages:
    try:
      with open(f.messages) as fh:
        messages = json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
      raise UserError(f"--messages={f.messages}: cannot read it as JSON ({e})") from None
    if f.system:
      messages = [{"role": "system", "content": f.system}] + list(messages)
    return data.chat_prompt_ids(src.tokenizer, messages, f.messages)
  if f.system:
    return data.chat_prompt_ids(src.tokenizer, [{"role": "system", "content": f.system},
                                                {"role": "user", "content": f.prompt}])
  return data.prompt_ids(src.tokenizer, src.fmt, f.prompt)


def main(argv):
  from absl import flags, logging
  logging.set_verbosity(logging.ERROR)  # orbax logs every file it reads at INFO, and warns on reads
  f = flags.FLAGS
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}")
  if sum(bool(x) for x in (f.prompt is not None, f.messages, f.input)) != 1:
    raise UserError("give one of --prompt=TEXT, --messages=FILE.json or --input=prompts.jsonl")
  if bool(f.input) != bool(f.output):
    raise UserError("--input=prompts.jsonl and --output=out.jsonl go together")
  if f.input and (f.adapter or f.system):
    raise UserError("--adapter / --system apply to one prompt; with --input each row names its "
                    "'adapter' (none: the base) and carries its own system message")
  if f.prompt is not None and not f.prompt.strip():
    raise UserError("--prompt is empty; give the text to complete")
  if f.system and f.raw:
    raise UserError("--system needs the chat template, and --raw feeds the prompt as plain text; "
                    "drop one of them")
  if f.system and f.workdir and not f.messages:
    cfg = workdir_config(f.workdir)
    if prompt_format(cfg) != "messages":
      fmt = (cfg.get("data") or {}).get("format")
      raise UserError(f"--system: {f.workdir} trains data.format={fmt}, which has no system "
                      "message; use a messages workdir, or put the text in --prompt")
  rows = _read_rows(f.input) if f.input else None
  for where, row in rows or ():
    check_row(row, where)
  names = adapter_names(f.workdir, f.adapters, f.step)  # checked before anything slow
  if f.adapter is not None and f.adapter not in names:
    raise UserError(f"{f.workdir or '--adapters=' + (f.adapters or '')}: has no adapter "
                    f"{f.adapter!r} (its adapters: {', '.join(names) or 'none'})")
  if rows is None and f.adapter is None and len(names) > 1:
    raise UserError(f"{f.workdir or f.adapters}: holds adapters {', '.join(names)}; "
                    "choose one with --adapter=NAME")
  ids = [adapter_index(names, _row_adapter(row), where) for where, row in rows or ()]
  src = load_sources(f.workdir, f.base, f.adapters, f.step, raw=f.raw)
  if rows is None:
    name = f.adapter
    if name is None and src.names:
      name = src.names[0]
    ids = [adapter_index(src.names, name, f"--adapter={name}")]
    print(decode(src, [_single_prompt(src, f)], ids, f)[0])
    return
  texts = decode(src, [row_prompt(src, row, where) for where, row in rows], ids, f)
  with open(f.output, "w") as fh:
    for (_, row), text in zip(rows, texts):
      fh.write(json.dumps(dict(row, completion=text), ensure_ascii=False) + "\n")
  print(f"wrote {len(texts)} completions to {f.output}")

def define_source_flags():
  """The flags that say what to decode with (shared with ftjax.eval)."""
  from absl import flags
  flags.DEFINE_string("workdir", None, "Training workdir (its config.json and checkpoints).")
  flags.DEFINE_string("base", None, "Instead of --workdir: a Hugging Face model directory.")
  flags.DEFINE_string("adapters", None, "With --base: PEFT adapter dirs, NAME=DIR,NAME=DIR.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_integer("max_new_tokens", 128, "At most this many new tokens.")
  flags.DEFINE_integer("batch_size", 8, "Rows decoded at once.")
  flags.DEFINE_float("temperature", 0.0, "0 is greedy.")
  flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")



class _CallableModule(types.ModuleType):
  """`ftjax.generate` is the decoding function (ftjax/__init__.py); importing this CLI module
  rebinds that package attribute to the module (Python's import sets it), so the module calls
  through to the function and `ftjax.generate(model, tokens, ...)` works either way."""

  def __call__(self, *args, **kwargs):
    return sampling.generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
  from absl import app, flags

  from ftjax.errors import parse_flags, run_cli

  define_source_flags()
  flags.DEFINE_string("adapter", None, "Which adapter (default: the only one).")
  flags.DEFINE_string("prompt", None, "The prompt, formatted as training did.")
  flags.DEFINE_string("system", None, "A system message before --prompt (chat templates).")
  flags.DEFINE_string("messages", None, "A JSON file: the conversation so far, [{role, content}].")
  flags.DEFINE_string("input", None, "JSONL of {prompt|messages, adapter} rows.")
  flags.DEFINE_string("output", None, "JSONL written: each input row with its 'completion'.")
  flags.DEFINE_boolean("raw", False, "With --base: feed --prompt as plain text even when the "
                       "tokenizer has a chat template (by default a user turn).")
  app.run(run_cli(main), flags_parser=parse_flags)
