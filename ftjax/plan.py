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
--target=h100 (h200, a100) compiles for one NVIDIA GPU with XLA:GPU's own compiler (the CUDA
plugin's, run deviceless from XLA's GPU spec in ftjax/gpu_specs/; pip install -e '.[gpu-plan]' in
a Python 3.12 env): real sm_90 code, its cuDNN and Triton kernels included. The capacity of a GPU
is what JAX's allocator may take of it (XLA_PYTHON_CLIENT_MEM_FRACTION, 0.75 unless set), so a
plan that fits is a run that fits. What only a real card decides (whether cuDNN accepts its
attention graph, its workspace) is not in the plan.

The step is compiled under a one-device mesh, as ftjax.train runs it (sharding.with_mesh): the
activation constraints and the Pallas kernels' shard_map are those of the run.
--hlo=FILE writes the compiled HLO of the policy planned.

train.remat="auto" compiles the step with each policy in REMAT_ORDER (cheapest first) and takes
the first whose peak fits HEADROOM of the device's memory; ftjax.train asks the same question
(`resolve_remat`). Where the device reports no limit (XLA:CPU) the capacity is the host's
available RAM (MemAvailable), where the step's buffers live.

Output: bytes per category, whether it fits the device, pinned host memory when remat offloads,
`remat: POLICY`, `flops per token: X` (counted from shapes, see `flops_per_token`) and as the
last line `peak device memory: X.XX GiB`. The figure is for one device running the whole batch
(no mesh); under FSDP the parameters divide by mesh.fsdp.
"""
import copy
import dataclasses
import functools
import importlib.util
import math
import os
import re
import types

from absl import app, flags
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
from ml_collections import config_flags

from ftjax import data, hf_io, lora, objectives, optim, quant, sharding, step as step_lib
from ftjax.errors import UserError, parse_flags, run_cli
from ftjax.model import REMAT_POLICIES, Model

GiB = 1024**3
# train.remat="auto" tries these in order, cheapest first (FLOPs recomputed: flops_per_token).
REMAT_ORDER = ("none", "save_proj", "dots", "full", "offload")
assert set(REMAT_ORDER) == {"none", *REMAT_POLICIES}
# The share of the device a plan may use: the rest is for what the buffer assignment does not
# see (the runtime's own buffers, fragmentation, the compiler's workspace).
HEADROOM = 0.9


@dataclasses.dataclass(frozen=True)
class Plan:
  """Bytes per category; `categories` sums to `peak` exactly."""
  categories: dict  # name -> bytes
  peak: int
  device: str
  device_bytes: int | None  # what the device can hold, when it says
  host_bytes: int = 0  # pinned host memory the step uses (train.remat="offload"), not in peak
  remat: str = "none"  # the policy planned (chosen, with train.remat="auto")
  flops_per_token: int = 0
  capacity_from: str = "device"  # or "host RAM" (a device that reports no limit)
  compiled: object = dataclasses.field(default=None, repr=False, compare=False)  # the step

  @property
  def hlo(self) -> str:
    """The compiled step's HLO text ("" where the compiler gave up)."""
    return self.compiled.as_text() if self.compiled is not None else ""

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


# NVIDIA GPUs, compiled for by XLA:GPU without one: --target name -> its spec in ftjax/gpu_specs/
# (XLA's own GpuTargetConfig text protos; each file names its source).
GPU_TARGETS = {"h100": "h100.txtpb", "h200": "h200.txtpb", "a100": "a100.txtpb"}
GPU_SPECS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_specs")
# The share of a GPU that JAX's allocator takes (and preallocates) when
# XLA_PYTHON_CLIENT_MEM_FRACTION is not set: all a step can use.
JAX_GPU_MEM_FRACTION = 0.75
SKIP_CUDA_CHECK = "JAX_SKIP_CUDA_CONSTRAINTS_CHECK"


def gpu_memory_fraction() -> float:
  """What JAX's GPU allocator may use of the card: XLA_PYTHON_CLIENT_MEM_FRACTION, else 0.75."""
  value = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "")
  try:
    return float(value) if value else JAX_GPU_MEM_FRACTION
  except ValueError:
    raise UserError(f"XLA_PYTHON_CLIENT_MEM_FRACTION={value!r}: use a fraction such as 0.9") from None


