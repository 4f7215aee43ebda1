"""python -m ftjax.export --workdir=DIR --format=peft|merged|gguf|gguf_lora --out=DIR [--step=N]
                        [--dtype=D] [--adapter=NAME] [--overwrite] [--gguf_type=f16] [--base_gguf=FILE]

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

--out is new or empty, or an earlier export's directory: every export records the files it wrote
in --out/ftjax_export.json (MANIFEST) and removes them before writing again, so a merged export
never leaves a PEFT adapter_config.json beside its weights (transformers would load both). A
directory holding anything else is refused, unless --overwrite (which empties it first); a
training workdir, or a directory holding the workdir or the base, is refused even then.
"""
import json
import os
import shutil
import struct
import tempfile

import jax
import ml_dtypes
import numpy as np

from ftjax import ckpt, data, gguf_export, gguf_io, hf_io, lora, moe, peft_io
from ftjax.errors import UserError
from ftjax.lora import Adapters

FORMATS = ("peft", "merged", "gguf", "gguf_lora")
DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "chat_template.jinja", "chat_template.json", "vocab.json",
                   "merges.txt", "added_tokens.json")
_ST_NAMES = {np.dtype(v): k for k, v in hf_io._ST_DTYPES.items()}  # numpy dtype -> "BF16", ...
_INDEX = "model.safetensors.index.json"
MANIFEST = "ftjax_export.json"


def read_workdir(workdir: str, step: int | None = None,
                 adapter: str | None = None) -> tuple[dict, dict, int]:
  """(the resolved training config, {out subdirectory: Adapters} of the latest or given
  checkpoint, its step): {"": adapters} for one adapter (or --adapter), else {name: adapters}."""
  cfg = _read_config(os.path.join(workdir, "config.json"))
  step = ckpt.checkpoint_step(workdir, step)
  adapters, _ = ckpt.load_workdir_adapters(workdir, step, adapter)
  return cfg, ({"": adapters} if not adapters.stacked else lora.unstack(adapters)), step


def _card(cfg: dict, step: int, name: str) -> dict:
  train = (cfg.get("data") or {}).get("train", "")
  sources = data.parse_sources(train) if train else {}
  card = {"data": sources.get(name, train), "steps": step}
  return {"adapter": name, **card} if name and name in sources else card


def export_peft(workdir: str, out: str, step: int | None = None,
                adapter: str | None = None, overwrite: bool = False) -> tuple[int, list[str]]:
  """Writes the workdir's adapters as PEFT LoRA directories for the base at model.path; returns
  the checkpoint step written and the directories written (one per adapter)."""
  return _export("peft", workdir, out, step, adapter, None, overwrite)


def export_merged(workdir: str, out: str, step: int | None = None, dtype: str | None = None,
                  adapter: str | None = None, overwrite: bool = False) -> tuple[int, list[str]]:
  """Writes full HF checkpoints: the base at model.path with the adapters merged in; returns
  the checkpoint step written and the directories written (one per adapter)."""
  if dtype is not None and dtype not in DTYPES:
    raise UserError(f"--dtype={dtype!r}: use one of {list(DTYPES)}")
  return _export("merged", workdir, out, step, adapter, dtype, overwrite)


def _export(fmt, workdir, out, step, adapter, dtype, overwrite,
            gguf=("f16", None)) -> tuple[int, list[str]]:
  """Every format: checked, written beside --out, moved in whole (gguf: (type, base_gguf))."""
  cfg_path = os.path.join(workdir, "config.json")
  cfg = _read_config(cfg_path)
  base = cfg["model"]["path"]
  tokenizer = (cfg.get("tokenizer") or {}).get("path") or base
  prepare_out(out, {"the training workdir": workdir, "the base model": base,
                    "the tokenizer": tokenizer}, overwrite)  # before anything slow or written
  cfg, each, step = read_workdir(workdir, step, adapter)
  dirs = [os.path.join(out, sub) if sub else out for sub in each]
  if jax.process_index() != 0:
    return step, dirs
  # Written beside --out and moved in once complete: a failed export leaves --out as it was.
  parent = os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.export-", dir=parent)
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would become --out's own mode
  try:
    if fmt.startswith("gguf"):  # llama.cpp / Ollama files (ftjax/gguf_export.py)
      gguf_export.export(cfg, each, tmp, fmt, *gguf)
    for sub, adapters in (each.items() if not fmt.startswith("gguf") else ()):
      where = os.path.join(tmp, sub)
      if fmt == "peft":
        adapters = Adapters(adapters.params, adapters.rank, adapters.alpha, adapters.rslora,
                            float(cfg.get("lora", {}).get("dropout", 0.0)))
        peft_io.write_adapters(adapters, hf_io.read_spec(base), where, base,
                               card=_card(cfg, step, sub or adapter or ""))
      else:
        merge_into(base, adapters, where, dtype=dtype, tokenizer_path=tokenizer)
      write_chat_stop(cfg, where)
    write_manifest(tmp, {"format": fmt, "workdir": os.path.abspath(workdir), "step": step,
                         "adapters": [sub or adapter or ckpt.DEFAULT_ADAPTER for sub in each]})
    install(tmp, out, overwrite)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return step, dirs


