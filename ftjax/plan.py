"""python -m ftjax.plan --config=configs/NAME.py [--config.a.b=value ...]

Predicts the device memory of a training run before any weight is read: from config.json alone it
builds the shapes of everything the train step touches (the base as ShapeDtypeStructs, quantized
projections as QArrays of them, adapters, optimizer state, one batch), compiles the very step that
`ftjax.train` runs (same function, same donation) ahead of time for the local backend, and reads
the compiler's buffer assignment. Nothing the size of the model is allocated.

Output: bytes per category, whether it fits the local device, and as the last line
`peak device memory: X.XX GiB`. The figure is for one device running the whole batch (no mesh);
under FSDP the parameters divide by mesh.fsdp. Run it where you will train: the figure is the local
compiler's. XLA:CPU has no bf16 dot and keeps float32 copies of bf16 operands, and it runs the
plain attention where a GPU uses cuDNN's fused one, so a CPU plan of a bf16 model overstates a
GPU's peak (by a few GiB for Llama-3-8B QLoRA; bench/RESULTS.md).
"""
import dataclasses
import functools

from absl import app
import jax
import jax.numpy as jnp
from ml_collections import config_flags

from ftjax import hf_io, lora, optim, quant, step as step_lib
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


def compile_step(cfg, spec):
  """(compiled train step, its abstract args) exactly as ftjax.train builds them, for shapes."""
  model = abstract_model(spec, cfg.model.dtype, cfg.quant.mode, cfg.quant.group_size,
                         cfg.model.embed_on_host)
  adapters = jax.eval_shape(functools.partial(
      lora.init, spec, cfg.lora.targets, cfg.lora.rank, cfg.lora.alpha, rslora=cfg.lora.rslora,
      dropout=cfg.lora.dropout), jax.random.PRNGKey(0))
  optimizer = optim.make_optimizer(cfg.optim, cfg.train.steps)
  state = jax.eval_shape(lambda a: step_lib.init_state(lora.with_params(adapters, a), optimizer,
                                                       cfg.seed), adapters.params)
  batch = abstract_batch(cfg.train.batch_size, cfg.data.seq_len,
                         (spec.dim, hf_io.DTYPES[cfg.model.dtype]) if cfg.model.embed_on_host
                         else None)
  fn = jax.jit(functools.partial(step_lib.train_step, adapters=adapters, optimizer=optimizer,
                                 grad_accum=cfg.train.grad_accum, remat=cfg.train.remat), donate_argnums=0)
  return fn.lower(state, model, batch).compile(), (state, model, batch)


def device_bytes(device) -> int | None:
  """What the device can hold: bytes_limit of memory_stats (GPU, TPU); None if unknown (CPU)."""
  try:
    stats = device.memory_stats()
  except Exception:  # some backends raise instead of returning None
    return None
  return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def plan(cfg) -> Plan:
  """Compiles the train step of `cfg` for the local backend and splits its peak into categories."""
  if cfg.train.grad_accum < 1 or cfg.train.batch_size % cfg.train.grad_accum:
    raise UserError(f"train.batch_size={cfg.train.batch_size} is not divisible by "
                    f"train.grad_accum={cfg.train.grad_accum}")
  if not cfg.model.path:
    raise UserError("model.path is empty: set it to a directory holding the model's config.json")
  spec = hf_io.read_spec(cfg.model.path)
  compiled, (state, model, batch) = compile_step(cfg, spec)
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
  device = jax.local_devices()[0]
  return Plan(categories, sum(categories.values()), f"{device.platform}:{device.device_kind}",
              device_bytes(device))


def report(cfg, p: Plan) -> str:
  lines = [f"plan: {cfg.model.path} quant={cfg.quant.mode} dtype={cfg.model.dtype} "
           f"lora rank {cfg.lora.rank} ({cfg.lora.targets}) batch {cfg.train.batch_size} x seq "
           f"{cfg.data.seq_len} remat={cfg.train.remat} grad_accum={cfg.train.grad_accum}"
           + (" embed_on_host" if cfg.model.embed_on_host else "")]
  width = max(len(k) for k in p.categories)
  for name, b in p.categories.items():
    lines.append(f"  {name:<{width}}  {b / GiB:9.3f} GiB  ({b:,} bytes)")
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
  from absl import flags
  cfg = flags.FLAGS["config"].value
  if cfg is None:
    raise UserError("--config=configs/NAME.py is required")
  print(report(cfg, plan(cfg)), flush=True)


if __name__ == "__main__":
  # Defined here, not at import: ftjax.train defines the same --config flag.
  config_flags.DEFINE_config_file("config", None, "Recipe file.", lock_config=True)
  app.run(run_cli(main), flags_parser=parse_flags)
