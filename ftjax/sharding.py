"""The device mesh and one ordered (path regex -> PartitionSpec) table for every parameter.

Mesh axes: `data` (pure data parallel), `fsdp` (parameters and batch), `tensor` (heads, MLP width).
Specs are written for one layer's array; stacked [L, ...] arrays get a leading unsharded L axis.
A dimension that an axis does not divide stays unsharded (tiny test models), so the table never
produces an invalid sharding.
"""
import math
import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

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
    (r"layers/\w+/bias", P("tensor")),
    (r".*(norm|layernorm)/scale", P()),
)


def make_mesh(cfg_mesh, devices=None) -> Mesh:
  """mesh.data x mesh.fsdp x mesh.tensor; one -1 takes the devices the others leave."""
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
  return Mesh(grid, AXES)


def fit(spec: P, shape, mesh: Mesh) -> P:
  """Drops axes that do not divide their dimension; pads the spec to the array's rank."""
  out = []
  for i, dim in enumerate(shape):
    axis = spec[i] if i < len(spec) else None
    names = (axis,) if isinstance(axis, str) else (axis or ())
    size = math.prod(mesh.shape[a] for a in names)
    out.append(axis if names and dim % size == 0 else None)
  return P(*out)


def param_spec(path: str, shape, mesh: Mesh) -> P:
  for pattern, spec in PARAM_RULES:
    if re.fullmatch(pattern, path):
      return fit(spec, shape, mesh)
  raise ValueError(f"no sharding rule covers parameter {path}")  # our bug: extend PARAM_RULES


def param_sharding(mesh: Mesh, path: tuple[str, ...], shape, stacked: bool) -> NamedSharding:
  """Sharding of one layer's slice of parameter `path` (stacked: the slice of an [L, ...] array)."""
  return NamedSharding(mesh, param_spec("/".join(path), shape, mesh))


def adapter_spec(base: P, which: str) -> P:
  """a [L, in, R] follows the base kernel's `in` axis, b [L, R, out] its `out` axis."""
  base = tuple(base) + (None,) * (2 - len(base))
  return P(None, base[0], None) if which == "a" else P(None, None, base[1])


def adapter_shardings(mesh: Mesh, spec, adapter_params):
  def one(path, leaf):
    name, which = path[0].key, path[1].key
    base = param_spec(f"layers/{name}/kernel", spec.projection_shape(name), mesh)
    return NamedSharding(mesh, fit(adapter_spec(base, which), leaf.shape, mesh))
  return jax.tree_util.tree_map_with_path(one, adapter_params)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