# ----------------------------------------------------------------------------- where exports go


def _read_config(cfg_path: str) -> dict:
  if not os.path.isfile(cfg_path):
    raise UserError(f"{cfg_path}: not found; --workdir must be a training workdir")
  with open(cfg_path) as f:
    cfg = json.load(f)
  if not (cfg.get("model") or {}).get("path"):
    raise UserError(f"{cfg_path}: has no model.path (the base model the adapters were trained on)")
  return cfg


def _within(path: str, parent: str) -> bool:
  path, parent = os.path.realpath(path), os.path.realpath(parent)
  return path == parent or path.startswith(parent.rstrip(os.sep) + os.sep)


_LOOKED_AT = 2000  # entries of --out examined at most: an export dir holds a few dozen


def _entries(out: str) -> list[str]:
  """Paths under `out` (relative) of its files, symlinks and empty directories; at most
  _LOOKED_AT + 1 of them."""
  found = []
  for root, dirs, files in os.walk(out):
    rel = os.path.relpath(root, out)
    links = [d for d in dirs if os.path.islink(os.path.join(root, d))]
    found += [os.path.normpath(os.path.join(rel, n)) for n in files + links]
    if not files and not dirs and rel != ".":
      found.append(rel + os.sep)
    if len(found) > _LOOKED_AT:
      break
  return found


def _manifest(out: str) -> dict | None:
  try:
    with open(os.path.join(out, MANIFEST)) as f:
      manifest = json.load(f)
    return manifest if isinstance(manifest.get("files"), list) else None
  except (OSError, ValueError, AttributeError):
    return None


def prepare_out(out: str, protected: dict, overwrite: bool):
  """Refuses an --out the export must not write into; reads only. `protected`: {what: path} that
  --out must neither be nor hold (the workdir, the base model, its tokenizer)."""
  if os.path.exists(out) and not os.path.isdir(out):
    raise UserError(f"--out={out}: is a file; give a directory (new, or an earlier export's)")
  for what, path in protected.items():
    if path and os.path.exists(path) and _within(path, out):
      how = "is" if os.path.realpath(path) == os.path.realpath(out) else "holds"
      raise UserError(f"--out={out}: {how} {what} ({path}); an export never writes there: choose "
                      "a new directory")
  workdir = protected.get("the training workdir")
  if workdir and _within(out, workdir):
    raise UserError(f"--out={out}: is inside the training workdir {workdir}; an export never "
                    "writes into a workdir: choose a directory outside it")
  if not os.path.isdir(out):
    return
  entries = _entries(out)
  looks_trained = [e for e in entries if e.split(os.sep)[0] in ("checkpoints", "metrics.jsonl")
                   or ".git" in e.split(os.sep)]
  if looks_trained:
    raise UserError(f"--out={out}: holds {looks_trained[0]} (a training workdir or a git "
                    "repository); an export never writes there, --overwrite neither: choose a "
                    "new directory")
  if overwrite or not entries:
    if len(entries) > _LOOKED_AT:
      raise UserError(f"--out={out}: holds over {_LOOKED_AT} files, which is no export; "
                      "--overwrite empties only a directory of a few: choose a new directory")
    return
  owned = set((_manifest(out) or {}).get("files") or ()) | {MANIFEST}
  stray = sorted(e for e in entries if e not in owned)
  if stray:
    more = f" and {len(stray) - 1} more" if len(stray) > 1 else ""
    raise UserError(f"--out={out}: is not empty and holds files no export wrote ({stray[0]}"
                    f"{more}); choose a new directory, or --overwrite to replace it whole")


