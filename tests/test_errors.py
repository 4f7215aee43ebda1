"""Bad input stops a run with one line naming the culprit and the fix, and touches nothing saved.

Each entry of the catalogue in docs/errors.md has a test here. Most call `train.run` in-process,
which raises the same `UserError` whose message the CLI prints as `error: <message>`; a few run
the CLI to check what a user sees: exit status 1, one `error:` line on stderr, no traceback.
The model is a one-layer Llama with the demo's tokenizer, so the few runs that compile are quick.
"""
import ast
import errno
import glob
import hashlib
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys

from absl import flags
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors.numpy
from ml_collections import config_flags

from ftjax import ckpt, data, train
from ftjax.config import defaults
from ftjax.errors import UserError, parse_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))
import demo  # noqa: E402  (trains the demo's tokenizer)

ENV = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false", PYTHONPATH=REPO)


# ----------------------------------------------------------------------------- fixtures


def write_tiny_llama(path, vocab, seed=0, **config):
  """config.json + model.safetensors of a one-layer Llama, written with numpy."""
  cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": vocab,
         "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
         "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
         "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": True,
         "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, **config}
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.normal(0.0, 0.1, shape).astype(np.float32)
  d, f, h = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
  q, kv = cfg["num_attention_heads"] * h, cfg["num_key_value_heads"] * h
  weights = {"model.embed_tokens.weight": normal(cfg["vocab_size"], d),
             "model.norm.weight": np.ones(d, np.float32)}
  for i in range(cfg["num_hidden_layers"]):
    p = f"model.layers.{i}."
    weights.update({
        p + "self_attn.q_proj.weight": normal(q, d), p + "self_attn.k_proj.weight": normal(kv, d),
        p + "self_attn.v_proj.weight": normal(kv, d), p + "self_attn.o_proj.weight": normal(d, q),
        p + "mlp.gate_proj.weight": normal(f, d), p + "mlp.up_proj.weight": normal(f, d),
        p + "mlp.down_proj.weight": normal(d, f),
        p + "input_layernorm.weight": np.ones(d, np.float32),
        p + "post_attention_layernorm.weight": np.ones(d, np.float32)})
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as fh:
    json.dump(cfg, fh)
  safetensors.numpy.save_file(weights, os.path.join(path, "model.safetensors"),
                              metadata={"format": "pt"})


def tiny_base(path, demo_dir):
  """A one-layer Llama directory at `path` with the demo's tokenizer (vocabulary 384), which
  demo.build_base trains into `demo_dir`."""
  demo.build_base(demo_dir)
  os.makedirs(path, exist_ok=True)
  for name in os.listdir(demo_dir):
    if name.startswith(("tokenizer", "special_tokens", "chat_template")):
      shutil.copy(os.path.join(demo_dir, name), path)
  write_tiny_llama(path, vocab=384)
  return path


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  return tiny_base(str(tmp_path_factory.mktemp("tiny_base")),
                   str(tmp_path_factory.mktemp("demo_base")))


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("data") / "train.jsonl")
  with open(os.path.join(REPO, "configs/demo_data/train.jsonl")) as f:
    rows = f.readlines()[:100]
  with open(path, "w") as f:
    f.writelines(rows)
  return path


def make_config(base, train_file, workdir, **overrides):
  c = defaults()
  c.workdir, c.model.path, c.model.dtype = str(workdir), base, "float32"
  c.data.train, c.data.seq_len, c.data.format = train_file, 64, "prompt_completion"
  c.train.steps, c.train.batch_size, c.train.log_every, c.train.eval_every = 2, 4, 1, 0
  c.train.remat, c.optim.warmup_steps, c.ckpt.every, c.mesh.fsdp = "none", 0, 1, 1
  c.lora.rank, c.lora.alpha = 4, 8.0
  for k, v in overrides.items():
    node = c
    *parents, leaf = k.split("__")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


@pytest.fixture(scope="module")
def trained(base, train_file, tmp_path_factory):
  """A workdir holding complete checkpoints (steps 1 and 2) that bad runs must leave alone."""
  workdir = tmp_path_factory.mktemp("trained")
  train.run(make_config(base, train_file, workdir))
  assert ckpt.complete_steps(str(workdir / "checkpoints")) == [1, 2]
  return str(workdir)


def snapshot(path) -> dict:
  """Every file's content hash and every directory under `path`."""
  out = {}
  for root, dirs, files in os.walk(path):
    for d in dirs:
      out[os.path.relpath(os.path.join(root, d), path)] = "dir"
    for name in files:
      with open(os.path.join(root, name), "rb") as f:
        out[os.path.relpath(os.path.join(root, name), path)] = hashlib.sha256(f.read()).hexdigest()
  return out


def user_error(cfg) -> str:
  """The one-line message `train.run(cfg)` stops with (the CLI prints it as `error: ...`)."""
  with pytest.raises(UserError) as e:
    train.run(cfg)
  message = str(e.value)
  assert message and "\n" not in message, message
  return message


def copy_model(base, tmp_path) -> str:
  path = str(tmp_path / "model")
  shutil.copytree(base, path)
  return path


def edit_json(path, **changes):
  with open(path) as f:
    value = json.load(f)
  value.update(changes)
  with open(path, "w") as f:
    json.dump(value, f)


def edit_weights(model, fn):
  path = os.path.join(model, "model.safetensors")
  weights = safetensors.numpy.load_file(path)
  fn(weights)
  safetensors.numpy.save_file(weights, path, metadata={"format": "pt"})


def evil_pickle(path, marker):
  """A pickle that would create `marker` if anything unpickled it."""

  class Evil:
    def __reduce__(self):
      return (os.system, (f"touch {marker}",))

  with open(path, "wb") as f:
    pickle.dump(Evil(), f)


def write_rows(path, lines):
  with open(path, "w") as f:
    f.write("".join(l + "\n" for l in lines))
  return str(path)


# ----------------------------------------------------------------------------- the catalogue
# (case id, setup(tmp_path, base, train_file) -> config overrides, words the message must hold).
# Every case runs against the `trained` workdir and must leave it byte for byte as it was.


def _model_missing(tmp, base, _):
  return {"model__path": str(tmp / "no-such-model")}


