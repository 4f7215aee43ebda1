"""The sparse MLP of a mixture-of-experts layer (Mixtral, Qwen2-MoE, Qwen3-MoE).

Experts are weights with one more axis: `experts.gate_up_proj` [E, D, 2F] and `experts.down_proj`
[E, F, D] per layer (transformers 5's fused in-memory layout, transposed to (in, out)), so LoRA
puts one low-rank pair on each expert, a [E, in, R] and b [E, R, out], exactly as PEFT's
`target_parameters` does. The router `gate` [D, E] stays in the model's dtype, frozen unless
lora.targets names it (`ROUTER`: then it is a LoRA target like a dense projection, [D, R] and
[R, E]; never through all-linear, since moving the routing moves which experts train).

Dropless top-k routing, as transformers: softmax over the E router logits in float32, top-k
(ties go to the lower expert index, as torch.topk on CPU and jax.lax.top_k do), optionally
renormalized (`norm_topk`; always for Mixtral). Each token's k copies are sorted by expert once
(a stable argsort), and the experts run as grouped matmuls (`jax.lax.ragged_dot`) over the sorted
rows through the same `linear` as dense projections: the quantized custom_vjp and LoRA apply as
they do there. The routed rows are N * k, so the matmul work grows with k, never with E; no
token is dropped (no capacity factor). XLA:TPU lowers ragged_dot to a grouped-matmul kernel;
XLA:GPU (jax 0.11.2) and XLA:CPU as a masked dense product over the E groups (E/k times the work:
fine for tests, not for training a large MoE), so on Hopper GPUs `linear` runs JAX's Mosaic GPU
grouped-matmul kernels instead (ftjax/kernels/grouped_gpu.py).
"""
import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ftjax import sharding

EXPERT_PROJECTIONS = ("experts.gate_up_proj", "experts.down_proj")
SHARED_PROJECTIONS = ("shared_expert.gate_proj", "shared_expert.up_proj",
                      "shared_expert.down_proj")
ROUTER = "gate"  # HF's `mlp.gate`; not the dense MLP's `gate_proj`
# What only a MoE layer holds (a model mixing MoE and dense layers stacks these over its MoE layers)
SPARSE_PARAMS = EXPERT_PROJECTIONS + SHARED_PROJECTIONS + (ROUTER, "shared_expert_gate")


def route(spec, logits):
  """Router logits [N, E] -> (weights float32 [N, k], experts int32 [N, k]), as transformers'
  TopKRouter (its logits in the activations' dtype, then softmax in float32)."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  weights, experts = jax.lax.top_k(probs, spec.top_k)
  if spec.norm_topk:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return weights, experts


def sparse_mlp(spec, p, x, proj, act, adapter_ids=None):
  """x [B, T, D] -> (the MoE MLP's output [B, T, D], load float32 [E]).

  p: the layer's params (router `gate`, the experts', the shared expert's). proj(name, x,
  group_sizes=None, adapter_ids=None): the layer's `linear` (LoRA, quantization, remat names),
  for the router too.
  adapter_ids [B]: each row's adapter when adapters are stacked; routed rows carry their token's.
  load: the share of the N * k routed rows each expert received.

  Under a mesh (jax.set_mesh) whose batch axes divide B, the routing and the experts run in a
  shard_map over those axes: each batch shard routes, sorts and multiplies its own tokens' rows
  (the expert weights, closed over, are gathered to every shard as FSDP gathers any weight; a
  quantized one as packed integers, sharding.gather_quantized), and only the loads are summed
  across shards. Left to XLA, the global argsort made every device sort and run the whole
  batch's rows, and the Mosaic GPU kernels, which XLA cannot partition, gathered them all.
  """
  axes = sharding.batch_axes(x.shape[0])
  routed = functools.partial(_routed, spec, proj, act, axes)
  if axes:  # manual over the batch axes only: `tensor`, if any, stays XLA's (see README).
    # check_vma=False: the Mosaic GPU kernels' custom_vjp returns cotangents without the shard_map's
    # varying-axes types; the weights' cotangents are then summed over the shards all the same.
    ids_spec = P(axes) if adapter_ids is not None else None
    routed = jax.shard_map(routed, in_specs=(P(axes), ids_spec), out_specs=(P(axes), P()),
                           axis_names=set(axes), check_vma=False)
  out, load = routed(x, adapter_ids)
  if spec.shared_expert_dim:
    shared = proj("shared_expert.down_proj",
                  act(proj("shared_expert.gate_proj", x)) * proj("shared_expert.up_proj", x))
    gate_s = jax.nn.sigmoid(x @ p["shared_expert_gate"]["kernel"].astype(x.dtype))
    out = out + gate_s * shared
  return out, load


def _routed(spec, proj, act, axes, x, adapter_ids):
  """The routed experts over x [B, T, D] (a batch shard's rows under a shard_map over `axes`) ->
  (out [B, T, D], load [E] over all shards)."""
  b, t, d = x.shape
  x2 = x.reshape(b * t, d)
  k = spec.top_k
  # the shard's own adapter_ids, not the layer's (the router's stacked LoRA picks one per row)
  weights, experts = route(spec, proj(ROUTER, x2, adapter_ids=adapter_ids))
  flat = experts.reshape(-1)  # [N * k]: token n's choices at n * k ...
  order = jnp.argsort(flat, stable=True)  # rows grouped by expert, tokens in order within
  token = order // k
  group_sizes = jnp.bincount(flat, length=spec.n_experts).astype(jnp.int32)
  row_ids = None
  if adapter_ids is not None:  # each routed row keeps its token's row adapter
    row_ids = jnp.repeat(adapter_ids, t)[token]
  rows = x2[token]
  gate, up = jnp.split(proj("experts.gate_up_proj", rows, group_sizes, row_ids), 2, axis=-1)
  y = proj("experts.down_proj", act(gate) * up, group_sizes, row_ids)
  y = y * weights.reshape(-1)[order][:, None].astype(y.dtype)
  out = jnp.zeros_like(x2).at[token].add(y)
  counts = jax.lax.psum(group_sizes, axes) if axes else group_sizes
  load = counts.astype(jnp.float32) / jnp.sum(counts)
  return out.reshape(b, t, d), load
