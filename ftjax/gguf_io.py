"""GGUF checkpoints in (llama.cpp's format, read with its own `gguf` package).

A `.gguf` file (or a directory holding exactly one and no config.json) stands where a Hugging Face
directory would: `read_config` turns its metadata into the config.json dict transformers would
write, and `open_checkpoint` gives its tensors under their Hugging Face names, with the same
`shape(name)` / `get(name)` interface as hf_io's safetensors files, so hf_io loads, shards and
quantizes them exactly as it does safetensors. The model never knows about GGUF.

`get(name)` is lazy and row-addressable: a slice reads (and dequantizes, for Q8_0, Q4_K, ...) only
the rows it covers from the memory-mapped file, since llama.cpp's blocks run along a row. So a
tensor is dequantized when its layer is placed, one at a time, and on a multi-host mesh each host
reads only its devices' rows. What llama.cpp's converter did to the weights is undone here: the
Q/K row permutation of the Llama layout (rope pairs interleaved instead of split in halves) and
Gemma's norm weights stored plus one; Llama 3.1's rope scaling, which the converter stores as a
factor per frequency (`rope_freqs.weight`), becomes the llama3 rope_scaling transformers reads.
"""
import functools
import os

import gguf
import numpy as np

from ftjax.errors import UserError

# general.architecture -> transformers model_type (the archs whose llama.cpp layout ftjax maps).
ARCHS = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma", "gemma2": "gemma2",
         "gemma3": "gemma3_text"}

# llama.cpp tensor name (per layer: after `blk.{i}.`) -> Hugging Face module path.
_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
_LAYER = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
# Llama and Qwen norm the mlp input with `ffn_norm`; Gemma 2/3 have four norms a layer.
_LAYER_PLAIN = {"ffn_norm": "post_attention_layernorm"}
_LAYER_SANDWICH = {"post_attention_norm": "post_attention_layernorm",
                   "ffn_norm": "pre_feedforward_layernorm",
                   "post_ffw_norm": "post_feedforward_layernorm"}
# Consumed as metadata, not weights.
_METADATA_TENSORS = ("rope_freqs.weight",)


def name_table(arch: str, n_layers: int) -> dict[str, str]:
  """{llama.cpp tensor name: Hugging Face tensor name} for one GGUF architecture."""
  table = dict(_GLOBAL)
  layer = dict(_LAYER, **(_LAYER_SANDWICH if arch in ("gemma2", "gemma3") else _LAYER_PLAIN))
  for i in range(n_layers):
    for g, h in layer.items():
      for kind in ("weight", "bias"):
        table[f"blk.{i}.{g}.{kind}"] = f"model.layers.{i}.{h}.{kind}"
  return table


def find(path: str) -> str | None:
  """The GGUF file `path` names: itself, or the one `.gguf` in a directory without config.json."""
  if os.path.isfile(path):
    return path if path.endswith(".gguf") else None
  if not os.path.isdir(path) or os.path.exists(os.path.join(path, "config.json")):
    return None
  files = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
  if len(files) > 1:
    raise UserError(f"{path}: holds {len(files)} GGUF files ({', '.join(files[:3])}); point "
                    "model.path at one of them")
  return os.path.join(path, files[0]) if files else None


class _Reader(gguf.GGUFReader):
  """llama.cpp's reader, saying where a file ends too early: in which tensor's bytes, or after
  which metadata key (its own errors there are numpy's reshape and index errors)."""

  def __init__(self, path: str):
    self.fields = {}
    try:
      super().__init__(path)
    except (ValueError, IndexError, KeyError, TypeError) as e:
      if isinstance(e, _Truncated):
        raise
      keys = [k for k in self.fields if not k.startswith("GGUF.")]
      count = self.fields.get("GGUF.kv_count")
      if count is not None and keys and len(keys) == int(count.parts[0][0]):
        raise _Truncated("in its tensor list (after every metadata key)") from None
      where = f"after metadata key {keys[-1]!r}" if keys else "in its header"
      raise _Truncated(f"{where} ({str(e)[:80]})") from None

  def _build_tensors(self, start_offs, fields):
    for field in fields:
      name = bytes(field.parts[1]).decode("utf-8", "replace")
      try:
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(int(field.parts[4][0]))]
      except (ValueError, KeyError):
        continue  # a type gguf does not know: said when the tensor is read
      end = int(start_offs + field.parts[5][0]) + int(np.prod(field.parts[3])) * size // block
      if end > len(self.data):
        raise _Truncated(f"at tensor {name} (its bytes end at {end}, the file at {len(self.data)})")
    super()._build_tensors(start_offs, fields)