def targets() -> str:
  return ", ".join(("local", *TPU_TARGETS, *GPU_TARGETS))


def target_device(target: str):
  """(device to compile for, the bytes a step may use there or None): a local device, one chip of
  a TPU topology described to libtpu (deviceless ahead-of-time compilation, as MaxText's
  train_compile does), or one GPU described to XLA:GPU (see gpu_device)."""
  if target == "local":
    device = jax.local_devices()[0]
    return device, device_bytes(device)
  if target in GPU_TARGETS:
    return gpu_device(target)
  if target not in TPU_TARGETS:
    raise UserError(f"--target={target!r}: use one of {targets()}")
  topology, hbm = TPU_TARGETS[target]
  from jax.experimental import topologies
  # What libtpu reads while it starts, so that it does not look for a cloud metadata server or
  # real hosts. Restored after: a TPU_WORKER_HOSTNAMES left behind makes child processes (and
  # ftjax.train) believe they are on a TPU cluster.
  # ALLOW_MULTIPLE_LIBTPU_LOAD: compiling touches no chip, so another process holding libtpu's
  # lock (a TPU job, another plan) need not stop it.
  startup = {"TPU_SKIP_MDS_QUERY": "1", "TPU_ACCELERATOR_TYPE": "v5litepod-4",
             "TPU_WORKER_HOSTNAMES": "localhost", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
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


def gpu_device(target: str):
  """(a compile-only GPU, what JAX's allocator may use of it): the CUDA plugin's deviceless
  topology from XLA's spec of the card (ftjax/gpu_specs/)."""
  with open(os.path.join(GPU_SPECS, GPU_TARGETS[target])) as f:
    spec = f.read()
  memory = int(re.search(r"device_memory_size: (\d+)", spec).group(1))
  from jax.experimental import topologies
  # The CUDA plugin checks its libraries against a GPU (cuInit) when JAX first starts its plugins
  # (once per process), and without a GPU registers nothing; compiling needs no GPU. The planner
  # skips that check for this call only (the variable is restored after), which works where it is
  # the first to start JAX, as in python -m ftjax.plan.
  saved = os.environ.get(SKIP_CUDA_CHECK)
  os.environ[SKIP_CUDA_CHECK] = "1"
  try:
    device = topologies.get_topology_desc(platform="cuda", target_config=spec,
                                          topology="1x1x1").devices[0]
  except Exception:  # no CUDA plugin: jax raises NotImplementedError or a backend error
    if has_cuda_plugin():
      raise UserError(f"--target={target}: the CUDA plugin did not start: JAX started before the "
                      f"planner without a GPU; set {SKIP_CUDA_CHECK}=1 or JAX_PLATFORMS=cpu "
                      "first") from None
    raise UserError(f"--target={target}: the CUDA compiler is not installed here (jax "
                    f"{jax.__version__} without jax[cuda12]); install it with pip install -e "
                    "'.[gpu-plan]' in a Python 3.12 env") from None
  finally:
    if saved is None:
      os.environ.pop(SKIP_CUDA_CHECK, None)
  return device, int(gpu_memory_fraction() * memory)


def has_cuda_plugin() -> bool:
  """Whether jax[cuda12]'s plugin (and with it XLA:GPU's compiler) is installed."""
  try:
    return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
  except ImportError:  # no jax_plugins package at all
    return False


def flops_per_token(spec, targets: str, rank: int, seq_len: int, remat: str,
                    causal: bool = True, reference: str = "") -> int:
  """FLOPs of one trained token, counted from shapes (a multiply-add is 2).

  The frozen base: forward 2N + activation gradients 2N, N the projections' and the output
  head's weights (no weight gradients). Adapters: 6 x their parameters. Attention: forward
  4 x heads x head_dim x keys (causal: (T + 1) / 2 keys on average), backward twice that. Plus
  what `remat` recomputes (model.REMAT_POLICIES): save_proj the scores q k^T and each x @ a;
  dots attention's forward; full and offload the layer's forward but for down_proj's output,
  which the backward pass does not read (Gemma's post-feedforward norm does). Recompute that
  happens under every policy (attention kernels that rebuild their scores in the backward pass,
  loss tiles) is not counted, as MFU conventions do not count it. reference (DPO, IPO): one more
  forward per token without gradient, of the base ("base") or of the base with the starting
  adapter ("adapter"); "" for objectives without one.
  """
  # A mixture of experts runs each token through top_k experts (and the router's D x E); a
  # projection counts in the layers that hold it (a mixed model's MoE and dense MLPs).
  uses = lambda n: (spec.top_k if spec.projection_lead(n) else 1) * len(spec.layers_of(n))
  projections = sum(uses(n) * math.prod(spec.projection_shape(n)) for n in spec.projections)
  projections += spec.dim * spec.n_experts * len(spec.sparse_layers)
  base = projections + spec.dim * spec.vocab
  names = lora.resolve_targets(spec, targets)
  adapter = sum(uses(n) * rank * sum(spec.projection_shape(n)) for n in names)
  x_a = sum(uses(n) * 2 * rank * spec.projection_shape(n)[0] for n in names)
  keys = (seq_len + 1) / 2 if causal else seq_len
  scores = spec.n_layers * 2 * spec.n_heads * spec.head_dim * keys  # q k^T; p v costs the same
  downs = [n for n in ("down_proj", "experts.down_proj") if n in spec.projections]
  if spec.sandwich_norm:
    downs = []
  down = sum(uses(n) * math.prod(spec.projection_shape(n)) for n in downs)
  down_b = sum(uses(n) * rank * spec.dim for n in downs if n in names)
  recompute = {"none": 0, "save_proj": scores + x_a, "dots": 2 * scores,
               "full": 2 * (projections - down) + 2 * (adapter - down_b) + 2 * scores}
  recompute["offload"] = recompute["full"]
  ref = 0
  if reference:  # a forward: 2N, the scores, and the starting adapter's 2 x its parameters
    ref = 2 * base + 2 * scores + (2 * adapter if reference == "adapter" else 0)
  return round(4 * base + 6 * adapter + 3 * 2 * scores + recompute[remat] + ref)


def reference_of(cfg) -> str:
  """What a step's reference forward runs (flops_per_token's `reference`)."""
  if not objectives.from_config(cfg).reference:
    return ""
  return "adapter" if cfg.lora.init_from else "base"


def host_available_bytes() -> int | None:
  """MemAvailable of /proc/meminfo (Linux), else free physical pages; None if neither says."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  try:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError, AttributeError):
    return None


def has_pinned_host(device) -> bool:
  """Whether remat "offload" can move activations to host memory from `device`. A GPU always
  can (CUDA pins host memory on any GPU host), also the compile-only one of a --target, which
  lists no memories: XLA:GPU still compiles the offload."""
  if device.platform == "gpu":
    return True
  try:
    return "pinned_host" in {m.kind for m in device.addressable_memories()}
  except Exception:  # a backend without memory spaces
    return False


def check_remat(remat: str, device=None):
  """UserError unless `remat` is "auto" or a policy `device` (default: the local one) can run."""
  if remat not in ("auto", *REMAT_ORDER):
    raise UserError(f"train.remat={remat!r}: use auto or one of {', '.join(REMAT_ORDER)}")
  device = device or (jax.local_devices()[0] if remat == "offload" else None)
  if device is not None and remat == "offload" and not has_pinned_host(device):
    raise UserError(f"train.remat=offload: {device.platform} has no pinned host memory to "
                    "offload to; use auto or full")


def abstract_model_and_state(cfg, spec, adapters=None, optimizer=None):
  """(Model, train state) of `cfg` as shapes."""
  model = abstract_model(spec, cfg.model.dtype, cfg.quant.mode, cfg.quant.group_size,
                         cfg.model.embed_on_host)
  adapters = adapters or abstract_adapters(cfg, spec)
  optimizer = optimizer or optim.make_optimizer(cfg.optim, cfg.train.steps)
  state = jax.eval_shape(lambda a: step_lib.init_state(lora.with_params(adapters, a), optimizer,
                                                       cfg.seed), adapters.params)
  return model, state


def adapter_names(cfg) -> tuple[str, ...]:
  """Named data.train sources: one stacked adapter each, batch_size rows each per step."""
  return tuple(n for n in data.train_sources(cfg.data.train) if n) if cfg.data.train else ()


def abstract_adapters(cfg, spec):
  init = functools.partial(lora.init, spec, cfg.lora.targets, cfg.lora.rank, cfg.lora.alpha,
                           jax.random.PRNGKey(0), rslora=cfg.lora.rslora, dropout=cfg.lora.dropout)
  names = adapter_names(cfg)
  return jax.eval_shape(lambda: lora.stack({n: init() for n in names}) if names else init())


def compile_step(cfg, spec, device=None, remat=None, say=None):
  """(compiled train step, its abstract args) exactly as ftjax.train builds them, for shapes;
  compiled for `device` (default: the local backend's first) with `remat` (default
  cfg.train.remat), under a one-device mesh as ftjax.train runs it (sharding.with_mesh): the
  Pallas kernels read the GPU or TPU they lower for from the mesh. say(line): told what is
  compiled, before the compiler starts."""
  adapters = abstract_adapters(cfg, spec)
  optimizer = optim.make_optimizer(cfg.optim, cfg.train.steps)
  model, state = abstract_model_and_state(cfg, spec, adapters, optimizer)
  names = adapter_names(cfg)
  rows = cfg.train.batch_size * max(len(names), 1)
  batch = abstract_batch(rows, cfg.data.seq_len,
                         (spec.dim, hf_io.DTYPES[cfg.model.dtype]) if cfg.model.embed_on_host
                         else None)
  if names:
    batch["adapter_ids"] = jax.ShapeDtypeStruct((rows,), jnp.int32)
  device = device if device is not None else jax.local_devices()[0]
  mesh = sharding.make_mesh(types.SimpleNamespace(data=1, fsdp=1, tensor=1), [device])
  one = jax.sharding.NamedSharding(mesh, P())
  remat = remat or cfg.train.remat
  step = functools.partial(step_lib.train_step, adapters=adapters, optimizer=optimizer,
                           grad_accum=cfg.train.grad_accum, remat=remat,
                           objective=objectives.from_config(cfg))
  # The kernels are static in the step, resolved for the target platform (as ftjax.train does).
  kernels = step_lib.kernels_for(cfg, device.platform, spec,
                                 getattr(device, "compute_capability", None))
  model = dataclasses.replace(model, kernels=kernels)
  if say is not None:
    say(f"compiling the train step for {device_name(device)}: remat {remat}, attention "
        f"{kernels.attention}, quantized matmuls {kernels.quant if cfg.quant.mode != 'none' else '-'}"
        + (f", grouped matmuls {kernels.grouped}" if spec.n_experts else "")
        + f", {rows} x {cfg.data.seq_len} tokens ...")
  # The mesh's abstract form, as jax.set_mesh(mesh) sets it for ftjax.train: what the activation
  # constraints, the kernels' shard_map and Pallas-Triton (the GPU it lowers for) read. Not the
  # concrete mesh: a compile-only device holds no arrays, and splash builds its mask tables as
  # arrays while it traces.
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    lowered = jax.jit(step, donate_argnums=0, in_shardings=one,
                      out_shardings=one).lower(state, model, batch)
  try:
    return lowered.compile(), (state, model, batch)
  except Exception as e:  # the TPU compiler refuses a step that cannot fit
    temp = compiler_out_of_memory(e)
    if temp is None:
      raise
    raise OutOfMemory(temp, state, model) from None


def device_name(device) -> str:
  return f"{device.platform}:{device.device_kind}"


class OutOfMemory(Exception):
  """The compiler gave up: the step needs `temp` bytes of temporaries more than the device has."""

  def __init__(self, temp, state, model):
    super().__init__(f"{temp} bytes of temporaries")
    self.temp, self.state, self.model = temp, state, model


def device_bytes(device) -> int | None:
  """What the device can hold: bytes_limit of memory_stats (GPU, TPU); None if unknown (CPU)."""
  try:
    stats = device.memory_stats()
  except Exception:  # some backends raise instead of returning None
    return None
  return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def plan(cfg, target: str = "local", capacity: int | None = None, say=None) -> Plan:
  """Compiles the train step of `cfg` for `target` (the local backend, a TPU chip or a GPU: see
  TPU_TARGETS, GPU_TARGETS) and splits its peak into categories. train.remat="auto": the first
  policy of REMAT_ORDER whose peak fits HEADROOM x `capacity` (default: what the device holds,
  or the host's available RAM where it says nothing). say(line): told each compile's kernels and
  policy before it starts (a compile of an 8B step takes minutes)."""
  if cfg.train.grad_accum < 1 or cfg.train.batch_size % cfg.train.grad_accum:
    raise UserError(f"train.batch_size={cfg.train.batch_size} is not divisible by "
                    f"train.grad_accum={cfg.train.grad_accum}")
  if not cfg.model.path:
    raise UserError("model.path is empty: set it to a directory holding the model's config.json")
  device, device_limit = target_device(target)
  check_remat(cfg.train.remat, device)
  spec = hf_io.read_spec(cfg.model.path)
  source = "device"
  if capacity is None:
    capacity = device_limit
    if capacity is None:
      capacity, source = host_available_bytes(), "host RAM"
  if cfg.train.remat != "auto":
    return plan_policy(cfg, spec, device, cfg.train.remat, capacity, source, say)
  tried = []
  if capacity is not None:  # what every policy holds; when that alone does not fit, compile nothing
    model, state = abstract_model_and_state(cfg, spec)
    least = (quant.nbytes(model.params) + quant.nbytes(state), "the base and the state alone")
    if least[0] > HEADROOM * capacity:
      raise nothing_fits(device, capacity, source, *least)
  for remat in REMAT_ORDER:
    if remat == "offload" and not has_pinned_host(device):
      continue
    p = plan_policy(cfg, spec, device, remat, capacity, source, say)
    if capacity is None or p.peak <= HEADROOM * capacity:
      return p
    if say is not None:
      say(f"remat {remat}: peak {p.peak / GiB:.2f} GiB, over {HEADROOM:.0%} of "
          f"{capacity / GiB:.2f} GiB")
    tried.append(p)
  least = min(tried, key=lambda p: p.peak)
  raise nothing_fits(device, capacity, source, least.peak, f"the smallest plan, remat {least.remat},")


def nothing_fits(device, capacity, source, need, what) -> UserError:
  return UserError(
      f"train.remat=auto: no policy fits {HEADROOM:.0%} of {device.platform}'s "
      f"{capacity / GiB:.2f} GiB ({source}); {what} needs {need / GiB:.2f} GiB: lower "
      "train.batch_size (or raise train.grad_accum), data.seq_len, or quantize the base "
      "(quant.mode=nf4)")


def plan_policy(cfg, spec, device, remat, capacity, source, say=None) -> Plan:
  """The Plan of one remat policy (see `plan`)."""
  flops = flops_per_token(spec, cfg.lora.targets, cfg.lora.rank, cfg.data.seq_len, remat,
                          reference=reference_of(cfg))
  try:
    compiled, (state, model, batch) = compile_step(cfg, spec, device, remat, say)
  except OutOfMemory as e:  # a lower bound: what the compiler said before it gave up
    categories = {"base params": quant.nbytes(e.model.params),
                  "adapters and optimizer state": quant.nbytes(e.state),
                  "temporaries (the compiler gave up: out of memory)": e.temp}
    return Plan(categories, sum(categories.values()), device_name(device), capacity, 0, remat,
                flops, source)
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
  # XLA:GPU compiles a step that cannot fit (it warns "Can't reduce memory use below ..."): the
  # plan's `fits` compares this peak with the capacity, as the TPU compiler's refusal would.
  return Plan(categories, sum(categories.values()), device_name(device), capacity,
              getattr(mem, "host_temp_size_in_bytes", 0), remat, flops, source, compiled)


def compiler_out_of_memory(error) -> int | None:
  """Bytes of temporaries a compiler that ran out of memory says it needed (libtpu: "...required
  for HLO temporaries (146.06G) exceeds available HBM..."), or None for any other error."""
  m = re.search(r"required for HLO temporaries \(([\d.]+)([KMGT])\)", str(error))
  if "RESOURCE_EXHAUSTED" not in str(error) or m is None:
    return None
  return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2)))


