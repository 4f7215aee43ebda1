"""python -m ftjax.train --config=configs/NAME.py [--config.a.b=value ...]

Fine-tunes LoRA adapters on a frozen (optionally quantized) base. Rerunning the same command resumes
from the newest checkpoint in `workdir`; SIGTERM saves the current step and exits 0.
"""
import dataclasses
import functools
import json
import os
import signal
import sys
import time

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from ftjax import ckpt, data, hf_io, lora, optim, quant, sharding, step as step_lib
from ftjax.errors import UserError, parse_flags, run_cli
from ftjax.sampling import generate
from ftjax.model import REMAT_POLICIES, Model
from ftjax.metrics import MetricWriter, ProgressBar

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
  train: data.Batches
  eval_examples: list
  eval_rows: list  # raw eval rows, for generation exact match


def load_data(cfg) -> Data:
  tokenizer = data.load_tokenizer(cfg.tokenizer.path or cfg.model.path)
  if not cfg.data.train:
    raise UserError("data.train is empty: set it to a .jsonl/.json/.parquet file, a saved "
                    "dataset dir, or a hub dataset name")
  rows = data.load_rows(cfg.data.train)
  examples, stats = data.tokenize_rows(rows, tokenizer, cfg.data.format, cfg.data.seq_len,
                                       cfg.data.train)
  log0(f"train data {cfg.data.train}: {describe(stats)}")
  batches = data.Batches(examples, batch_size=cfg.train.batch_size, seq_len=cfg.data.seq_len,
                         packing=cfg.data.packing, seed=cfg.seed, pad_id=tokenizer.pad_id,
                         name=cfg.data.train)
  eval_examples, eval_rows = [], []
  if cfg.data.eval:
    eval_rows = list(data.load_rows(cfg.data.eval))
    eval_examples, stats = data.tokenize_rows(eval_rows, tokenizer, cfg.data.format,
                                              cfg.data.seq_len, cfg.data.eval)
    log0(f"eval data {cfg.data.eval}: {describe(stats)}")
  return Data(tokenizer, batches, eval_examples, eval_rows)


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
  if cfg.train.remat not in ("none", *REMAT_POLICIES):
    raise UserError(f"train.remat={cfg.train.remat!r}: use one of none, "
                    f"{', '.join(REMAT_POLICIES)}")
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


def make_adapters(cfg, spec, key) -> lora.Adapters:
  if cfg.lora.init_from:
    from ftjax import peft_io
    adapters = ckpt.load_adapters(cfg.lora.init_from)  # a PEFT dir or a training workdir
    peft_io.check_adapters(adapters, spec, cfg.lora.init_from)
    return dataclasses.replace(adapters, dropout=cfg.lora.dropout)
  return lora.init(spec, cfg.lora.targets, cfg.lora.rank, cfg.lora.alpha, key,
                   rslora=cfg.lora.rslora, dropout=cfg.lora.dropout)


def evaluate(eval_fn, adapter_params, model, batches, mesh, host_table=None) -> float:
  total, count = 0.0, 0.0
  for batch in batches:
    t, n = eval_fn(adapter_params, model, place_batch(batch, mesh, host_table))
    total, count = total + float(t), count + float(n)
  return total / max(count, 1.0)


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


def exact_match(cfg, model, adapters, d: Data, n: int) -> tuple[float, str]:
  """Greedy-decodes the first n eval prompts in one left-padded batch; returns the fraction whose
  completion equals the reference exactly, and one sample."""
  pairs = [data.prompt_and_reference(d.tokenizer, cfg.data.format, row) for row in d.eval_rows[:n]]
  width = max(len(p) for p, _ in pairs)
  tokens = np.full((len(pairs), width), d.tokenizer.pad_id, np.int32)
  mask = np.zeros((len(pairs), width), bool)
  for i, (prompt, _) in enumerate(pairs):
    tokens[i, width - len(prompt):], mask[i, width - len(prompt):] = prompt, True
  longest = max(len(d.tokenizer.encode(ref)) for _, ref in pairs)
  out = np.asarray(generate(model, tokens, adapters=adapters, max_new_tokens=longest + 8,
                            prompt_mask=mask))
  texts = [data.decode_completion(d.tokenizer, row) for row in out]
  hits = sum(t.strip() == ref.strip() for t, (_, ref) in zip(texts, pairs))
  sample = f"{d.tokenizer.decode(pairs[0][0])!r} -> {texts[0]!r}"
  return hits / len(pairs), sample


