"""PEFT LoRA adapter directories: adapters out (`write_adapters`) and back in (`read_adapters`).

A PEFT directory holds `adapter_config.json` and `adapter_model.safetensors` with, per layer i and
targeted projection, `base_model.model.model.layers.{i}.<module>.lora_A.weight` (R, in) and
`...lora_B.weight` (out, R): torch's nn.Linear layout, the transpose of our stacked a [L, in, R] and
b [L, R, out]. Phi-3's fused qkv_proj / gate_up_proj are plain PEFT targets (PEFT saves lora_B with
the fused output width), so they need no special casing.

Experts (transformers 5 holds them fused in memory, `mlp.experts.gate_up_proj` [E, 2F, D] and
`mlp.experts.down_proj` [E, D, F]) are PEFT 0.21 `target_parameters`: one ParamWrapper per
parameter around the `mlp.experts` module, nested in the order listed (the first innermost, so
with both, gate_up's factors are `mlp.experts.base_layer.lora_{A,B}` and down's
`mlp.experts.lora_{A,B}`). lora_A is [R * E, in], expert-major (rows e*R .. e*R + R - 1 are
expert e's A); lora_B is [out, R * E], rank-major (column j*E + e is expert e's j-th column):
PEFT reshapes A to (E, R, in) and B to (out, R, E).

A MoE router adapter (lora.targets naming `gate`) is `target_parameters=["mlp.gate.weight"]`:
transformers 5's router is a module holding a bare [E, D] `weight`, not an nn.Linear, so PEFT
wraps that parameter; its factors are saved as a dense target's, `mlp.gate.lora_A` (R, D) and
`lora_B` (E, R).

PEFT loads with `load_state_dict(strict=False)`: a misnamed tensor is ignored silently. So we write
exactly PEFT's names and an explicit `target_modules` list (null would mean q_proj,v_proj), and on
reading refuse with one line whatever we cannot apply rather than dropping it.
"""
import json
import os
import re

import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from ftjax import hf_io, moe
from ftjax import lora as lora_lib
from ftjax.errors import UserError
from ftjax.model import ModelSpec

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model.model.layers."
_EXPERTS = ("experts.gate_up_proj", "experts.down_proj")
_NAME_OF_MODULE = {module: name for name, module in hf_io.HF_MODULE.items() if name not in _EXPERTS}
_EXPERTS_MODULE = "mlp.experts"
_ROUTER_PARAMETER = "mlp.gate.weight"
_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(.+)\.lora_([AB])\.weight$")


def tensor_name(layer: int, target: str, factor: str, targets=()) -> str:
  """PEFT's saved name of one LoRA factor ("A" or "B") of `target` in decoder layer `layer`;
  `targets`: all the adapter's targets (the experts' names depend on which are adapted)."""
  module = hf_io.HF_MODULE[target]
  if target == _EXPERTS[0] and _EXPERTS[1] in targets:
    module += ".base_layer"  # the inner of the two nested ParamWrappers
  return f"{_PREFIX}{layer}.{module}.lora_{factor}.weight"


def _target_parameters(targets) -> list[str]:
  """PEFT's target_parameters: the experts', innermost first, then the router's."""
  router = [_ROUTER_PARAMETER] if moe.ROUTER in targets else []
  return [f"mlp.{t}" for t in _EXPERTS if t in targets] + router


def check_adapters(adapters: lora_lib.Adapters, spec: ModelSpec, where: str = "adapters"):
  """UserError unless every adapter factor fits this base: its projections, shapes and layers."""
  for name, ab in adapters.params.items():
    if name not in spec.adaptable:
      raise UserError(f"{where}: targets {name}, which a {spec.arch} model does not have "
                      f"(its projections: {list(spec.adaptable)})")
    d_in, d_out = spec.projection_shape(name)
    lead = (len(spec.layers_of(name)),) + spec.projection_lead(name)
    want = {"a": lead + (d_in, adapters.rank), "b": lead + (adapters.rank, d_out)}
    for factor, shape in want.items():
      got = tuple(ab[factor].shape)
      if got != shape:
        raise UserError(f"{where}: {name}.{factor} has shape [layers, ...] {list(got)}, the base "
                        f"model ({spec.arch}, {spec.n_layers} layers) needs {list(shape)}")


