"""Attention: one function, four implementations; the plain-XLA path is the reference.

  attention(q, k, v, q_pos=, k_pos=, q_seg=, k_seg=, window=, scale=, softcap=, impl=)
  q [B, T, N, H], k/v [B, S, K, H] -> [B, T, N, H]; softmax in float32

A query attends to the keys of its own segment (packing; segment 0 is padding), at or before its
position, and within `window` positions when the layer has a sliding window (a static int; None:
full attention). Implementations (`Kernels.attention`, chosen once by `resolve`):

  xla     the reference, any platform. Query blocks of Q_BLOCK, each block's [T_block, S] scores
          recomputed in the backward pass; a sequence that is not a multiple of the block is
          padded to one (never one block of [T, S] scores for all heads).
  splash  TPU: JAX's splash attention (Pallas/Mosaic), segment ids, causal and local masks,
          soft-capping and GQA in the kernel; fully masked tiles are skipped.
  cudnn   GPU: cuDNN's flash attention through jax.nn.dot_product_attention with is_causal,
          per-row sequence lengths and local_window_size; no mask or bias tensor, masked tiles
          skipped. cuDNN has no public segment ids, so it takes rows that are ONE document then
          padding (data.packing=False); `resolve` refuses it for packed batches, and a packed row
          that reaches it anyway comes out NaN (a loud failure instead of attention across
          documents).
  triton  GPU: JAX's Pallas-Triton flash attention (segment ids, causal tiles skipped), so packed
          rows too; no sliding window or soft-cap, so `resolve` refuses specs that need them. Its
          kernel wants as many kv heads as query heads: k, v are repeated per group (GQA).

The kernels assume self-attention over a training row: keys are the queries' own tokens and
positions count up within each segment (what positions_from_segments gives). With a KV cache
(decoding) the decoder always calls "xla".
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from ftjax import sharding
from ftjax.errors import UserError

IMPLS = ("xla", "splash", "cudnn", "triton")

# Queries per block of the plain-XLA path. Each block's [Q_BLOCK, S] float32 scores are recomputed
# in the backward pass instead of kept, so attention never holds [T, S] scores of all heads at once
# (0.5 GiB per layer for Llama-3-8B at 2048 tokens).
Q_BLOCK = 512
KERNEL_BLOCK = 128  # sequences handed to a kernel are padded to a multiple of this


def resolve(name: str, platform: str, spec, *, packing: bool, dtype) -> str:
  """The implementation `model.attention=name` means on `platform` ("cpu" | "gpu" | "tpu") for
  this ModelSpec, batch layout (data.packing) and compute dtype; UserError if it cannot run."""
  if name not in ("auto",) + IMPLS:
    raise UserError(f"model.attention={name!r}: use one of auto, {', '.join(IMPLS)}")
  if name == "auto":
    if platform == "tpu":
      return "splash"
    if platform == "gpu" and _cudnn_problem(spec, packing, dtype) is None:
      return "cudnn"
    return "xla"  # CPU, or a GPU computation cuDNN cannot express (Pallas-Triton is opt-in)
  wants = {"splash": "tpu", "cudnn": "gpu", "triton": "gpu"}.get(name)
  if wants is not None and platform != wants:
    raise UserError(f"model.attention={name}: runs on {wants.upper()} only, this is {platform}; "
                    "use auto or xla")
  problem = {"cudnn": lambda: _cudnn_problem(spec, packing, dtype),
             "triton": lambda: _triton_problem(spec)}.get(name, lambda: None)()
  if problem:
    raise UserError(f"model.attention={name}: {problem}; use auto or xla")
  return name


def _cudnn_problem(spec, packing, dtype):
  if packing:
    return "cuDNN takes no segment ids, so it cannot keep packed rows apart (set data.packing=False)"
  if spec.attn_softcap is not None:
    return "cuDNN has no logit soft-capping"
  if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
    return "cuDNN's flash attention needs model.dtype bfloat16 or float16"
  if spec.head_dim % 8 or spec.head_dim > 256:
    return f"head dim {spec.head_dim}: cuDNN needs a multiple of 8, at most 256 (128 before Hopper)"
  return None


def _triton_problem(spec):
  if any(spec.layer_sliding) and spec.sliding_window:
    return "the Pallas-Triton kernel has no sliding window"
  if spec.attn_softcap is not None:
    return "the Pallas-Triton kernel has no logit soft-capping"
  return None


def mask(q_pos, k_pos, q_seg, k_seg, window):
  """[B, 1, 1, T, S] boolean: same segment, causal by position, within the sliding window.

  Positions restart at each packed segment, so within a segment position order is token order.
  Key slots with segment 0 that are not the query's segment are padding (or empty cache).
  """
  ok = (q_seg[:, :, None] == k_seg[:, None, :]) & (k_pos[:, None, :] <= q_pos[:, :, None])
  if window is not None:
    ok &= q_pos[:, :, None] - k_pos[:, None, :] < window
  return ok[:, None, None]


def attention(q, k, v, *, q_pos, k_pos, q_seg, k_seg, window, scale, softcap, impl="xla",
              interpret=False, q_block=Q_BLOCK):
  """See the module docstring. interpret: run a Pallas kernel in interpret mode (CPU tests)."""
  if impl == "xla":
    return _xla(q, k, v, q_pos, k_pos, q_seg, k_seg, window, scale, softcap, q_block)
  if impl == "splash":
    return _per_shard(functools.partial(_splash, window=window, scale=scale, softcap=softcap,
                                        interpret=interpret), q, k, v, q_seg)
  if impl == "cudnn":  # cuDNN's call carries its own partitioning rule
    return _cudnn(q, k, v, q_seg, window, scale, softcap, "cudnn")
  if impl == "triton":
    return _per_shard(functools.partial(_triton, window=window, scale=scale, softcap=softcap,
                                        interpret=interpret), q, k, v, q_seg)
  raise ValueError(f"attention impl {impl!r}: use one of {IMPLS}")


def _per_shard(kernel, q, k, v, seg):
  """A Pallas kernel is a custom call GSPMD cannot split: under a mesh (jax.set_mesh) it runs per
  device on its rows (batch over data, fsdp) and heads (over tensor), where those divide."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return kernel(q, k, v, seg)
  size = lambda axes: math.prod(mesh.shape[a] for a in axes)
  batch = tuple(a for a in sharding.BATCH if a in mesh.axis_names)
  batch = batch if batch and q.shape[0] % size(batch) == 0 else None
  heads = "tensor" if "tensor" in mesh.axis_names else None
  if heads and (q.shape[2] % mesh.shape[heads] or k.shape[2] % mesh.shape[heads]):
    heads = None
  rows = P(batch, None, heads, None)
  return jax.shard_map(kernel, mesh=mesh, in_specs=(rows, rows, rows, P(batch, None)),
                       out_specs=rows, check_vma=False)(q, k, v, seg)


