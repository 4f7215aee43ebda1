"""python -m ftjax.plan --config=configs/NAME.py [--config.a.b=value ...] [--target=tpu-v5e]

Predicts the device memory of a training run before any weight is read: from config.json alone it
builds the shapes of everything the train step touches (the base as ShapeDtypeStructs, quantized
projections as QArrays of them, adapters, optimizer state, one batch), compiles the very step that
`ftjax.train` runs (same function, same donation) ahead of time, and reads the compiler's buffer
assignment. Nothing the size of the model is allocated.

--target=local (default) compiles for this machine's first device. --target=tpu-v5e (tpu-v4,
tpu-v6e) compiles for one TPU chip with libtpu's compiler, on any machine (no TPU needed; pip
install 'ftjax[tpu-plan]'): the accelerator's own figure, where a CPU plan of a bf16 model is
inflated by XLA:CPU (no bf16 dot, so float32 copies of bf16 operands; bench/RESULTS.md).

Output: bytes per category, whether it fits the device, pinned host memory when remat offloads,
and as the last line `peak device memory: X.XX GiB`. The figure is for one device running the
whole batch (no mesh); under FSDP the parameters divide by mesh.fsdp.
"""
import dataclasses
import functools
import os

from absl import app, flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags

from ftjax import data, hf_io, lora, optim, quant, step as step_lib
from ftjax.errors import UserError, parse_flags, run_cli
from ftjax.model import Model

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Plan:
  """Bytes per category; `categories` sums to `peak` exactly."""
  categories: dict  # name -> bytes
  peak: int
  device: str
  device_bytes: int | None  # what the device can hold, when it says
  host_bytes: int = 0  # pinned host memory the step uses (train.remat="offload"), not in peak

  @property
  def fits(self) -> bool | None:
    return None if self.device_bytes is None else self.peak <= self.device_bytes


def abstract_model(spec, dtype: str, quant_mode: str, group_size: int,
                   embed_on_host: bool = False) -> Model:
  """The Model `hf_io.load_hf` would return, as shapes: same paths, dtypes and QArray layout."""
  if dtype not in hf_io.DTYPES:
    raise UserError(f"model.dtype={dtype!r}: use one of {list(hf_io.DTYPES)}")
  params = hf_io.abstract_params(spec, hf_io.device_table(spec, embed_on_host),
                                 hf_io.DTYPES[dtype], quant_mode, group_size)
  return Model(spec, params)


def abstract_batch(batch_size: int, seq_len: int, embeds=None) -> dict:
  """The batch contract of ftjax.data: int32 tokens/targets/segment_ids, float32 loss_mask; plus
  `embeds` [B, T, D] when the embedding table stays on the host (embeds: (D, dtype))."""
  i32 = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32)
  batch = {"tokens": i32, "targets": i32, "segment_ids": i32,
           "loss_mask": jax.ShapeDtypeStruct((batch_size, seq_len), jnp.float32)}
  if embeds is not None:
    batch["embeds"] = jax.ShapeDtypeStruct((batch_size, seq_len, embeds[0]), embeds[1])
  return batch


# Accelerators the planner can compile for without having one (libtpu's compiler, run here):
# --target name -> (topology handed to libtpu, HBM per chip).
TPU_TARGETS = {"tpu-v5e": ("v5e:2x2", 16 * GiB), "tpu-v4": ("v4:2x2x1", 32 * GiB),
               "tpu-v6e": ("v6e:2x2", 32 * GiB)}


def target_device(target: str):
  """(device to compile for, its memory in bytes or None): a local device, or one chip of a TPU
  topology described to libtpu (deviceless ahead-of-time compilation, as MaxText's
  train_compile does)."""
  if target == "local":
    device = jax.local_devices()[0]
    return device, device_bytes(device)
  if target not in TPU_TARGETS:
    raise UserError(f"--target={target!r}: use local or one of {', '.join(TPU_TARGETS)}")
  topology, hbm = TPU_TARGETS[target]
  from jax.experimental import topologies
  # What libtpu reads while it starts, so that it does not look for a cloud metadata server or
  # real hosts. Restored after: a TPU_WORKER_HOSTNAMES left behind makes child processes (and
  # ftjax.train) believe they are on a TPU cluster.
  startup = {"TPU_SKIP_MDS_QUERY": "1", "TPU_ACCELERATOR_TYPE": "v5litepod-4",
             "TPU_WORKER_HOSTNAMES": "localhost"}
  saved = {k: os.environ.get(k) for k in startup}
  os.environ.update({k: v for k, v in startup.items() if saved[k] is None})
  try:
    devices = topologies.get_topology_desc(
        platform="tpu", topology_name=topology, chip_config_name="default",
        chips_per_host_bounds=(2, 2, 1), num_slices=1).devices
  except Exception as e:  # no libtpu: jax raises RuntimeError or a backend error
    raise UserError(f"--target={target}: the TPU compiler is not available here ({e}); "
                    "install it with pip install 'ftjax[tpu-plan]'") from None
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
  return devices[0], hbm


