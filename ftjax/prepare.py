"""Everything a run does before its first step: checks, mesh, data, base, adapters, optimizer
state, the restored checkpoint. Cheap refusals come first, so a user's mistake costs no loading."""
import dataclasses
import json
import os
import time
from typing import Any

import jax

from ftjax import ckpt, data, datacheck, hf_io, lora, optim, peft_io, plan as plan_lib, quant
from ftjax import config as config_lib, objectives, pairs, sharding
from ftjax import step as step_lib
from ftjax import workdir as workdir_lib
from ftjax.errors import UserError
from ftjax.metrics import log0
from ftjax.model import Model


@dataclasses.dataclass
class Data:
  tokenizer: data.Tokenizer
  train: callable  # (position, process_index, process_count) -> this host's rows of that batch
  names: tuple  # the adapters' names (data.train's named sources); () for one unnamed source
  eval_examples: dict  # adapter name ("" when unnamed) -> its eval examples; {} without eval
  eval_rows: dict  # the same, raw eval rows, for generation exact match


def train_sources(cfg) -> dict:
  if not cfg.data.train:
    raise UserError("data.train is empty: set it to a .jsonl/.json/.parquet file, a saved "
                    "dataset dir, or a hub dataset name")
  return data.train_sources(cfg.data.train)


def load_data(cfg) -> Data:
  tokenizer = data.load_tokenizer(cfg.tokenizer.path or cfg.model.path)
  sources = train_sources(cfg)
  evals = data.eval_sources(sources, cfg.data.eval)
  batches, eval_examples, raw_rows = {}, {}, {}
  # preference pairs (ftjax/pairs.py) tokenize and batch as whole pairs
  preference = cfg.data.format == pairs.FORMAT
  tokenize_rows = pairs.tokenize_pairs if preference else data.tokenize_rows
  make_batches = pairs.PairBatches if preference else data.Batches
  for name, path in sources.items():
    label = f"{name}={path}" if name else path
    examples, stats = tokenize_rows(data.load_rows(path), tokenizer, cfg.data.format,
                                    cfg.data.seq_len, path)
    log0(f"train data {label}: {describe(stats)}")
    batches[name] = make_batches(examples, batch_size=cfg.train.batch_size,
                                 seq_len=cfg.data.seq_len, packing=cfg.data.packing,
                                 seed=cfg.seed, pad_id=tokenizer.pad_id, name=path)
  for path in dict.fromkeys(evals.values()):  # one eval file may serve every adapter
    rows = list(data.load_rows(path))
    examples, stats = tokenize_rows(rows, tokenizer, cfg.data.format, cfg.data.seq_len, path)
    log0(f"eval data {path}: {describe(stats)}")
    for name in (n for n, p in evals.items() if p == path):
      raw_rows[name], eval_examples[name] = rows, examples
  log0(datacheck.training_summary(cfg, tokenizer))  # raises under data.check=strict
  if list(sources) == [""]:
    return Data(tokenizer, batches[""], (), eval_examples, raw_rows)
  return Data(tokenizer, data.stacked_batches(batches), tuple(sources), eval_examples, raw_rows)


def describe(stats: data.Stats) -> str:
  return (f"{stats.rows} rows, {stats.tokens} tokens of which {stats.target_tokens} trained; "
          f"{stats.truncated} truncated to data.seq_len, {stats.dropped} dropped (no target left)")


def check_config(cfg):
  if not cfg.workdir:
    raise UserError("workdir is empty: set --config.workdir=DIR (checkpoints and metrics go there)")
  if not cfg.model.path:
    raise UserError("model.path is empty: set it to a Hugging Face model directory")
  config_lib.check_ranges(cfg)  # every numeric key, with its fix (ftjax/config.py)
  if cfg.train.batch_size % cfg.train.grad_accum:
    raise UserError(f"train.batch_size={cfg.train.batch_size} is not divisible by "
                    f"train.grad_accum={cfg.train.grad_accum}")
  if cfg.quant.kernel not in ("xla", "pallas"):
    raise UserError(f"quant.kernel={cfg.quant.kernel!r}: use xla or pallas")
  plan_lib.check_remat(cfg.train.remat)
  objective = objectives.from_config(cfg)  # an unknown objective or a stray preference.* key
  if objective.pairs != (cfg.data.format == pairs.FORMAT):
    raise UserError(f"train.objective={objective.name} with data.format={cfg.data.format}: "
                    f"preference objectives (dpo, orpo, simpo) train on data.format={pairs.FORMAT}"
                    " (prompt/chosen/rejected rows), sft on the other formats")
  if cfg.quant.mode not in ("none", "int8", "int4", "nf4"):
    raise UserError(f"quant.mode={cfg.quant.mode!r}: use none, int8, int4 or nf4")


