"""GGUF out: a workdir's adapters as files llama.cpp, Ollama and LM Studio load.

  gguf       the base merged with the adapter (W + scale * B A, in float32, from the 16-bit or
             GGUF base as export's `merged` is), one .gguf with the base's tokenizer, chat
             template and the end-of-turn stop, in f32 / f16 / bf16 / q8_0, plus an Ollama Modelfile.
  gguf_lora  the adapter alone as a llama.cpp LoRA GGUF (general.type=adapter, adapter.type=lora,
             adapter.lora.alpha; tensors `<llama.cpp name>.lora_a` [r, in] / `.lora_b` [out, r]),
             plus the base as a GGUF (or --base_gguf) and a Modelfile naming both.

What llama.cpp's converter does to Hugging Face weights is done here too: its tensor names
(gguf_io.name_table), the Q/K row permutation of the Llama layout (applied to LoRA B's rows, A is
unaffected), Gemma's norms stored plus one. llama.cpp scales a LoRA by alpha / rank with the rank
read from the tensors, so ftjax's effective scale (rsLoRA's alpha / sqrt(r) included) is written
as alpha = scale * rank. Tensors are produced and written one at a time (the writer's tensor
infos first, then each tensor's bytes), so host memory stays about one tensor.

The tokenizer comes from a GGUF base's own metadata (every tokenizer.* key copied), or from a
Hugging Face tokenizer.json as llama.cpp's converter writes it (ftjax/gguf_vocab.py). Llama 3.1's
rope scaling is written as llama.cpp's `rope_freqs.weight` (a factor per rotary frequency).
"""
import os

import gguf
import numpy as np

from ftjax import data, gguf_io, gguf_vocab, hf_io, peft_io
from ftjax.errors import UserError

GGUF_TYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
              "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}
_FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
               "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
# transformers model_type -> llama.cpp architecture (Mistral is written as llama, as its converter does)
_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma",
         "gemma2": "gemma2", "gemma3_text": "gemma3"}
_ROPE_FREQS = "rope_freqs.weight"  # llama.cpp's llama3 rope: a factor per rotary frequency
# Keys a merged file sets itself rather than copying from a GGUF base.
_OWN_KEYS = ("GGUF.", "general.file_type", "general.quantization_version", "general.architecture",
             "general.type", "general.alignment")


def _gguf_arch(spec, where: str) -> str:
  if spec.arch not in _ARCH:
    raise UserError(f"{where}: model_type {spec.arch} has no GGUF export (llama.cpp loads "
                    f"{', '.join(sorted(_ARCH))} as ftjax writes them)")
  return _ARCH[spec.arch]


def _to_gguf_names(arch: str, n_layers: int) -> dict[str, str]:
  return {hf: g for g, hf in gguf_io.name_table(arch, n_layers).items()}