def run(cfg) -> dict:
  """Trains as `cfg` says; returns the last logged metrics."""
  check_config(cfg)
  mesh = sharding.make_mesh(cfg.mesh)
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
  t0 = time.time()
  model = dataclasses.replace(
      hf_io.load_hf(cfg.model.path, cfg.model.dtype, cfg.quant.mode, mesh,
                    group_size=cfg.quant.group_size, embed_on_host=cfg.model.embed_on_host),
      kernels=step_kernels)
  host_table = (hf_io.host_embedding(cfg.model.path, cfg.model.dtype)
                if cfg.model.embed_on_host else None)
  log0(f"loaded {spec.arch} base ({spec.n_layers} layers, quant={cfg.quant.mode}) in "
       f"{time.time() - t0:.1f}s on mesh {dict(mesh.shape)}")
  key = jax.random.PRNGKey(cfg.seed)
  adapters = make_adapters(cfg, spec, jax.random.fold_in(key, 1))
  optimizer = optim.make_optimizer(cfg.optim, cfg.train.steps)
  state_shardings = {
      "adapters": sharding.adapter_shardings(mesh, spec, adapters.params),
      "opt_state": None, "step": sharding.replicated(mesh), "rng": sharding.replicated(mesh),
      "data_position": sharding.replicated(mesh)}
  init = jax.jit(lambda a: step_lib.init_state(lora.with_params(adapters, a), optimizer, cfg.seed),
                 out_shardings=None)
  state = init(jax.device_put(adapters.params, state_shardings["adapters"]))
  state_shardings["opt_state"] = jax.tree.map(lambda x: x.sharding, state["opt_state"])

  meta = {"config": json.loads(cfg.to_json_best_effort()), "lora": ckpt.lora_meta(adapters),
          "base": dataclasses.asdict(spec)}
  meta["config"]["model"]["attention"] = step_kernels.attention  # config.json: what ran
  mngr = ckpt.manager(cfg.workdir, cfg.ckpt.keep)
  restored = ckpt.restore_latest(mngr, jax.tree.map(ocp_abstract, state), meta, cfg.workdir)
  if restored is not None:
    state = restored
    log0(f"resumed from {cfg.workdir} at step {int(state['step'])}")
  if jax.process_index() == 0:
    os.makedirs(cfg.workdir, exist_ok=True)
    with open(os.path.join(cfg.workdir, "config.json"), "w") as f:
      json.dump(meta["config"], f, indent=2)

  train_step = sharding.with_mesh(mesh, jax.jit(  # the mesh turns on activation constraints
      functools.partial(step_lib.train_step, adapters=adapters, optimizer=optimizer,
                        grad_accum=cfg.train.grad_accum, remat=cfg.train.remat),
      donate_argnums=0, out_shardings=(state_shardings, sharding.replicated(mesh))))
  eval_fn = jax.jit(functools.partial(step_lib.eval_step, adapters=adapters))
  eval_batches = lambda: data.eval_batches(
      d.eval_examples, batch_size=cfg.train.batch_size, seq_len=cfg.data.seq_len,
      pad_id=d.tokenizer.pad_id, process_index=jax.process_index(),
      process_count=jax.process_count())

  stop = {"signal": None}
  signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))
  writer = MetricWriter(cfg.workdir, enabled=jax.process_index() == 0)
  first = int(state["step"])
  if cfg.train.eval_generate and d.eval_rows and first == 0:
    em, sample = exact_match(cfg, with_device_embedding(model, host_table, mesh), None, d,
                             cfg.train.eval_generate)
    log0(f"before training: exact match {em:.1%} on {cfg.train.eval_generate} eval prompts; "
         f"sample {sample}")
    writer.write(0, {"exact_match": em})
  bar = ProgressBar(first, cfg.train.steps, enabled=jax.process_index() == 0)
  last, skipped, tokens, t_log = {}, 0, 0, time.time()
  position = int(state["data_position"])
  host_batch = d.train(position, jax.process_index(), jax.process_count())
  for step in range(first, cfg.train.steps):
    state, metrics = train_step(state, model, place_batch(host_batch, mesh, host_table))
    done, position = step + 1, position + 1
    tokens += int(np.sum(host_batch["segment_ids"] > 0)) * jax.process_count()
    if done < cfg.train.steps:  # the next batch is built while the device works
      host_batch = d.train(position, jax.process_index(), jax.process_count())
    if bool(metrics["nonfinite"]):
      if not cfg.train.skip_nonfinite:
        name = "loss" if not np.isfinite(float(metrics["loss"])) else "grad_norm"
        ckpt.wait(mngr)  # let the save in flight finish: the checkpoints stay as they were
        raise UserError(f"step {done}: non-finite {name} ({float(metrics[name])}); stopped "
                        "before applying it, checkpoints untouched. Lower optim.lr (or raise "
                        "optim.warmup_steps), or set train.skip_nonfinite=True to skip such steps")
      skipped += 1
    if done % cfg.train.log_every == 0 or done == cfg.train.steps:
      dt = time.time() - t_log
      last = {"loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
              "lr": float(optim.learning_rate(cfg.optim, cfg.train.steps)(done - 1)),
              "tokens_per_s": tokens / max(dt, 1e-9), "skipped_nonfinite": skipped}
      writer.write(done, last)
      bar.update(done, last)
      tokens, t_log = 0, time.time()
    if d.eval_examples and cfg.train.eval_every and done % cfg.train.eval_every == 0:
      eval_loss = evaluate(eval_fn, state["adapters"], model, eval_batches(), mesh, host_table)
      writer.write(done, {"eval_loss": eval_loss, "eval_ppl": float(np.exp(eval_loss))})
      bar.note(f"step {done}: eval_loss {eval_loss:.4f}")
    stopping = stop_requested(stop)
    if done % cfg.ckpt.every == 0 or done == cfg.train.steps or stopping:
      ckpt.save(mngr, state, meta, force=True)
    if stopping:
      ckpt.wait(mngr)
      bar.close()
      log0(f"SIGTERM: saved step {done} to {cfg.workdir}; rerun the same command to resume")
      writer.close()
      return last
  bar.close()
  ckpt.wait(mngr)
  if d.eval_examples:
    eval_loss = evaluate(eval_fn, state["adapters"], model, eval_batches(), mesh, host_table)
    writer.write(cfg.train.steps, {"eval_loss": eval_loss, "eval_ppl": float(np.exp(eval_loss))})
    log0(f"final eval_loss {eval_loss:.4f} (perplexity {np.exp(eval_loss):.2f})")
    last["eval_loss"] = eval_loss
  if cfg.train.eval_generate and d.eval_rows:
    trained = lora.with_params(adapters, state["adapters"])
    em, sample = exact_match(cfg, with_device_embedding(model, host_table, mesh), trained, d,
                             cfg.train.eval_generate)
    log0(f"after training: exact match {em:.1%} on {cfg.train.eval_generate} eval prompts; "
         f"sample {sample}")
    writer.write(cfg.train.steps, {"exact_match": em})
    last["exact_match"] = em
  writer.close()
  return last


def stop_requested(stop) -> bool:
  """Whether any process got SIGTERM. Processes can receive it at different steps; they must all
  save the same step, so with several processes the flag is shared every step."""
  if jax.process_count() == 1:
    return stop["signal"] is not None
  from jax.experimental import multihost_utils
  flags_ = multihost_utils.process_allgather(np.int32(stop["signal"] is not None))
  return bool(np.any(flags_))


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
