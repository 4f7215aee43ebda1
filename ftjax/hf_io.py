"""Hugging Face checkpoints in: config.json -> ModelSpec, safetensors -> the base pytree.

Shapes first (`abstract_params`), then shardings (`sharding.param_shardings`, which checks that every
parameter is covered), then fill: tensors are streamed one layer at a time from memory-mapped
safetensors files, each device's slice read by a `jax.make_array_from_callback` callback straight from
the file (the transpose from torch's (out, in) to (in, out) is a lazy view), cast, and written into
its slot of the stacked [L, ...] array (a donated in-place update). So on a multi-host mesh each host
reads only the bytes its devices hold. A quantized projection arrives the same way, one layer in the
model's dtype (16 bits for bfloat16; a float32 checkpoint is quantized from the bfloat16 values the
unquantized model would hold), and is quantized there by a jitted function, each device its own
slice (see `_load`): device memory peaks at the quantized model plus one 16-bit layer of one
tensor (and the quantizer's float32 temporaries of it), and the host never quantizes. Nothing is
unpickled: .bin / .pt checkpoints are refused.
"""
import dataclasses
import functools
import glob
import json
import os
import struct

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_dtypes
import numpy as np

from ftjax import gguf_io, quant as quant_lib, sharding as sharding_lib
from ftjax.errors import UserError
from ftjax.model import Model, ModelSpec, RopeSpec

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3",
             "mixtral", "qwen2_moe", "qwen3_moe")
MOE = ("mixtral", "qwen2_moe", "qwen3_moe")

# Where each projection lives under `model.layers.{i}.` (export writes the same module paths).
HF_MODULE = {
    "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj", "qkv_proj": "self_attn.qkv_proj", "gate_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj", "down_proj": "mlp.down_proj", "gate_up_proj": "mlp.gate_up_proj",
    # mixture of experts: transformers 5's in-memory module names (what PEFT's keys use)
    "experts.gate_up_proj": "mlp.experts", "experts.down_proj": "mlp.experts",
    "shared_expert.gate_proj": "mlp.shared_expert.gate_proj",
    "shared_expert.up_proj": "mlp.shared_expert.up_proj",
    "shared_expert.down_proj": "mlp.shared_expert.down_proj",
    "gate": "mlp.gate",  # the router, a LoRA target only when named (Mixtral's files: EXPERT_FILES)
}
# Checkpoint files keep one tensor per expert e; the fused gate_up kernel concatenates gate and up
# along its output, as transformers 5 does in memory. Mixtral's files use w1 (gate), w3 (up),
# w2 (down) under block_sparse_moe.
EXPERT_FILES = {
    "mixtral": {"experts.gate_up_proj": ("block_sparse_moe.experts.{e}.w1",
                                         "block_sparse_moe.experts.{e}.w3"),
                "experts.down_proj": ("block_sparse_moe.experts.{e}.w2",),
                "gate": "block_sparse_moe.gate"},
    "default": {"experts.gate_up_proj": ("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj"),
                "experts.down_proj": ("mlp.experts.{e}.down_proj",), "gate": "mlp.gate"},
}
NORM_MODULE = {
    "input_layernorm": "input_layernorm", "post_attention_layernorm": "post_attention_layernorm",
    "pre_feedforward_layernorm": "pre_feedforward_layernorm",
    "post_feedforward_layernorm": "post_feedforward_layernorm",
    "q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm",
}
DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}


# ----------------------------------------------------------------------------- config.json


def _rope(params: dict, where: str) -> RopeSpec:
  kind = params.get("rope_type", params.get("type", "default"))
  if kind not in ("default", "linear", "llama3"):
    raise UserError(f"{where}: rope type {kind!r} is not supported (default, linear, llama3)")
  return RopeSpec(
      theta=float(params.get("rope_theta", 10000.0)), kind=kind,
      factor=float(params.get("factor", 1.0)),
      low_freq_factor=float(params.get("low_freq_factor", 1.0)),
      high_freq_factor=float(params.get("high_freq_factor", 4.0)),
      original_max_position=int(params.get("original_max_position_embeddings", 8192)))