def resolve_remat(cfg, mesh=None, capacity: int | None = None) -> tuple[str, str]:
  """(policy, log line) for ftjax.train: cfg.train.remat if given, else the planner's choice
  for one local device running its share of the batch (batch_size / (mesh.data x mesh.fsdp)
  rows; the parameters counted whole, so a sharded base only leaves more room)."""
  spec = hf_io.read_spec(cfg.model.path)
  if cfg.train.remat != "auto":
    check_remat(cfg.train.remat)
    flops = flops_per_token(spec, cfg.lora.targets, cfg.lora.rank, cfg.data.seq_len,
                            cfg.train.remat, reference=reference_of(cfg))
    return cfg.train.remat, f"remat: {cfg.train.remat} (train.remat); flops per token: {flops:.4g}"
  shards = mesh.shape["data"] * mesh.shape["fsdp"] if mesh is not None else 1
  rows = max(1, cfg.train.batch_size // shards)
  local = cfg.copy_and_resolve_references()
  with local.unlocked():
    local.train.batch_size = rows
    local.train.grad_accum = cfg.train.grad_accum if rows % cfg.train.grad_accum == 0 else 1
  p = plan(local, "local", capacity)
  if jax.process_count() > 1:  # every process must compile the same step: process 0 decides
    from jax.experimental import multihost_utils
    chosen = REMAT_ORDER[int(multihost_utils.broadcast_one_to_all(
        np.int32(REMAT_ORDER.index(p.remat))))]
    if chosen != p.remat:
      p = plan_policy(local, spec, jax.local_devices()[0], chosen, p.device_bytes,
                      p.capacity_from)
  return p.remat, (f"remat: {p.remat} (auto: planned peak {p.peak / GiB:.2f} GiB of "
                   f"{p.device_bytes / GiB:.2f} GiB ({p.capacity_from}) for {rows} rows per "
                   f"device); flops per token: {p.flops_per_token:.4g}")


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
    where = "" if p.capacity_from == "device" else f" of {p.capacity_from}"
    lines.append(f"fits {p.device} ({p.device_bytes / GiB:.2f} GiB{where}): "
                 f"{'yes' if p.fits else 'NO'}")
  lines.append(f"remat: {p.remat}")
  lines.append(f"flops per token: {p.flops_per_token:.4g}")
  lines.append(f"peak device memory: {p.peak / GiB:.2f} GiB")
  return "\n".join(lines)


# The mesh: the planner decides it, as only a compiled step knows what fits.

FIT_FRACTION = 0.9  # of a device's memory the auto mesh lets one replica plan to use


def choose_mesh(cfg, devices=None) -> tuple[jax.sharding.Mesh, str]:
  """The mesh for cfg.mesh, whose sizes may be "auto", and a few words on why.

  Integers (and -1) win. With any -1, "auto" axes are 1; tensor "auto" is 1; when only one of
  data/fsdp is "auto" it takes the devices left. When both are, the planner (this module: the
  real step compiled for shapes, one replica's share of the batch) decides: data parallel over
  every device if the base and the step fit FIT_FRACTION of one device (a frozen base then costs
  only an all-reduce of the adapter gradients per step, where FSDP all-gathers the base in the
  forward and again in the backward pass); else FSDP over each host's devices, data parallel
  across hosts; and FSDP over all devices when even a host's share does not fit. The device's
  memory is mesh.device_gib if set (on a GPU, the share of it JAX's allocator takes:
  gpu_memory_fraction), else what it reports (a GPU reports that share); a device that reports
  none (CPU) gets data parallelism, unplanned.
  """
  devices = jax.devices() if devices is None else devices
  sizes = {a: cfg.mesh[a] for a in sharding.AXES}
  for axis, size in sizes.items():
    if isinstance(size, str) and size != "auto":
      raise UserError(f"mesh.{axis}={size!r}: use a positive size, -1 (the devices left) or auto")
  auto = [a for a in sharding.AXES if sizes[a] == "auto"]
  why = "as configured"
  if sizes["tensor"] == "auto":
    sizes["tensor"] = 1
  if -1 in sizes.values():
    sizes.update({a: 1 for a in auto if a != "tensor"})
  elif sizes["data"] == "auto" and sizes["fsdp"] == "auto":
    sizes["data"], sizes["fsdp"], why = _data_or_fsdp(cfg, devices, int(sizes["tensor"]))
  elif "auto" in (sizes["data"], sizes["fsdp"]):
    sizes.update({a: -1 for a in ("data", "fsdp") if sizes[a] == "auto"})
    why = "auto: the devices the other axes leave"
  mesh = sharding.make_mesh(types.SimpleNamespace(**sizes), devices)
  return mesh, why


def mesh_capacity(device_gib: float, device) -> int | None:
  """The bytes one device of the mesh offers a step: mesh.device_gib of memory if set (on a GPU,
  the share of it JAX's allocator takes, gpu_memory_fraction), else what the device reports (a
  GPU reports that share already), None where it reports nothing."""
  if device_gib > 0:
    gpu = getattr(device, "platform", None) == "gpu"
    return int(device_gib * GiB * (gpu_memory_fraction() if gpu else 1.0))
  return device_bytes(device)


def _data_or_fsdp(cfg, devices, tensor):
  """(data, fsdp, why) for `devices` over a tensor axis of `tensor` (see choose_mesh)."""
  n = len(devices) // tensor if len(devices) % tensor == 0 else len(devices)
  if n == 1:
    return 1, 1, "auto: one device"
  capacity = mesh_capacity(cfg.mesh.device_gib, devices[0])
  if capacity is None:
    return -1, 1, ("auto: data parallel, the device reports no memory limit (set mesh.device_gib "
                   "to plan against one)")
  replica = copy.deepcopy(cfg)  # one replica's share of the batch, on one device
  per = cfg.train.batch_size // n if cfg.train.batch_size % n == 0 else cfg.train.batch_size
  replica.train.batch_size = per
  replica.train.grad_accum = cfg.train.grad_accum if per % cfg.train.grad_accum == 0 else 1
  p = plan(replica)
  base = p.categories["base params"]
  step = p.peak - base
  need = f"base {base / GiB:.2f} GiB + step {step / GiB:.2f} GiB"
  if p.peak <= FIT_FRACTION * capacity:
    return -1, 1, f"auto: {need} fit one {capacity / GiB:.3g} GiB device"
  local = sum(getattr(d, "process_index", 0) == getattr(devices[0], "process_index", 0)
              for d in devices) // tensor
  if 1 < local < n and base / local + step <= FIT_FRACTION * capacity:
    return n // local, local, (f"auto: {need} exceed one {capacity / GiB:.3g} GiB device: FSDP "
                               "within each host, data parallel across hosts")
  return 1, -1, f"auto: {need} exceed one {capacity / GiB:.3g} GiB device: FSDP over all devices"


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}")
  cfg = flags.FLAGS["config"].value
  if cfg is None:
    raise UserError("--config=configs/NAME.py is required")
  say = lambda line: print(line, flush=True)
  p = plan(cfg, flags.FLAGS.target, say=say)
  if flags.FLAGS.hlo:
    with open(flags.FLAGS.hlo, "w") as f:
      f.write(p.hlo)
    say(f"wrote the compiled HLO (remat {p.remat}) to {flags.FLAGS.hlo}")
  print(report(cfg, p), flush=True)


if __name__ == "__main__":
  # Defined here, not at import: ftjax.train defines the same --config flag.
  config_flags.DEFINE_config_file("config", None, "Recipe file.", lock_config=True)
  flags.DEFINE_string("target", "local", "Compile for: local (this machine's first device), a "
                      f"TPU chip ({', '.join(TPU_TARGETS)}; needs libtpu) or an NVIDIA GPU "
                      f"({', '.join(GPU_TARGETS)}; needs jax[cuda12]), without having one.")
  flags.DEFINE_string("hlo", "", "Write the compiled step's HLO text to this file.")
  app.run(run_cli(main), flags_parser=parse_flags)
