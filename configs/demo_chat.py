"""The demo as a chat: the same triage, learned from {"messages": [...]} conversations.

  python -m ftjax.train --config=configs/demo_chat.py

The demo's tiny base and tokenizer (runs/demo_base, built by configs/demo.py), whose chat template
writes each turn as "<s>ROLE\\nCONTENT</s>\\n"; configs/demo_data/chat_train.jsonl has a system
message on some rows and a follow-up request on some. Only the assistant replies (each with its
closing </s>) are trained. Exact match of the last reply on eval conversations: MEASURED.
  python -m ftjax.check_data --config=configs/demo_chat.py --show=2   # what is trained
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