class _Truncated(ValueError):
  pass


@functools.lru_cache(maxsize=4)
def _reader(path: str, mtime: float) -> gguf.GGUFReader:
  del mtime  # part of the cache key only: a rewritten file is read again
  try:
    return _Reader(path)
  except OSError as e:
    raise UserError(f"{path}: cannot read it ({e.strerror or e})") from None
  except _Truncated as e:
    raise UserError(f"{path}: not a valid GGUF file or truncated {e}; re-download it") from None


def reader(path: str) -> gguf.GGUFReader:
  return _reader(path, os.path.getmtime(path))


def has_tokenizer(path: str) -> bool:
  """Whether the GGUF carries a vocabulary (llama.cpp's converter always writes one)."""
  return "tokenizer.ggml.tokens" in reader(path).fields


def _field(r, path, key, default=KeyError):
  f = r.fields.get(key)
  if f is None:
    if default is KeyError:
      raise UserError(f"{path}: GGUF metadata key {key!r} is missing")
    return default
  value = f.contents()
  return value


def read_config(path: str) -> dict:
  """The config.json dict transformers would write for this GGUF (its model_type, sizes, rope,
  eos), from llama.cpp's metadata keys."""
  r = reader(path)
  arch = _field(r, path, "general.architecture")
  if arch not in ARCHS:
    raise UserError(f"{path}: general.architecture {arch!r} is not supported; supported GGUF "
                    f"architectures: {', '.join(ARCHS)}")
  a = lambda key, default=KeyError: _field(r, path, f"{arch}.{key}", default)
  names = {t.name for t in r.tensors}
  heads, dim = int(a("attention.head_count")), int(a("embedding_length"))
  vocab = a("vocab_size", None)
  if vocab is None:  # older converters: the vocabulary's length, or the embedding's rows
    tokens = r.fields.get("tokenizer.ggml.tokens")
    vocab = len(tokens.data) if tokens else int(r.get_tensor(
        [t.name for t in r.tensors].index("token_embd.weight")).shape[1])
  model_type = ARCHS[arch]
  if arch == "llama" and "mistral" in str(_field(r, path, "general.name", "")).lower():
    model_type = "mistral"  # llama.cpp writes Mistral as llama; transformers tells them by name
  head_dim = int(a("attention.key_length", 0) or a("rope.dimension_count", 0) or dim // heads)
  cfg = {
      "model_type": model_type, "hidden_size": dim, "num_hidden_layers": int(a("block_count")),
      "num_attention_heads": heads, "num_key_value_heads": int(a("attention.head_count_kv", heads)),
      "head_dim": head_dim, "intermediate_size": int(a("feed_forward_length")),
      "vocab_size": int(vocab), "rms_norm_eps": float(a("attention.layer_norm_rms_epsilon", 1e-6)),
      "rope_theta": float(a("rope.freq_base", 10000.0)),
      "max_position_embeddings": int(a("context_length", 2048)),
      "tie_word_embeddings": "output.weight" not in names,
  }
  for key, hf in (("eos_token_id", "eos_token_id"), ("bos_token_id", "bos_token_id")):
    value = _field(r, path, f"tokenizer.ggml.{key}", None)
    if value is not None:
      cfg[hf] = int(value)
  scaling = a("rope.scaling.type", None)
  if scaling == "linear":
    cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(a("rope.scaling.factor"))}
  elif scaling not in (None, "none"):
    raise UserError(f"{path}: {arch}.rope.scaling.type {scaling!r} is not supported (linear)")
  if "rope_freqs.weight" in names:
    if scaling not in (None, "none"):
      raise UserError(f"{path}: tensor rope_freqs.weight and {arch}.rope.scaling.type {scaling!r} "
                      "both scale the rope; expected one")
    factors = np.asarray(next(t for t in r.tensors if t.name == "rope_freqs.weight").data,
                         np.float64).reshape(-1)
    rotary = int(a("rope.dimension_count", 0) or head_dim)
    scaling = llama3_rope(factors, cfg["rope_theta"], rotary, f"{path}: tensor rope_freqs.weight")
    if scaling:
      cfg["rope_scaling"] = scaling
  if arch.startswith("gemma"):
    cfg["hidden_activation"] = "gelu_pytorch_tanh"
  if arch in ("gemma2", "gemma3"):
    # llama.cpp scales queries by key_length ** -0.5 (transformers: query_pre_attn_scalar).
    cfg["query_pre_attn_scalar"] = head_dim
    cfg["sliding_window"] = int(a("attention.sliding_window", 4096))
  if arch == "gemma2":
    cfg["attn_logit_softcapping"] = float(a("attn_logit_softcapping", 50.0))
    cfg["final_logit_softcapping"] = float(a("final_logit_softcapping", 30.0))
  if arch == "gemma3":
    cfg["rope_local_base_freq"] = 10000.0  # fixed in llama.cpp's gemma3, as in transformers
    cfg["sliding_window_pattern"] = 6
  return cfg


