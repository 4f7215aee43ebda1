"""python -m ftjax.export --workdir=DIR --format=peft|merged|gguf|gguf_lora --out=DIR [--step=N]
                        [--dtype=D] [--adapter=NAME] [--gguf_type=f16] [--base_gguf=FILE]

Turns a training workdir's adapters into something PyTorch loads:
  peft    a PEFT adapter directory for the base at model.path (a few MB);
  merged  a full Hugging Face checkpoint, W + scale * B A folded into every targeted projection.
  gguf, gguf_lora  the merged model, or the adapter alone beside its base, as GGUF files for
          llama.cpp and Ollama, each with a Modelfile (ftjax/gguf_export.py).

A workdir of several adapters (named data.train sources) writes one directory per adapter,
--out/NAME, or with --adapter=NAME that adapter alone to --out. A one-adapter workdir writes --out
(its adapter answers to --adapter=default).

The merge reads the 16-bit base AGAIN from model.path's safetensors (never the quantized weights a
QLoRA run trained against: merging into those would bake the quantization error in), one tensor at
a time from a memory-mapped file, and streams each output shard to disk tensor by tensor, so host
memory stays about one tensor whatever the model size. Output shards mirror the source's.
"""
import json
import os
import shutil
import struct

import jax
import ml_dtypes
import numpy as np

from ftjax import ckpt, data, gguf_export, gguf_io, hf_io, lora, peft_io
from ftjax.errors import UserError
from ftjax.lora import Adapters

FORMATS = ("peft", "merged", "gguf", "gguf_lora")
DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "chat_template.jinja", "chat_template.json", "vocab.json",
                   "merges.txt", "added_tokens.json")
_ST_NAMES = {np.dtype(v): k for k, v in hf_io._ST_DTYPES.items()}  # numpy dtype -> "BF16", ...
_INDEX = "model.safetensors.index.json"


def read_workdir(workdir: str, step: int | None = None,
                 adapter: str | None = None) -> tuple[dict, dict, int]:
  """(the resolved training config, {out subdirectory: Adapters} of the latest or given
  checkpoint, its step): {"": adapters} for one adapter (or --adapter), else {name: adapters}."""
  cfg_path = os.path.join(workdir, "config.json")
  if not os.path.isfile(cfg_path):
    raise UserError(f"{cfg_path}: not found; --workdir must be a training workdir")
  with open(cfg_path) as f:
    cfg = json.load(f)
  if not (cfg.get("model") or {}).get("path"):
    raise UserError(f"{cfg_path}: has no model.path (the base model the adapters were trained on)")
  if step is None:
    mngr = ckpt.manager(workdir, keep=0, read_only=True)
    step = mngr.latest_step()
    mngr.close()
  adapters, _ = ckpt.load_workdir_adapters(workdir, step, adapter)
  return cfg, ({"": adapters} if not adapters.stacked else lora.unstack(adapters)), step


def _card(cfg: dict, step: int, name: str) -> dict:
  train = (cfg.get("data") or {}).get("train", "")
  sources = data.parse_sources(train) if train else {}
  card = {"data": sources.get(name, train), "steps": step}
  return {"adapter": name, **card} if name and name in sources else card


def export_peft(workdir: str, out: str, step: int | None = None,
                adapter: str | None = None) -> int:
  """Writes the workdir's adapters as PEFT LoRA directories for the base at model.path; returns
  the checkpoint step written."""
  cfg, each, step = read_workdir(workdir, step, adapter)
  base = cfg["model"]["path"]
  for sub, adapters in each.items():
    adapters = Adapters(adapters.params, adapters.rank, adapters.alpha, adapters.rslora,
                        float(cfg.get("lora", {}).get("dropout", 0.0)))
    if jax.process_index() == 0:
      peft_io.write_adapters(adapters, hf_io.read_spec(base), os.path.join(out, sub), base,
                             card=_card(cfg, step, sub or adapter or ""))
      write_chat_stop(cfg, os.path.join(out, sub))
  return step


def export_merged(workdir: str, out: str, step: int | None = None, dtype: str | None = None,
                  adapter: str | None = None) -> int:
  """Writes full HF checkpoints: the base at model.path with the adapters merged in; returns
  the checkpoint step written."""
  cfg, each, step = read_workdir(workdir, step, adapter)
  if jax.process_index() == 0:
    tokenizer = (cfg.get("tokenizer") or {}).get("path") or cfg["model"]["path"]
    for sub, adapters in each.items():
      merge_into(cfg["model"]["path"], adapters, os.path.join(out, sub), dtype=dtype,
                 tokenizer_path=tokenizer)
      write_chat_stop(cfg, os.path.join(out, sub))
  return step


