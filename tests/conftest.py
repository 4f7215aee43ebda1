"""Tiny Hugging Face models built here (nothing downloaded), one per supported architecture."""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# CPU only, also in the subprocesses tests start: with libtpu installed (the tpu-plan extra) JAX
# would otherwise probe for a TPU first and log its failure to stderr, which tests read.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session, in a fresh temporary directory, also read and
# written by the subprocesses tests start (they inherit the environment): the same programs (the
# demo's train step, its decodes, the planner's compile) are compiled by many tests' runs, each a
# new process, and compiling is about half of a tiny run's time on CPU. A hit is the executable
# the compiler wrote, so no result changes. Below 0.1 s a compile costs about what a hit does.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="ftjax-tests-jax-cache-")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
# A size limit turns on jax's file lock around each read and write: processes running at once
# (multi-process runs, the xdist workers) never read an entry another one is half-way writing.
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 * 2**30))

import logging

# bitsandbytes (imported by peft and test_quant) warns on import that it could not fetch a CPU
# kernel from the hub (transformers installs `kernels`): the tests run offline and use its own.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

import jax
import pytest
import torch
import transformers

jax.config.update("jax_default_matmul_precision", "highest")
# jax reads these variables when it is imported: a plugin may have imported it before this file.
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
jax.config.update("jax_compilation_cache_max_size", int(os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"]))

VOCAB = 101
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, intermediate_size=48, max_position_embeddings=256,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)

# Each entry exercises what is special about the architecture; windows are shorter than the
# test sequences so sliding-window masking is actually tested.
ARCH_CONFIGS = {
    "llama": (transformers.LlamaConfig, dict(
        head_dim=16, rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                          low_freq_factor=1.0, high_freq_factor=4.0,
                                          original_max_position_embeddings=16))),
    "mistral": (transformers.MistralConfig, dict(sliding_window=5, head_dim=8)),
    "qwen2": (transformers.Qwen2Config, dict(tie_word_embeddings=True)),
    "qwen3": (transformers.Qwen3Config, dict(head_dim=16)),
    "gemma": (transformers.GemmaConfig, dict(head_dim=16)),
    "gemma2": (transformers.Gemma2Config, dict(head_dim=16, sliding_window=5,
                                               query_pre_attn_scalar=12,
                                               attn_logit_softcapping=5.0,
                                               final_logit_softcapping=3.0)),
    "gemma3_text": (transformers.Gemma3TextConfig, dict(
        head_dim=16, sliding_window=5, query_pre_attn_scalar=12,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters=dict(sliding_attention=dict(rope_type="default", rope_theta=10000.0),
                             full_attention=dict(rope_type="linear", rope_theta=1000000.0,
                                                 factor=8.0)))),
    "phi3": (transformers.Phi3Config, dict(sliding_window=6, num_key_value_heads=2,
                                           rope_parameters=dict(rope_type="default",
                                                                rope_theta=10000.0,
                                                                partial_rotary_factor=0.5))),
}
ARCHS = tuple(ARCH_CONFIGS)

# The files that take longest (about 4, 2 and 1-1.5 minutes on 2 cores), run first: pyproject runs
# the suite on two xdist workers, each taking whole files in this order, and a long file started
# last would leave the other worker idle at the end.
LONGEST_FIRST = ("test_readme.py", "test_plan.py", "test_train.py", "test_multihost.py",
                 "test_multigen.py", "test_dpo.py", "test_sharding.py", "test_demo.py",
                 "test_bench.py", "test_crash.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: same order within


def build_hf(arch, seed=0, configs=None, **overrides):
  """A float32 transformers model of `arch` (from `configs`, default ARCH_CONFIGS) with weights
  spread wide enough that a wrong mask, rope, norm or expert moves the logits a lot (HF's 0.02
  init would hide such bugs)."""
  cls, extra = (configs or ARCH_CONFIGS)[arch]
  cfg = cls(**{**_COMMON, **extra, **overrides})
  cfg._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1 and "norm" in name:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      else:
        p.normal_(0.0, 0.35)
  return model


@pytest.fixture
def tiny_hf(tmp_path):
  """Factory: tiny_hf(arch, **config_overrides) -> (torch model, checkpoint dir)."""

  def make(arch, seed=0, max_shard_size=None, **overrides):
    model = build_hf(arch, seed, **overrides)
    path = tmp_path / f"{arch}-{seed}"
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kw)
    return model, str(path)

  return make