# ----------------------------------------------------------------------------- writing


def adapter_config(adapters: lora_lib.Adapters, spec: ModelSpec,
                   base_model_name_or_path: str) -> dict:
  """The adapter_config.json PEFT writes for this LoRA (the keys PEFT >= 0.9 understands)."""
  alpha = adapters.alpha
  return {
      "peft_type": "LORA", "task_type": "CAUSAL_LM",
      "base_model_name_or_path": base_model_name_or_path,
      "revision": None, "inference_mode": True, "r": adapters.rank,
      "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
      "lora_dropout": adapters.dropout, "use_rslora": adapters.rslora, "use_dora": False,
      "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
      # in layer order, as an explicit list: null would make PEFT fall back to q_proj,v_proj
      "target_modules": [t for t in spec.projections if t in adapters.params
                         and t not in _EXPERTS],  # the router (not a projection) is a parameter
      "target_parameters": _target_parameters(adapters.params) or None,
      "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
      "rank_pattern": {}, "alpha_pattern": {},
  }


def _card(adapters, spec, base, card):
  card = card or {}
  lines = ["---", f"base_model: {base}", "library_name: peft", "tags: [lora, ftjax]", "---", "",
           f"# LoRA adapter for {base}", "",
           "Fine-tuned with ftjax. Load with `peft.PeftModel.from_pretrained(base_model, dir)`.",
           "", f"- architecture: {spec.arch} ({spec.n_layers} layers)",
           f"- rank: {adapters.rank}, alpha: {adapters.alpha:g}, rsLoRA: {adapters.rslora} "
           f"(scale {adapters.scale:g})",
           f"- target modules: {', '.join(t for t in spec.adaptable if t in adapters.params)}"]
  lines += [f"- {key}: {value}" for key, value in card.items()]
  return "\n".join(lines) + "\n"


def base_reference(path: str) -> str:
  """What adapter_config.json names the base by: a local directory as an absolute path (a relative
  one resolves only from where the export ran), anything else (a hub name) as given."""
  return os.path.abspath(path) if os.path.exists(path) else path


def write_adapters(adapters: lora_lib.Adapters, spec: ModelSpec, out_dir: str,
                   base_model_name_or_path: str, card: dict | None = None):
  """Writes a PEFT LoRA directory: adapter_config.json, adapter_model.safetensors, README.md.

  card: extra lines for the model card, e.g. {"data": "train.jsonl", "steps": 1000}.
  Tensors keep the adapters' dtype (float32 as trained).
  """
  check_adapters(adapters, spec)
  base_model_name_or_path = base_reference(base_model_name_or_path)
  tensors = {}
  for name in spec.adaptable:
    if name not in adapters.params:
      continue
    a, b = (np.asarray(adapters.params[name][f]) for f in ("a", "b"))
    for j, i in enumerate(spec.layers_of(name)):  # stack slot j holds decoder layer i
      if name in _EXPERTS:  # a [E, in, R] -> [E * R, in]; b [E, R, out] -> [out, R * E]
        e, d_in, r = a[j].shape
        a_i = a[j].transpose(0, 2, 1).reshape(e * r, d_in)
        b_i = b[j].transpose(2, 1, 0).reshape(-1, r * e)
      else:
        a_i, b_i = a[j].T, b[j].T  # (R, in), (out, R)
      tensors[tensor_name(i, name, "A", adapters.params)] = np.ascontiguousarray(a_i)
      tensors[tensor_name(i, name, "B", adapters.params)] = np.ascontiguousarray(b_i)
  os.makedirs(out_dir, exist_ok=True)
  weights = os.path.join(out_dir, WEIGHTS)
  safetensors.numpy.save_file(tensors, weights, metadata={"format": "pt"})
  # safetensors writes through a private temporary file (mode 0600); give it an ordinary file's
  # mode, so that a server running as another user can read the adapter
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(weights, 0o666 & ~umask)
  with open(os.path.join(out_dir, CONFIG), "w") as f:
    json.dump(adapter_config(adapters, spec, base_model_name_or_path), f, indent=2)
  with open(os.path.join(out_dir, "README.md"), "w") as f:
    f.write(_card(adapters, spec, base_model_name_or_path, card))


