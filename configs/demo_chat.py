"""The demo as a chat: the same triage, learned from {"messages": [...]} conversations.

  python -m ftjax.train --config=configs/demo_chat.py

The demo's tiny base and tokenizer (runs/demo_base, built by configs/demo.py), whose chat template
writes each turn as "<s>ROLE\\nCONTENT</s>\\n". configs/demo_data/chat_train.jsonl (from
make_data.py) has a system message on some conversations and a second request on some; only the
assistant replies, each with its closing </s>, are trained. A conversation is about twice as many
tokens as a demo row, so this takes about 1.7x the demo's time (600 steps of 8 rows of 192 tokens).
Greedy exact match of the last reply on 40 eval conversations (train.eval_generate), measured:
0.0% before training, 82.5% after (rerun on 2 CPU cores; another machine measured 72.5%: float32
sums differ between CPUs, and one conversation is 2.5 points; the demo: 0.0% -> 90.0%). Workdir
runs/demo_chat.
  python -m ftjax.check_data --config=configs/demo_chat.py --show=2   # exit 0; the loss mask
  python -m ftjax.generate --workdir=runs/demo_chat --prompt="my telly wont turn on asap"
"""
import importlib.util
import os

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("demo", os.path.join(HERE, "demo.py"))
demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo)


def add_chat_template(path: str):
  """A base built before the demo's tokenizer had a chat template gets it beside its files."""
  import transformers
  if transformers.AutoTokenizer.from_pretrained(path).chat_template is None:
    with open(os.path.join(path, "chat_template.jinja"), "w") as f:
      f.write(demo.CHAT_TEMPLATE)


def get_config():
  c = demo.get_config()  # builds the base
  add_chat_template(demo.BASE)
  c.workdir = "runs/demo_chat"
  c.data.train = os.path.join(HERE, "demo_data", "chat_train.jsonl")
  c.data.eval = os.path.join(HERE, "demo_data", "chat_eval.jsonl")
  c.data.format = "messages"
  c.data.seq_len = 192  # the longest conversation (two requests) fits
  c.train.batch_size = 8  # as many tokens per step as the demo
  c.train.steps = 600  # a conversation is about twice a demo row: fewer per step
  return c
