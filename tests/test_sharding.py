"""Sharding: the mesh, the parameter table and its coverage check, adapters following their base, and
on 8 forced CPU devices (one subprocess: this file run as a script) a (data=2, fsdp=2, tensor=2)
training run, a resume on another mesh shape, a run of two adapters and a sharded QLoRA load that
all equal one device.
"""
import dataclasses
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

import ftjax
from conftest import ARCHS
from ftjax import evaluation, hf_io, lora, plan, quant, sharding, step as step_lib, train
from ftjax.config import defaults
from ftjax.errors import UserError
from ftjax.model import Kernels, hidden_states

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, SAVED_AT = 4, 2  # the resumed run saves at SAVED_AT on one mesh, continues on another
MESH = AbstractMesh((2, 2, 2), sharding.AXES)  # shardings without 8 real devices


def tiny_config(base, workdir, mesh=(1, 1, 1), steps=STEPS):
  """A few steps of the demo task, float32, with a learning rate that moves the loss at once (so a
  resume that lost the adapters or the optimizer state would show)."""
  c = defaults()
  c.workdir, c.model.path, c.model.dtype = str(workdir), str(base), "float32"
  c.data.train = os.path.join(REPO, "configs/demo_data/train.jsonl")
  c.data.seq_len, c.train.batch_size, c.train.steps = 32, 8, steps
  c.train.log_every, c.train.remat, c.train.eval_every = 1, "none", 0
  # constant after warmup: a run stopped at SAVED_AT follows the same schedule as a full one
  c.optim.lr, c.optim.warmup_steps, c.optim.schedule = 1e-2, 1, "constant"
  c.ckpt.every = 1000
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
  return c


def losses(workdir, key="loss"):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {m["step"]: m[key] for m in map(json.loads, f) if key in m}


def worker_env(devices, cache):
  """A CPU subprocess with `devices` devices. Runs of one test share a compilation cache, and LLVM
  does not optimize: that halves XLA:CPU's compile time and moves losses by ~1e-7. PYTHONPATH: this
  checkout's ftjax, not an installed one."""
  path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
  return dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false", PYTHONPATH=path,
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
                        "--xla_backend_optimization_level=0",
              JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def arch_spec(arch):
  from conftest import ARCH_CONFIGS, _COMMON
  cls, extra = ARCH_CONFIGS[arch]
  # dims that every axis divides, so the table's specs survive `fit` unchanged
  dims = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4,
              num_key_value_heads=2, head_dim=32, vocab_size=128)  # two NF4 groups per `in`
  return hf_io.spec_from_config(cls(**{**_COMMON, **extra, **dims}).to_dict())


_SHARED = {}  # built once per session, also for tests/test_multihost.py (which imports this)


@pytest.fixture
def base(tmp_path_factory):
  """The demo's tiny Llama (hidden 128, 4 heads, 2 kv heads, mlp 256, vocab 384)."""
  if "base" not in _SHARED:
    sys.path.insert(0, os.path.join(REPO, "configs"))
    import demo
    _SHARED["base"] = str(tmp_path_factory.mktemp("demo_base"))
    demo.build_base(_SHARED["base"])
  return _SHARED["base"]


def one_device_losses(base, tmp_path_factory):
  """{step: loss} of STEPS steps on this process's one device: what every mesh must reproduce."""
  if "losses" not in _SHARED:
    workdir = tmp_path_factory.mktemp("one_device")
    train.run(tiny_config(base, workdir))
    _SHARED["losses"] = losses(workdir)
  want = _SHARED["losses"]
  assert sorted(want) == list(range(1, STEPS + 1))
  # it falls fast: a resume that lost the adapters or the optimizer state could not match it
  assert want[STEPS] < 0.8 * want[1]
  return want


