"""python -m ftjax.generate --workdir=DIR --prompt=TEXT [--max_new_tokens=N --temperature=T]

Formats the prompt the way training did (from DIR/config.json), samples with the workdir's
adapters (see ftjax/sampling.py) and prints only the completion.
"""
import jax
import numpy as np

from ftjax.sampling import generate


def main(argv):
  from absl import logging
  logging.set_verbosity(logging.ERROR)  # orbax logs every file it reads at INFO, and warns on reads
  import json
  import os

  from absl import flags

  from ftjax import ckpt, data, hf_io, peft_io
  from ftjax.errors import UserError

  f = flags.FLAGS
  cfg_path = os.path.join(f.workdir, "config.json")
  if not os.path.isfile(cfg_path):
    raise UserError(f"{cfg_path}: not found; --workdir must be a training workdir")
  with open(cfg_path) as fh:
    cfg = json.load(fh)
  adapters, _ = ckpt.load_workdir_adapters(f.workdir, f.step)
  model = hf_io.load_hf(cfg["model"]["path"], cfg["model"]["dtype"], cfg["quant"]["mode"],
                        group_size=cfg["quant"]["group_size"])
  peft_io.check_adapters(adapters, model.spec, f.workdir)
  tokenizer = data.load_tokenizer(cfg["tokenizer"]["path"] or cfg["model"]["path"])
  prompt = data.prompt_ids(tokenizer, cfg["data"]["format"], f.prompt)
  out = generate(model, np.asarray([prompt], np.int32), adapters=adapters,
                 max_new_tokens=f.max_new_tokens, temperature=f.temperature, top_p=f.top_p,
                 key=jax.random.PRNGKey(f.seed))
  print(data.decode_completion(tokenizer, np.asarray(out)[0]))


if __name__ == "__main__":
  from absl import app, flags

  from ftjax.errors import parse_flags, run_cli

  flags.DEFINE_string("workdir", None, "Training workdir (its config.json and checkpoints).",
                      required=True)
  flags.DEFINE_string("prompt", None, "The prompt, formatted as training did.", required=True)
  flags.DEFINE_integer("max_new_tokens", 128, "At most this many new tokens.")
  flags.DEFINE_float("temperature", 0.0, "0 is greedy.")
  flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  app.run(run_cli(main), flags_parser=parse_flags)