def _ropes(cfg: dict, where: str):
  """(global rope, local rope or None, partial rotary factor) from either config.json layout.

  transformers < 5: `rope_theta` + `rope_scaling` (+ Gemma 3's `rope_local_base_freq`).
  transformers 5: `rope_parameters`, per layer type for Gemma 3.
  """
  rp = cfg.get("rope_parameters")
  partial = cfg.get("partial_rotary_factor")
  if rp:
    if "full_attention" in rp or "sliding_attention" in rp:
      full = rp.get("full_attention") or rp.get("sliding_attention")
      local = rp.get("sliding_attention")
      partial = partial or full.get("partial_rotary_factor")
      return _rope(full, where), (_rope(local, where) if local else None), partial
    return _rope(rp, where), None, partial or rp.get("partial_rotary_factor")
  scaling = dict(cfg.get("rope_scaling") or {})
  scaling["rope_theta"] = cfg.get("rope_theta", 10000.0)
  local = None
  if "rope_local_base_freq" in cfg:
    local = RopeSpec(theta=float(cfg["rope_local_base_freq"]))
  return _rope(scaling, where), local, partial


def _layer_sliding(cfg: dict, arch: str, n_layers: int) -> tuple[bool, ...]:
  if cfg.get("layer_types"):
    return tuple(t == "sliding_attention" for t in cfg["layer_types"])
  window = cfg.get("sliding_window")
  if not window:
    return (False,) * n_layers
  if arch == "gemma2":
    return tuple(i % 2 == 0 for i in range(n_layers))
  if arch == "gemma3_text":
    pattern = cfg.get("sliding_window_pattern", 6)
    return tuple((i + 1) % pattern != 0 for i in range(n_layers))
  if arch == "qwen2":
    on, start = cfg.get("use_sliding_window", False), cfg.get("max_window_layers", 0)
    return tuple(bool(on) and i >= start for i in range(n_layers))
  return (True,) * n_layers  # Mistral, Phi-3: every layer


def spec_from_config(cfg: dict, where: str = "config.json") -> ModelSpec:
  """Parses a transformers config.json dict into a ModelSpec."""
  arch = cfg.get("model_type")
  if arch not in SUPPORTED:
    hint = " (for Gemma 3 use the text-only checkpoint, model_type gemma3_text)" if arch == "gemma3" else ""
    raise UserError(f"{where}: model_type {arch!r} is not supported; supported: "
                    f"{', '.join(SUPPORTED)}{hint}")
  try:
    dim, n_heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    n_layers = int(cfg["num_hidden_layers"])
    head_dim = int(cfg.get("head_dim") or dim // n_heads)
    vocab, mlp_dim = int(cfg["vocab_size"]), int(cfg["intermediate_size"])
  except KeyError as e:
    raise UserError(f"{where}: missing key {e.args[0]!r}") from None
  except (TypeError, ValueError) as e:
    raise UserError(f"{where}: a size field is not an integer ({e})") from None
  gemma = arch.startswith("gemma")
  rope, rope_local, partial = _ropes(cfg, where)
  act_name = cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu"
  act = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
         "gelu_tanh": "gelu_tanh", "gelu": "gelu"}.get(act_name)
  if act is None:
    raise UserError(f"{where}: activation {act_name!r} is not supported")
  sliding = _layer_sliding(cfg, arch, n_layers)
  if len(sliding) != n_layers:
    raise UserError(f"{where}: layer_types has {len(sliding)} entries for {n_layers} layers")
  eos = cfg.get("eos_token_id")
  eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
  qps = cfg.get("query_pre_attn_scalar") if arch in ("gemma2", "gemma3_text") else None
  moe = _moe_fields(cfg, arch, n_layers, where) if arch in MOE else {}
  return ModelSpec(
      arch=arch, vocab=vocab, dim=dim, n_layers=n_layers, n_heads=n_heads,
      n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads), head_dim=head_dim,
      mlp_dim=mlp_dim, norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), act=act, rope=rope,
      rope_local=rope_local, rotary_dim=int(head_dim * partial) if partial else None,
      qkv_bias=arch in ("qwen2", "qwen2_moe"), qk_norm=arch in ("qwen3", "gemma3_text", "qwen3_moe"),
      norm_plus_one=gemma,
      embed_scale=gemma, sandwich_norm=arch in ("gemma2", "gemma3_text"),
      sliding_window=cfg.get("sliding_window") if any(sliding) else None, layer_sliding=sliding,
      attn_softcap=cfg.get("attn_logit_softcapping") if arch == "gemma2" else None,
      final_softcap=cfg.get("final_logit_softcapping") if arch == "gemma2" else None,
      query_scale=float(qps) ** -0.5 if qps else None,
      tie_embeddings=bool(cfg.get("tie_word_embeddings", gemma)),
      fused_projections=arch == "phi3", eos_ids=eos_ids, **moe)


