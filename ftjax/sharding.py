"""The device mesh and one ordered (path regex -> PartitionSpec) table for every parameter.

Mesh axes: `data` (pure data parallel), `fsdp` (parameters and batch), `tensor` (heads, MLP width).
Specs are written for one layer's array; stacked [L, ...] arrays (everything under `layers/`) get a
leading unsharded L axis. A dimension that an axis does not divide stays unsharded (tiny test
models), so the table never produces an invalid sharding. `param_shardings` checks that the table
covers every parameter of a tree and names the first path it does not.

Adapters follow their base kernel: `a [L, in, R]` shards `in` like the kernel, `b [L, R, out]`
shards `out` like it; the rank dim is never sharded, nor the adapter axis of stacked adapters
([L, A, in, R]). Batches are [B, T] with B over (data, fsdp), and the hidden states between
decoder layers are constrained the same way (`constrain_activations`, active under
`jax.set_mesh`, see `with_mesh`). A mixture of experts' routed part runs per batch shard, in a
shard_map over those axes (`batch_axes`, moe.sparse_mlp).
"""
import dataclasses
import functools
import math
import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ftjax import quant
from ftjax.errors import UserError

AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")

# First match wins. Kernels are (in, out).
PARAM_RULES = (
    (r"embed/embedding", P("tensor", "fsdp")),  # [V, D]
    (r"lm_head/kernel", P("fsdp", "tensor")),  # [D, V]
    (r"layers/(q_proj|k_proj|v_proj|qkv_proj|gate_proj|up_proj|gate_up_proj)/kernel",
     P("fsdp", "tensor")),
    (r"layers/(o_proj|down_proj)/kernel", P("tensor", "fsdp")),
    # mixture of experts [E, in, out]: each expert sharded as a dense projection; the expert axis
    # itself unsharded (an `expert` mesh axis would go there, see README)
    (r"layers/experts\.gate_up_proj/kernel", P(None, "fsdp", "tensor")),
    (r"layers/experts\.down_proj/kernel", P(None, "tensor", "fsdp")),
    (r"layers/shared_expert\.(gate_proj|up_proj)/kernel", P("fsdp", "tensor")),
    (r"layers/shared_expert\.down_proj/kernel", P("tensor", "fsdp")),
    (r"layers/(gate|shared_expert_gate)/kernel", P()),  # routers [D, E], [D, 1]: small, frozen
    (r"layers/\w+/bias", P("tensor")),
    (r".*(norm|layernorm)/scale", P()),
)