@pytest.fixture
def eight_devices(base, tmp_path_factory):
  """The 8-device worker, started before the one-device reference run so the two overlap."""
  out = tmp_path_factory.mktemp("eight")
  proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), base, str(out)],
                          env=worker_env(8, out / "jax_cache"), cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  yield proc, out
  if proc.poll() is None:
    proc.kill()


@pytest.mark.parametrize("sizes, message", [
    ((3, 1, 1), "product 3 != 8 devices"),
    ((-1, 3, 1), "3 does not divide the 8 devices"),
    ((-1, -1, 2), "at most one -1"),
    ((0, 8, 1), "each must be a positive size"),
])
def test_bad_mesh_is_a_user_error(sizes, message):
  cfg = ConfigDict(dict(zip(sharding.AXES, sizes)))
  with pytest.raises(UserError, match=message) as e:
    sharding.make_mesh(cfg, devices=[object()] * 8)
  assert "\n" not in str(e.value) and "mesh.data/fsdp/tensor=" in str(e.value)


class FakeDevice:
  def __init__(self, process_index):
    self.process_index = process_index


@pytest.mark.parametrize("sizes, want, why", [
    ((2, 2, 2), (2, 2, 2), "as configured"),
    (("auto", -1, "auto"), (1, 8, 1), "as configured"),
    (("auto", 2, "auto"), (4, 2, 1), "the devices the other axes leave"),
    (("auto", "auto", 2), (4, 1, 2), "reports no memory limit"),  # a fake device reports none
    (("auto",) * 3, (8, 1, 1), "reports no memory limit"),
])
def test_auto_mesh_rules(sizes, want, why):
  """What needs no planner: explicit sizes and -1 win, one auto axis takes the rest, and a device
  without a memory limit gets data parallelism (the planner's branches: the 8-device worker)."""
  cfg = defaults()
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = sizes
  mesh, got_why = plan.choose_mesh(cfg, devices=[FakeDevice(0)] * 8)
  assert tuple(mesh.shape.values()) == want and why in got_why, (dict(mesh.shape), got_why)
  assert plan.choose_mesh(defaults(), devices=[FakeDevice(0)])[0].shape["data"] == 1