def _converted(arch: str, spec, gname: str, x: np.ndarray) -> np.ndarray:
  """What llama.cpp's converter does to a float32 tensor in Hugging Face layout."""
  if arch == "llama" and gname.endswith((".attn_q.weight", ".attn_k.weight", ".attn_q.weight.lora_b",
                                         ".attn_k.weight.lora_b")):
    heads = spec.n_heads if ".attn_q." in gname else spec.n_kv_heads
    x = x.reshape(heads, 2, x.shape[0] // heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)
  if arch.startswith("gemma") and gname.endswith("norm.weight"):
    x = x + 1
  return x


def _tensor_type(shape, qtype):
  """The type a tensor is written in: 1-D tensors (norms, biases) stay F32 and rows that are not
  whole blocks fall back to F16, as llama.cpp's converter does."""
  if len(shape) == 1:
    return gguf.GGMLQuantizationType.F32
  if shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
    return gguf.GGMLQuantizationType.F16
  return qtype


def _encode(x: np.ndarray, qtype) -> np.ndarray:
  """x (float32) as the bytes (or typed array) of its GGUF type."""
  qtype = _tensor_type(x.shape, qtype)
  if qtype == gguf.GGMLQuantizationType.F32:
    return np.ascontiguousarray(x, np.float32)
  if qtype == gguf.GGMLQuantizationType.F16:
    return np.ascontiguousarray(x, np.float16)
  return gguf.quants.quantize(np.ascontiguousarray(x, np.float32), qtype)


def _metadata(w: gguf.GGUFWriter, base: str, tokenizer: str, cfg: dict, spec, eot: int | None):
  """The base GGUF's keys when it is one; else llama.cpp's hyperparameter keys from config.json
  and the tokenizer's keys. eot: the end of turn training taught (llama.cpp stops at it),
  replacing the base's."""
  src = gguf_io.find(base)
  if not src:
    w.add_name(os.path.basename(os.path.abspath(base)))
    w.add_block_count(spec.n_layers)
    w.add_context_length(int(cfg.get("max_position_embeddings", 2048)))
    w.add_embedding_length(spec.dim)
    w.add_feed_forward_length(spec.mlp_dim)
    w.add_head_count(spec.n_heads)
    w.add_head_count_kv(spec.n_kv_heads)
    w.add_layer_norm_rms_eps(spec.norm_eps)
    w.add_rope_freq_base(spec.rope.theta)
    w.add_vocab_size(spec.vocab)
    w.add_rope_dimension_count(spec.rotary_dim or spec.head_dim)
    w.add_key_length(spec.head_dim)
    w.add_value_length(spec.head_dim)
    if spec.rope.kind == "linear":
      w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
      w.add_rope_scaling_factor(spec.rope.factor)
    if spec.sliding_window:
      w.add_sliding_window(spec.sliding_window)
    if spec.attn_softcap:
      w.add_attn_logit_softcapping(spec.attn_softcap)
    if spec.final_softcap:
      w.add_final_logit_softcapping(spec.final_softcap)
    if not gguf_io.find(tokenizer):  # a Hugging Face tokenizer, as llama.cpp's converter writes it
      gguf_vocab.write(w, tokenizer, spec.vocab, eot)
      return
  # A GGUF base's keys (all of them), or a GGUF tokenizer.path's tokenizer keys.
  for key, field in gguf_io.reader(src or gguf_io.find(tokenizer)).fields.items():
    if key.startswith(_OWN_KEYS) or (eot is not None and key == gguf.Keys.Tokenizer.EOT_ID):
      continue
    if src or key.startswith("tokenizer."):
      sub = field.types[1] if len(field.types) > 1 else None
      w.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
  if eot is not None:
    w.add_eot_token_id(eot)


def _check_rope(arch: str, spec, where: str):
  if spec.rope.kind == "llama3" and arch != "llama":
    raise UserError(f"{where}: rope type llama3 on {spec.arch} has no GGUF export (llama.cpp reads "
                    "rope_freqs.weight for llama only)")
  if spec.rope.kind not in ("default", "linear", "llama3"):
    raise UserError(f"{where}: rope type {spec.rope.kind} has no GGUF export here; export "
                    "--format=merged and convert it with llama.cpp's convert_hf_to_gguf.py")


def write_merged(base: str, adapters, out_file: str, gguf_type: str = "f16", eot: int | None = None,
                 tokenizer: str | None = None):
  """base (HF dir or GGUF) + adapters (or None: the base alone) -> one GGUF file, streamed, with
  the tokenizer at `tokenizer` (default: the base's)."""
  if gguf_type not in GGUF_TYPES:
    raise UserError(f"--gguf_type={gguf_type!r}: use one of {', '.join(GGUF_TYPES)}")
  cfg, spec = hf_io.read_config(base), hf_io.read_spec(base)
  arch = _gguf_arch(spec, base)
  _check_rope(arch, spec, base)
  where = hf_io.open_checkpoint(base)
  names = _to_gguf_names(arch, spec.n_layers)
  if adapters is not None:
    peft_io.check_adapters(adapters, spec, "the workdir's adapters")
    factors = {n: tuple(np.asarray(ab[f], np.float32) for f in ("a", "b"))
               for n, ab in adapters.params.items()}
    merges = {f"model.layers.{i}.{hf_io.HF_MODULE[n]}.weight": (n, i)
              for n in factors for i in range(spec.n_layers)}
    scale = np.float32(adapters.scale)
  else:
    merges = {}
  qtype = GGUF_TYPES[gguf_type]

  def produce(hf_name):
    x = np.asarray(where[hf_name].get(hf_name), np.float32)
    if hf_name in merges:
      n, i = merges[hf_name]
      a, b = factors[n]
      x = x + scale * (a[i] @ b[i]).T
    return _encode(_converted(arch, spec, names[hf_name], x), qtype)

  os.makedirs(os.path.dirname(os.path.abspath(out_file)), exist_ok=True)
  w = gguf.GGUFWriter(out_file, arch)
  _metadata(w, base, tokenizer or base, cfg, spec, eot)
  w.add_type(gguf.GGUFType.MODEL)
  w.add_file_type(_FILE_TYPES[gguf_type])
  w.add_quantization_version(gguf.GGML_QUANT_VERSION)
  rope_freqs = None
  if spec.rope.kind == "llama3":  # llama.cpp's factors, first, as its converter writes them
    p = spec.rope
    rope_freqs = gguf_io.llama3_factors(p.theta, spec.rotary_dim or spec.head_dim, p.factor,
                                        p.low_freq_factor, p.high_freq_factor,
                                        p.original_max_position).astype(np.float32)
    w.add_tensor_info(_ROPE_FREQS, rope_freqs.shape, rope_freqs.dtype, rope_freqs.nbytes)
  order = [k for k in where if k in names and not (spec.tie_embeddings and k == "lm_head.weight")]
  for k in order:
    shape = tuple(where[k].shape(k))
    t = _tensor_type(shape, qtype)
    block, nbytes = gguf.GGML_QUANT_SIZES[t]
    size = int(np.prod(shape)) // block * nbytes
    dtype = {gguf.GGMLQuantizationType.F32: np.float32,
             gguf.GGMLQuantizationType.F16: np.float16}.get(t, np.uint8)
    byte_shape = shape if dtype is not np.uint8 else (*shape[:-1], shape[-1] // block * nbytes)
    w.add_tensor_info(names[k], byte_shape, np.dtype(dtype), size,
                      raw_dtype=t if dtype is np.uint8 else None)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_ti_data_to_file()
  if rope_freqs is not None:
    w.write_tensor_data(rope_freqs)
  for k in order:
    w.write_tensor_data(produce(k))
  w.close()


def write_lora(adapters, spec, out_file: str, where: str = "adapters"):
  """The adapter alone as a llama.cpp LoRA GGUF (float32 factors)."""
  arch = _gguf_arch(spec, where)
  names = _to_gguf_names(arch, spec.n_layers)
  w = gguf.GGUFWriter(out_file, arch)
  w.add_type(gguf.GGUFType.ADAPTER)
  w.add_string(gguf.Keys.Adapter.TYPE, "lora")
  # llama.cpp multiplies B A by alpha / rank (rank from the tensors): fold ftjax's scale in.
  w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(adapters.scale) * adapters.rank)
  for n, ab in sorted(adapters.params.items()):
    a, b = np.asarray(ab["a"], np.float32), np.asarray(ab["b"], np.float32)
    for i in range(spec.n_layers):
      g = names[f"model.layers.{i}.{hf_io.HF_MODULE[n]}.weight"]
      w.add_tensor(g + ".lora_a", np.ascontiguousarray(a[i].T))  # [r, in]
      w.add_tensor(g + ".lora_b", np.ascontiguousarray(_converted(arch, spec, g + ".lora_b",
                                                                  b[i].T)))  # [out, r]
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def write_modelfile(out_dir: str, model_file: str, adapter_file: str | None, stop: str | None):
  """An Ollama Modelfile: FROM the model (its chat template read from the GGUF), ADAPTER, stop."""
  lines = [f"FROM {_relative(model_file, out_dir)}"]
  if adapter_file:
    lines.append(f"ADAPTER {_relative(adapter_file, out_dir)}")
  if stop:
    lines.append(f'PARAMETER stop "{stop}"')
  with open(os.path.join(out_dir, "Modelfile"), "w") as f:
    f.write("\n".join(lines) + "\n")


def _relative(path: str, out_dir: str) -> str:
  rel = os.path.relpath(os.path.abspath(path), os.path.abspath(out_dir))
  return rel if rel.startswith("..") else "./" + rel


def _stop(cfg: dict) -> tuple[int | None, str | None]:
  """The chat template's end of turn (id, text) when the adapter was trained on messages."""
  if (cfg.get("data") or {}).get("format") != "messages":
    return None, None
  tok = data.load_tokenizer((cfg.get("tokenizer") or {}).get("path") or cfg["model"]["path"])
  eot = data.end_of_turn_id(tok)
  return (eot, tok.decode([eot])) if eot is not None else (None, None)


def export(cfg: dict, each: dict, out: str, fmt: str, gguf_type: str = "f16",
           base_gguf: str | None = None):
  """Writes --format=gguf or gguf_lora for export.read_workdir's {sub: Adapters}."""
  base = cfg["model"]["path"]
  tokenizer = (cfg.get("tokenizer") or {}).get("path") or base
  eot, stop = _stop(cfg)
  stem = os.path.splitext(os.path.basename(gguf_io.find(base) or base.rstrip("/")))[0]
  for sub, adapters in each.items():
    out_dir = os.path.join(out, sub)
    os.makedirs(out_dir, exist_ok=True)
    if fmt == "gguf":
      model_file = os.path.join(out_dir, f"model-{gguf_type}.gguf")
      write_merged(base, adapters, model_file, gguf_type, eot, tokenizer)
      write_modelfile(out_dir, model_file, None, stop)
      continue
    spec = hf_io.read_spec(base)
    lora_file = os.path.join(out_dir, "adapter.gguf")
    write_lora(adapters, spec, lora_file, base)
    model_file = base_gguf
    if model_file is None:  # the base once, beside the first adapter's directory
      model_file = os.path.join(out, f"{stem}-{gguf_type}.gguf")
      if not os.path.exists(model_file):
        write_merged(base, None, model_file, gguf_type, eot, tokenizer)
    elif not os.path.isfile(model_file):
      raise UserError(f"--base_gguf={model_file}: not a file")
    write_modelfile(out_dir, model_file, lora_file, stop)
