"""python -m ftjax.train --config=configs/NAME.py [--config.a.b=value ...]

Fine-tunes LoRA adapters on a frozen (optionally quantized) base. Rerunning the same command resumes
from the newest checkpoint in `workdir`; SIGTERM saves the current step and exits 0.
"""
import concurrent.futures
import dataclasses
import functools
import json
import os
import signal
import sys
import time
from typing import Any

from absl import app, flags, logging
import jax
import numpy as np
from ml_collections import config_flags

from ftjax import ckpt, data, datacheck, hf_io, lora, optim, quant, sharding
from ftjax import plan as plan_lib, step as step_lib
from ftjax.errors import UserError, parse_flags, run_cli
from ftjax.sampling import generate
from ftjax.model import Model
from ftjax.metrics import MetricWriter, ProgressBar, by_adapter, per_adapter

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file.", lock_config=True)
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0, for multi-host runs.")
flags.DEFINE_integer("num_processes", None, "Number of processes (hosts) in a multi-host run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run.")
FLAGS = flags.FLAGS


def initialize_distributed():
  """jax.distributed.initialize from the flags, or auto-detected (TPU VMs, GKE TPU, SLURM srun,
  Open MPI); a single process otherwise.

  It must run before anything touches JAX devices, so main calls it first. Note that absl parses
  the flags, which loads --config and runs its get_config(), before main: a config file must not
  touch jax devices (jax.devices(), any jnp array) when it is loaded.
  """
  given = (FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  if any(v is not None for v in given):
    if any(v is None for v in given):
      raise UserError("multi-host: pass all three of --coordinator_address=HOST:PORT "
                      "--num_processes=N --process_id=I, or none of them to auto-detect")
    if not 0 <= FLAGS.process_id < FLAGS.num_processes:
      raise UserError(f"--process_id={FLAGS.process_id}: must be in [0, --num_processes="
                      f"{FLAGS.num_processes})")
    # "deactivate": the flags say it all. Left on, a SLURM/MPI environment would still restrict
    # each process to one local device (SLURM_LOCALID), wrong for one process per node.
    kwargs = dict(coordinator_address=FLAGS.coordinator_address,
                  num_processes=FLAGS.num_processes, process_id=FLAGS.process_id,
                  cluster_detection_method="deactivate")
  elif _cluster_detected():
    kwargs = {}  # jax reads the cluster's environment
  else:
    return
  try:  # CPU processes exchange collectives through gloo; it only concerns the CPU backend
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except AttributeError:  # a jax without the option (it is the default where it exists)
    pass
  try:
    jax.distributed.initialize(**kwargs)
  except RuntimeError as e:
    if "before" not in str(e):
      raise
    raise UserError(f"jax.distributed.initialize: {e}; does the --config file touch jax "
                    "devices when it is loaded?") from None


def _cluster_detected() -> bool:
  """True where jax.distributed.initialize() can find its peers with no arguments."""
  env = os.environ
  count = lambda key: int(env.get(key) or 1)
  in_srun = all(k in env for k in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID"))
  try:  # set when `import jax` found TPU chips on the PCI bus (a Cloud TPU VM, GCE or GKE)
    from jax._src.cloud_tpu_init import running_in_cloud_tpu_vm as tpu_vm
  except ImportError:
    tpu_vm = False
  return bool((in_srun and count("SLURM_NTASKS") > 1) or count("OMPI_COMM_WORLD_SIZE") > 1
              or "TPU_WORKER_HOSTNAMES" in env or "TPU_PROCESS_ADDRESSES" in env or tpu_vm)


@dataclasses.dataclass
class Data:
  tokenizer: data.Tokenizer
  train: callable  # (position, process_index, process_count) -> this host's rows of that batch
  names: tuple  # the adapters' names (data.train's named sources); () for one unnamed source
  eval_examples: dict  # adapter name ("" when unnamed) -> its eval examples; {} without eval
  eval_rows: dict  # the same, raw eval rows, for generation exact match


def load_data(cfg) -> Data:
  tokenizer = data.load_tokenizer(cfg.tokenizer.path or cfg.model.path)
  if not cfg.data.train:
    raise UserError("data.train is empty: set it to a .jsonl/.json/.parquet file, a saved "
                    "dataset dir, or a hub dataset name")
  sources = data.train_sources(cfg.data.train)
  evals = data.eval_sources(sources, cfg.data.eval)
  batches, eval_examples, raw_rows = {}, {}, {}
  for name, path in sources.items():
    label = f"{name}={path}" if name else path
    examples, stats = data.tokenize_rows(data.load_rows(path), tokenizer, cfg.data.format,
                                         cfg.data.seq_len, path)
    log0(f"train data {label}: {describe(stats)}")
    batches[name] = data.Batches(examples, batch_size=cfg.train.batch_size,
                                 seq_len=cfg.data.seq_len, packing=cfg.data.packing,
                                 seed=cfg.seed, pad_id=tokenizer.pad_id, name=path)
  for path in dict.fromkeys(evals.values()):  # one eval file may serve every adapter
    rows = list(data.load_rows(path))
    examples, stats = data.tokenize_rows(rows, tokenizer, cfg.data.format, cfg.data.seq_len, path)
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


def log0(msg):
  if jax.process_index() == 0:
    print(msg, flush=True)


def check_config(cfg):
  if not cfg.workdir:
    raise UserError("workdir is empty: set --config.workdir=DIR (checkpoints and metrics go there)")
  if not cfg.model.path:
    raise UserError("model.path is empty: set it to a Hugging Face model directory")
  if cfg.train.grad_accum < 1 or cfg.train.batch_size % cfg.train.grad_accum:
    raise UserError(f"train.batch_size={cfg.train.batch_size} is not divisible by "
                    f"train.grad_accum={cfg.train.grad_accum}")
  if cfg.quant.kernel not in ("xla", "pallas"):
    raise UserError(f"quant.kernel={cfg.quant.kernel!r}: use xla or pallas")
  plan_lib.check_remat(cfg.train.remat)
  if cfg.quant.mode not in ("none", "int8", "int4", "nf4"):
    raise UserError(f"quant.mode={cfg.quant.mode!r}: use none, int8, int4 or nf4")
  for key in ("lora.rank", "train.log_every", "ckpt.every"):  # ranks and periods; 0 divides by 0
    section, name = key.split(".")
    if cfg[section][name] < 1:
      raise UserError(f"{key}={cfg[section][name]}: must be a positive integer")


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
    from ftjax import peft_io
    adapters = ckpt.load_adapters(cfg.lora.init_from)  # a PEFT dir or a training workdir
    if adapters.stacked:
      raise UserError(f"lora.init_from={cfg.lora.init_from}: holds several adapters "
                      f"({', '.join(adapters.names)}); export the one to start from "
                      "(python -m ftjax.export --adapter=NAME) and point lora.init_from at it")
    peft_io.check_adapters(adapters, spec, cfg.lora.init_from)
    return dataclasses.replace(adapters, dropout=cfg.lora.dropout)
  return lora.init(spec, cfg.lora.targets, cfg.lora.rank, cfg.lora.alpha, key,
                   rslora=cfg.lora.rslora, dropout=cfg.lora.dropout)


def eval_step_fn(adapters: lora.Adapters, mesh):
  """The jitted eval step, run under the mesh as the train step is (so FSDP gathers quantized
  weights as packed integers there too, not as dequantized floats)."""
  return sharding.with_mesh(mesh, jax.jit(functools.partial(step_lib.eval_step,
                                                            adapters=adapters)))


def evaluate(eval_fn, adapter_params, model, batches, mesh, host_table=None,
             adapter: int | None = None) -> float:
  """Mean token loss over the eval set (batches of `eval_rows` rows); `adapter`: the index of the
  stacked adapter the batches' rows use (the step then returns one sum per adapter)."""
  total, count = 0.0, 0.0
  for batch in batches:
    t, n = jax.device_get(eval_fn(adapter_params, model, place_batch(batch, mesh, host_table)))
    if adapter is not None:
      t, n = t[adapter], n[adapter]
    total, count = total + float(t), count + float(n)
  return total / max(count, 1.0)


def eval_metrics(eval_fn, adapter_params, model, d: Data, cfg, mesh, host_table=None) -> dict:
  """{"eval_loss", "eval_ppl"}; with several adapters each one's on its own eval data
  (`eval_loss/NAME`, `eval_ppl/NAME`), and `eval_loss` their mean."""
  losses = {}
  for k, (name, examples) in enumerate(d.eval_examples.items()):
    adapter = k if d.names else None
    losses[name] = evaluate(eval_fn, adapter_params, model, data.eval_batches(
        examples, batch_size=eval_rows(cfg, mesh), seq_len=cfg.data.seq_len,
        pad_id=d.tokenizer.pad_id, process_index=jax.process_index(),
        process_count=jax.process_count(), adapter_id=adapter), mesh, host_table, adapter)
  out = by_adapter("eval_loss", losses)
  return {**out, **{k.replace("eval_loss", "eval_ppl"): float(np.exp(v)) for k, v in out.items()}}


def eval_rows(cfg, mesh) -> int:
  """Rows per eval forward: training's micro-batch (batch_size / grad_accum), so that eval fits
  wherever training does; the whole batch when the micro-batch does not split over the devices."""
  micro = cfg.train.batch_size // cfg.train.grad_accum
  parallel = mesh.shape["data"] * mesh.shape["fsdp"]
  return micro if micro % parallel == 0 and micro % jax.process_count() == 0 else (
      cfg.train.batch_size)


def place_batch(batch, mesh, host_table=None):
  """This host's rows (block process_index of process_count, see sharding.make_mesh) -> one
  global array sharded over (data, fsdp). With the embedding table on the host (a numpy [V, D]),
  the batch also carries the tokens' rows as `embeds`."""
  if host_table is not None:
    batch = {**batch, "embeds": host_table[batch["tokens"]]}
  shard, n = sharding.batch_sharding(mesh), jax.process_count()
  # The global shape is explicit: inferred, it would be wrong for a batch axis that does not span
  # every process (make_mesh refuses such meshes).
  return {k: jax.make_array_from_process_local_data(shard, v, (len(v) * n,) + v.shape[1:])
          for k, v in batch.items()}


def with_device_embedding(model, host_table, mesh):
  """The model with its embedding table on the devices again, for decoding, which needs a new
  row every step; the caller drops it afterwards. Each device reads only its shard."""
  if host_table is None:
    return model
  abstract = {"embed": {"embedding": jax.ShapeDtypeStruct(host_table.shape, host_table.dtype)}}
  target = sharding.param_shardings(mesh, abstract)["embed"]["embedding"]
  # np.array: a copy, so that no device buffer aliases the read-only memory map
  table = jax.make_array_from_callback(host_table.shape, target,
                                       lambda idx: np.array(host_table[idx]))
  return dataclasses.replace(model, params={**model.params, "embed": {"embedding": table}})


def exact_match(cfg, model, adapters, tokenizer, rows, n: int, mesh) -> tuple[float, int, str]:
  """Greedy-decodes the first n eval prompts (of `rows`) in one left-padded batch, under the mesh;
  returns the fraction whose completion equals the reference exactly, how many were decoded, and
  one sample."""
  pairs = [data.prompt_and_reference(tokenizer, cfg.data.format, row) for row in rows[:n]]
  width = max(len(p) for p, _ in pairs)
  tokens = np.full((len(pairs), width), tokenizer.pad_id, np.int32)
  mask = np.zeros((len(pairs), width), bool)
  for i, (prompt, _) in enumerate(pairs):
    tokens[i, width - len(prompt):], mask[i, width - len(prompt):] = prompt, True
  longest = max(len(tokenizer.encode(ref)) for _, ref in pairs)
  # chat data: stop where training taught to stop, at the template's end of turn (as generate does)
  eot = data.end_of_turn_id(tokenizer) if cfg.data.format == "messages" else None
  out = np.asarray(sharding.with_mesh(mesh, generate)(
      model, tokens, adapters=adapters, max_new_tokens=longest + 8, prompt_mask=mask,
      stop_ids=() if eot is None else (eot,)))
  texts = [data.decode_completion(tokenizer, row) for row in out]
  hits = sum(t.strip() == ref.strip() for t, (_, ref) in zip(texts, pairs))
  sample = f"{tokenizer.decode(pairs[0][0])!r} -> {texts[0]!r}"
  return hits / len(pairs), len(pairs), sample


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


def prepare(cfg) -> Run | None:
  """Everything before the first step: checks, mesh, data, base, adapters, optimizer state, and
  the restored checkpoint. None when the workdir is already trained to train.steps."""
  check_config(cfg)
  mesh, why = sharding.choose_mesh(cfg)
  log0(f"mesh data={mesh.shape['data']} fsdp={mesh.shape['fsdp']} tensor={mesh.shape['tensor']} "
       f"({why})")
  spec = hf_io.read_spec(cfg.model.path)
  check_model_fit(cfg, spec)
  d = load_data(cfg)  # data errors surface before minutes of model loading
  if d.tokenizer.vocab_size > spec.vocab:
    raise UserError(f"tokenizer {cfg.tokenizer.path or cfg.model.path}: vocabulary of "
                    f"{d.tokenizer.vocab_size} exceeds the model's embedding ({spec.vocab} rows)")
  if cfg.train.batch_size % (mesh.shape["data"] * mesh.shape["fsdp"]):
    raise UserError(f"train.batch_size={cfg.train.batch_size} is not divisible by the data-parallel "
                    f"size mesh.data*mesh.fsdp={mesh.shape['data'] * mesh.shape['fsdp']}")

  step_kernels = step_lib.kernels_for(cfg, jax.devices()[0].platform, spec)  # static in the step
  log0(f"kernels: attention {step_kernels.attention} (model.attention={cfg.model.attention}), "
       f"quantized matmul {step_kernels.quant}")
  key = jax.random.PRNGKey(cfg.seed)
  adapters = make_adapters(cfg, spec, jax.random.fold_in(key, 1), d.names)
  meta = {"config": json.loads(cfg.to_json_best_effort()), "lora": ckpt.lora_meta(adapters),
          "base": dataclasses.asdict(spec)}
  meta["config"]["model"]["attention"] = step_kernels.attention  # config.json: what ran
  mngr = ckpt.manager(cfg.workdir, cfg.ckpt.keep)
  optimizer = optim.make_optimizer(cfg.optim, cfg.train.steps)
  state_shardings = {
      "adapters": sharding.adapter_shardings(mesh, spec, adapters.params),
      "opt_state": None, "step": sharding.replicated(mesh), "rng": sharding.replicated(mesh),
      "data_position": sharding.replicated(mesh), "guard": sharding.replicated(mesh)}
  init = jax.jit(lambda a: step_lib.init_state(lora.with_params(adapters, a), optimizer, cfg.seed))
  state = init(jax.device_put(adapters.params, state_shardings["adapters"]))
  adapters = lora.with_params(adapters, None)  # the state holds the arrays from here on
  saved = {k: v for k, v in state.items() if k != "guard"}
  restored = ckpt.restore_latest(mngr, jax.tree.map(ocp_abstract, saved), meta, cfg.workdir)
  if restored is not None:
    state = {**restored, "guard": state["guard"]}
  first = int(jax.device_get(state["step"]))
  if restored is not None and first >= cfg.train.steps:
    log0(f"{cfg.workdir}: already trained to step {first} (train.steps={cfg.train.steps}); "
         f"nothing to do. Raise train.steps to train on, or use another workdir")
    return None
  if restored is not None:
    log0(f"resumed from {cfg.workdir} at step {first}")
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
    os.makedirs(cfg.workdir, exist_ok=True)
    with open(os.path.join(cfg.workdir, "config.json"), "w") as f:
      json.dump(meta["config"], f, indent=2)
  return Run(cfg, mesh, d, model, host_table, adapters, state, meta, mngr, first)


def run(cfg) -> dict:
  """Trains as `cfg` says; returns the last logged metrics."""
  r = prepare(cfg)
  if r is None:
    return {}
  cfg, mesh = r.cfg, r.mesh
  optimizer = optim.make_optimizer(cfg.optim, cfg.train.steps)
  shardings = jax.tree.map(lambda x: x.sharding, r.state)
  remat, remat_line = plan_lib.resolve_remat(cfg, mesh)  # "auto": the cheapest that fits
  log0(remat_line)
  train_step = sharding.with_mesh(mesh, jax.jit(  # the mesh turns on activation constraints
      functools.partial(step_lib.train_step, adapters=r.adapters, optimizer=optimizer,
                        grad_accum=cfg.train.grad_accum, remat=remat,
                        skip_nonfinite=cfg.train.skip_nonfinite),
      donate_argnums=0, out_shardings=(shardings, sharding.replicated(mesh))))
  eval_fn = eval_step_fn(r.adapters, mesh)
  eval_loss = lambda state: eval_metrics(eval_fn, state["adapters"], r.model, r.data, cfg, mesh,
                                         r.host_table)

  writer = MetricWriter(cfg.workdir, r.first, enabled=jax.process_index() == 0)
  try:
    if cfg.train.eval_generate and r.data.eval_rows and r.first == 0:
      report_exact_match(r, writer, None, "before training")
    bar = ProgressBar(r.first, cfg.train.steps, enabled=jax.process_index() == 0)
    with StopSignals(multiprocess=jax.process_count() > 1) as stop:
      last, state, evaluated = train_loop(r, train_step, eval_loss, writer, bar, stop)
    bar.close()
    if stop.name is not None:
      log0(f"{stop.name}: saved step {int(jax.device_get(state['step']))} to {cfg.workdir}; "
           "rerun the same command to resume")
      return last
    if r.data.eval_examples and not evaluated:  # the loop's last eval may already be this one
      ev = eval_loss(state)
      writer.write(cfg.train.steps, ev)
      last.update(eval_losses(ev))
    if "eval_loss" in last:
      log0(f"final eval_loss {last['eval_loss']:.4f} (perplexity {np.exp(last['eval_loss']):.2f})")
    if cfg.train.eval_generate and r.data.eval_rows:
      last.update(report_exact_match(
          r, writer, lora.with_params(r.adapters, state["adapters"]), "after training"))
    return last
  finally:
    writer.close()


def report_exact_match(r: Run, writer, adapters, when: str) -> dict:
  """{"exact_match"}: of the base (adapters None) or the trained adapters; with several, each
  one's on its own eval prompts (`exact_match/NAME`) and their mean."""
  step = r.cfg.train.steps if adapters is not None else 0
  model = with_device_embedding(r.model, r.host_table, r.mesh)
  names = r.data.names or ("",)
  each = (lora.unstack(adapters) if r.data.names else {"": adapters}) if adapters is not None \
      else dict.fromkeys(names)
  ems = {}
  for name in names:
    ems[name], n, sample = exact_match(r.cfg, model, each[name], r.data.tokenizer,
                                       r.data.eval_rows[name], r.cfg.train.eval_generate, r.mesh)
    log0(f"{when}: {name + ': ' if name else ''}exact match {ems[name]:.1%} on {n} eval "
         f"prompts; sample {sample}")
  out = by_adapter("exact_match", ems)
  writer.write(step, out)
  return out


def eval_losses(ev: dict) -> dict:
  """What of evaluate's metrics the progress bar and the returned metrics carry."""
  return {k: v for k, v in ev.items() if k.startswith("eval_loss")}


def train_loop(r: Run, train_step, eval_loss, writer, bar, stop):
  """Steps r.first+1 .. train.steps. The device is never waited for between steps except where
  the host must know a value: log steps, evals, checkpoints, a stop. The next batch is built and
  placed in a background thread while the device runs the current step.

  Returns (last logged metrics, final state, whether the last step was just evaluated)."""
  cfg, state = r.cfg, r.state
  n_proc, me = jax.process_count(), jax.process_index()

  def make_batch(position):
    host = r.data.train(position, me, n_proc)
    return place_batch(host, r.mesh, r.host_table), int(np.sum(host["segment_ids"] > 0)) * n_proc

  last, evaluated, tokens, t_log = {}, False, 0, time.time()
  position = int(jax.device_get(state["data_position"]))
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    upcoming = pool.submit(make_batch, position)
    for done in range(r.first + 1, cfg.train.steps + 1):
      batch, n_tokens = upcoming.result()
      state, metrics = train_step(state, r.model, batch)
      position += 1
      tokens += n_tokens
      if done < cfg.train.steps:
        upcoming = pool.submit(make_batch, position)
      stopping = stop.requested(done)
      log = done % cfg.train.log_every == 0 or done == cfg.train.steps
      evaluate_now = bool(r.data.eval_examples and cfg.train.eval_every
                          and done % cfg.train.eval_every == 0)
      save = done % cfg.ckpt.every == 0 or done == cfg.train.steps or stopping
      if not (log or evaluate_now or save):
        continue
      guard, metrics = jax.device_get((state["guard"], metrics))  # the one sync of this step
      check_finite(r, guard)
      if log:
        dt = time.time() - t_log
        last = {"loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
                "lr": float(optim.learning_rate(cfg.optim, cfg.train.steps)(done - 1)),
                "tokens_per_s": tokens / max(dt, 1e-9),
                "skipped_nonfinite": int(guard["skipped"]), **per_adapter(metrics, r.data.names)}
        writer.write(done, last)
        tokens, t_log = 0, time.time()
      evaluated = evaluate_now
      if evaluate_now:
        ev = eval_loss(state)
        writer.write(done, ev)
        last = {**last, **eval_losses(ev)}
      if log or evaluate_now:
        bar.update(done, last)
      if save:
        ckpt.save(r.mngr, {k: v for k, v in state.items() if k != "guard"}, r.meta, force=True)
      if stopping:
        break
  ckpt.wait(r.mngr)
  return last, state, evaluated


def check_finite(r: Run, guard):
  """Stops at the first non-finite step (unless train.skip_nonfinite). The step froze the state
  there, so however late this is read, the adapters are those from before that step."""
  bad = int(guard["halted_at"])
  if not bad:
    return
  name = "loss" if not np.isfinite(float(guard["loss"])) else "grad_norm"
  ckpt.wait(r.mngr)  # let the save in flight finish: the checkpoints stay as they were
  raise UserError(f"step {bad}: non-finite {name} ({float(guard[name])}); stopped "
                  "before applying it, checkpoints untouched. Lower optim.lr (or raise "
                  "optim.warmup_steps), or set train.skip_nonfinite=True to skip such steps")


class StopSignals:
  """SIGTERM (a preemption) and Ctrl-C both end the run cleanly: the current step finishes, is
  saved, and the run exits 0. A second Ctrl-C aborts at once.

  With several processes, all must save the same step: jax's preemption service (which catches
  SIGTERM itself) agrees on it without a collective per step, and Ctrl-C is forwarded to it as a
  SIGTERM."""

  def __init__(self, multiprocess: bool):
    self.name, self._multi, self._previous = None, multiprocess, {}

  def __enter__(self):
    handlers = {signal.SIGINT: self._interrupt}
    if not self._multi:
      handlers[signal.SIGTERM] = self._terminate
    for sig, handler in handlers.items():
      self._previous[sig] = signal.signal(sig, handler)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def _terminate(self, signum, frame):
    self.name = self.name or "SIGTERM"

  def _interrupt(self, signum, frame):
    if self.name is not None:
      print("\nsecond Ctrl-C: aborted without saving this step; the newest complete checkpoint "
            "is intact", file=sys.stderr, flush=True)
      os._exit(130)
    self.name = "SIGINT"
    print("\nCtrl-C: finishing this step and saving (Ctrl-C again to abort)", file=sys.stderr,
          flush=True)
    if self._multi:
      os.kill(os.getpid(), signal.SIGTERM)  # to the preemption service, which tells the others

  def requested(self, step: int) -> bool:
    if self._multi:
      from jax.experimental import multihost_utils
      if multihost_utils.reached_preemption_sync_point(step):
        self.name = self.name or "SIGTERM"
        return True
      return False
    return self.name is not None


def ocp_abstract(x):
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}")
  if _CONFIG.value is None:
    raise UserError("--config=configs/NAME.py is required")
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  initialize_distributed()
  run(_CONFIG.value)


if __name__ == "__main__":
  app.run(run_cli(main), flags_parser=parse_flags)