def _moe_fields(cfg: dict, arch: str, n_layers: int, where: str) -> dict:
  """ModelSpec's expert fields from a Mixtral / Qwen2-MoE / Qwen3-MoE config.json."""
  n_experts = cfg.get("num_local_experts") if arch == "mixtral" else (
      cfg.get("num_experts", cfg.get("num_local_experts")))
  top_k = cfg.get("num_experts_per_tok")
  for key, value in (("num_experts", n_experts), ("num_experts_per_tok", top_k)):
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
      raise UserError(f"{where}: {key}={value!r} must be a positive integer for {arch}")
  if top_k > n_experts:
    raise UserError(f"{where}: num_experts_per_tok={top_k} exceeds the {n_experts} experts")
  dense = _dense_mlp_layers(cfg, n_layers, where) if arch != "mixtral" else ()
  try:
    expert_dim = int(cfg["intermediate_size"] if arch == "mixtral" else
                     cfg["moe_intermediate_size"])
    shared = int(cfg.get("shared_expert_intermediate_size") or 0) if arch == "qwen2_moe" else 0
  except KeyError as e:
    raise UserError(f"{where}: missing key {e.args[0]!r}") from None
  return dict(n_experts=n_experts, top_k=top_k, expert_dim=expert_dim, shared_expert_dim=shared,
              norm_topk=arch == "mixtral" or bool(cfg.get("norm_topk_prob", False)),
              dense_mlp_layers=dense)


def _dense_mlp_layers(cfg: dict, n_layers: int, where: str) -> tuple[int, ...]:
  """Qwen2/3-MoE's dense-MLP layers, as transformers picks them: layer i is a MoE unless it is in
  mlp_only_layers or (i + 1) is not a multiple of decoder_sparse_step."""
  step, only = cfg.get("decoder_sparse_step", 1), cfg.get("mlp_only_layers") or []
  if not isinstance(step, int) or isinstance(step, bool) or step <= 0:
    raise UserError(f"{where}: decoder_sparse_step={step!r} must be a positive integer")
  if not isinstance(only, list) or any(not isinstance(i, int) or isinstance(i, bool)
                                       or not 0 <= i < n_layers for i in only):
    raise UserError(f"{where}: mlp_only_layers={only!r} must list layer indices in "
                    f"[0, {n_layers})")
  dense = tuple(i for i in range(n_layers) if i in only or (i + 1) % step)
  if len(dense) == n_layers:
    key = "mlp_only_layers" if set(only) == set(range(n_layers)) else "decoder_sparse_step"
    raise UserError(f"{where}: {key}={cfg.get(key)!r} leaves no layer a mixture of experts; "
                    "for a dense model use its dense model_type")
  return dense


def read_config(path: str) -> dict:
  gguf_file = gguf_io.find(path)
  if gguf_file:
    return gguf_io.read_config(gguf_file)
  if not os.path.isdir(path):
    raise UserError(f"model path {path!r} does not exist or is not a directory")
  cfg_path = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_path):
    raise UserError(f"{cfg_path}: not found (a Hugging Face model directory has a config.json)")
  cfg = _read_json(cfg_path)
  if not isinstance(cfg, dict):
    raise UserError(f"{cfg_path}: not a JSON object; re-download it")
  return cfg


def _read_json(path: str):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:  # ValueError: bad JSON or bad UTF-8
    raise UserError(f"{path}: cannot read it as JSON ({e}); re-download it") from None