def install(tmp: str, out: str, overwrite: bool):
  """Moves a complete export from `tmp` into `out`, first removing what prepare_out allowed to be
  replaced: an earlier export's files (its manifest lists them), or with overwrite everything."""
  if not os.path.isdir(out):
    os.rename(tmp, out)
    return
  if overwrite:
    for name in os.listdir(out):
      path = os.path.join(out, name)
      if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
      else:
        os.remove(path)
  else:
    for rel in (_manifest(out) or {}).get("files", []) + [MANIFEST]:
      path = os.path.join(out, rel)
      if _within(path, out) and os.path.lexists(path) and not os.path.isdir(path):
        os.remove(path)
    for root, dirs, _ in os.walk(out, topdown=False):
      for d in dirs:
        try:
          os.rmdir(os.path.join(root, d))  # emptied adapter directories
        except OSError:
          pass
  for name in os.listdir(tmp):
    os.rename(os.path.join(tmp, name), os.path.join(out, name))


def write_manifest(out: str, info: dict):
  """out/MANIFEST: what this export is and every file it wrote, so that exporting again into the
  same directory may replace them (and only them)."""
  files = sorted(e for e in _entries(out) if e != MANIFEST)
  with open(os.path.join(out, MANIFEST), "w") as f:
    json.dump({**info, "files": files}, f, indent=2)


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


def _merge_targets(spec, factors) -> dict:
  """{checkpoint tensor: (projection, index into its factors, output columns)}: one per layer,
  and for experts one per layer, expert and file part (gate and up of the fused gate_up)."""
  merges = {}
  table = hf_io.key_table(spec)
  expert_entries = {e.projection: e for e in table if e.parts}
  # the router's file name is the architecture's (Mixtral: block_sparse_moe.gate), not HF_MODULE's
  files = {e.path[1]: e.hf for e in table if e.path == ("layers", moe.ROUTER, "kernel")}
  for name in factors:
    entry = expert_entries.get(name)
    for slot, i in enumerate(spec.layers_of(name)):  # factors[name][slot] is layer i's
      if entry is None:
        file = files.get(name, f"model.layers.{{i}}.{hf_io.HF_MODULE[name]}.weight")
        merges[file.format(i=i)] = (name, slot, slice(None))
        continue
      width = entry.shape[-1] // len(entry.parts)
      for e in range(entry.experts):
        for j, part in enumerate(entry.parts):
          merges[part.format(i=i, e=e)] = (name, (slot, e), slice(j * width, (j + 1) * width))
  return merges


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
  merges = _merge_targets(spec, factors)
  for key, (name, _, cols) in merges.items():
    d_in, d_out = spec.projection_shape(name)
    d_out = len(range(d_out)[cols])
    if key not in where or tuple(where[key].shape(key)) != (d_out, d_in):
      raise UserError(f"{base_path}: tensor {key} is missing or not shaped [{d_out}, {d_in}]")
  scale = np.float32(adapters.scale)
  out_dtype = DTYPES[dtype] if dtype else None

  def produce(st, key, target):
    def f():
      x = st.get(key)  # a memory-mapped view: only this tensor is read
      if key not in merges:
        return np.asarray(x, target)
      name, at, cols = merges[key]
      a, b = factors[name]
      return (np.asarray(x, np.float32) + scale * (a[at] @ b[at])[:, cols].T).astype(target)
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
    step, dirs = _export(f.format, f.workdir, f.out, f.step, f.adapter, None, f.overwrite,
                         gguf=(f.gguf_type or "f16", f.base_gguf))
  elif f.format == "peft":
    if f.dtype:
      raise UserError("--dtype applies to --format=merged only (PEFT adapters stay float32)")
    step, dirs = export_peft(f.workdir, f.out, f.step, f.adapter, f.overwrite)
  else:
    step, dirs = export_merged(f.workdir, f.out, f.step, f.dtype, f.adapter, f.overwrite)
  if jax.process_index() == 0:
    for where in dirs:
      name = os.path.basename(where) if len(dirs) > 1 else f.adapter
      print(f"wrote {f.format} export of {f.workdir}{f' adapter {name}' if name else ''} "
            f"(checkpoint step {step}) to {where}")

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
  flags.DEFINE_boolean("overwrite", False, "Empty a non-empty --out that no export wrote first "
                       "(never a workdir or a directory holding one).")
  flags.DEFINE_string("gguf_type", None, "gguf/gguf_lora: the model file's tensor type, f16 "
                      "(default), bf16, f32 or q8_0 (k-quants: llama.cpp's llama-quantize).")
  flags.DEFINE_string("base_gguf", None, "gguf_lora: the base GGUF the Modelfile names (default: "
                      "the base written beside the adapters).")
  app.run(run_cli(main), flags_parser=parse_flags)