# ----------------------------------------------------------------------------- the reference


def _xla(q, k, v, q_pos, k_pos, q_seg, k_seg, window, scale, softcap, q_block):
  b, t, n, h = q.shape
  if t <= q_block:
    return _xla_block(q, k, v, mask(q_pos, k_pos, q_seg, k_seg, window), scale, softcap)
  pad = -t % q_block  # padded queries match no key (segment -1): sliced off below
  if pad:
    q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    q_pos = jnp.pad(q_pos, ((0, 0), (0, pad)))
    q_seg = jnp.pad(q_seg, ((0, 0), (0, pad)), constant_values=-1)
  nb = (t + pad) // q_block
  split = lambda x: x.reshape((b, nb, q_block) + x.shape[2:]).swapaxes(0, 1)

  @jax.checkpoint
  def one_block(xs):
    qb, pb, sb = xs
    return _xla_block(qb, k, v, mask(pb, k_pos, sb, k_seg, window), scale, softcap)

  o = jax.lax.map(one_block, (split(q), split(q_pos), split(q_seg)))
  return o.swapaxes(0, 1).reshape(b, t + pad, n, h)[:, :t]


def _xla_block(q, k, v, ok, scale, softcap):
  b, t, n, h = q.shape
  kv = k.shape[2]
  q = q.reshape(b, t, kv, n // kv, h)
  s = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32) * scale
  if softcap is not None:
    s = jnp.tanh(s / softcap) * softcap
  s = jnp.where(ok, s, jnp.finfo(jnp.float32).min)
  p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
  o = jnp.einsum("bkgts,bskh->btkgh", p, v)
  return o.reshape(b, t, n, h)


def _pad_tokens(x, pad, value=0):
  """Pads axis 1 (tokens) of x by `pad`."""
  return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=value)


# ----------------------------------------------------------------------------- TPU: splash


@functools.lru_cache(maxsize=64)
def _splash_kernel(t, n, window, softcap, interpret):
  """A splash kernel for one row: q [N, t, H], k/v [K, t, H] (t a multiple of KERNEL_BLOCK). The
  mask is static (causal, or a causal local band); segment ids come at call time."""
  from jax.experimental.pallas.ops.tpu import splash_attention as sa
  if window is None:
    head = sa.CausalMask((t, t))
  else:  # keys at distance 0 .. window-1 before the query, none after
    head = sa.LocalMask((t, t), window_size=(window - 1, 0), offset=0)
  block = next(c for c in (512, 256, 128) if t % c == 0)
  sizes = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                        block_q_dq=block, block_kv_dq=block)
  with jax.ensure_compile_time_eval():  # its mask tables are constants, not this trace's values
    return sa.make_splash_mha(sa.MultiHeadMask([head] * n), block_sizes=sizes, head_shards=1,
                              q_seq_shards=1, attn_logits_soft_cap=softcap, interpret=interpret)