def read_spec(path: str) -> ModelSpec:
  """The ModelSpec of a checkpoint directory, from config.json (and generation_config.json's eos)."""
  spec = spec_from_config(read_config(path), os.path.join(path, "config.json"))
  gen = os.path.join(path, "generation_config.json")
  if os.path.isfile(gen):
    gen_cfg = _read_json(gen)
    eos = gen_cfg.get("eos_token_id") if isinstance(gen_cfg, dict) else None
    extra = eos if isinstance(eos, list) else ([] if eos is None else [eos])
    ids = tuple(dict.fromkeys(list(spec.eos_ids) + [int(e) for e in extra]))
    spec = dataclasses.replace(spec, eos_ids=ids)
  return spec


# ----------------------------------------------------------------------------- safetensors

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
              "BOOL": np.bool_}


class SafetensorsFile:
  """A memory-mapped safetensors file: `get(name)` is a lazy numpy view, so slicing it reads only
  the bytes of that slice. The header is checked against the file size, so a truncated download
  fails here with its name instead of as garbage weights."""

  def __init__(self, path: str):
    self.path = path
    try:
      size = os.path.getsize(path)
      with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
          raise ValueError("header longer than the file")
        header = json.loads(f.read(n))
    except OSError as e:  # a directory, no read permission, an I/O error
      raise UserError(f"{path}: cannot read it ({e.strerror or e}); check that it is a readable "
                      "file") from None
    except (struct.error, ValueError, UnicodeDecodeError) as e:
      raise UserError(f"{path}: not a valid safetensors file ({e}); re-download or re-save it") from None
    if not isinstance(header, dict):
      raise UserError(f"{path}: not a valid safetensors file (header is not a JSON object); "
                      "re-download or re-save it")
    header.pop("__metadata__", None)
    self.start = 8 + n
    self.tensors = {}
    for name, info in header.items():
      try:
        begin, end = (int(x) for x in info["data_offsets"])
        shape = tuple(int(d) for d in info["shape"])
        dtype = info["dtype"]
      except (KeyError, TypeError, ValueError):
        raise UserError(f"{path}: not a valid safetensors file (tensor {name} lacks a valid "
                        "dtype, shape or data_offsets); re-download or re-save it") from None
      if self.start + end > size:
        raise UserError(f"{path}: truncated (tensor {name} ends at byte {self.start + end}, "
                        f"file has {size}); re-download or re-save it")
      if dtype not in _ST_DTYPES:
        raise UserError(f"{path}: tensor {name} has unsupported dtype {dtype}")
      nbytes = int(np.prod(shape)) * np.dtype(_ST_DTYPES[dtype]).itemsize
      if end - begin != nbytes:
        raise UserError(f"{path}: not a valid safetensors file (tensor {name}, {dtype} "
                        f"{list(shape)}, needs {nbytes} bytes but spans {end - begin}); "
                        "re-download or re-save it")
      self.tensors[name] = (dtype, shape, begin, end)
    self._mm = np.memmap(path, dtype=np.uint8, mode="r") if size else None

  def shape(self, name):
    return self.tensors[name][1]

  def get(self, name) -> np.ndarray:
    dtype, shape, begin, end = self.tensors[name]
    raw = self._mm[self.start + begin:self.start + end]
    return raw.view(_ST_DTYPES[dtype]).reshape(shape)


def open_checkpoint(path: str) -> dict[str, SafetensorsFile]:
  """{tensor name: file holding it} for a single-file or sharded (index.json) checkpoint, or a
  GGUF file (or a directory holding one), its tensors under their Hugging Face names."""
  gguf_file = gguf_io.find(path)
  if gguf_file:
    return gguf_io.open_checkpoint(gguf_file)
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(index):
    weight_map = _read_json(index)
    if not isinstance(weight_map, dict) or not isinstance(weight_map.get("weight_map"), dict):
      raise UserError(f"{index}: has no \"weight_map\" object; re-download it")
    weight_map = weight_map["weight_map"]
    files = {}
    for fname in sorted(set(weight_map.values())):
      fpath = os.path.join(path, fname)
      if not os.path.isfile(fpath):
        raise UserError(f"{fpath}: listed in {index} but missing")
      files[fname] = SafetensorsFile(fpath)
    where = {}
    for name, fname in weight_map.items():
      if name not in files[fname].tensors:
        raise UserError(f"{files[fname].path}: has no tensor {name} (listed in {index})")
      where[name] = files[fname]
    return where
  shards = sorted(glob.glob(os.path.join(path, "*.safetensors")))
  if not shards:
    pickles = [p for ext in ("bin", "pt", "pth", "ckpt") for p in glob.glob(os.path.join(path, f"*.{ext}"))]
    if pickles:
      raise UserError(f"{path}: only pickle weights ({os.path.basename(pickles[0])}); ftjax never "
                      "unpickles. Convert to safetensors, e.g. AutoModelForCausalLM.from_pretrained"
                      "(path).save_pretrained(path) in a trusted environment")
    raise UserError(f"{path}: no *.safetensors weights found")
  where = {}
  for fpath in shards:
    st = SafetensorsFile(fpath)
    for name in st.tensors:
      where[name] = st
  return where


