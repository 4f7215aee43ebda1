"""The demo: teach a tiny model to triage messy support requests into one clean JSON object.

  python -m ftjax.train --config=configs/demo.py

Runs anywhere with nothing downloaded (under two minutes on 2 CPU cores). The first run builds a
tiny Llama-shaped base with transformers and a byte-level BPE tokenizer trained on the shipped data
(cached in runs/demo_base), then fine-tunes LoRA adapters on configs/demo_data/train.jsonl. It
prints exact match of greedy-decoded JSON on eval prompts before (0%) and after training (about
90%+), and a sample. Rerunning resumes from runs/demo/checkpoints (delete runs/demo to start over).
Then try:  python -m ftjax.generate --workdir=runs/demo --prompt="my telly wont turn on asap"
"""
import os
import shutil
import tempfile

from ftjax.config import defaults

HERE = os.path.dirname(os.path.abspath(__file__))
BASE = "runs/demo_base"
# ChatML's shape with the tokenizer's own specials (configs/demo_chat.py): <s> opens a turn, </s>
# (eos) ends it, so a trained reply ends by emitting eos. The plain demo never renders it.
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


def build_base(path: str):
  """A random tiny Llama in HF format plus a tokenizer trained on the demo data (once, cached).

  Written with numpy and safetensors (no torch needed), with transformers' own init: normal(0,
  initializer_range) matrices, unit norms.
  """
  if os.path.exists(os.path.join(path, "model.safetensors")):
    return
  import numpy as np
  import tokenizers
  import transformers
  from safetensors.numpy import save_file
  from tokenizers import decoders, models, pre_tokenizers, processors, trainers

  tok = tokenizers.Tokenizer(models.BPE())
  # Words, digits, spaces and punctuation are separate pieces, so a word is the same token in the
  # request and in the JSON.
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(tokenizers.Regex(r"[A-Za-z]+|\d|\s|[^A-Za-z\d\s]"), "isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<pad>", "<s>", "</s>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)  # its bars are not the user's run
  tok.train([os.path.join(HERE, "demo_data", "train.jsonl")], trainer)
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
  hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                                                eos_token="</s>", pad_token="</s>")
  hf_tok.chat_template = CHAT_TEMPLATE
  # Tied embeddings and a wider init than 0.02 let the frozen output head be confident.
  config = transformers.LlamaConfig(
      vocab_size=384, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1,
      eos_token_id=2, pad_token_id=0, tie_word_embeddings=True, initializer_range=0.1,
      dtype="float32")
  rng = np.random.default_rng(0)
  d, f, h = config.hidden_size, config.intermediate_size, config.head_dim
  shapes = {"self_attn.q_proj": (4 * h, d), "self_attn.k_proj": (2 * h, d),
            "self_attn.v_proj": (2 * h, d), "self_attn.o_proj": (d, 4 * h),
            "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d), "mlp.down_proj": (d, f)}
  normal = lambda shape: rng.normal(0.0, config.initializer_range, shape).astype(np.float32)
  weights = {"model.embed_tokens.weight": normal((config.vocab_size, d)),
             "model.norm.weight": np.ones(d, np.float32)}
  for i in range(config.num_hidden_layers):
    for name, shape in shapes.items():
      weights[f"model.layers.{i}.{name}.weight"] = normal(shape)
    for name in ("input_layernorm", "post_attention_layernorm"):
      weights[f"model.layers.{i}.{name}.weight"] = np.ones(d, np.float32)
  # Built beside its final place and renamed into it: processes that load this config at the same
  # time (multi-host on one machine) never see a half-written base.
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".demo_base-", dir=parent)
  hf_tok.save_pretrained(tmp)
  config.save_pretrained(tmp)
  transformers.GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0).save_pretrained(tmp)
  save_file(weights, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
  try:
    os.rename(tmp, path)
  except OSError:  # another process got there first
    shutil.rmtree(tmp, ignore_errors=True)


def get_config():
  build_base(BASE)
  c = defaults()
  c.workdir = "runs/demo"
  c.model.path = BASE
  c.model.dtype = "float32"  # tiny model on CPU: float32 is as fast and exact
  c.data.train = os.path.join(HERE, "demo_data", "train.jsonl")
  c.data.eval = os.path.join(HERE, "demo_data", "eval.jsonl")
  c.data.format = "prompt_completion"
  c.data.seq_len = 96
  c.data.packing = True
  c.lora.rank = 16
  c.lora.alpha = 32.0
  c.train.steps = 400
  c.train.batch_size = 16
  c.train.log_every = 10
  c.train.eval_every = 100
  c.train.remat = "none"
  c.train.eval_generate = 40
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 20
  c.ckpt.every = 100
  c.mesh.fsdp = 1
  c.mesh.data = -1
  return c