def llama3_factors(theta: float, rotary_dim: int, factor: float, low: float, high: float,
                   original: int) -> np.ndarray:
  """What each rotary frequency is divided by under transformers' llama3 rope (float64)."""
  inv = 1.0 / theta ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)
  wavelen = 2 * np.pi / inv
  smooth = (original / wavelen - low) / (high - low)
  medium = 1 / ((1 - smooth) / factor + smooth)
  return np.where(wavelen < original / high, 1.0,
                  np.where(wavelen > original / low, factor, medium))


def llama3_rope(factors: np.ndarray, theta: float, rotary_dim: int, where: str) -> dict | None:
  """config.json's llama3 rope_scaling reproducing llama.cpp's per-frequency rope factors (its
  converter writes them for Llama 3.1-style models), or None when they are all 1.

  Only the wavelength bounds original / low and original / high matter, so `original` is fixed at
  Llama 3's 8192: factors 1 below the high bound, `factor` above the low one, and between them
  1 / f = (1 - s) / factor + s with s linear in 1 / wavelength, fitted to the medium factors."""
  if len(factors) != rotary_dim // 2 or not np.all(np.isfinite(factors)) or factors.min() <= 0:
    raise UserError(f"{where}: {len(factors)} factors for {rotary_dim // 2} rotary frequencies, or "
                    "not all positive and finite")
  factor = float(factors.max())
  if np.allclose(factors, 1.0, rtol=0, atol=1e-6):
    return None
  original = 8192
  wavelen = 2 * np.pi * theta ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)
  is_high, is_low = np.isclose(factors, 1.0, atol=1e-6), np.isclose(factors, factor, rtol=1e-6)
  medium = ~is_high & ~is_low
  # bounds (high_w, low_w) on wavelength: wavelen < high_w -> 1; wavelen > low_w -> factor
  last_high = wavelen[is_high].max() if is_high.any() else 0.0
  first_low = wavelen[is_low].min()
  s = (1 / factors - 1 / factor) / (1 - 1 / factor)  # 0 at the low bound, 1 at the high one
  if medium.sum() >= 2:  # s = a / wavelen + b
    a, b = np.polyfit(1 / wavelen[medium], s[medium], 1)
    low_w, high_w = -a / b, a / (1 - b)
  elif medium.sum() == 1:  # low bound halfway (geometrically) to the next wavelength
    wm, sm = wavelen[medium][0], s[medium][0]
    low_w = np.sqrt(wm * first_low)
    high_w = 1 / (1 / low_w + (1 / wm - 1 / low_w) / sm)
  else:
    high_w = np.sqrt(last_high * first_low) if last_high else first_low / 2
    low_w = (high_w + first_low) / 2
  # Llama 3.1's 1.0 and 4.0 written as such when they reproduce the float32 factors; else as fitted
  for digits, rtol in ((6, 1e-6), (17, 1e-4)):
    low, high = (float(f"{original / x:.{digits}g}") for x in (low_w, high_w))
    got = llama3_factors(theta, rotary_dim, factor, low, high, original)
    if np.allclose(got, factors, rtol=rtol, atol=0):
      return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
              "high_freq_factor": high, "original_max_position_embeddings": original}
  raise UserError(f"{where}: the factors are not a llama3 rope scaling (Llama 3.1's), the only "
                  "kind ftjax maps")