def write_chat_stop(cfg: dict, out: str):
  """For messages data, the chat template's end-of-turn token (what training taught the model to
  stop with) joins eos in out/generation_config.json, so transformers' generate stops there too."""
  if (cfg.get("data") or {}).get("format") != "messages":
    return
  base = cfg["model"]["path"]
  eot = data.end_of_turn_id(data.load_tokenizer((cfg.get("tokenizer") or {}).get("path") or base))
  if eot is None:
    return
  path = os.path.join(out, "generation_config.json")
  source = path if os.path.isfile(path) else os.path.join(base, "generation_config.json")
  gen = {}
  if os.path.isfile(source):
    with open(source) as f:
      gen = json.load(f)
  eos = gen.get("eos_token_id", hf_io.read_config(base).get("eos_token_id"))
  eos = [] if eos is None else list(eos) if isinstance(eos, list) else [eos]
  gen["eos_token_id"] = eos + [eot] if eot not in eos else eos
  with open(path, "w") as f:
    json.dump(gen, f, indent=2)


# ----------------------------------------------------------------------------- merging


def _write_safetensors(path: str, tensors: list[tuple[str, np.dtype, tuple, callable]]) -> int:
  """Streams a safetensors file: (name, dtype, shape, produce) -> bytes, one tensor in memory at
  a time. Returns the size of the tensor data."""
  header, offset = {"__metadata__": {"format": "pt"}}, 0
  for name, dtype, shape, _ in tensors:
    size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    header[name] = {"dtype": _ST_NAMES[np.dtype(dtype)], "shape": list(shape),
                    "data_offsets": [offset, offset + size]}
    offset += size
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # as safetensors does: data starts 8-byte aligned
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)) + blob)
    for name, dtype, shape, produce in tensors:
      x = np.ascontiguousarray(produce(), dtype=dtype)
      assert x.shape == tuple(shape), (name, x.shape, shape)
      f.write(x.tobytes())
  return offset


def merge_into(base_path: str, adapters: Adapters, out: str, dtype: str | None = None,
               tokenizer_path: str | None = None):
  """base (16-bit safetensors) + adapters -> a merged checkpoint dir `out`.

  dtype: None keeps every tensor's dtype; else floating tensors are cast to it and config.json's
  dtype says so. The merge itself is float32: W + scale * (a @ b).T per layer.
  """
  if dtype is not None and dtype not in DTYPES:
    raise UserError(f"--dtype={dtype!r}: use one of {list(DTYPES)}")
  config = hf_io.read_config(base_path)
  if config.get("quantization_config"):
    raise UserError(f"{os.path.join(base_path, 'config.json')}: a pre-quantized checkpoint; "
                    "merging needs the 16-bit base weights")
  spec = hf_io.read_spec(base_path)
  peft_io.check_adapters(adapters, spec, "the workdir's adapters")
  if os.path.abspath(out) == os.path.abspath(base_path):
    raise UserError(f"--out={out}: is the base model directory; choose another")
  where = hf_io.open_checkpoint(base_path)

  # Where each merge goes, and the factors as float32 numpy (small: the adapters are tiny).
  factors = {name: tuple(np.asarray(ab[f], np.float32) for f in ("a", "b"))
             for name, ab in adapters.params.items()}
  merges = {f"model.layers.{i}.{hf_io.HF_MODULE[name]}.weight": (name, i)
            for name in factors for i in range(spec.n_layers)}
  for key, (name, _) in merges.items():
    d_in, d_out = spec.projection_shape(name)
    if key not in where or tuple(where[key].shape(key)) != (d_out, d_in):
      raise UserError(f"{base_path}: tensor {key} is missing or not shaped [{d_out}, {d_in}]")
  scale = np.float32(adapters.scale)
  out_dtype = DTYPES[dtype] if dtype else None

  def produce(st, key, target):
    def f():
      x = st.get(key)  # a memory-mapped view: only this tensor is read
      if key not in merges:
        return np.asarray(x, target)
      name, i = merges[key]
      a, b = factors[name]
      return (np.asarray(x, np.float32) + scale * (a[i] @ b[i]).T).astype(target)
    return f

  os.makedirs(out, exist_ok=True)
  by_file = {}
  for key, st in where.items():
    by_file.setdefault(st.path, []).append(key)
  weight_map, total = {}, 0
  for src in sorted(by_file):
    fname = os.path.basename(src)
    if fname.endswith(".gguf"):  # a GGUF base: its tensors go to one safetensors file
      fname = "model.safetensors"
    entries = []
    for key in by_file[src]:
      st = where[key]
      src_dtype = st.get(key).dtype  # a lazy view: reads nothing
      floating = np.issubdtype(src_dtype, np.floating) or src_dtype == ml_dtypes.bfloat16
      target = out_dtype if out_dtype is not None and floating else src_dtype
      entries.append((key, target, st.shape(key), produce(st, key, target)))
      weight_map[key] = fname
    total += _write_safetensors(os.path.join(out, fname), entries)
  with open(os.path.join(out, _INDEX), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
              f, indent=2)

  if dtype is not None:  # transformers 5 writes "dtype", 4 "torch_dtype"
    keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]
    for k in keys:
      config[k] = dtype
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  copies = [(os.path.join(base_path, "generation_config.json"), "generation_config.json")]
  tokenizer_path = tokenizer_path or base_path
  if gguf_io.find(tokenizer_path):  # converted from the GGUF's vocabulary by transformers
    if gguf_io.has_tokenizer(gguf_io.find(tokenizer_path)):
      data.load_tokenizer(tokenizer_path).hf.save_pretrained(out)
  elif os.path.isfile(tokenizer_path):  # tokenizer.path may name a sentencepiece .model file
    copies.append((tokenizer_path, "tokenizer.model"))
  else:
    copies += [(os.path.join(tokenizer_path, name), name) for name in TOKENIZER_FILES]
  for src, name in copies:
    if os.path.isfile(src):
      shutil.copyfile(src, os.path.join(out, name))


