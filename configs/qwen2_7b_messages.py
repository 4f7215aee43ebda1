"""LoRA on Qwen2 7B Instruct with chat data ({"messages": [{"role", "content"}, ...]}).

  huggingface-cli download Qwen/Qwen2-7B-Instruct --local-dir checkpoints/qwen2-7b
  python -m ftjax.train --config=configs/qwen2_7b_messages.py --config.data.train=chats.jsonl

Conversations are rendered with the tokenizer's own chat template; only the assistant replies
(and the <|im_end|> closing each) are trained, found from the rendered text's offsets, so this
works without {% generation %} markers in the template. Qwen2's q/k/v biases stay frozen.
Try the result with the chat template applied the same way:
  python -m ftjax.generate --workdir=runs/qwen2_7b_messages --prompt="Summarize: ..."
"""
from ftjax.config import defaults


def get_config():
  c = defaults()
  c.workdir = "runs/qwen2_7b_messages"
  c.model.path = "checkpoints/qwen2-7b"
  c.model.dtype = "bfloat16"
  c.data.format = "messages"
  c.data.seq_len = 4096
  c.lora.rank = 32
  c.lora.alpha = 32.0
  c.lora.rslora = True
  c.train.steps = 1000
  c.train.batch_size = 8
  c.train.remat = "auto"  # the cheapest recompute that fits the device (ftjax.plan)
  c.optim.lr = 1e-4
  return c