def _model_not_a_dir(tmp, base, _):
  return {"model__path": os.path.join(copy_model(base, tmp), "model.safetensors")}


def _config_json_missing(tmp, base, _):
  model = copy_model(base, tmp)
  os.remove(os.path.join(model, "config.json"))
  return {"model__path": model, "tokenizer__path": base}


def _config_json_corrupt(tmp, base, _):
  model = copy_model(base, tmp)
  with open(os.path.join(model, "config.json"), "w") as f:
    f.write('{"model_type": "llama",')
  return {"model__path": model}


def _unsupported_model_type(tmp, base, _):
  model = copy_model(base, tmp)
  edit_json(os.path.join(model, "config.json"), model_type="gpt2")
  return {"model__path": model}


def _missing_tensor(tmp, base, _):
  model = copy_model(base, tmp)
  edit_weights(model, lambda w: w.pop("model.layers.0.mlp.up_proj.weight"))
  return {"model__path": model}


def _unexpected_tensor(tmp, base, _):
  model = copy_model(base, tmp)
  edit_weights(model, lambda w: w.update({"model.layers.0.mlp.extra.weight": np.ones(4)}))
  return {"model__path": model}


def _shape_mismatch(tmp, base, _):
  model = copy_model(base, tmp)
  edit_json(os.path.join(model, "config.json"), intermediate_size=48)
  return {"model__path": model}


