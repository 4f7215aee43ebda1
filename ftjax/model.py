"""ModelSpec and the pure forward pass of a decoder-only transformer.

Axis letters, used in names and einsum strings: B batch, T query positions, S key positions,
D model, N query heads, K kv heads, G query heads per kv head (N = K * G), H head dim, F mlp,
V vocab, L layers, R LoRA rank, E experts (mixture-of-experts layers: ftjax/moe.py).

Decoder layers are stacked on a leading L axis and run under `jax.lax.scan`, so compile time does not
grow with depth. What differs between layers (sliding window or not, which rope table) is a scanned
input, not a Python branch; the sliding window, which attention kernels need static, picks one of
a few static branches (see `decoder`). Attention is ftjax/attention.py.
"""
import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from ftjax import moe
from ftjax.attention import attention
from ftjax.linear import linear
from ftjax.sharding import constrain_activations, gather_quantized, shard_key


@dataclasses.dataclass(frozen=True)
class RopeSpec:
  theta: float = 10000.0
  kind: str = "default"  # "default" | "linear" | "llama3"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position: int = 8192


DENSE_MLP = ("gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Everything about an architecture the forward pass needs; hashable, so it is static under jit."""
  arch: str
  vocab: int
  dim: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  mlp_dim: int
  norm_eps: float = 1e-6
  act: str = "silu"  # "silu" | "gelu_tanh" | "gelu"
  rope: RopeSpec = RopeSpec()
  rope_local: RopeSpec | None = None  # rope of sliding-window layers when it differs (Gemma 3)
  rotary_dim: int | None = None  # < head_dim for partial rotary (Phi-3 variants)
  qkv_bias: bool = False  # Qwen2
  qk_norm: bool = False  # Qwen3, Gemma 3
  norm_plus_one: bool = False  # Gemma: the norm multiplies by (1 + w)
  embed_scale: bool = False  # Gemma: embeddings times sqrt(D)
  sandwich_norm: bool = False  # Gemma 2/3: norms after attention and mlp too
  sliding_window: int | None = None
  layer_sliding: tuple[bool, ...] = ()  # per layer: sliding-window attention?
  attn_softcap: float | None = None
  final_softcap: float | None = None
  query_scale: float | None = None  # defaults to head_dim ** -0.5
  tie_embeddings: bool = False
  fused_projections: bool = False  # Phi-3: qkv_proj and gate_up_proj
  eos_ids: tuple[int, ...] = ()
  # Mixture of experts (ftjax/moe.py): E experts, top-k per token.
  n_experts: int = 0
  top_k: int = 0
  expert_dim: int = 0  # F of one expert (moe_intermediate_size)
  norm_topk: bool = False  # renormalize the top-k router probabilities to sum to 1
  shared_expert_dim: int = 0  # Qwen2-MoE: a dense expert every token takes, sigmoid-gated
  # Qwen2/3-MoE's mlp_only_layers and decoder_sparse_step: layers whose MLP is dense (mlp_dim)
  dense_mlp_layers: tuple[int, ...] = ()

  @property
  def projections(self) -> tuple[str, ...]:
    """The linear modules of a decoder layer, by their HF names (under `mlp.` for MoE's)."""
    if self.fused_projections:
      return ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    attn = ("q_proj", "k_proj", "v_proj", "o_proj")
    if self.n_experts:
      shared = moe.SHARED_PROJECTIONS if self.shared_expert_dim else ()
      dense = DENSE_MLP if self.dense_mlp_layers else ()
      return attn + dense + moe.EXPERT_PROJECTIONS + shared
    return attn + DENSE_MLP

  @property
  def sparse_layers(self) -> tuple[int, ...]:
    """The layers whose MLP is a mixture of experts (none in a dense model)."""
    if not self.n_experts:
      return ()
    return tuple(i for i in range(self.n_layers) if i not in self.dense_mlp_layers)

  @property
  def mixed(self) -> bool:
    """Whether MoE and dense MLP layers alternate, so that layers hold different parameters."""
    return bool(self.n_experts and self.dense_mlp_layers)

  def layers_of(self, name: str) -> tuple[int, ...]:
    """The layers that hold parameter `name` (a projection, the router, a norm), in order: its
    stack's leading axis. Every layer's, but in a mixed model (the dense MLP's, the MoE's)."""
    if self.mixed and name in DENSE_MLP:
      return self.dense_mlp_layers
    if self.mixed and name in moe.SPARSE_PARAMS:
      return self.sparse_layers
    return tuple(range(self.n_layers))

  @property
  def adaptable(self) -> tuple[str, ...]:
    """What LoRA may adapt: the projections, then a MoE's router (which lora.targets must name;
    all-linear leaves it out)."""
    return self.projections + ((moe.ROUTER,) if self.n_experts else ())

  def projection_shape(self, name: str) -> tuple[int, int]:
    """(in, out) of a projection kernel (of one expert for the experts')."""
    d, n, k, h, f = self.dim, self.n_heads, self.n_kv_heads, self.head_dim, self.mlp_dim
    fe, fs = self.expert_dim, self.shared_expert_dim
    return {
        "q_proj": (d, n * h), "k_proj": (d, k * h), "v_proj": (d, k * h), "o_proj": (n * h, d),
        "qkv_proj": (d, (n + 2 * k) * h), "gate_proj": (d, f), "up_proj": (d, f),
        "gate_up_proj": (d, 2 * f), "down_proj": (f, d),
        "experts.gate_up_proj": (d, 2 * fe), "experts.down_proj": (fe, d),
        "shared_expert.gate_proj": (d, fs), "shared_expert.up_proj": (d, fs),
        "shared_expert.down_proj": (fs, d), moe.ROUTER: (d, self.n_experts),
    }[name]

  def projection_lead(self, name: str) -> tuple[int, ...]:
    """Per-layer axes before (in, out): (E,) for the experts' kernels, () otherwise."""
    return (self.n_experts,) if name in moe.EXPERT_PROJECTIONS else ()


@dataclasses.dataclass(frozen=True)
class Kernels:
  """Which implementation the step runs; static configuration, chosen once (step.kernels_for)."""
  attention: str = "xla"  # xla | splash | cudnn | triton (ftjax/attention.py)
  quant: str = "xla"  # the dequantize-matmul: xla | triton | mosaic (ftjax/kernels)
  grouped: str = "xla"  # the experts' grouped matmul: xla | mgpu (ftjax/kernels)
  interpret: bool = False  # Pallas kernels in interpret mode: how CPU tests run them


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Model:
  """A spec (static), its base parameters (a pytree) and the kernels the forward pass uses
  (static). Passes through jax.jit as an argument."""
  spec: ModelSpec = dataclasses.field(metadata=dict(static=True))
  params: Any
  kernels: Kernels = dataclasses.field(default=Kernels(), metadata=dict(static=True))


# ----------------------------------------------------------------------------- building blocks


def rms_norm(x, scale, eps, plus_one):
  """RMSNorm computed in float32, as transformers does, returned in x's dtype."""
  xf = x.astype(jnp.float32)
  xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  if plus_one:  # Gemma multiplies in float32 before casting back; Llama casts first
    return (xf * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)
  return scale.astype(x.dtype) * xf.astype(x.dtype)


def activation(name, x):
  if name == "silu":
    return jax.nn.silu(x)
  if name == "gelu_tanh":
    return jax.nn.gelu(x, approximate=True)
  return jax.nn.gelu(x, approximate=False)


def inv_frequencies(rope: RopeSpec, rotary_dim: int):
  """Inverse frequencies [rotary_dim // 2] in float32, with the config's scaling applied."""
  inv = 1.0 / (rope.theta ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))
  if rope.kind == "linear":
    inv = inv / rope.factor
  elif rope.kind == "llama3":
    low_wavelen = rope.original_max_position / rope.low_freq_factor
    high_wavelen = rope.original_max_position / rope.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > low_wavelen, inv / rope.factor, inv)
    smooth = (rope.original_max_position / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    inv = jnp.where(medium, smoothed, scaled)
  return inv


def rope_tables(rope: RopeSpec, rotary_dim: int, positions):
  """cos, sin [B, T, rotary_dim] for integer positions [B, T] (HF's rotate-half layout)."""
  freqs = positions.astype(jnp.float32)[..., None] * inv_frequencies(rope, rotary_dim)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
  """x: [B, T, heads, H]; rotates the first cos.shape[-1] dims, passes the rest."""
  r = cos.shape[-1]
  xr, xpass = x[..., :r].astype(jnp.float32), x[..., r:]
  half = r // 2
  rotated = jnp.concatenate([-xr[..., half:], xr[..., :half]], axis=-1)
  out = (xr * cos[:, :, None, :] + rotated * sin[:, :, None, :]).astype(x.dtype)
  return jnp.concatenate([out, xpass], axis=-1) if xpass.shape[-1] else out


def positions_from_segments(segment_ids):
  """Position of each token within its segment: restarts at 0 where the segment id changes."""
  t = jnp.arange(segment_ids.shape[1])[None, :]
  starts = jnp.concatenate(
      [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  start_index = jax.lax.cummax(jnp.where(starts, t, 0), axis=1)
  return (t - start_index).astype(jnp.int32)


# ----------------------------------------------------------------------------- one decoder layer


def _norm(spec, p, name, x):
  return rms_norm(x, p[name]["scale"], spec.norm_eps, spec.norm_plus_one)


def decoder_layer(spec: ModelSpec, p, lora, x, ctx):
  """One layer. p: this layer's params; lora: this layer's adapters {name: (a, b)} or {}.

  ctx: dict with cos/sin tables (global and local), q/k positions and segments, this layer's
  (static) window and `sliding` flag, whether its MLP is a MoE's (`sparse`), the Kernels, the
  LoRA scale, optional dropout key/rate, and optional kv cache for this layer. Returns (x, new_cache_or_None, expert load [E] (float32
  share of this layer's routed tokens per expert; [0] for a dense MLP)).
  """
  b, t, _ = x.shape
  n, kv, h = spec.n_heads, spec.n_kv_heads, spec.head_dim
  kernels = ctx["kernels"]

  def proj(name, inp, group_sizes=None, adapter_ids=None):
    w = p[name]
    ab = lora.get(name)
    y = linear(inp, w["kernel"], ab, scale=ctx["lora_scale"], bias=w.get("bias"),
               lora_input=_dropout(ctx, name, inp) if ab is not None else None,
               adapter_ids=ctx.get("adapter_ids") if adapter_ids is None else adapter_ids,
               group_sizes=group_sizes, backend=kernels.quant, grouped=kernels.grouped,
               interpret=kernels.interpret)
    return checkpoint_name(y, name)  # what remat "save_proj" keeps

  r = _norm(spec, p, "input_layernorm", x)
  if spec.fused_projections:
    qkv = proj("qkv_proj", r)
    q, k, v = jnp.split(qkv, [n * h, (n + kv) * h], axis=-1)
  else:
    q, k, v = proj("q_proj", r), proj("k_proj", r), proj("v_proj", r)
  q, k, v = q.reshape(b, t, n, h), k.reshape(b, t, kv, h), v.reshape(b, t, kv, h)
  if spec.qk_norm:
    q, k = _norm(spec, p, "q_norm", q), _norm(spec, p, "k_norm", k)
  local = "_local" if ctx["sliding"] else ""
  cos, sin = ctx["cos" + local], ctx["sin" + local]
  q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

  cache = ctx.get("cache")
  if cache is not None:  # decoding: this step's keys go into the carried cache, in place
    at = (ctx["layer"], 0, ctx["cache_index"], 0, 0)
    cache = {"k": jax.lax.dynamic_update_slice(cache["k"], k[None].astype(cache["k"].dtype), at),
             "v": jax.lax.dynamic_update_slice(cache["v"], v[None].astype(cache["v"].dtype), at)}
    if ctx["read_cache"]:  # a decode step attends to every cached key; a prefill to its own
      k, v = cache["k"][ctx["layer"]], cache["v"][ctx["layer"]]
  scale = spec.query_scale if spec.query_scale is not None else h ** -0.5
  o = attention(q, k.astype(q.dtype), v.astype(q.dtype), q_pos=ctx["q_pos"], k_pos=ctx["k_pos"],
                q_seg=ctx["q_seg"], k_seg=ctx["k_seg"], window=ctx["window"], scale=scale,
                softcap=spec.attn_softcap, interpret=kernels.interpret,
                impl="xla" if cache is not None else kernels.attention)  # kernels: training rows
  o = proj("o_proj", checkpoint_name(o.reshape(b, t, n * h), "attention_out"))
  if spec.sandwich_norm:
    o = _norm(spec, p, "post_attention_layernorm", o)
  x = x + o

  r = _norm(spec, p, "pre_feedforward_layernorm" if spec.sandwich_norm else
            "post_attention_layernorm", x)
  if ctx["sparse"]:
    m, load = moe.sparse_mlp(spec, p, r, proj, lambda v: activation(spec.act, v),
                             ctx.get("adapter_ids"))
    return x + m, cache, load
  if spec.fused_projections:
    gate, up = jnp.split(proj("gate_up_proj", r), 2, axis=-1)
  else:
    gate, up = proj("gate_proj", r), proj("up_proj", r)
  m = proj("down_proj", activation(spec.act, gate) * up)
  if spec.sandwich_norm:
    m = _norm(spec, p, "post_feedforward_layernorm", m)
  return x + m, cache, jnp.zeros((0,), jnp.float32)


def _dropout(ctx, name, x):
  rate, key = ctx.get("dropout_rate", 0.0), ctx.get("dropout_key")
  if not rate or key is None:
    return None
  key = jax.random.fold_in(shard_key(key), ctx["projection_index"][name])
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


# ----------------------------------------------------------------------------- the whole model

# What each layer keeps for the backward pass ("none": everything it needs, no recompute).
# "save_proj": each projection's output and attention's output (MaxText's save_qkv_proj /
# save_out_proj family); recomputed are the element-wise parts (norms, rope, activation), the
# attention scores and each adapter's x @ a. "dots": every dot without batch dimensions (the
# projections and LoRA's), so attention is recomputed whole. "full": only its input (the
# residual stream, one [B, T, D] per layer), everything else recomputed. "offload": the same, but
# those inputs wait in pinned host memory, not on the device (0.5 GiB for Llama-3-8B at 2048
# tokens), copied back as the backward pass reaches each layer. ftjax.plan counts what each costs.
SAVED_BY_NAME = ("q_proj", "k_proj", "v_proj", "qkv_proj", "attention_out", "o_proj",
                 "gate_proj", "up_proj", "gate_up_proj", "down_proj", *moe.EXPERT_PROJECTIONS,
                 *moe.SHARED_PROJECTIONS)
REMAT_POLICIES = {
    "save_proj": jax.checkpoint_policies.save_only_these_names(*SAVED_BY_NAME),
    "full": jax.checkpoint_policies.nothing_saveable,
    "offload": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=["layer_input"],
        offload_src="device", offload_dst="pinned_host"),
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def embed(spec: ModelSpec, params, tokens):
  return scale_embeddings(spec, jnp.take(params["embed"]["embedding"], tokens, axis=0))


def scale_embeddings(spec: ModelSpec, x):
  """Embedding rows -> the first layer's input (Gemma multiplies by sqrt(D))."""
  if spec.embed_scale:  # transformers rounds sqrt(D) to the weights' dtype first
    x = x * jnp.asarray(spec.dim ** 0.5, x.dtype)
  return x


def layer_windows(spec: ModelSpec) -> tuple[tuple[int | None, bool], ...]:
  """Per layer, static: (sliding window or None for full attention, uses the local rope)."""
  sliding = spec.layer_sliding or (False,) * spec.n_layers
  return tuple((spec.sliding_window if s else None, bool(s)) for s in sliding)


def decoder(spec: ModelSpec, params, x, *, q_pos, q_seg, k_pos=None, k_seg=None, adapters=None,
            adapter_ids=None, dropout_key=None, remat="none", cache=None, cache_index=None,
            kernels=Kernels(), with_load=False):
  """Runs all layers over hidden states x [B, T, D]; returns (x, new_cache), and with
  `with_load` also each MoE layer's expert load [L_moe, E] (moe.sparse_mlp; [L, 0] for dense
  models).

  adapter_ids [B]: each row's adapter when `adapters` is stacked (lora.stack); -1 for the base.

  The stacked [L, ...] layers run as one scan. Attention kernels need a static window, so where
  layers differ (Gemma 2/3: local and global) each kind of layer is a branch of a lax.switch with
  its window and rope fixed, and the layer's kind (a scanned int) picks one. Measured on the 8B
  plan, scanning blocks of layers instead ([L/P, P, ...] or sliced stacks) made XLA copy the
  stacked weights (+4.4 GiB at P=2, +10 GiB at P=6); the switch costs +1% under remat. A model
  whose layers hold different parameters (MoE and dense MLPs mixed: spec.mixed, each stacked
  over its own layers, spec.layers_of) runs its layers as an unrolled loop instead: compile time
  grows with depth there.

  cache: {"k", "v"} [L, B, S, K, H], carried through the layer scan (each layer writes its T new
  keys at `cache_index` in place, so a decode step moves one token's keys, not the whole cache).
  With k_pos / k_seg [B, S] the queries attend to the whole cache (a decode step); without, to
  their own keys only, as in training (a prefill).

  Under `jax.set_mesh(mesh)` the hidden state at every layer boundary is constrained to batch
  over (data, fsdp) (sharding.constrain_activations), and quantized kernels are gathered as packed
  integers (sharding.gather_quantized); without a mesh both are no-ops.
  """
  rotary = spec.rotary_dim or spec.head_dim
  cos, sin = rope_tables(spec.rope, rotary, q_pos)
  cos_l, sin_l = rope_tables(spec.rope_local or spec.rope, rotary, q_pos)
  lora_params = adapters.params if adapters is not None else {}
  static_ctx = dict(
      cos=cos, sin=sin, cos_local=cos_l, sin_local=sin_l, q_pos=q_pos, q_seg=q_seg,
      k_pos=q_pos if k_pos is None else k_pos, k_seg=q_seg if k_seg is None else k_seg,
      lora_scale=adapters.scale if adapters is not None else 1.0, kernels=kernels,
      dropout_rate=adapters.dropout if adapters is not None else 0.0, cache_index=cache_index,
      read_cache=k_pos is not None,
      adapter_ids=_adapter_ids(adapters, adapter_ids, x.shape[0]),
      projection_index={name: i for i, name in enumerate(spec.adaptable)})
  keys = (jax.random.split(dropout_key, spec.n_layers) if dropout_key is not None
          else jnp.zeros((spec.n_layers,), jnp.uint32))

  def one_layer(window, sliding, sparse):
    def run(carry, p, lora_layer, key, layer):
      ctx = dict(static_ctx, window=window, sliding=sliding, sparse=sparse, cache=carry[1],
                 layer=layer, dropout_key=key if dropout_key is not None else None)
      lora = {name: (ab["a"], ab["b"]) for name, ab in lora_layer.items()}
      h, cache, load = decoder_layer(spec, gather_quantized(p), lora, carry[0], ctx)
      return (constrain_activations(h), cache), load
    return run

  def remat_of(fn):
    """fn(carry, ...) with the layer's input named (what remat "offload" moves to the host),
    under the remat policy."""
    def named(carry, *args):
      return fn((checkpoint_name(carry[0], "layer_input"), carry[1]), *args)
    if remat == "none":
      return named
    return jax.checkpoint(named, policy=REMAT_POLICIES[remat], prevent_cse=False)

  windows = layer_windows(spec)
  sparse = set(spec.sparse_layers)
  carry = (constrain_activations(x), cache)
  if spec.mixed or isinstance(params["layers"], (list, tuple)):  # an unrolled loop
    layers = params["layers"]
    if not isinstance(layers, (list, tuple)):
      layers = layer_slices(spec, layers)
    lora_layers = layer_slices(spec, lora_params)
    loads = []
    for i, p in enumerate(layers):
      run = remat_of(one_layer(*windows[i], i in sparse))
      carry, load = run(carry, p, lora_layers[i], keys[i], i)
      loads.append(load)
    loads = [l for i, l in enumerate(loads) if i in sparse] if spec.mixed else loads
    x, cache = carry
    return (x, cache, jnp.stack(loads)) if with_load else (x, cache)

  kinds = tuple(dict.fromkeys(windows))  # the distinct (window, sliding) pairs, in layer order
  branches = [one_layer(*w, bool(sparse)) for w in kinds]

  def body(carry, xs):
    kind, *layer_xs = xs
    if len(branches) == 1:
      return branches[0](carry, *layer_xs)
    return jax.lax.switch(kind, branches, carry, *layer_xs)  # the branch with this layer's window

  kind = [kinds.index(w) for w in windows]
  xs = (jnp.asarray(kind, jnp.int32), params["layers"], lora_params, keys,
        jnp.arange(spec.n_layers))
  (x, cache), loads = jax.lax.scan(remat_of(body), carry, xs)
  return (x, cache, loads) if with_load else (x, cache)


def layer_slices(spec: ModelSpec, layers) -> list[dict]:
  """Stacked layer parameters (base or LoRA: {name: [len(spec.layers_of(name)), ...]}) -> one
  dict per decoder layer, of what that layer holds."""
  out = [{} for _ in range(spec.n_layers)]
  for name, tree in layers.items():
    for j, i in enumerate(spec.layers_of(name)):
      out[i][name] = jax.tree.map(lambda a, j=j: a[j], tree)
  return out


def decode_layout(spec: ModelSpec, params):
  """The base with its stacked layers split into one buffer per layer (a list), which `decoder`
  runs as an unrolled loop. XLA:CPU copies a scanned layer's weights out of the stack before each
  matmul (measured: a decode-sized matmul chain 2.3x slower than on separate buffers); a decode
  step reads every weight once per token, so that copy is most of its memory traffic. Costs one
  copy of the layers while it lives."""
  return dict(params, layers=layer_slices(spec, params["layers"]))


def _adapter_ids(adapters, adapter_ids, rows):
  if adapters is None or not adapters.stacked:
    if adapter_ids is not None:
      raise ValueError("adapter_ids given, but the adapters are not stacked (lora.stack)")
    return None
  if adapter_ids is None:
    raise ValueError(f"stacked adapters {adapters.names}: pass adapter_ids, one per row")
  return jnp.broadcast_to(jnp.asarray(adapter_ids, jnp.int32), (rows,))


def final_hidden(spec: ModelSpec, params, x):
  return rms_norm(x, params["final_norm"]["scale"], spec.norm_eps, spec.norm_plus_one)


def output_kernel(spec: ModelSpec, params):
  """The [D, V] output projection; a transposed view of the embedding when tied (no copy)."""
  return params["embed"]["embedding"].T if spec.tie_embeddings else params["lm_head"]["kernel"]


def logits_from_hidden(spec: ModelSpec, params, h):
  """h [..., D] -> float32 logits [..., V], with Gemma 2's final soft-capping."""
  w = output_kernel(spec, params)
  logits = jnp.einsum("...d,dv->...v", h, w.astype(h.dtype), preferred_element_type=jnp.float32)
  if spec.final_softcap is not None:
    logits = jnp.tanh(logits / spec.final_softcap) * spec.final_softcap
  return logits


def hidden_states(model: Model, tokens, adapters=None, segment_ids=None, *, embeds=None,
                  adapter_ids=None, dropout_key=None, remat="none"):
  """Final-normed hidden states [B, T, D] (the train step turns these into a chunked loss).

  embeds: the tokens' embedding rows [B, T, D], looked up on the host (model.embed_on_host); the
  params then have no embedding table.
  """
  spec, params = model.spec, model.params
  tokens = jnp.asarray(tokens, jnp.int32)
  if segment_ids is None:
    segment_ids = jnp.ones_like(tokens)
  positions = positions_from_segments(segment_ids)
  x = embed(spec, params, tokens) if embeds is None else scale_embeddings(spec, embeds)
  x, _ = decoder(spec, params, x, q_pos=positions, q_seg=segment_ids, adapters=adapters,
                 adapter_ids=adapter_ids, dropout_key=dropout_key, remat=remat,
                 kernels=model.kernels)
  return final_hidden(spec, params, x)


def forward(model: Model, tokens, adapters=None, segment_ids=None, *, adapter_ids=None):
  """int32 tokens [B, T] -> float32 logits [B, T, V].

  With segment_ids, tokens attend only within their segment and positions restart at 0 at each
  segment start (packing). With stacked adapters (lora.stack), adapter_ids [B] picks each row's
  adapter (-1: the base alone).
  """
  return logits_from_hidden(model.spec, model.params, hidden_states(
      model, tokens, adapters, segment_ids, adapter_ids=adapter_ids))


def expert_load(model: Model, tokens, adapters=None, segment_ids=None, *, adapter_ids=None,
                embeds=None):
  """float32 [L, E]: each layer's share of routed tokens per expert (rows sum to 1) for this
  batch; what a user watches for routing collapse (one expert taking everything). [L, 0] for a
  dense model. embeds: as in `hidden_states`."""
  spec, params = model.spec, model.params
  tokens = jnp.asarray(tokens, jnp.int32)
  if segment_ids is None:
    segment_ids = jnp.ones_like(tokens)
  x = embed(spec, params, tokens) if embeds is None else scale_embeddings(spec, embeds)
  *_, load = decoder(spec, params, x, q_pos=positions_from_segments(segment_ids),
                     q_seg=segment_ids, adapters=adapters, adapter_ids=adapter_ids,
                     kernels=model.kernels, with_load=True)
  return load