def _splash(q, k, v, seg, window, scale, softcap, interpret):
  from jax.experimental.pallas.ops.tpu import splash_attention as sa
  b, t, n, _ = q.shape
  pad = -t % KERNEL_BLOCK  # padded tokens: a segment of their own (-1), sliced off after
  seg = _pad_tokens(seg.astype(jnp.int32), pad, -1)
  heads_first = lambda x: _pad_tokens(x, pad).swapaxes(1, 2)  # [B, heads, T, H]
  kernel = _splash_kernel(t + pad, n, window, softcap, bool(interpret))
  run = lambda q, k, v, seg: jax.vmap(kernel)(q, k, v, segment_ids=sa.SegmentIds(seg, seg))
  if q.dtype.itemsize == 2:  # Mosaic has no 16-bit dot at precision "highest" (a no-op for them)
    run = _at_default_precision(run)
  # splash has no scale argument: scaling q first equals scaling the scores (before the soft-cap)
  o = run(heads_first(q * jnp.asarray(scale, q.dtype)), heads_first(k), heads_first(v), seg)
  return o.swapaxes(1, 2)[:, :t]


def _at_default_precision(f):
  """f(q, k, v, seg) traced at matmul precision "default", its backward pass too (which JAX would
  otherwise trace later, under whatever precision is set then)."""
  at_default = lambda: jax.default_matmul_precision("default")

  @jax.custom_vjp
  def g(q, k, v, seg):
    with at_default():
      return f(q, k, v, seg)

  def fwd(q, k, v, seg):
    with at_default():
      out, vjp = jax.vjp(lambda q, k, v: f(q, k, v, seg), q, k, v)
    return out, (vjp, seg)

  def bwd(res, ct):
    vjp, seg = res
    with at_default():
      return (*vjp(ct), np.zeros(seg.shape, jax.dtypes.float0))

  g.defvjp(fwd, bwd)
  return g


# ----------------------------------------------------------------------------- GPU: cuDNN


def _cudnn(q, k, v, seg, window, scale, softcap, implementation):
  """jax.nn.dot_product_attention with only what cuDNN reads natively: causal, per-row lengths,
  a local window. Rows must be one segment followed by padding (see the module docstring).
  implementation "xla" runs the same call through JAX's own version (how CPU tests check it)."""
  if softcap is not None:
    raise ValueError("cudnn attention has no soft-capping (attention.resolve refuses it)")
  t = q.shape[1]
  length = jnp.sum(seg != 0, axis=1).astype(jnp.int32)
  o = jax.nn.dot_product_attention(
      q, k, v, scale=scale, is_causal=True, query_seq_lengths=jnp.maximum(length, 1),
      key_value_seq_lengths=jnp.maximum(length, 1),
      local_window_size=None if window is None else (window - 1, 0),
      implementation=implementation)
  idx = jnp.arange(t)[None, :]
  real = idx < length[:, None]
  one_document = jnp.all(jnp.where(real, seg == seg[:, :1], seg == 0), axis=1)
  # Padded queries: zero (cuDNN leaves them undefined). Rows it cannot express: NaN.
  o = jnp.where(real[:, :, None, None], o, 0)
  return jnp.where(one_document[:, None, None, None], o, jnp.nan).astype(q.dtype)


# ----------------------------------------------------------------------------- GPU: Pallas-Triton


def _triton(q, k, v, seg, window, scale, softcap, interpret):
  if window is not None or softcap is not None:
    raise ValueError("triton attention has no window or soft-cap (attention.resolve refuses it)")
  import warnings
  with warnings.catch_warnings():  # jax >= 0.11 marks the module deprecated (for tokamax)
    warnings.simplefilter("ignore", DeprecationWarning)
    from jax.experimental.pallas.ops.gpu import attention as triton_attention
  b, t, n, _ = q.shape
  groups = n // k.shape[2]
  if groups > 1:  # GQA: the kernel wants one kv head per query head; dk, dv sum back per group
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
  pad = -t % KERNEL_BLOCK
  seg = _pad_tokens(seg.astype(jnp.int32), pad, -1)
  o = triton_attention.mha(_pad_tokens(q, pad), _pad_tokens(k, pad), _pad_tokens(v, pad),
                           segment_ids=seg, sm_scale=float(scale), causal=True,
                           interpret=interpret)
  return o[:, :t]