def _truncated_weights(tmp, base, _):
  model = copy_model(base, tmp)
  path = os.path.join(model, "model.safetensors")
  with open(path, "rb") as f:
    blob = f.read()
  with open(path, "wb") as f:
    f.write(blob[:len(blob) // 2])
  return {"model__path": model}


def _corrupt_weights(tmp, base, _):
  model = copy_model(base, tmp)
  with open(os.path.join(model, "model.safetensors"), "r+b") as f:
    f.write(b"\xff" * 16)  # the header length and the start of the header
  return {"model__path": model}


def _pickle_weights(tmp, base, _):
  model = copy_model(base, tmp)
  os.remove(os.path.join(model, "model.safetensors"))
  evil_pickle(os.path.join(model, "pytorch_model.bin"), tmp / "unpickled")
  return {"model__path": model}


def _tokenizer_missing(tmp, base, _):
  return {"tokenizer__path": str(tmp / "no-such-tokenizer")}


def _tokenizer_not_in_model_dir(tmp, base, _):
  model = copy_model(base, tmp)
  for name in glob.glob(os.path.join(model, "tokenizer*")):
    os.remove(name)
  return {"model__path": model}


def _tokenizer_corrupt(tmp, base, _):
  model = copy_model(base, tmp)
  with open(os.path.join(model, "tokenizer.json"), "w") as f:
    f.write("{not json")
  return {"model__path": model}


def _tokenizer_larger_than_embedding(tmp, base, _):
  model = copy_model(base, tmp)
  write_tiny_llama(model, vocab=300)  # the tokenizer has 384 ids
  return {"model__path": model}


def _data_missing(tmp, base, _):
  return {"data__train": str(tmp / "no-such-data.jsonl")}


def _data_bad_json(tmp, base, train_file):
  with open(train_file) as f:
    good = f.read().splitlines()[:5]
  return {"data__train": write_rows(tmp / "bad.jsonl", good[:2] + ['{"prompt": "a", '] + good)}


def _data_row_without_field(tmp, base, train_file):
  with open(train_file) as f:
    good = f.read().splitlines()[:5]
  return {"data__train": write_rows(tmp / "rows.jsonl", good[:3] + ['{"prompt": "hello"}'] + good)}


def _data_empty(tmp, base, _):
  return {"data__train": write_rows(tmp / "empty.jsonl", [])}


def _data_nothing_trainable(tmp, base, train_file):
  return {"data__seq_len": 3}  # every prompt is longer: truncation leaves no completion token


def _mesh_does_not_divide(tmp, base, _):
  return {"mesh__data": len(jax.devices()) + 2, "mesh__fsdp": 1}


def _mesh_size_not_a_number(tmp, base, _):
  return {"mesh__fsdp": "two"}


def _lora_rank_zero(tmp, base, _):
  return {"lora__rank": 0}


def _quant_mode_unknown(tmp, base, _):
  return {"quant__mode": "int3"}


def _quant_group_does_not_divide(tmp, base, _):
  return {"quant__mode": "int4", "quant__group_size": 48}  # input dims are 32 and 64


def _lora_targets_unknown(tmp, base, _):
  return {"lora__targets": "q_proj,qkv"}


def _log_every_zero(tmp, base, _):
  return {"train__log_every": 0}


def _init_from_pickle_adapter(tmp, base, _):
  adapter = tmp / "adapter"
  adapter.mkdir()
  with open(adapter / "adapter_config.json", "w") as f:
    json.dump({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}, f)
  evil_pickle(adapter / "adapter_model.bin", tmp / "unpickled")
  return {"lora__init_from": str(adapter)}


def _resume_other_lora_shape(tmp, base, _):
  return {"lora__rank": 8}


def _embed_on_host_tied(tmp, base, _):
  return {"model__embed_on_host": True}  # the tiny base ties its output head to the embedding


def _quant_kernel_unknown(tmp, base, _):
  return {"quant__kernel": "cuda"}


def _attention_not_here(tmp, base, _):
  return {"model__attention": "splash"}  # a TPU kernel, on this CPU


def _remat_unknown(tmp, base, _):
  return {"train__remat": "selective"}


def _resume_other_base(tmp, base, _):
  model = copy_model(base, tmp)
  edit_json(os.path.join(model, "config.json"), rope_theta=500000.0)  # same tensors, new model
  return {"model__path": model}


CATALOGUE = [
    ("model-missing", _model_missing, ["no-such-model", "does not exist"]),
    ("model-not-a-dir", _model_not_a_dir, ["model.safetensors", "not a directory"]),
    ("config-json-missing", _config_json_missing, ["config.json", "not found"]),
    ("config-json-corrupt", _config_json_corrupt, ["config.json", "JSON"]),
    ("unsupported-model-type", _unsupported_model_type, ["config.json", "'gpt2'", "llama"]),
    ("missing-tensor", _missing_tensor, ["missing tensor model.layers.0.mlp.up_proj.weight"]),
    ("unexpected-tensor", _unexpected_tensor, ["unexpected tensor model.layers.0.mlp.extra"]),
    ("shape-mismatch", _shape_mismatch, ["model.safetensors", "gate_proj", "[64, 32]",
                                         "config.json implies [48, 32]"]),
    ("truncated-weights", _truncated_weights, ["model.safetensors", "truncated", "re-download"]),
    ("corrupt-weights", _corrupt_weights, ["model.safetensors", "not a valid safetensors"]),
    ("pickle-weights", _pickle_weights, ["pytorch_model.bin", "never unpickles", "safetensors"]),
    ("tokenizer-missing", _tokenizer_missing, ["no-such-tokenizer", "tokenizer not found",
                                               "tokenizer.path"]),
    ("tokenizer-not-in-model-dir", _tokenizer_not_in_model_dir, ["no tokenizer.json"]),
    ("tokenizer-corrupt", _tokenizer_corrupt, ["model", "cannot load tokenizer"]),
    ("tokenizer-larger-than-embedding", _tokenizer_larger_than_embedding,
     ["vocabulary of 384", "300 rows"]),
    ("data-missing", _data_missing, ["no-such-data.jsonl", "not found", "data.train"]),
    ("data-bad-json", _data_bad_json, ["bad.jsonl:3:", "not valid JSON"]),
    ("data-row-without-field", _data_row_without_field, ["rows.jsonl:4:", "'completion'"]),
    ("data-empty", _data_empty, ["empty.jsonl", "no rows"]),
    ("data-nothing-trainable", _data_nothing_trainable, ["all 100 rows were dropped",
                                                         "data.seq_len=3"]),
    ("mesh-does-not-divide", _mesh_does_not_divide, ["mesh", "devices"]),
    ("mesh-size-not-a-number", _mesh_size_not_a_number, ["mesh.fsdp='two'", "auto"]),
    ("lora-rank-zero", _lora_rank_zero, ["lora.rank=0", "positive"]),
    ("quant-mode-unknown", _quant_mode_unknown, ["quant.mode='int3'", "nf4"]),
    ("quant-group-does-not-divide", _quant_group_does_not_divide,
     ["quant.group_size=48", "input dim 32"]),
    ("lora-targets-unknown", _lora_targets_unknown, ["lora.targets", "qkv", "all-linear"]),
    ("embed-on-host-tied", _embed_on_host_tied, ["model.embed_on_host=True", "tie_word_embeddings",
                                                 "model.embed_on_host=False"]),
    ("quant-kernel-unknown", _quant_kernel_unknown, ["quant.kernel='cuda'", "pallas"]),
    ("attention-not-here", _attention_not_here, ["model.attention=splash", "TPU only", "cpu",
                                                 "auto"]),
    ("remat-unknown", _remat_unknown, ["train.remat='selective'", "auto", "save_proj"]),
    ("log-every-zero", _log_every_zero, ["train.log_every=0", "positive"]),
    ("init-from-pickle-adapter", _init_from_pickle_adapter, ["adapter_model.bin",
                                                             "never unpickles"]),
    ("resume-other-lora-shape", _resume_other_lora_shape, [
        "its checkpoint (step 2) was trained with other settings", "lora.rank: 4 -> 8",
        "new --config.workdir", "--config.lora.init_from="]),
    ("resume-other-base", _resume_other_base, [
        "model.path: ", "base config.json (rope.theta: 10000.0 -> 500000.0)",
        "--config.lora.init_from="]),
]


@pytest.mark.parametrize("setup,words", [c[1:] for c in CATALOGUE], ids=[c[0] for c in CATALOGUE])
def test_bad_input_is_one_line_and_touches_nothing(setup, words, base, train_file, trained,
                                                   tmp_path):
  before = snapshot(trained)
  overrides = setup(tmp_path, base, train_file)
  # In the trained workdir, another model dir, tokenizer or data file is refused as a change of
  # meaning before it is even read: their own mistakes show in a fresh workdir.
  fresh = (setup not in (_resume_other_base, _resume_other_lora_shape) and
           any(k.replace("__", ".") in ckpt.MEANING_KEYS for k in overrides))
  workdir = str(tmp_path / "fresh") if fresh else trained
  message = user_error(make_config(base, train_file, workdir, **overrides))
  for word in words:
    assert word in message, (word, message)
  assert snapshot(trained) == before
  assert ckpt.complete_steps(os.path.join(workdir, "checkpoints")) == ([] if fresh else [1, 2])
  assert not (tmp_path / "unpickled").exists()


def test_damaged_checkpoint_is_one_line_and_left_alone(base, train_file, trained, tmp_path):
  """A newest checkpoint with files gone (not something a kill does: a person or a failing disk)
  is named, with what to delete, instead of a tensorstore traceback."""
  workdir = str(tmp_path / "w")
  shutil.copytree(trained, workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "2", "state"))
  before = snapshot(workdir)
  message = user_error(make_config(base, train_file, workdir, train__steps=3))
  newest = os.path.join(workdir, "checkpoints", "2")
  assert message.startswith(newest + ": cannot restore"), message
  assert f"delete {newest} to resume from step 1, the previous complete checkpoint" in message
  assert snapshot(workdir) == before


# ----------------------------------------------------------------------------- what a resume may change


def _meta(cfg):
  from ftjax import lora
  spec = {"arch": "llama", "dim": 32}
  adapters = lora.Adapters({name: None for name in ("q_proj", "v_proj")}, rank=cfg.lora.rank,
                           alpha=cfg.lora.alpha, rslora=cfg.lora.rslora)
  return {"config": json.loads(cfg.to_json_best_effort()), "lora": ckpt.lora_meta(adapters),
          "base": spec}


@pytest.mark.parametrize("key,value", [
    ("model__path", "/elsewhere/model"), ("model__dtype", "bfloat16"), ("quant__mode", "nf4"),
    ("tokenizer__path", "/elsewhere/tok"), ("lora__rank", 8), ("lora__alpha", 2.0),
    ("lora__rslora", True), ("lora__targets", "q_proj"), ("data__train", "other.jsonl"),
    ("data__format", "text"), ("data__seq_len", 128), ("data__packing", False),
    ("train__batch_size", 16), ("seed", 3)])
def test_resume_refuses_each_meaning_key(key, value, base, train_file, tmp_path):
  old = make_config(base, train_file, tmp_path)
  new = make_config(base, train_file, tmp_path, **{key: value})
  changes = ckpt.changed_meaning(_meta(old), _meta(new))
  name = key.replace("__", ".")
  assert len(changes) == 1 and changes[0].startswith(f"{name}: "), changes
  assert repr(value) in changes[0]


@pytest.mark.parametrize("key,value", [
    ("train__steps", 9), ("optim__lr", 1e-3), ("train__log_every", 5), ("train__eval_every", 3),
    ("ckpt__every", 4), ("optim__warmup_steps", 7), ("train__grad_accum", 2), ("mesh__fsdp", -1),
    ("train__remat", "full"), ("quant__group_size", 64), ("lora__dropout", 0.1),
    ("data__eval", "eval.jsonl"), ("model__embed_on_host", True)])
def test_resume_allows_each_safe_key(key, value, base, train_file, tmp_path):
  old = make_config(base, train_file, tmp_path)
  new = make_config(base, train_file, tmp_path, **{key: value})
  assert ckpt.changed_meaning(_meta(old), _meta(new)) == []


def test_resume_with_safe_changes_trains_on(base, train_file, trained, tmp_path):
  workdir = str(tmp_path / "w")
  shutil.copytree(trained, workdir)
  last = train.run(make_config(base, train_file, workdir, train__steps=3, optim__lr=1e-3,
                               train__log_every=3, ckpt__every=3))
  assert ckpt.complete_steps(os.path.join(workdir, "checkpoints")) == [1, 2, 3]
  assert np.isfinite(last["loss"])
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    assert [json.loads(l)["step"] for l in f] == [1, 2, 3]  # no step twice


def test_resume_of_a_finished_run_changes_nothing(base, train_file, trained, capsys):
  before = snapshot(trained)
  assert train.run(make_config(base, train_file, trained)) == {}
  assert "already trained to step 2" in capsys.readouterr().out
  assert snapshot(trained) == before


def test_restore_failure_that_is_not_damage_keeps_the_checkpoints(base, train_file, trained,
                                                                   tmp_path, monkeypatch):
  """A restore that fails for another reason than a missing or unreadable file (here: a sharding
  mismatch inside orbax) names that cause, and does not tell the user to delete anything."""
  real = ocp.CheckpointManager.restore

  def failing(self, step, args=None, **kw):
    if "state" in (args or {}):
      raise ValueError("Requested sharding is incompatible with the saved array's shape")
    return real(self, step, args=args, **kw)

  monkeypatch.setattr(ocp.CheckpointManager, "restore", failing)
  before = snapshot(trained)
  message = user_error(make_config(base, train_file, trained, train__steps=3))
  assert "Requested sharding is incompatible" in message and "delete" not in message, message
  assert "kept as they are" in message
  assert snapshot(trained) == before


# ----------------------------------------------------------------------------- more corrupted model
# files: a safetensors header of the wrong structure or byte length, an unreadable weights file,
# and malformed JSON beside the weights.


def _weights_unreadable(model):
  path = os.path.join(model, "model.safetensors")
  os.remove(path)
  os.mkdir(path)  # reading it fails as a file without read permission would (we may be root)


def _header_not_an_object(model):
  with open(os.path.join(model, "model.safetensors"), "wb") as f:
    f.write(struct.pack("<Q", 8) + b"[1, 2]  ")


def _byte_length_mismatch(model):
  path = os.path.join(model, "model.safetensors")
  with open(path, "rb") as f:
    blob = f.read()
  n = struct.unpack("<Q", blob[:8])[0]
  header = json.loads(blob[8:8 + n])
  header["model.norm.weight"]["dtype"] = "BF16"  # 32 float32 = 64 bf16 values for a [32] tensor
  text = json.dumps(header).encode()
  text += b" " * (-len(text) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(text)) + text + blob[8 + n:])