# ----------------------------------------------------------------------------- reading

# Config keys that change what the adapter computes in ways ftjax does not apply: (key, why).
_UNSUPPORTED = (
    ("use_dora", "DoRA"), ("modules_to_save", "fully trained extra modules"),
    ("rank_pattern", "per-module ranks"), ("alpha_pattern", "per-module alphas"),
    ("fan_in_fan_out", "Conv1D (fan_in_fan_out) weights"), ("lora_bias", "LoRA biases"),
    ("layers_to_transform", "adapters on only some layers"),
    ("layer_replication", "layer replication"), ("trainable_token_indices", "trainable tokens"),
    ("use_qalora", "QA-LoRA"),
)


def _read_config(path: str) -> dict:
  cfg_path = os.path.join(path, CONFIG)
  if not os.path.isfile(cfg_path):
    raise UserError(f"{cfg_path}: not found (a PEFT adapter directory has one)")
  try:
    with open(cfg_path) as f:
      cfg = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise UserError(f"{cfg_path}: cannot read it as JSON ({e})") from None
  if cfg.get("peft_type", "LORA") != "LORA":
    raise UserError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r}; ftjax reads only LORA")
  for key, what in _UNSUPPORTED:
    if cfg.get(key):
      raise UserError(f"{cfg_path}: {key}={cfg[key]!r} ({what}) is not supported by ftjax")
  if cfg.get("bias", "none") != "none":
    raise UserError(f"{cfg_path}: bias={cfg['bias']!r} (trained biases) is not supported by "
                    "ftjax; only bias='none'")
  for key in ("r", "lora_alpha"):
    if not isinstance(cfg.get(key), (int, float)) or cfg[key] <= 0:
      raise UserError(f"{cfg_path}: {key}={cfg.get(key)!r} must be a positive number")
  targets = cfg.get("target_modules")
  params = cfg.get("target_parameters") or []
  known = _target_parameters(_EXPERTS + (moe.ROUTER,))
  if not isinstance(params, list) or any(p not in known for p in params):
    raise UserError(f"{cfg_path}: target_parameters={params!r}; ftjax reads only the experts' "
                    f"and the router's {known}")
  if isinstance(targets, list):  # PEFT matches a name or a dotted suffix of the module path
    for t in targets:
      if t.split(".")[-1] not in hf_io.HF_MODULE:
        raise UserError(f"{cfg_path}: target_modules has {t!r}, not a decoder projection; ftjax "
                        f"adapts only {sorted(hf_io.HF_MODULE)}")
  return cfg


def _open_weights(path: str) -> hf_io.SafetensorsFile:
  st_path = os.path.join(path, WEIGHTS)
  if not os.path.isfile(st_path):
    pickles = [f for f in ("adapter_model.bin", "adapter_model.pt") if
               os.path.isfile(os.path.join(path, f))]
    if pickles:
      raise UserError(f"{os.path.join(path, pickles[0])}: pickle weights; ftjax never unpickles. "
                      "Save the adapter with safetensors: model.save_pretrained(dir, "
                      "safe_serialization=True) in a trusted environment")
    raise UserError(f"{st_path}: not found")
  return hf_io.SafetensorsFile(st_path)