# ----------------------------------------------------------------------------- the key table


@dataclasses.dataclass(frozen=True)
class Entry:
  """One base parameter: its path in the pytree, the HF name pattern, and its logical shape."""
  path: tuple[str, ...]
  hf: str  # with {i} for the layer index when stacked
  shape: tuple[int, ...]  # per layer for stacked entries, in ftjax layout
  stacked: bool
  transpose: bool  # a torch (out, in) weight stored as an (in, out) kernel
  projection: str | None = None  # projection name: quantizable, LoRA-targetable
  parts: tuple[str, ...] = ()  # experts: per-expert names ({i}, {e}) concatenated along out
  experts: int = 0  # experts: E, the axis before (in, out)
  layers: tuple[int, ...] | None = None  # stacked: the layers it is stacked over (None: all)

  def layer_indices(self, n_layers: int) -> tuple[int, ...]:
    """The checkpoint layers this entry reads, in the order of its stack ([0] if not stacked)."""
    if not self.stacked:
      return (0,)
    return tuple(range(n_layers)) if self.layers is None else self.layers

  def names(self, i: int) -> list[str]:
    """The checkpoint tensors this entry reads for layer i."""
    if not self.parts:
      return [self.hf.format(i=i)]
    return [part.format(i=i, e=e) for e in range(self.experts) for part in self.parts]

  def file_shape(self, name: str) -> tuple[int, ...]:
    """The shape tensor `name` (one of `names`) must have in the checkpoint."""
    if not self.parts:
      return self.shape[::-1] if self.transpose else self.shape
    return (self.shape[-1] // len(self.parts), self.shape[-2])  # torch (out, in) of one part


def key_table(spec: ModelSpec) -> list[Entry]:
  """Every tensor this architecture's checkpoint must hold, with its ftjax path and shape."""
  d, h = spec.dim, spec.head_dim
  table = [Entry(("embed", "embedding"), "model.embed_tokens.weight", (spec.vocab, d), False, False),
           Entry(("final_norm", "scale"), "model.norm.weight", (d,), False, False)]
  if not spec.tie_embeddings:
    table.append(Entry(("lm_head", "kernel"), "lm_head.weight", (d, spec.vocab), False, True))
  norms = ["input_layernorm", "post_attention_layernorm"]
  if spec.sandwich_norm:
    norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
  for name in norms:
    table.append(Entry(("layers", name, "scale"), f"model.layers.{{i}}.{NORM_MODULE[name]}.weight",
                       (d,), True, False))
  if spec.qk_norm:
    for name in ("q_norm", "k_norm"):
      table.append(Entry(("layers", name, "scale"), f"model.layers.{{i}}.{NORM_MODULE[name]}.weight",
                         (h,), True, False))
  if spec.n_experts:
    files = EXPERT_FILES.get(spec.arch, EXPERT_FILES["default"])
    table.append(Entry(("layers", "gate", "kernel"), f"model.layers.{{i}}.{files['gate']}.weight",
                       (d, spec.n_experts), True, True))
    if spec.shared_expert_dim:
      table.append(Entry(("layers", "shared_expert_gate", "kernel"),
                         "model.layers.{i}.mlp.shared_expert_gate.weight", (d, 1), True, True))
  for name in spec.projections:
    hf = f"model.layers.{{i}}.{HF_MODULE[name]}"
    if name in files_of(spec):
      parts = tuple(f"model.layers.{{i}}.{part}.weight" for part in files_of(spec)[name])
      table.append(Entry(("layers", name, "kernel"), parts[0], spec.projection_lead(name)
                         + spec.projection_shape(name), True, False, projection=name,
                         parts=parts, experts=spec.n_experts))
      continue
    table.append(Entry(("layers", name, "kernel"), hf + ".weight", spec.projection_shape(name),
                       True, True, projection=name))
    if spec.qkv_bias and name in ("q_proj", "k_proj", "v_proj"):
      table.append(Entry(("layers", name, "bias"), hf + ".bias", spec.projection_shape(name)[1:],
                         True, False))
  if spec.mixed:  # MoE and dense MLP layers: each part stacked over the layers that hold it
    table = [dataclasses.replace(e, layers=spec.layers_of(e.path[1])) if e.stacked else e
             for e in table]
  return table


def files_of(spec: ModelSpec) -> dict:
  """{expert projection: its per-expert file names} ({} for dense models)."""
  if not spec.n_experts:
    return {}
  files = EXPERT_FILES.get(spec.arch, EXPERT_FILES["default"])
  return {name: files[name] for name in spec.projections if name in files}


# Present in some checkpoints, recomputed here.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _check_keys(spec, table, where, path):
  expected = {name for e in table for i in e.layer_indices(spec.n_layers) for name in e.names(i)}
  found = set(where)
  missing = sorted(expected - found)
  if missing:
    raise UserError(f"{path}: checkpoint is missing tensor {missing[0]}"
                    + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
  extra = sorted(k for k in found - expected if not k.endswith(_IGNORED_SUFFIXES)
                 and not (spec.tie_embeddings and k == "lm_head.weight"))
  if extra:
    hint = ""
    if spec.n_experts and ".experts." in extra[0]:
      hint = f" (config.json's expert count is {spec.n_experts}: does it match the checkpoint?)"
    elif ".experts." in extra[0] or "moe" in extra[0]:
      hint = " (expert weights: is config.json's model_type right?)"
    raise UserError(f"{path}: unexpected tensor {extra[0]} for model_type {spec.arch}"
                    + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "") + hint)
  for e in table:
    names = [n for i in e.layer_indices(spec.n_layers) for n in e.names(i)]
    for name in names:
      want = e.file_shape(name)
      got = where[name].shape(name)
      if tuple(got) != tuple(want):
        raise UserError(f"{where[name].path}: tensor {name} has shape {list(got)}, config.json "
                        f"implies {list(want)}")


# ----------------------------------------------------------------------------- loading


@functools.partial(jax.jit, donate_argnums=0, static_argnums=3)
def _set_layer(stack, layer, i, quantize=None):
  # i is traced: one compile per tensor shape, not one per layer. quantize: None or (mode,
  # group_size, dtype); quantized in the same program, the codes go straight into their slot.
  if quantize is not None:
    mode, group_size, dtype = quantize
    layer = quant_lib.quantize(layer, mode, group_size, dtype=dtype)
  stack = jax.tree.map(lambda s, x: jax.lax.dynamic_update_index_in_dim(s, x, i, 0), stack, layer)
  return stack, i + 0  # ready when the layer is written: the stack itself is donated onwards


def _key(idx):
  """A hashable form of a tuple of slices (slices hash only from Python 3.12)."""
  return tuple((s.start, s.stop, s.step) if isinstance(s, slice) else s for s in idx)


def _read_slice(view, idx, dtype):
  """Reads only `view[idx]` of a (lazily transposed) memory-mapped tensor into a new array of
  `dtype` (a copy even when no cast is needed: no device buffer may alias the read-only map)."""
  return np.array(view[idx], dtype=dtype)


def _put(shape, sharding, read):
  """A global array whose addressable shards come from `read(idx)`; a slice held by several local
  devices (replication) is read once."""
  cache = {}

  def shard(idx):
    k = _key(idx)
    if k not in cache:
      cache[k] = read(idx)
    return cache[k]

  return jax.make_array_from_callback(shape, sharding, shard)


class _ExpertStack:
  """One layer of an expert entry as a lazy [E, in, out] view over its per-expert (out, in)
  tensors (`Entry.parts` concatenated along out): indexing it reads only the experts, rows and
  columns asked for, so each device's callback reads just its slice of the files."""

  def __init__(self, entry: Entry, i: int, where):
    names = entry.names(i)
    n = len(entry.parts)
    self.views = [[where[m].get(m) for m in names[e * n:(e + 1) * n]] for e in range(entry.experts)]
    self.shape = (entry.experts,) + tuple(entry.shape[-2:])

  def __getitem__(self, idx):
    idx = tuple(idx) + (slice(None),) * (3 - len(tuple(idx)))
    experts, rows, cols = idx
    start, stop, _ = cols.indices(self.shape[2])
    out = []
    for parts in self.views[experts]:
      pieces, offset = [], 0
      for v in parts:  # the part's columns that fall in [start, stop)
        lo, hi = max(start, offset), min(stop, offset + v.shape[0])
        if lo < hi:
          pieces.append(v.T[rows, lo - offset:hi - offset])
        offset += v.shape[0]
      out.append(np.concatenate(pieces, axis=1))
    return np.stack(out)


def _load(view, transpose, dtype, sharding):
  """One tensor (or one layer of a stacked one) from its memory-mapped `view`, in `dtype`, straight
  into `sharding`: each device's callback reads just its slice of the file (the transpose is a
  lazy view), so a host reads only its share."""
  view = view.T if transpose else view
  return _put(view.shape, sharding, lambda idx: _read_slice(view, idx, dtype))


def abstract_params(spec: ModelSpec, table, dtype, quant=None, group_size: int = 128):
  """The base pytree as jax.ShapeDtypeStructs (QArrays of them for quantized projections)."""
  params = {}
  for e in table:
    shape = ((len(e.layer_indices(spec.n_layers)),) if e.stacked else ()) + tuple(e.shape)
    if quant not in (None, "none") and e.projection:
      value = quant_lib.abstract(shape, dtype, quant, group_size)
    else:
      value = jax.ShapeDtypeStruct(shape, dtype)
    node = params
    for k in e.path[:-1]:
      node = node.setdefault(k, {})
    node[e.path[-1]] = value
  return params


def _at(tree, path):
  for k in path:
    tree = tree[k]
  return tree


EMBED_PATH = ("embed", "embedding")


def device_table(spec: ModelSpec, embed_on_host: bool = False) -> list[Entry]:
  """key_table(spec) minus the input embedding when it stays in host memory (untied heads only)."""
  table = key_table(spec)
  if not embed_on_host:
    return table
  if spec.tie_embeddings:
    raise UserError("model.embed_on_host=True needs an output head of its own, but this "
                    f"{spec.arch} checkpoint ties it to the input embedding "
                    "(tie_word_embeddings), so the table must stay on the device; set "
                    "model.embed_on_host=False")
  return [e for e in table if e.path != EMBED_PATH]


def host_embedding(path: str, dtype="bfloat16") -> np.ndarray:
  """The input embedding table [V, D] as a host numpy array of `dtype`: a view of the memory-mapped
  file when it already has that dtype (pages are read as rows are looked up), else one copy."""
  (entry,) = [e for e in key_table(read_spec(path)) if e.path == EMBED_PATH]
  where = open_checkpoint(path)
  return np.asarray(where[entry.hf].get(entry.hf), dtype=DTYPES[dtype])


def load_hf(path: str, dtype="bfloat16", quant=None, mesh=None, *, group_size: int = 128,
            embed_on_host: bool = False) -> Model:
  """Loads a Hugging Face causal-LM directory (config.json + safetensors), or a GGUF file (or a
  directory holding one; ftjax/gguf_io.py, dequantized while loading), into a Model.

  dtype: "bfloat16" | "float32" | "float16". quant: None | "int8" | "int4" | "nf4" (decoder
  projections only; embeddings, norms and lm_head stay in dtype). mesh: a jax Mesh to shard over
  (sharding.PARAM_RULES); every process of a multi-host run calls this and reads only the slices
  its devices hold. Without a mesh everything goes to the first local device. embed_on_host:
  leave the input embedding out of the params (see `host_embedding`; batches then carry
  `embeds`, which saves vocab x dim of device memory: 1 GiB for Llama 3 8B in bf16).
  """
  if dtype not in DTYPES:
    raise UserError(f"model.dtype={dtype!r}: use one of {list(DTYPES)}")
  jdtype = DTYPES[dtype]
  spec = read_spec(path)
  where = open_checkpoint(path)
  _check_keys(spec, key_table(spec), where, path)
  table = device_table(spec, embed_on_host)
  quantize = None if quant in (None, "none") else (quant, group_size, jdtype)

  # Shapes first, then shardings (checked to cover every parameter), then fill.
  abstract = abstract_params(spec, table, jdtype, quant, group_size)
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: device, abstract)
  else:
    shardings = sharding_lib.param_shardings(mesh, abstract)

  params, nonfinite = {}, []  # (tensor name, file, count of inf/nan on the device): read once
  for e in table:
    quant_e = quantize if e.projection else None
    target, shape = _at(shardings, e.path), _at(abstract, e.path)
    # A quantized weight arrives in 16 bits laid out like its packed codes (q's spec over
    # [in/2, out] splits [in, out] into the same whole groups of rows) and is quantized on the
    # devices, which reduce among themselves what spans the matrix (int8's column scales, NF4's
    # double-quant statistics); the 16-bit copy is then dropped.
    arrives = target.q if quant_e else target
    if not e.stacked:
      value = _load(where[e.hf].get(e.hf), e.transpose, jdtype, arrives)
      nonfinite.append((e.hf, where[e.hf].path, _count_nonfinite(value)))
      if quant_e:
            value = quant_lib.quantize(value, *quant_e[:2], dtype=jdtype, sharding=target)
    else:
      per_layer = _layer_sharding(arrives)
      # Allocate the stacked array once in place, then write each layer into its slot.
      value = jax.tree.map(lambda s, sh: jnp.zeros(s.shape, s.dtype, device=sh), shape, target)
      written = None
      for j, i in enumerate(e.layer_indices(spec.n_layers)):  # file layer i -> stack slot j
        if e.parts:
          layer = _load(_ExpertStack(e, i, where), False, jdtype, per_layer)
          first = e.names(i)[0]
          name, file = f"{first} (and the other experts of layer {i})", where[first].path
        else:
          name = e.hf.format(i=i)
          layer = _load(where[name].get(name), e.transpose, jdtype, per_layer)
          file = where[name].path
        nonfinite.append((name, file, _count_nonfinite(layer)))
        value, done = _set_layer(value, layer, j, quant_e)
        if quant_e and written is not None:
          # The loop would run ahead of the quantizer, each layer holding its 16-bit copy: the
          # next layer is read while this one is quantized, never more.
          written.block_until_ready()
        written = done
    node = params
    for k in e.path[:-1]:
      node = node.setdefault(k, {})
    node[e.path[-1]] = value
  counts = np.array([sum(map(int, c)) for c in jax.device_get([c for _, _, c in nonfinite])])
  if jax.process_count() > 1:  # every process stops, on what any of them found
    jax.block_until_ready(params)  # no collective of the loading still in flight beside this one
    counts = multihost_utils.process_allgather(counts).sum(0)
  for (name, file, _), count in zip(nonfinite, counts):
    if count:  # else training would stop at step 1 with a "non-finite loss" nothing in ftjax fixes
      raise UserError(f"{file}: tensor {name} holds {int(count)} non-finite values (inf or nan) "
                      f"as {dtype}: the base's weights are damaged; download the model again (if "
                      "the file's values are finite, they overflow this dtype: use "
                      "model.dtype=bfloat16)")
  return Model(spec, params)


def _count_nonfinite(x) -> list:
  """The non-finite values in this process's shards of x (one replica of each), as device
  scalars not yet read. Per shard, so no collective: a reduction over a global array would be
  an all-reduce across processes, and those of successive tensors, in flight together, can meet
  in another order on another process and hang."""
  return [_nonfinite(s.data) for s in x.addressable_shards if s.replica_id == 0]


@jax.jit
def _nonfinite(x):
  return jnp.sum(~jnp.isfinite(x), dtype=jnp.int32)


def _layer_sharding(sharding):
  """The sharding of one layer of a stacked [L, ...] array (L is never sharded)."""
  if isinstance(sharding, jax.sharding.NamedSharding):
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[1:]))
  return sharding