def _config_not_an_object(model):
  with open(os.path.join(model, "config.json"), "w") as f:
    f.write("[1]")


def _config_size_not_a_number(model):
  edit_json(os.path.join(model, "config.json"), hidden_size="big")


def _generation_config_corrupt(model):
  with open(os.path.join(model, "generation_config.json"), "w") as f:
    f.write("{oops")


def _index_corrupt(model):
  with open(os.path.join(model, "model.safetensors.index.json"), "w") as f:
    f.write('{"metadata": {}}')  # no weight_map


@pytest.mark.parametrize("corrupt,culprit", [
    (_weights_unreadable, "model.safetensors"), (_header_not_an_object, "model.safetensors"),
    (_byte_length_mismatch, "model.safetensors"), (_config_not_an_object, "config.json"),
    (_config_size_not_a_number, "config.json"),
    (_generation_config_corrupt, "generation_config.json"),
    (_index_corrupt, "model.safetensors.index.json")])
def test_model_files_more_corruptions(corrupt, culprit, base, tmp_path):
  import ftjax
  model = copy_model(base, tmp_path)
  corrupt(model)
  with pytest.raises(UserError, match=culprit):
    ftjax.load_hf(model, dtype="float32")


# ----------------------------------------------------------------------------- the command line


def _recipe(tmp_path, base, train_file, workdir) -> str:
  path = tmp_path / "recipe.py"
  path.write_text(
      "from ftjax.config import defaults\n\n\ndef get_config():\n  c = defaults()\n"
      f"  c.workdir, c.model.path, c.data.train = {str(workdir)!r}, {base!r}, {train_file!r}\n"
      "  c.model.dtype, c.data.seq_len, c.train.batch_size, c.mesh.fsdp = 'float32', 64, 4, 1\n"
      "  c.lora.rank, c.lora.alpha, c.train.remat = 4, 8.0, 'none'\n  return c\n")
  return str(path)