def compile_step(cfg, spec, device=None):
  """(compiled train step, its abstract args) exactly as ftjax.train builds them, for shapes;
  compiled for `device` (default: the local backend's)."""
  model = abstract_model(spec, cfg.model.dtype, cfg.quant.mode, cfg.quant.group_size,
                         cfg.model.embed_on_host)
  init = functools.partial(lora.init, spec, cfg.lora.targets, cfg.lora.rank, cfg.lora.alpha,
                           jax.random.PRNGKey(0), rslora=cfg.lora.rslora, dropout=cfg.lora.dropout)
  # named data.train sources: one stacked adapter each, batch_size rows each per step
  names = tuple(n for n in data.train_sources(cfg.data.train) if n) if cfg.data.train else ()
  adapters = jax.eval_shape(lambda: lora.stack({n: init() for n in names}) if names else init())
  optimizer = optim.make_optimizer(cfg.optim, cfg.train.steps)
  state = jax.eval_shape(lambda a: step_lib.init_state(lora.with_params(adapters, a), optimizer,
                                                       cfg.seed), adapters.params)
  rows = cfg.train.batch_size * max(len(names), 1)
  batch = abstract_batch(rows, cfg.data.seq_len,
                         (spec.dim, hf_io.DTYPES[cfg.model.dtype]) if cfg.model.embed_on_host
                         else None)
  if names:
    batch["adapter_ids"] = jax.ShapeDtypeStruct((rows,), jnp.int32)
  placed = {}
  if device is not None:
    one = jax.sharding.SingleDeviceSharding(device)
    placed = dict(in_shardings=one, out_shardings=one)
  step = functools.partial(step_lib.train_step, adapters=adapters, optimizer=optimizer,
                           grad_accum=cfg.train.grad_accum, remat=cfg.train.remat)
  # The kernels are static in the step, resolved for the target platform (as ftjax.train does).
  platform = device.platform if device is not None else jax.default_backend()
  model = dataclasses.replace(model, kernels=step_lib.kernels_for(cfg, platform, spec))
  lowered = jax.jit(step, donate_argnums=0, **placed).lower(state, model, batch)
  return lowered.compile(), (state, model, batch)


def device_bytes(device) -> int | None:
  """What the device can hold: bytes_limit of memory_stats (GPU, TPU); None if unknown (CPU)."""
  try:
    stats = device.memory_stats()
  except Exception:  # some backends raise instead of returning None
    return None
  return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def plan(cfg, target: str = "local") -> Plan:
  """Compiles the train step of `cfg` for `target` (the local backend, or a TPU chip: see
  TPU_TARGETS) and splits its peak into categories."""
  if cfg.train.grad_accum < 1 or cfg.train.batch_size % cfg.train.grad_accum:
    raise UserError(f"train.batch_size={cfg.train.batch_size} is not divisible by "
                    f"train.grad_accum={cfg.train.grad_accum}")
  if not cfg.model.path:
    raise UserError("model.path is empty: set it to a directory holding the model's config.json")
  spec = hf_io.read_spec(cfg.model.path)
  device, capacity = target_device(target)
  compiled, (state, model, batch) = compile_step(cfg, spec, None if target == "local" else device)
  mem = compiled.memory_analysis()
  params = quant.nbytes(model.params)
  adapters = quant.nbytes(state["adapters"])
  opt = quant.nbytes(state["opt_state"])
  # Arguments: the base, the state (donated: the new state is written over it) and the batch.
  # Outputs not aliased to a donated input are the metrics and any state leaf XLA did not alias.
  other_args = mem.argument_size_in_bytes - params - adapters - opt
  categories = {
      "base params": params,
      "adapters": adapters,
      "optimizer state": opt,
      "batch, step, rng": other_args,
      "outputs not aliased (metrics)": mem.output_size_in_bytes - mem.alias_size_in_bytes,
      "activations and temporaries": mem.temp_size_in_bytes,
  }
  return Plan(categories, sum(categories.values()), f"{device.platform}:{device.device_kind}",
              capacity, getattr(mem, "host_temp_size_in_bytes", 0))


def report(cfg, p: Plan) -> str:
  names = tuple(n for n in data.train_sources(cfg.data.train) if n) if cfg.data.train else ()
  lines = [f"plan: {cfg.model.path} quant={cfg.quant.mode} dtype={cfg.model.dtype} "
           f"lora rank {cfg.lora.rank} ({cfg.lora.targets}) batch {cfg.train.batch_size} x seq "
           f"{cfg.data.seq_len} remat={cfg.train.remat} grad_accum={cfg.train.grad_accum}"
           + (" embed_on_host" if cfg.model.embed_on_host else "")
           + (f" adapters {', '.join(names)} (batch rows each)" if names else "")]
  width = max(len(k) for k in p.categories)
  for name, b in p.categories.items():
    lines.append(f"  {name:<{width}}  {b / GiB:9.3f} GiB  ({b:,} bytes)")
  if p.host_bytes:
    lines.append(f"  (and {p.host_bytes / GiB:.3f} GiB of pinned host memory: offloaded "
                 "activations)")
  if p.fits is None:
    lines.append(f"fits {p.device}: unknown (the device reports no memory limit)")
  else:
    lines.append(f"fits {p.device} ({p.device_bytes / GiB:.2f} GiB): "
                 f"{'yes' if p.fits else 'NO'}")
  lines.append(f"peak device memory: {p.peak / GiB:.2f} GiB")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}")
  cfg = flags.FLAGS["config"].value
  if cfg is None:
    raise UserError("--config=configs/NAME.py is required")
  print(report(cfg, plan(cfg, flags.FLAGS.target)), flush=True)


if __name__ == "__main__":
  # Defined here, not at import: ftjax.train defines the same --config flag.
  config_flags.DEFINE_config_file("config", None, "Recipe file.", lock_config=True)
  flags.DEFINE_string("target", "local", "Compile for: local (this machine's first device) or a "
                      f"TPU chip without having one ({', '.join(TPU_TARGETS)}; needs libtpu).")
  app.run(run_cli(main), flags_parser=parse_flags)