# ----------------------------------------------------------------------------- CLI


def main(argv):
  from absl import logging
  logging.set_verbosity(logging.ERROR)  # orbax logs every file it reads at INFO, and warns on reads
  from absl import flags

  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}")
  f = flags.FLAGS
  if f.format not in FORMATS:
    raise UserError(f"--format={f.format!r}: use {', '.join(FORMATS)}")
  if (f.gguf_type or f.base_gguf) and not f.format.startswith("gguf"):
    raise UserError("--gguf_type and --base_gguf apply to --format=gguf or gguf_lora only")
  if f.format.startswith("gguf"):
    cfg, each, step = read_workdir(f.workdir, f.step, f.adapter)
    if jax.process_index() == 0:
      gguf_export.export(cfg, each, f.out, f.format, f.gguf_type or "f16", f.base_gguf)
  elif f.format == "peft":
    if f.dtype:
      raise UserError("--dtype applies to --format=merged only (PEFT adapters stay float32)")
    step = export_peft(f.workdir, f.out, f.step, f.adapter)
  else:
    step = export_merged(f.workdir, f.out, f.step, f.dtype, f.adapter)
  if jax.process_index() == 0:
    print(f"wrote {f.format} export of {f.workdir} (checkpoint step {step}) to {f.out}")


if __name__ == "__main__":
  from absl import app, flags

  from ftjax.errors import parse_flags, run_cli

  flags.DEFINE_string("workdir", None, "Training workdir (its config.json and checkpoints).",
                      required=True)
  flags.DEFINE_string("format", "peft", "peft (adapter dir) or merged (full HF checkpoint).")
  flags.DEFINE_string("out", None, "Output directory.", required=True)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_string("adapter", None, "One adapter of a workdir of several (data.train's "
                      "source name); default: all of them, one directory each under --out.")
  flags.DEFINE_string("dtype", None, "merged only: bfloat16, float16 or float32 (default: the "
                      "base checkpoint's).")
  flags.DEFINE_string("gguf_type", None, "gguf/gguf_lora: the model file's tensor type, f16 "
                      "(default), bf16, f32 or q8_0 (k-quants: llama.cpp's llama-quantize).")
  flags.DEFINE_string("base_gguf", None, "gguf_lora: the base GGUF the Modelfile names (default: "
                      "the base written beside the adapters).")
  app.run(run_cli(main), flags_parser=parse_flags)