def _cli(recipe, *overrides, env=None):
  return subprocess.run([sys.executable, "-m", "ftjax.train", f"--config={recipe}", *overrides],
                        cwd=REPO, env=env or ENV, capture_output=True, text=True, timeout=300)


def _assert_one_error_line(proc) -> str:
  assert proc.returncode == 1, (proc.stdout, proc.stderr)
  assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
  return lines[0]


def test_cli_mistyped_config_key(base, train_file, trained, tmp_path):
  before = snapshot(trained)
  line = _assert_one_error_line(_cli(_recipe(tmp_path, base, train_file, trained),
                                     "--config.lora.rnak=8"))
  assert "--config.lora.rnak" in line and 'Did you mean "rank"' in line, line
  assert snapshot(trained) == before


def test_cli_batch_not_divisible_by_data_parallel(base, train_file, trained, tmp_path):
  env = dict(ENV, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  before = snapshot(trained)
  line = _assert_one_error_line(_cli(_recipe(tmp_path, base, train_file, trained),
                                     "--config.mesh.data=2", "--config.train.batch_size=3",
                                     env=env))
  assert "train.batch_size=3" in line and "2" in line, line
  assert snapshot(trained) == before


def test_cli_model_dir_missing(base, train_file, tmp_path):
  line = _assert_one_error_line(_cli(_recipe(tmp_path, base, train_file, tmp_path / "w"),
                                     f"--config.model.path={tmp_path}/nope"))
  assert f"{tmp_path}/nope" in line, line
  assert not (tmp_path / "w").exists()


@pytest.fixture
def flag_values(tmp_path, base, train_file):
  """A fresh absl FlagValues with a locked --config, as train.py defines it."""
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "Recipe file.", flag_values=fv,
                                  lock_config=True)
  return fv, _recipe(tmp_path, base, train_file, tmp_path / "w")


@pytest.mark.parametrize("argv_tail,words", [
    (["--config.lora.rnak=8"], ["--config.lora.rnak", "no key 'rnak'", 'Did you mean "rank"']),
    (["--config.nosuch.key=1"], ["--config.nosuch.key", "no key 'nosuch'", "ftjax/config.py"]),
    (["--config.lora.rank=eight"], ["--config.lora.rank=eight", "invalid literal for int()"]),
    (["--config.train.steps=1.5"], ["--config.train.steps=1.5", "int"]),
    (["--config.lora.rank"], ["--config.lora.rank"]),
    (["--confg.lora.rank=8"], ["confg.lora.rank"]),
], ids=["unknown-key", "unknown-section", "wrong-type", "float-for-int", "no-value", "bad-flag"])
def test_config_mistakes_are_one_line(flag_values, capsys, monkeypatch, argv_tail, words):
  fv, recipe = flag_values
  argv = ["train", f"--config={recipe}", *argv_tail]
  monkeypatch.setattr(sys, "argv", argv)  # ml_collections reads the overrides from sys.argv
  with pytest.raises(SystemExit) as e:
    parse_flags(argv, fv)
  assert e.value.code == 1
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1, err
  for word in words:
    assert word in err, (word, err)


def test_config_file_missing_is_one_line(flag_values, capsys, monkeypatch, tmp_path):
  fv, _ = flag_values
  argv = ["train", f"--config={tmp_path}/nope.py"]
  monkeypatch.setattr(sys, "argv", argv)
  with pytest.raises(SystemExit):
    parse_flags(argv, fv)
  err = capsys.readouterr().err
  assert err.startswith(f"error: --config={tmp_path}/nope.py: cannot load") and \
      err.count("\n") == 1, err


def test_good_overrides_parse(flag_values, monkeypatch):
  fv, recipe = flag_values
  argv = ["train", f"--config={recipe}", "--config.lora.rank=8"]
  monkeypatch.setattr(sys, "argv", argv)
  parse_flags(argv, fv)
  assert fv.config.lora.rank == 8


# ----------------------------------------------------------------------------- disk full


@pytest.fixture
def small_disk(tmp_path):
  """An 8 MiB tmpfs (when we may mount one), else None: the test then simulates a full disk."""
  path = tmp_path / "disk"
  path.mkdir()
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(path)],
                           capture_output=True).returncode == 0
  yield path if mounted else None
  if mounted:
    subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(disk, leave: int) -> str:
  """Takes all but `leave` bytes of the tmpfs at `disk`; returns the filler's path."""
  filler = os.path.join(disk, "filler")
  free = shutil.disk_usage(disk).free
  with open(filler, "wb") as f:
    os.posix_fallocate(f.fileno(), 0, max(free - leave, 1))
  return filler


def test_disk_full_stops_cleanly_and_keeps_the_last_checkpoint(base, train_file, small_disk,
                                                              tmp_path, monkeypatch):
  workdir = str((small_disk or tmp_path) / "run")
  real_save, filled = ckpt.save, []

  def save_then_fill_the_disk(mngr, state, meta, force=False):
    result = real_save(mngr, state, meta, force)
    if int(state["step"]) == 2:  # another program takes the space once step 2 is written
      ckpt.wait(mngr)
      if small_disk:
        filled.append(_fill(small_disk, 64 << 10))
      else:
        monkeypatch.setattr(ckpt, "_free_bytes", lambda directory: 64 << 10)
        filled.append(None)
    return result

  monkeypatch.setattr(ckpt, "save", save_then_fill_the_disk)
  cfg = make_config(base, train_file, workdir, train__steps=4)
  message = user_error(cfg)
  assert filled
  assert "No space left on device" in message and "step 2" in message, message
  assert "rerun the same command" in message, message
  checkpoints = os.path.join(workdir, "checkpoints")
  assert ckpt.complete_steps(checkpoints) == [1, 2]
  assert not glob.glob(os.path.join(checkpoints, "*tmp*"))  # nothing half-written either
  adapters = ckpt.load_adapters(workdir)  # the newest checkpoint restores
  assert adapters.rank == 4 and all(np.isfinite(x).all() for x in jax.tree.leaves(adapters.params))

  monkeypatch.undo()  # space is freed: the same command resumes from step 2 and finishes
  if filled[0]:
    os.remove(filled[0])
  last = train.run(cfg)
  assert np.isfinite(last["loss"]) and ckpt.complete_steps(checkpoints)[-1] == 4