def check_model_fit(cfg, spec):
  """What only the model's shapes can judge, checked before minutes of loading it."""
  if cfg.quant.mode != "none":
    for name in spec.projections:  # each projection's input dim must split into whole groups
      quant.check(cfg.quant.mode, spec.projection_shape(name), cfg.quant.group_size)
  if not cfg.lora.init_from:
    lora.resolve_targets(spec, cfg.lora.targets)
  hf_io.device_table(spec, cfg.model.embed_on_host)  # a tied head cannot leave the table on the host


def make_adapters(cfg, spec, key, names=()) -> lora.Adapters:
  """The run's adapters; with names (several sources) stacked, each one initialized exactly as a
  run on its source alone would be (same key), so each trains as that run does."""
  if names:
    one = make_adapters(cfg, spec, key)
    return lora.stack({name: one for name in names})
  if cfg.lora.init_from:
    adapters = ckpt.load_adapters(cfg.lora.init_from, spec=spec)  # a PEFT dir or a workdir
    if adapters.stacked:
      raise UserError(f"lora.init_from={cfg.lora.init_from}: holds several adapters "
                      f"({', '.join(adapters.names)}); export the one to start from "
                      "(python -m ftjax.export --adapter=NAME) and point lora.init_from at it")
    peft_io.check_adapters(adapters, spec, cfg.lora.init_from)
    if objectives.from_config(cfg).pairs and adapters.rank != cfg.lora.rank:
      raise UserError(f"lora.init_from={cfg.lora.init_from}: its adapter has rank {adapters.rank} "
                      f"but lora.rank={cfg.lora.rank}; preference tuning continues that adapter "
                      f"(the reference), so set lora.rank={adapters.rank}")
    return dataclasses.replace(adapters, dropout=cfg.lora.dropout)
  return lora.init(spec, cfg.lora.targets, cfg.lora.rank, cfg.lora.alpha, key,
                   rslora=cfg.lora.rslora, dropout=cfg.lora.dropout)


@dataclasses.dataclass
class Run:
  """What the loop needs, built once by `prepare`: plain values, no behaviour."""
  cfg: Any
  mesh: Any
  data: Data
  model: Model
  host_table: Any  # the input embedding table in host RAM (model.embed_on_host), else None
  adapters: lora.Adapters  # the LoRA config; params=None (the state holds the arrays)
  state: dict
  meta: dict
  mngr: Any
  first: int  # the step the state is at