class _Rows:
  """A lazy [rows, cols] (or [n]) view of one GGUF tensor in Hugging Face layout: indexing reads and
  dequantizes only the rows asked for, `src[row]` being the stored row of each; `offset` is added
  (Gemma's norms are stored plus one)."""

  def __init__(self, tensor, shape, src=None, offset=0.0):
    self.tensor, self.shape, self.src, self.offset = tensor, tuple(shape), src, offset
    self.ndim = len(self.shape)
    self.dtype = np.dtype(np.float32)  # what indexing returns, whatever the stored type

  @property
  def T(self):  # pylint: disable=invalid-name
    return _Transposed(self)

  def __getitem__(self, idx):
    idx = idx if isinstance(idx, tuple) else (idx,)
    rows = idx[0] if idx else slice(None)
    if self.src is not None:
      rows = self.src[rows]
    raw = self.tensor.data[rows]
    try:
      values = gguf.quants.dequantize(raw, self.tensor.tensor_type).astype(np.float32)
    except NotImplementedError:
      raise UserError(f"tensor {self.tensor.name} has GGUF type {self.tensor.tensor_type.name}, "
                      "which ftjax cannot dequantize") from None
    values = values.reshape((-1,) + self.shape[1:])[(slice(None),) + tuple(idx[1:])]
    return values - np.float32(self.offset) if self.offset else values

  def __array__(self, dtype=None, copy=None):
    del copy
    out = self[:]
    return out if dtype is None else out.astype(dtype)


class _Transposed:
  def __init__(self, base):
    self.base, self.shape = base, base.shape[::-1]

  def __getitem__(self, idx):
    idx = idx if isinstance(idx, tuple) else (idx,)
    return self.base[tuple(idx[::-1])].T


def _unpermute_rows(n_rows: int, n_head: int) -> np.ndarray:
  """src[j]: the stored row of Hugging Face row j of a Q or K weight, undoing llama.cpp's
  `permute` (its convert_hf_to_gguf.py: reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2))."""
  stored = np.arange(n_rows).reshape(n_head, 2, n_rows // n_head // 2).swapaxes(1, 2).reshape(-1)
  return np.argsort(stored)


class GGUFTensors:
  """One GGUF file's tensors under their Hugging Face names (hf_io.SafetensorsFile's interface)."""

  def __init__(self, path: str):
    self.path = path
    r = reader(path)
    cfg = read_config(path)
    arch = _field(r, path, "general.architecture")
    table = name_table(arch, cfg["num_hidden_layers"])
    by_name = {t.name: t for t in r.tensors}
    self._tensors = {}
    checked = set()
    for name, t in by_name.items():
      if name in _METADATA_TENSORS:
        continue
      qtype = t.tensor_type
      if qtype not in checked:  # one block of zeros tells whether gguf can dequantize this type
        block, nbytes = gguf.GGML_QUANT_SIZES.get(qtype, (1, 0))
        try:
          gguf.quants.dequantize(np.zeros((1, nbytes), np.uint8), qtype)
        except (NotImplementedError, ValueError, KeyError):
          raise UserError(f"{path}: tensor {name} has GGUF type {qtype.name}, which ftjax cannot "
                          "read; re-quantize the model to F16, Q8_0 or a k-quant") from None
        checked.add(qtype)
      hf = table.get(name, name)
      shape = tuple(int(d) for d in reversed(t.shape))
      src = None
      if arch == "llama" and name.endswith((".attn_q.weight", ".attn_k.weight")):
        heads = cfg["num_attention_heads"] if ".attn_q." in name else cfg["num_key_value_heads"]
        src = _unpermute_rows(shape[0], heads)
      offset = 1.0 if arch.startswith("gemma") and name.endswith("norm.weight") else 0.0
      self._tensors[hf] = _Rows(t, shape, src, offset)
    self.tensors = self._tensors

  def shape(self, name):
    return self._tensors[name].shape

  def get(self, name):
    return self._tensors[name]


def open_checkpoint(path: str) -> dict:
  """{Hugging Face tensor name: the GGUFTensors holding it}, as hf_io.open_checkpoint returns."""
  tensors = GGUFTensors(path)
  return {name: tensors for name in tensors.tensors}