def test_storage_failure_inside_orbax_is_one_line(small_disk, tmp_path, monkeypatch):
  """When the write itself fails (the space check passed, then the disk filled up), the error from
  orbax's writer becomes the same one line, and the previous checkpoint still restores."""
  workdir = str((small_disk or tmp_path) / "run")
  mngr = ckpt.manager(workdir, keep=3)
  state = lambda step, n: {"x": jax.numpy.full((n,), float(step)), "step": jax.numpy.array(step)}
  ckpt.save(mngr, state(1, 8), {"meta": 1})
  ckpt.wait(mngr)
  monkeypatch.setattr(ckpt, "_free_bytes", lambda directory: 1 << 40)  # the check passes
  if small_disk:
    _fill(small_disk, 16 << 10)
  else:  # no tmpfs: make orbax's writer hit ENOSPC
    def enospc(*args, **kwargs):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(type(mngr), "save", enospc)
  with pytest.raises(UserError) as e:
    ckpt.save(mngr, state(2, 1 << 16), {"meta": 1})  # 256 KiB: more than is left
    ckpt.wait(mngr)
  message = str(e.value)
  assert "\n" not in message and "No space left on device" in message, message
  assert "step 1" in message, message
  assert ckpt.complete_steps(os.path.join(workdir, "checkpoints")) == [1]
  monkeypatch.undo()
  reader = ckpt.manager(workdir, keep=0, read_only=True)
  restored = reader.restore(1, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  assert float(restored["state"]["x"][0]) == 1.0


# ----------------------------------------------------------------------------- non-finite values


def test_nonfinite_stops_naming_the_step(base, train_file, tmp_path):
  # Step 1 is finite; its update with lr 1e30 makes step 2's loss overflow.
  cfg = make_config(base, train_file, tmp_path, optim__lr=1e30, train__steps=4)
  message = user_error(cfg)
  assert message.startswith("step 2: non-finite loss"), message
  assert "train.skip_nonfinite=True" in message and "optim.lr" in message
  assert ckpt.complete_steps(str(tmp_path / "checkpoints")) == [1]  # and nothing half-written
  assert not glob.glob(str(tmp_path / "checkpoints" / "*tmp*"))


def test_nonfinite_steps_are_skipped_and_counted(base, train_file, tmp_path, monkeypatch):
  real_batch = data.Batches.__call__

  def poisoned(self, position, *args):
    batch = real_batch(self, position, *args)
    if position == 1:  # step 2's batch
      batch["loss_mask"] = batch["loss_mask"] * np.float32("nan")
    return batch

  monkeypatch.setattr(data.Batches, "__call__", poisoned)
  cfg = make_config(base, train_file, tmp_path, train__steps=4, train__skip_nonfinite=True)
  last = train.run(cfg)
  assert last["skipped_nonfinite"] == 1 and np.isfinite(last["loss"])
  with open(tmp_path / "metrics.jsonl") as f:
    losses = {m["step"]: m["loss"] for m in map(json.loads, f) if "loss" in m}
  assert np.isnan(losses[2]) and all(np.isfinite(losses[s]) for s in (1, 3, 4))
  # the skipped step changed nothing: the saved adapters are finite
  adapters = ckpt.load_adapters(str(tmp_path))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(adapters.params))


# ----------------------------------------------------------------------------- untrusted input


def test_package_never_unpickles_or_runs_remote_code():
  problems = []
  for path in glob.glob(os.path.join(REPO, "ftjax", "**", "*.py"), recursive=True):
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
      where = f"{os.path.relpath(path, REPO)}:{getattr(node, 'lineno', 0)}"
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
        if any(n.split(".")[0] in ("pickle", "cPickle", "dill", "joblib", "marshal")
               for n in names):
          problems.append(f"{where}: imports a pickle library")
      if not isinstance(node, ast.Call):
        continue
      name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(
          node.func, "id", "")
      owner = getattr(node.func, "value", None)
      owner = getattr(owner, "id", getattr(owner, "attr", ""))
      kwargs = {k.arg: getattr(k.value, "value", k.value) for k in node.keywords}
      if name in ("eval", "exec") and isinstance(node.func, ast.Name):
        problems.append(f"{where}: {name}()")
      if name == "load" and owner == "torch":
        problems.append(f"{where}: torch.load")
      if kwargs.get("allow_pickle") is True or kwargs.get("weights_only") is False:
        problems.append(f"{where}: unpickling allowed")
      if name == "from_pretrained" and kwargs.get("trust_remote_code") is not False:
        problems.append(f"{where}: from_pretrained without trust_remote_code=False")
      if kwargs.get("trust_remote_code") not in (None, False):
        problems.append(f"{where}: trust_remote_code={kwargs['trust_remote_code']}")
  assert not problems, problems