def make_mesh(cfg_mesh, devices=None) -> Mesh:
  """mesh.data x mesh.fsdp x mesh.tensor; one -1 takes the devices the others leave.

  Devices keep jax.devices() order (process by process), so each process's devices are one
  contiguous run of the batch axes (data, fsdp) and it feeds one contiguous block of rows.
  """
  devices = jax.devices() if devices is None else devices
  sizes = [int(cfg_mesh.data), int(cfg_mesh.fsdp), int(cfg_mesh.tensor)]
  n = len(devices)
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise UserError(f"mesh.data/fsdp/tensor={sizes}: each must be a positive size, at most one -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if n % known:
      raise UserError(f"mesh.data/fsdp/tensor={sizes}: {known} does not divide the {n} devices")
    sizes[sizes.index(-1)] = n // known
  if math.prod(sizes) != n:
    raise UserError(f"mesh.data/fsdp/tensor={sizes}: product {math.prod(sizes)} != {n} devices "
                    f"(use -1 for one axis to fill the rest)")
  grid = np.asarray(devices).reshape(sizes)
  _check_processes(grid)
  return Mesh(grid, AXES)


def _check_processes(grid):
  """Process i feeds rows [i * B/P, (i + 1) * B/P) of each batch (data.Batches), so its devices
  must be exactly the i-th run of (data, fsdp) batch blocks: a tensor group within one process."""
  blocks = grid.reshape(-1, grid.shape[-1])  # one row of devices per batch block
  owners = [{getattr(d, "process_index", 0) for d in row} for row in blocks]
  count = len(set().union(*owners))
  if count == 1:
    return
  want = [b * count // len(blocks) for b in range(len(blocks))]
  if any(len(o) > 1 for o in owners) or [min(o) for o in owners] != want:
    data, fsdp, tensor = grid.shape
    raise UserError(f"mesh.data/fsdp/tensor={[data, fsdp, tensor]} over {count} processes: "
                    f"mesh.data*mesh.fsdp={data * fsdp} must be a multiple of {count} and "
                    f"mesh.tensor={tensor} must divide the {grid.size // count} devices of each "
                    "process, so that every process feeds its own rows of the batch")


def _axis_size(mesh, axis) -> int:
  names = (axis,) if isinstance(axis, str) else (axis or ())
  return math.prod(mesh.shape[a] for a in names)


def fit(spec: P, shape, mesh) -> P:
  """Drops axes that do not divide their dimension; pads the spec to the array's rank."""
  out = []
  for i, dim in enumerate(shape):
    axis = spec[i] if i < len(spec) else None
    out.append(axis if axis and dim % _axis_size(mesh, axis) == 0 else None)
  return P(*out)


def rule(path: str) -> P:
  """The table's spec for one layer of parameter `path` ("a/b/kernel"); ValueError if none."""
  for pattern, spec in PARAM_RULES:
    if re.fullmatch(pattern, path):
      return spec
  raise ValueError(f"no sharding rule covers parameter {path}: add one to "
                   "ftjax.sharding.PARAM_RULES")  # our bug, not the user's


def param_spec(path: str, shape, mesh) -> P:
  """The fitted spec of one layer's array of parameter `path` (shape without the L axis)."""
  return fit(rule(path), shape, mesh)


def _quantized_specs(w, spec: P, mesh):
  """A QArray's children's specs: shard like the weight, but int4/nf4 along `in` only when every
  shard holds whole groups (packed q rows and their scale rows stay together; int8's one scale
  row spans all of `in` and is replicated along it anyway)."""
  spec = tuple(spec) + (None,) * (w.ndim - len(tuple(spec)))
  groups = w.matrix_shape[0] // w.group_size
  if w.kind != "int8" and spec[-2] and groups % _axis_size(mesh, spec[-2]):
    spec = spec[:-2] + (None, spec[-1])
  specs = quant.partition_specs(w, P(*spec))
  return jax.tree.map(lambda s, x: fit(s, x.shape, mesh), specs, w,
                      is_leaf=lambda s: isinstance(s, P))


def param_shardings(mesh, params):
  """NamedShardings for a whole base tree (arrays, ShapeDtypeStructs or QArrays of them).

  Every leaf must match a rule: the first uncovered path raises ValueError naming it. Paths under
  `layers/` are stacked [L, ...] and get an unsharded leading L axis.
  """

  def one(path, x):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    stacked = name.startswith("layers/")
    lead = (None,) if stacked else ()
    spec = P(*lead, *rule(name))
    if isinstance(x, quant.QArray):
      return jax.tree.map(lambda s: NamedSharding(mesh, s), _quantized_specs(x, spec, mesh),
                          is_leaf=lambda s: isinstance(s, P))
    return NamedSharding(mesh, fit(spec, x.shape, mesh))

  return jax.tree_util.tree_map_with_path(one, params,
                                          is_leaf=lambda x: isinstance(x, quant.QArray))


def adapter_spec(base: P, which: str, stacked: bool = False, experts: bool = False) -> P:
  """a [L, in, R] follows the base kernel's `in` axis, b [L, R, out] its `out` axis. Stacked
  adapters ([L, A, in, R], lora.stack) are replicated along their adapter axis A. Experts'
  ([L, (A,) E, in, R]) follow the kernel's expert axis too."""
  n = 3 if experts else 2
  base = tuple(base) + (None,) * (n - len(base))
  lead = ((None, None) if stacked else (None,)) + tuple(base[:-2])
  return P(*lead, base[-2], None) if which == "a" else P(*lead, None, base[-1])


def adapter_shardings(mesh, spec, adapter_params):
  """{name: {"a", "b"}} -> NamedShardings following each base kernel (see the module doc)."""
  def one(path, leaf):
    name, which = path[0].key, path[1].key
    lead = spec.projection_lead(name)
    base = param_spec(f"layers/{name}/kernel", lead + spec.projection_shape(name), mesh)
    stacked = leaf.ndim == 4 + len(lead)
    return NamedSharding(mesh, fit(adapter_spec(base, which, stacked, bool(lead)), leaf.shape,
                                   mesh))
  return jax.tree_util.tree_map_with_path(one, adapter_params)


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def constrain_activations(x):
  """Hidden states [B, ...] -> batch over (data, fsdp), the rest replicated, when a mesh is set
  with `jax.set_mesh` (a no-op otherwise, or when the axes do not divide B)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(BATCH) <= set(mesh.axis_names):
    return x
  if x.shape[0] % _axis_size(mesh, BATCH):
    return x
  return jax.lax.with_sharding_constraint(x, P(BATCH))


def batch_axes(rows: int) -> tuple[str, ...]:
  """The batch axes (data, fsdp) of the mesh set with `jax.set_mesh`, when they split `rows`
  rows in more than one shard: what moe.sparse_mlp maps over; () otherwise."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(BATCH) <= set(mesh.axis_names):
    return ()
  n = _axis_size(mesh, BATCH)
  return BATCH if n > 1 and rows % n == 0 else ()


def shard_key(key):
  """Inside moe.sparse_mlp's shard_map, `key` folded with this batch shard's index, so each shard
  draws its own LoRA-dropout masks for its routed rows (the one key would give every shard the
  same mask); `key` itself anywhere else."""
  mesh = jax.sharding.get_abstract_mesh()
  manual = () if mesh.empty else tuple(a for a in BATCH if a in mesh.manual_axes)
  return jax.random.fold_in(key, jax.lax.axis_index(manual)) if manual else key


def with_mesh(mesh: Mesh, fn):
  """fn run (and so traced) under `jax.set_mesh(mesh)`, which turns on the activation
  constraints of model.decoder."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.set_mesh(mesh):
      return fn(*args, **kwargs)

  if hasattr(fn, "lower"):  # a jitted fn: its lowering (for HLO checks) is under the mesh too
    def lower(*args, **kwargs):
      with jax.set_mesh(mesh):
        return fn.lower(*args, **kwargs)
    wrapped.lower = lower
  return wrapped


def gather_quantized(layer):
  """Under a mesh, all-gathers each quantized kernel of one layer over fsdp (keeping its tensor
  sharding) as packed integers and scales, before it is dequantized: FSDP then moves 4- or 8-bit
  weights, not the 16-bit ones XLA would otherwise gather after dequantizing. A no-op without a
  mesh (jax.set_mesh) or fsdp axis."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or "fsdp" not in mesh.axis_names or mesh.shape["fsdp"] == 1:
    return layer

  def gather(name, w):
    spec = param_spec(f"layers/{name}/kernel", w.shape, mesh)
    specs = _quantized_specs(w, spec, mesh)
    drop = lambda s: P(*(None if a == "fsdp" or (isinstance(a, tuple) and "fsdp" in a) else a
                         for a in s))
    return jax.tree.map(lambda x, s: jax.lax.with_sharding_constraint(x, drop(s)), w, specs,
                        is_leaf=lambda s: isinstance(s, P))

  return {name: ({**p, "kernel": gather(name, p["kernel"])}
                 if isinstance(p, dict) and isinstance(p.get("kernel"), quant.QArray) else p)
          for name, p in layer.items()}


def place_batch(batch, mesh, host_table=None):
  """This host's rows (block process_index of process_count, see sharding.make_mesh) -> one
  global array sharded over (data, fsdp). With the embedding table on the host (a numpy [V, D]),
  the batch also carries the tokens' rows as `embeds`."""
  if host_table is not None:
    batch = {**batch, "embeds": host_table[batch["tokens"]]}
  shard, n = batch_sharding(mesh), jax.process_count()
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
  target = param_shardings(mesh, abstract)["embed"]["embedding"]
  # np.array: a copy, so that no device buffer aliases the read-only memory map
  table = jax.make_array_from_callback(host_table.shape, target,
                                       lambda idx: np.array(host_table[idx]))
  return dataclasses.replace(model, params={**model.params, "embed": {"embedding": table}})