def test_tensor_axis_across_processes_is_a_user_error():
  devices = [FakeDevice(i // 4) for i in range(8)]  # 2 processes x 4 devices
  for sizes in ((2, 1, 4), (1, 4, 2), (8, 1, 1)):  # each process feeds its own batch rows
    sharding._check_processes(np.asarray(devices).reshape(sizes))
  with pytest.raises(UserError, match=r"mesh.tensor=8 must divide the 4 devices of each process"):
    sharding.make_mesh(ConfigDict(dict(data=1, fsdp=1, tensor=8)), devices=devices)


def test_bad_mesh_stops_a_run_before_loading(base, tmp_path):
  with pytest.raises(UserError, match=r"product 2 != 1 devices"):
    train.run(tiny_config(base, tmp_path, mesh=(2, 1, 1)))


@pytest.mark.parametrize("arch", ARCHS)  # the dense ones; test_moe covers the experts' rules
@pytest.mark.parametrize("quant", [None, "nf4"])
def test_table_covers_every_parameter(arch, quant):
  spec = arch_spec(arch)
  abstract = hf_io.abstract_params(spec, hf_io.key_table(spec), np.float32, quant, 64)
  shardings = sharding.param_shardings(MESH, abstract)
  flat = jax.tree_util.tree_leaves_with_path(shardings)
  assert len(flat) == len(jax.tree.leaves(abstract))
  specs = {jax.tree_util.keystr(k, simple=True, separator="/"): s.spec for k, s in flat}
  for name in spec.projections:  # stacked: L unsharded, then the table's (in, out) spec
    kernel = f"layers/{name}/kernel" + ("/q" if quant else "")
    want = P(None, *sharding.rule(f"layers/{name}/kernel"))
    assert specs[kernel] == want, (kernel, specs[kernel])
  assert specs["embed/embedding"] == P("tensor", "fsdp")


def test_uncovered_parameter_is_named():
  sds = jax.ShapeDtypeStruct
  params = {"embed": {"embedding": sds((128, 64), np.float32)},
            "layers": {"mystery_proj": {"kernel": sds((2, 64, 64), np.float32)},
                       "z_proj": {"kernel": sds((2, 64, 64), np.float32)}}}
  with pytest.raises(ValueError, match=r"no sharding rule covers parameter "
                                       r"layers/mystery_proj/kernel: add one"):
    sharding.param_shardings(MESH, params)


def test_quantized_shards_keep_whole_groups():
  from ftjax import quant
  sds = quant.abstract((2, 128, 256), np.float32, "int4", 64)  # 2 groups along `in`
  whole = sharding.param_shardings(MESH, {"layers": {"up_proj": {"kernel": sds}}})
  assert whole["layers"]["up_proj"]["kernel"].q.spec == P(None, "fsdp", "tensor")
  split = sharding.param_shardings(AbstractMesh((1, 4, 2), sharding.AXES),
                                   {"layers": {"up_proj": {"kernel": sds}}})
  w = split["layers"]["up_proj"]["kernel"]  # 4 shards of 2 groups: `in` stays whole
  assert w.q.spec == P(None, None, "tensor") and w.scale.spec == P(None, None, "tensor")


def test_adapters_follow_their_base_kernel():
  spec = arch_spec("llama")
  base = sharding.param_shardings(
      MESH, hf_io.abstract_params(spec, hf_io.key_table(spec), np.float32))["layers"]
  adapters = jax.eval_shape(lambda: lora.init(spec, "all-linear", 8, 16.0,
                                              jax.random.PRNGKey(0)).params)
  got = sharding.adapter_shardings(MESH, spec, adapters)
  assert set(got) == set(spec.projections)
  for name, ab in got.items():
    kernel = base[name]["kernel"].spec  # [L, in, out]
    assert ab["a"].spec == P(None, kernel[1], None), name  # rank never sharded
    assert ab["b"].spec == P(None, None, kernel[2]), name
  assert got["q_proj"]["a"].spec == P(None, "fsdp", None)
  assert got["o_proj"]["b"].spec == P(None, None, "fsdp")
  # stacked adapters [L, A, ...] (several in one run): the same, replicated along A
  stacked = jax.eval_shape(lambda: lora.stack({
      n: lora.init(spec, "all-linear", 8, 16.0, jax.random.PRNGKey(0)) for n in "xy"}).params)
  got = sharding.adapter_shardings(MESH, spec, stacked)
  assert got["q_proj"]["a"].spec == P(None, None, "fsdp", None)
  assert got["o_proj"]["b"].spec == P(None, None, None, "fsdp")


def test_eight_devices_equal_one(base, eight_devices, tmp_path_factory):
  """(2, 2, 2) training, a resume from fsdp=8 onto (2, 2, 2), sharded QLoRA, and the auto mesh
  both ways: all equal one device (run here while the worker runs)."""
  proc, out = eight_devices
  want = one_device_losses(base, tmp_path_factory)
  log, _ = proc.communicate(timeout=900)
  assert proc.returncode == 0, log[-5000:]
  assert re.search(r"mesh data=8 fsdp=1 tensor=1 \(auto: base [0-9.]+ GiB \+ step [0-9.]+ GiB "
                   r"fit one 16 GiB device\)", log), log[-3000:]
  assert re.search(r"mesh data=1 fsdp=8 tensor=1 \(auto: base [0-9.]+ GiB \+ step [0-9.]+ GiB "
                   r"exceed one 0.000977 GiB device: FSDP over all devices\)", log), log[-3000:]
  for run, key in (("sharded", "loss"), ("resumed", "loss"), ("auto_data", "loss"),
                   ("auto_fsdp", "loss"), ("multi", "loss/x"), ("multi", "loss/y")):
    got = losses(out / run, key)
    assert sorted(got) == sorted(want), run
    np.testing.assert_allclose([got[s] for s in want], list(want.values()), rtol=1e-5,
                               err_msg=f"{run} {key}")
  assert f"resumed from {out / 'resumed'} at step {SAVED_AT}" in log


# ----------------------------------------------------------------------------- the 8-device worker


def worker(base, out):
  """Run with 8 CPU devices; asserts what needs them and leaves metrics for the parent test."""
  assert jax.device_count() == 8
  mesh = sharding.make_mesh(ConfigDict(dict(data=-1, fsdp=2, tensor=2)))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}

  # The batch is sharded over (data, fsdp); the hidden states at layer boundaries are too.
  batch = sharding.place_batch({"tokens": np.zeros((8, 16), np.int32)}, mesh)
  assert batch["tokens"].sharding.spec == P(sharding.BATCH)
  model = ftjax.load_hf(base, "float32", mesh=mesh)
  with jax.set_mesh(mesh):
    hlo = jax.jit(hidden_states).lower(model, batch["tokens"]).as_text()
  assert hlo.count("sharding_constraint") >= 2 or hlo.count("@Sharding") >= 2, hlo[:2000]

  # Each device holds its share of a kernel sharded over fsdp and tensor, nothing more.
  kernel = model.params["layers"]["q_proj"]["kernel"]
  assert kernel.sharding.spec == P(None, "fsdp", "tensor")
  shard_bytes = {s.data.nbytes for s in kernel.addressable_shards}
  assert shard_bytes == {kernel.nbytes // 4}, shard_bytes

  # Sharded QLoRA (and int4) loads and runs like the unsharded model.
  tokens = np.random.default_rng(0).integers(3, 300, (8, 16))
  forward = jax.jit(ftjax.forward)
  for mode in ("nf4", "int4", "int8"):
    one = ftjax.load_hf(base, "float32", quant=mode, group_size=64)
    many = ftjax.load_hf(base, "float32", quant=mode, mesh=mesh, group_size=64)
    q = many.params["layers"]["gate_proj"]["kernel"].q
    assert q.sharding.spec == P(None, "fsdp", "tensor"), (mode, q.sharding.spec)
    np.testing.assert_allclose(forward(many, tokens), forward(one, tokens), rtol=1e-5,
                               atol=1e-5, err_msg=mode)
    # Each device quantizes its own slice of the 16-bit layer: no collective of the loader's
    # quantize-and-store program moves as much as one device's slice (only column scales and
    # NF4's absmax statistics do; a quantizer that gathered the weight would show here).
    stack = sharding.param_shardings(mesh, {"layers": {"up_proj": {"kernel": quant.abstract(
        (2, 512, 256), np.float32, mode, 64)}}})["layers"]["up_proj"]["kernel"]
    stack = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                         quant.abstract((2, 512, 256), np.float32, mode, 64), stack)
    w = jax.ShapeDtypeStruct((512, 256), np.float32,
                             sharding=NamedSharding(mesh, P(*stack.q.sharding.spec[1:])))
    assert w.sharding.spec == P("fsdp", "tensor"), w.sharding.spec
    hlo = hf_io._set_layer.lower(stack, w, 0, (mode, 64, np.float32)).compile().as_text()
    moved = [np.prod([int(x) for x in s.split(",") if x]) for s in re.findall(
        r"= [a-z0-9]+\[([0-9,]*)\][^ ]* (?:all-gather|all-reduce|all-to-all|collective-permute|"
        r"reduce-scatter)(?:-start)?\(", hlo)]
    assert max(moved, default=0) < 512 * 256 // 4, (mode, moved)

  # The Pallas attention kernels run per device under the mesh (shard_map) and equal one device.
  segments = np.array([[1] * 9 + [2] * 7] * 8)
  want = forward(ftjax.load_hf(base, "float32"), tokens, None, segments)
  for impl in ("splash", "triton"):
    fast = dataclasses.replace(model, kernels=Kernels(attention=impl, interpret=True))
    with jax.set_mesh(mesh):
      got = jax.jit(ftjax.forward)(fast, tokens, None, segments)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=impl)

  # FSDP moves the packed integers: in the compiled backward pass of a quantized model, no
  # projection weight is all-gathered in floating point (the unquantized model shows the check
  # can fail), and int4 gathers move uint8.
  def weight_gathers(model, step="train"):
    ad = lora.init(model.spec, "all-linear", 4, 8.0, jax.random.PRNGKey(0))
    names = ("tokens", "targets", "loss_mask", "segment_ids")
    b = sharding.place_batch({k: np.ones((8, 16), np.float32 if k == "loss_mask" else np.int32)
                           for k in names}, mesh)
    if step == "eval":  # what ftjax.train evaluates with
      hlo = evaluation.eval_step_fn(ad, mesh).lower(ad.params, model, b).compile().as_text()
    else:
      grad = jax.jit(jax.grad(lambda a, m, b: step_lib.loss_sum(a, ad, m, b, None, "full")[0]))
      with jax.set_mesh(mesh):
        hlo = grad.lower(ad.params, model, b).compile().as_text()
    gathers = re.findall(r"= ([a-z]+[0-9]+)\[([0-9,]+)\][^ ]* all-gather\(", hlo)
    vocab = model.spec.vocab
    # weights, not activations ([8, 16, ...]) nor the embedding table (a vocab-sized dim)
    big = lambda shape: (np.prod(shape) >= 1024 and shape[:2] != (8, 16)
                         and not {vocab, vocab // 2} & set(shape))
    shapes = [(d, tuple(int(x) for x in s.split(","))) for d, s in gathers]
    return ({d for d, sh in shapes if big(sh)},
            [sh for d, sh in shapes if d[0] in "fb" and big(sh)])
  dtypes, float_weights = weight_gathers(ftjax.load_hf(base, "float32", mesh=mesh))
  assert float_weights, "the unquantized model all-gathers its float weights"
  quantized = ftjax.load_hf(base, "float32", quant="int4", mesh=mesh, group_size=64)
  for step in ("train", "eval"):
    dtypes, float_weights = weight_gathers(quantized, step)
    assert not float_weights and dtypes == {"u8"}, (step, dtypes, float_weights)

  # The auto mesh on 8 CPU devices: no memory limit, so data parallel, unplanned; with a
  # pretend 16 GiB device the planner finds that base and step fit (data parallel), with a
  # pretend 1 MiB one that they do not (FSDP). Both runs must train like one device.
  mesh, why = plan.choose_mesh(tiny_config(base, out, mesh=("auto",) * 3))
  assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1} and "no memory limit" in why
  for run, gib in (("auto_data", 16.0), ("auto_fsdp", 2.0**-10)):
    c = tiny_config(base, os.path.join(out, run), mesh=("auto",) * 3)
    c.mesh.device_gib = gib
    train.run(c)

  # Training on (2, 2, 2); and saving on fsdp=8, then resuming on (2, 2, 2).
  train.run(tiny_config(base, os.path.join(out, "sharded"), mesh=(2, 2, 2)))
  resumed = os.path.join(out, "resumed")
  train.run(tiny_config(base, resumed, mesh=(1, 8, 1), steps=SAVED_AT))
  train.run(tiny_config(base, resumed, mesh=(2, 2, 2)))

  # Two adapters in one run on (2, 2, 2), each on the reference's data: each is that run.
  multi = tiny_config(base, os.path.join(out, "multi"), mesh=(2, 2, 2))
  multi.data.train = f"x={multi.data.train},y={multi.data.train}"
  train.run(multi)


if __name__ == "__main__":
  jax.config.update("jax_default_matmul_precision", "highest")  # as conftest.py does
  worker(*sys.argv[1:])