def prepare(cfg, lock: workdir_lib.Lock | None = None) -> Run | None:
  """Everything before the first step: checks, mesh, data, base, adapters, optimizer state, and
  the restored checkpoint. None when the workdir is already trained to train.steps. `lock` takes
  the workdir before anything in it is touched (train.run's; None: the caller holds it).

  What refuses cheaply comes first: the config, the model's config.json, a resume that would
  change the checkpoint's meaning, "already trained", an unusable workdir; then the data (its
  errors before minutes of model loading), then the base."""
  check_config(cfg)
  if lock is not None:
    lock.take(cfg.workdir)  # before any slow work, and before anything touches the workdir
  mesh, why = plan_lib.choose_mesh(cfg)
  log0(f"mesh data={mesh.shape['data']} fsdp={mesh.shape['fsdp']} tensor={mesh.shape['tensor']} "
       f"({why})")
  if cfg.train.batch_size % (mesh.shape["data"] * mesh.shape["fsdp"]):
    raise UserError(f"train.batch_size={cfg.train.batch_size} is not divisible by the data-parallel "
                    f"size mesh.data*mesh.fsdp={mesh.shape['data'] * mesh.shape['fsdp']}")
  spec = hf_io.read_spec(cfg.model.path)
  check_model_fit(cfg, spec)
  sources = train_sources(cfg)
  device = jax.devices()[0]
  step_kernels = step_lib.kernels_for(cfg, device.platform, spec,  # static in the step
                                      getattr(device, "compute_capability", None))
  key = jax.random.PRNGKey(cfg.seed)
  adapters = make_adapters(cfg, spec, jax.random.fold_in(key, 1),
                           tuple(sources) if list(sources) != [""] else ())
  meta = {"config": json.loads(cfg.to_json_best_effort()), "lora": ckpt.lora_meta(adapters),
          "base": dataclasses.asdict(spec), "data": ckpt.data_fingerprint(sources)}
  meta["config"]["model"]["attention"] = step_kernels.attention  # config.json: what ran
  saved_step = ckpt.check_resume(cfg.workdir, meta)  # reads only the checkpoint's metadata
  if saved_step is not None and saved_step >= cfg.train.steps:
    log0(f"{cfg.workdir}: already trained to step {saved_step} (train.steps={cfg.train.steps}); "
         f"nothing to do. Raise train.steps to train on, or use another workdir")
    return None
  # adapters + Adam's two moments: what the first checkpoint needs on disk
  unusable = ckpt.workdir_error(cfg.workdir, 3 * sum(x.nbytes for x in
                                                     jax.tree.leaves(adapters.params)))
  if unusable is not None:
    raise unusable

  d = load_data(cfg)  # data errors surface before minutes of model loading
  if d.tokenizer.vocab_size > spec.vocab:
    raise UserError(f"tokenizer {cfg.tokenizer.path or cfg.model.path}: vocabulary of "
                    f"{d.tokenizer.vocab_size} exceeds the model's embedding ({spec.vocab} rows)")
  log0(f"kernels: attention {step_kernels.attention} (model.attention={cfg.model.attention}), "
       f"quantized matmul {step_kernels.quant}")
  mngr = _writing(os.path.join(cfg.workdir, "checkpoints"),
                  lambda: ckpt.manager(cfg.workdir, cfg.ckpt.keep))
  optimizer = optim.make_optimizer(cfg.optim, cfg.train.steps)
  state_shardings = {
      "adapters": sharding.adapter_shardings(mesh, spec, adapters.params),
      "opt_state": None, "step": sharding.replicated(mesh), "rng": sharding.replicated(mesh),
      "data_position": sharding.replicated(mesh), "guard": sharding.replicated(mesh)}
  init = jax.jit(lambda a: step_lib.init_state(lora.with_params(adapters, a), optimizer, cfg.seed))
  state = init(jax.device_put(adapters.params, state_shardings["adapters"]))
  adapters = lora.with_params(adapters, None)  # the state holds the arrays from here on
  if saved_step is not None:
    saved = {k: v for k, v in state.items() if k != "guard"}
    state = {**ckpt.restore(mngr, saved_step, jax.tree.map(ocp_abstract, saved)),
             "guard": state["guard"]}
    log0(f"resumed from {cfg.workdir} at step {saved_step}"
         f"{workdir_lib.schedule_note(mngr, saved_step, cfg)}")
  first = int(jax.device_get(state["step"]))
  t0 = time.time()
  model = dataclasses.replace(
      hf_io.load_hf(cfg.model.path, cfg.model.dtype, cfg.quant.mode, mesh,
                    group_size=cfg.quant.group_size, embed_on_host=cfg.model.embed_on_host),
      kernels=step_kernels)
  host_table = (hf_io.host_embedding(cfg.model.path, cfg.model.dtype)
                if cfg.model.embed_on_host else None)
  log0(f"loaded {spec.arch} base ({spec.n_layers} layers, quant={cfg.quant.mode}) in "
       f"{time.time() - t0:.1f}s on mesh {dict(mesh.shape)}")
  if jax.process_index() == 0:
    path = os.path.join(cfg.workdir, "config.json")
    _writing(path, lambda: _write_json(path, meta["config"]))
  return Run(cfg, mesh, d, model, host_table, adapters, state, meta, mngr, first)


def _write_json(path: str, value):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  try:
    with open(path + ".tmp", "w") as f:  # renamed over the old file: a failed write loses nothing
      json.dump(value, f, indent=2)
    os.replace(path + ".tmp", path)
  finally:
    if os.path.exists(path + ".tmp"):
      os.remove(path + ".tmp")


def _writing(path: str, write):
  """write(); a failure of the storage under `path` (full, read-only, forbidden) is one line."""
  try:
    return write()
  except Exception as e:  # pylint: disable=broad-except  (re-raised unless the storage failed)
    error = ckpt.storage_error(path, e)
    if error is None:
      raise
    raise error from None


def ocp_abstract(x):
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