def test_tokenizer_custom_code_is_never_run(base, tmp_path):
  tok = copy_model(base, tmp_path)
  marker = tmp_path / "ran"
  with open(os.path.join(tok, "tokenization_evil.py"), "w") as f:
    f.write(f"open({str(marker)!r}, 'w').close()\n"
            "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")
  edit_json(os.path.join(tok, "tokenizer_config.json"),
            auto_map={"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]})
  try:
    data.load_tokenizer(tok)  # refusing is fine too; running the module is not
  except UserError:
    pass
  assert not marker.exists()


def test_chat_template_is_sandboxed(base, tmp_path):
  tok = copy_model(base, tmp_path)
  marker = tmp_path / "ran"
  with open(os.path.join(tok, "chat_template.jinja"), "w") as f:
    f.write("{{ cycler.__init__.__globals__.os.system('touch " + str(marker) + "') }}"
            "{% for m in messages %}{{ m.content }}{% endfor %}")
  tokenizer = data.load_tokenizer(tok)
  rows = [{"messages": [{"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "hello"}]}]
  with pytest.raises(UserError, match=r"chats.jsonl:1: the chat template refused"):
    data.tokenize_rows(rows, tokenizer, "messages", 64, "chats.jsonl")
  assert not marker.exists()


# ----------------------------------------------------------------------------- issue 21: data that
# changed under a resume, unusable workdirs, values out of range, non-finite weights and adapters,
# damaged newest checkpoints, encodings, refusals before slow work.

from ftjax import config as config_lib, datacheck, hf_io, metrics, prepare  # noqa: E402


def test_cli_resume_refuses_data_that_changed(base, train_file, trained, tmp_path):
  """Same data.train path, other rows: refused like any other change of meaning, naming the file
  and what changed; the data file is restored afterwards (other tests share it)."""
  before = snapshot(trained)
  with open(train_file, "rb") as f:
    original = f.read()
  try:
    with open(train_file, "ab") as f:
      f.write(original.splitlines(keepends=True)[0])  # one row more
    line = _assert_one_error_line(_cli(_recipe(tmp_path, base, train_file, trained),
                                       "--config.train.steps=3"))
  finally:
    with open(train_file, "wb") as f:
      f.write(original)
  assert f"data.train {train_file}: its content changed since the checkpoint (100 -> 101 lines" \
      in line, line
  assert "--config.lora.init_from=" in line and "new --config.workdir" in line, line
  assert snapshot(trained) == before


def test_resume_compares_data_only_when_fingerprinted(tmp_path):
  a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
  a.write_text('{"text": "x"}\n')
  b.write_text('{"text": "y"}\n')
  now = {"config": {}, "lora": {}, "base": None, "data": ckpt.data_fingerprint({"": str(a)})}
  old = {**now, "data": ckpt.data_fingerprint({"": str(b)})}
  old["data"][""]["path"] = str(a)  # the same path held other bytes when it was saved
  assert [c.split(":")[0] for c in ckpt.changed_meaning(old, now)] == [f"data.train {a}"]
  assert ckpt.changed_meaning({k: v for k, v in old.items() if k != "data"}, now) == []  # old ckpt
  assert ckpt.changed_meaning(now, now) == []


def test_refusals_come_before_the_data_and_the_base_load(base, train_file, trained, tmp_path,
                                                         monkeypatch, capsys):
  def never(*args, **kwargs):
    raise AssertionError("loaded before refusing")

  for slow in (data.load_rows, data.load_tokenizer):
    monkeypatch.setattr(data, slow.__name__, never)
  monkeypatch.setattr(hf_io, "load_hf", never)
  message = user_error(make_config(base, train_file, trained, lora__rank=8))
  assert "lora.rank: 4 -> 8" in message, message
  assert train.run(make_config(base, train_file, trained)) == {}
  assert "already trained to step 2" in capsys.readouterr().out


def test_cli_damaged_newest_checkpoint_is_one_line(base, train_file, trained, tmp_path):
  """Array files cut short: one line naming the previous complete step and what to delete, none
  of the reader threads' tracebacks."""
  workdir = str(tmp_path / "w")
  shutil.copytree(trained, workdir)
  newest = os.path.join(workdir, "checkpoints", "2")
  for path in glob.glob(os.path.join(newest, "state", "d", "*")):
    with open(path, "r+b") as f:
      f.truncate(10)
  before = snapshot(workdir)
  line = _assert_one_error_line(_cli(_recipe(tmp_path, base, train_file, workdir),
                                     "--config.train.steps=3"))
  assert line.startswith(f"error: {newest}: cannot restore the checkpoint"), line
  assert f"delete {newest} to resume from step 1, the previous complete checkpoint" in line, line
  assert snapshot(workdir) == before


def test_restore_failed_message_for_the_other_entry_points(tmp_path):
  for step in (1, 3):
    (tmp_path / str(step)).mkdir()
  e = FileNotFoundError(2, "No such file or directory")
  message = str(ckpt.restore_failed(str(tmp_path), 3, "restore the checkpoint", e, resume=False))
  assert message.startswith(f"{tmp_path}/3: cannot restore the checkpoint: a file is missing")
  assert "use --step=1, the previous complete checkpoint" in message, message


def _numeric_keys(c, prefix=""):
  for k, v in c.items():
    key = f"{prefix}{k}"
    if hasattr(v, "items"):
      yield from _numeric_keys(v, key + ".")
    elif isinstance(v, (int, float)) and not isinstance(v, bool):
      yield key


def test_every_numeric_key_has_a_range():
  mesh_axes = {"mesh.data", "mesh.fsdp", "mesh.tensor"}  # "auto" or a size: plan.choose_mesh
  assert set(_numeric_keys(defaults())) - mesh_axes == {k for k, _, _ in config_lib.RANGES}
  config_lib.check_ranges(defaults())  # the defaults are in range


@pytest.mark.parametrize("key,value,words", [
    ("optim__lr", -1e-4, ["optim.lr=-0.0001", ">= 0", "2e-4"]),
    ("optim__lr", float("nan"), ["optim.lr=nan", "finite"]),
    ("train__steps", -1, ["train.steps=-1", "no epochs", "rows / train.batch_size"]),
    ("lora__dropout", 5.0, ["lora.dropout=5.0", "[0, 1)", "0.05 for 5%"]),
] + [(k.replace(".", "__"), bad, [f"{k}=", "must be"]) for k, bad in [
    ("seed", -1), ("quant.group_size", 0), ("lora.alpha", 0.0), ("data.seq_len", 1),
    ("train.batch_size", 0), ("train.grad_accum", 0), ("train.eval_every", -1),
    ("train.eval_generate", -2), ("optim.warmup_steps", -1), ("optim.weight_decay", -0.1),
    ("optim.clip_norm", float("inf")), ("ckpt.keep", -1), ("mesh.device_gib", -1.0)]])
def test_values_out_of_range_are_refused_before_loading(key, value, words, base, train_file,
                                                        tmp_path, monkeypatch):
  monkeypatch.setattr(hf_io, "read_spec", lambda *a: pytest.fail("read the model first"))
  with pytest.raises(UserError) as e:
    prepare.prepare(make_config(base, train_file, tmp_path / "w", **{key: value}))
  for word in words:
    assert word in str(e.value), (word, str(e.value))
  assert not (tmp_path / "w").exists()


def test_nonfinite_base_weight_is_named(base, train_file, tmp_path):
  model = copy_model(base, tmp_path)
  edit_weights(model, lambda w: w["model.layers.0.mlp.up_proj.weight"].__setitem__((3, 5), np.nan))
  message = user_error(make_config(model, train_file, tmp_path / "w"))
  tensor = "model.layers.0.mlp.up_proj.weight"
  assert message.startswith(os.path.join(model, "model.safetensors") +
                            f": tensor {tensor} holds 1 non-finite"), message
  assert "optim.lr" not in message


def test_nonfinite_adapters_are_never_saved(base, train_file, tmp_path):
  """lr 1e39 overflows float32: step 1's loss and gradient are finite, its update is not."""
  message = user_error(make_config(base, train_file, tmp_path, optim__lr=1e39))
  assert message.startswith("step 1: the adapters (or their optimizer state) hold non-finite"), \
      message
  assert "optim.lr" in message and "none was saved" in message
  assert not glob.glob(str(tmp_path / "checkpoints" / "*"))  # no step, not even a tmp dir


def test_non_utf8_and_bom_and_paths_with_equals(base, train_file, tmp_path):
  with open(train_file, "rb") as f:
    rows = f.read().splitlines(keepends=True)
  bad = tmp_path / "latin1.jsonl"
  bad.write_bytes(b"".join(rows[:2]) + rows[2].replace(b'"prompt": "', b'"prompt": "caf\xe9 ')
                  + b"".join(rows[3:5]))
  with pytest.raises(UserError, match=rf"^{bad}:3: not UTF-8 \(byte 0xe9 at column \d+\)"):
    data.load_rows(str(bad))
  json_file = tmp_path / "latin1.json"
  json_file.write_bytes(b'[\n{"text": "a"},\n{"text": "\xff"}\n]')
  with pytest.raises(UserError, match=rf"^{json_file}:3: not UTF-8"):
    data.load_rows(str(json_file))
  sweep = tmp_path / "lr=2e-3"  # a sweep directory; the file starts with a BOM
  sweep.mkdir()
  (sweep / "train.jsonl").write_bytes(b"\xef\xbb\xbf" + b"".join(rows[:5]))
  (tmp_path / "bom.json").write_bytes(b'\xef\xbb\xbf[{"text": "a"}]')
  assert data.train_sources(str(sweep / "train.jsonl")) == {"": str(sweep / "train.jsonl")}
  assert data.load_rows(str(sweep / "train.jsonl")) == data.load_rows(train_file)[:5]
  assert data.load_rows(str(tmp_path / "bom.json")) == [{"text": "a"}]
  # train and check_data read rows alike (the CLIs print the UserError as their one line)
  cfg = make_config(base, train_file, tmp_path / "w", data__train=str(bad))
  for read in (prepare.load_data, datacheck.load_groups):
    with pytest.raises(UserError, match=rf"^{bad}:3: not UTF-8"):
      read(cfg)
  cfg.data.train = str(sweep / "train.jsonl")
  assert datacheck.load_groups(cfg)[0].path == cfg.data.train


def test_unusable_workdir_is_one_line_before_loading(base, train_file, tmp_path, monkeypatch):
  monkeypatch.setattr(data, "load_rows", lambda *a: pytest.fail("loaded the data first"))
  file = tmp_path / "a-file"
  file.write_text("mine")
  for workdir, words in [(file, ["is a file, not a directory"]),
                         (file / "run", ["a-file is a file", "cannot be created"])]:
    message = user_error(make_config(base, train_file, workdir))
    assert message.startswith(f"workdir={workdir}: "), message
    for word in words:
      assert word in message, message
  assert file.read_text() == "mine"
  # read-only (as root, chmod does not stop a write: the verdict of os.access is simulated)
  readonly = tmp_path / "ro"
  readonly.mkdir()
  monkeypatch.setattr(os, "access", lambda path, mode: os.path.abspath(path) != str(readonly))
  message = user_error(make_config(base, train_file, readonly / "run"))
  assert message.startswith(f"workdir={readonly / 'run'}: {readonly} is not writable"), message
  monkeypatch.undo()
  monkeypatch.setattr(data, "load_rows", lambda *a: pytest.fail("loaded the data first"))
  # full
  monkeypatch.setattr(ckpt, "_free_bytes", lambda directory: 100 << 10)
  message = user_error(make_config(base, train_file, tmp_path / "w"))
  assert "No space left on device" in message and "MiB free" in message, message
  assert not (tmp_path / "w").exists()


def test_metrics_disk_full_is_one_line_and_keeps_what_was_written(base, train_file, tmp_path,
                                                                 monkeypatch):
  """The disk fills after step 1 is logged: step 2's metrics.jsonl write fails with ENOSPC."""
  real_open = open

  class Full:
    def __init__(self, f):
      self._f, self._lines = f, 0

    def write(self, text):
      self._lines += 1
      if self._lines > 1:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
      return self._f.write(text)

    def __getattr__(self, name):
      return getattr(self._f, name)

  def opening(path, mode="r", *args, **kwargs):
    f = real_open(path, mode, *args, **kwargs)
    return Full(f) if path.endswith("metrics.jsonl") and mode == "a" else f

  monkeypatch.setattr(metrics, "open", opening, raising=False)
  message = user_error(make_config(base, train_file, tmp_path, train__steps=3))
  assert message.startswith(f"{tmp_path / 'metrics.jsonl'}: cannot write it (No space left"), \
      message
  with real_open(tmp_path / "metrics.jsonl") as f:
    assert [json.loads(l)["step"] for l in f] == [1]
  assert ckpt.complete_steps(str(tmp_path / "checkpoints")) == [1]  # the save in flight finished


def test_tensorboard_disk_full_is_one_line(tmp_path, monkeypatch):
  writer = metrics.MetricWriter(str(tmp_path))
  writer.write(1, {"loss": 1.0})

  def enospc(self, event):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(metrics.EventsWriter, "write_event", enospc)
  with pytest.raises(UserError, match=rf"^{tmp_path / 'tensorboard'}: cannot write it \(No space"):
    writer.write(2, {"loss": 0.5})
  writer.close()
  with open(tmp_path / "metrics.jsonl") as f:
    assert [json.loads(l)["step"] for l in f] == [1, 2]
