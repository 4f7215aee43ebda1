"""The demo, continued with DPO: teach the triage adapter which plausible mistakes not to make.

  python -m ftjax.train --config=configs/demo.py        # first: the SFT adapter in runs/demo
  python -m ftjax.train --config=configs/demo_dpo.py

Starts from the demo's SFT adapter (lora.init_from=runs/demo, which is also DPO's reference) and
trains it on configs/demo_data/pref_train.jsonl (make_data.py): 400 of the demo's requests, each
with the right JSON as `chosen` and, as `rejected`, the same JSON with one plausible mistake (the
urgency misread, or the intent confused with its neighbour: refund/cancel, track/cancel, ...).
metrics.jsonl carries TRL's names: rewards/chosen, rewards/rejected, rewards/margins,
rewards/accuracies, logps/chosen, logps/rejected, and eval_* of each on pref_eval.jsonl (100
held-out pairs). Exact match of greedy decodes on 40 eval prompts (the chosen reply is the
reference) is printed before and after. Workdir runs/demo_dpo.
"""
import importlib.util
import os

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("demo", os.path.join(HERE, "demo.py"))
demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo)


def get_config():
  c = demo.get_config()  # builds the base if needed
  c.workdir = "runs/demo_dpo"
  c.lora.init_from = "runs/demo"  # the SFT adapter: where DPO starts, and its reference
  c.data.train = os.path.join(HERE, "demo_data", "pref_train.jsonl")
  c.data.eval = os.path.join(HERE, "demo_data", "pref_eval.jsonl")
  c.data.format = "preference"
  c.data.seq_len = 128  # one row holds a pair: the prompt twice, both replies
  c.data.packing = False  # one pair per row: batch_size counts pairs, as TRL's
  c.train.objective = "dpo"
  c.preference.beta = 0.1
  c.train.steps = 100
  c.train.batch_size = 16
  c.train.eval_every = 50
  c.optim.lr = 5e-4
  c.optim.warmup_steps = 10
  c.ckpt.every = 50
  return c