def read_adapters(path: str, spec: ModelSpec | None = None) -> lora_lib.Adapters:
  """A PEFT LoRA directory (saved by PEFT or by ftjax) -> float32 Adapters.

  Without `spec` the layer count comes from the tensors, each target in every layer; whether they
  fit a base model is `check_adapters`'s job. With the base's spec each target has the layers
  that hold it (spec.layers_of: a model mixing MoE and dense MLP layers needs this).
  """
  cfg = _read_config(path)
  st = _open_weights(path)
  rank = int(cfg["r"])
  found = {}  # target -> {layer: {"A": name, "B": name}}
  # the experts' nested ParamWrappers: target_parameters' first is the innermost
  parameters = cfg.get("target_parameters") or []
  experts = [p[len("mlp."):] for p in parameters if p != _ROUTER_PARAMETER]
  modules = dict(_NAME_OF_MODULE)
  for depth, target in enumerate(reversed(experts)):
    modules[_EXPERTS_MODULE + ".base_layer" * depth] = target
  for key in st.tensors:
    m = _KEY.match(key)
    target = modules.get(m.group(2)) if m else None
    if target is None:
      raise UserError(f"{st.path}: tensor {key} is not a LoRA factor of a decoder projection; "
                      f"ftjax adapts only {sorted(hf_io.HF_MODULE)} in model.layers")
    found.setdefault(target, {}).setdefault(int(m.group(1)), {})[m.group(3)] = key
  if not found:
    raise UserError(f"{st.path}: holds no LoRA tensors")
  declared = cfg.get("target_modules")
  if isinstance(declared, list):
    router = [moe.ROUTER] if _ROUTER_PARAMETER in parameters else []
    missing = sorted({t.split(".")[-1] for t in declared + experts + router}
                     - {t.split(".")[-1] for t in found})
    if missing:
      raise UserError(f"{st.path}: no tensors for target {missing[0]} listed in {CONFIG}")
  n_layers = max(i for layers in found.values() for i in layers) + 1
  params = {}
  for target in (t for t in hf_io.HF_MODULE if t in found):  # a fixed, layer-forward order
    layers = found[target]
    expected = range(n_layers) if spec is None else spec.layers_of(target)
    extra = sorted(set(layers) - set(expected))
    if extra:
      raise UserError(f"{st.path}: {layers[extra[0]].get('A') or layers[extra[0]].get('B')}: "
                      f"layer {extra[0]} of the {spec.arch} base has no {target}")
    a, b = [], []
    for i in expected:
      pair = layers.get(i, {})
      for factor in ("A", "B"):
        if factor not in pair:
          hint = "; a model mixing MoE and dense MLPs: pass its spec" if spec is None else ""
          raise UserError(f"{st.path}: missing {tensor_name(i, target, factor)} (the adapter "
                          f"has tensors up to layer {n_layers - 1}{hint})")
      a_i, b_i = st.get(pair["A"]), st.get(pair["B"])
      if target in _EXPERTS and a_i.ndim == 2 and b_i.ndim == 2 and a_i.shape[0] % rank == 0:
        e = a_i.shape[0] // rank  # [E * R, in] -> [E, in, R]; [out, R * E] -> [E, R, out]
        if b_i.shape[1] != rank * e:
          raise UserError(f"{st.path}: {pair['B']} {list(b_i.shape)} does not have R * E = "
                          f"{rank * e} columns (r={rank} from {CONFIG})")
        if a and a_i.shape[::-1] != (a[0].shape[1], a[0].shape[0] * rank):
          raise UserError(f"{st.path}: {pair['A']} has shape {list(a_i.shape)}, unlike layer 0's")
        a.append(np.asarray(a_i, np.float32).reshape(e, rank, -1).transpose(0, 2, 1))
        b.append(np.asarray(b_i, np.float32).reshape(-1, rank, e).transpose(2, 1, 0))
        continue
      if a_i.ndim != 2 or b_i.ndim != 2 or a_i.shape[0] != rank or b_i.shape[1] != rank:
        raise UserError(f"{st.path}: {pair['A']} {list(a_i.shape)} / {pair['B']} "
                        f"{list(b_i.shape)} do not have rank r={rank} from {CONFIG}")
      if a and (a_i.shape != a[0].shape[::-1] or b_i.shape != b[0].shape[::-1]):
        raise UserError(f"{st.path}: {pair['A']} has shape {list(a_i.shape)}, layer 0's has "
                        f"{list(a[0].shape[::-1])}")
      a.append(np.asarray(a_i, np.float32).T)
      b.append(np.asarray(b_i, np.float32).T)
    params[target] = {"a": jnp.asarray(np.stack(a)), "b": jnp.asarray(np.stack(b))}
  return lora_lib.Adapters(params, rank=rank, alpha=float(cfg["lora_alpha"]),
                           rslora=bool(cfg.get("use_rslora", False)),
                           dropout=float(cfg.get("lora_dropout") or 0.0))

