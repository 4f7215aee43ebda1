"""Checkpoints of what is trained, and only that: adapters, optimizer state, step, rng, data position.

Orbax writes each step to a temporary directory and renames it when complete, so a kill at any
moment leaves the newest complete checkpoint restorable. Beside the arrays, `meta` (JSON) records the
resolved config, the LoRA shape and the base model's spec: resuming on a different base or LoRA
shape is refused instead of silently loading mismatched adapters.
"""
import dataclasses
import os

import jax
import orbax.checkpoint as ocp

from ftjax import lora as lora_lib
from ftjax.errors import UserError


def manager(workdir: str, keep: int, read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep or None, create=not read_only,
                                         read_only=read_only, enable_async_checkpointing=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               options=options)


def lora_meta(adapters: lora_lib.Adapters) -> dict:
  return {"rank": adapters.rank, "alpha": adapters.alpha, "rslora": adapters.rslora,
          "dropout": adapters.dropout, "targets": list(adapters.targets)}


def save(mngr: ocp.CheckpointManager, state, meta: dict, force: bool = False) -> bool:
  step = int(jax.device_get(state["step"]))
  return mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                  meta=ocp.args.JsonSave(meta)), force=force)


def _same(a, b) -> bool:
  """JSON round-trips tuples into lists; compare in that form."""
  import json
  return json.loads(json.dumps(a)) == json.loads(json.dumps(b))


def restore_latest(mngr: ocp.CheckpointManager, abstract_state, meta: dict, workdir: str):
  """The newest checkpoint's state, or None; refuses one made for another base or LoRA shape."""
  step = mngr.latest_step()
  if step is None:
    return None
  saved = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  for key, what in (("base", "base model"), ("lora", "LoRA shape")):
    if not _same(saved.get(key), meta[key]):
      raise UserError(
          f"{workdir}: holds a checkpoint (step {step}) from a different {what} "
          f"({saved.get(key)} vs now {meta[key]}); use another workdir, or delete "
          f"{os.path.join(workdir, 'checkpoints')} to start fresh")
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state)))
  return restored["state"]


def load_workdir_adapters(workdir: str, step: int | None = None) -> tuple[lora_lib.Adapters, dict]:
  """(Adapters, meta) of a training workdir's latest (or given) checkpoint."""
  path = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(path):
    raise UserError(f"{workdir}: no checkpoints/ directory (is it a training workdir?)")
  mngr = manager(workdir, keep=0, read_only=True)
  step = mngr.latest_step() if step is None else step
  if step is None or step not in mngr.all_steps():
    raise UserError(f"{path}: no checkpoint" + (f" for step {step}" if step is not None else ""))
  meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  mngr.close()
  lm = meta["lora"]
  params = {name: state["adapters"][name] for name in lm["targets"]}
  adapters = lora_lib.Adapters(params, rank=lm["rank"], alpha=lm["alpha"], rslora=lm["rslora"],
                               dropout=0.0)
  return adapters, meta


def load_adapters(path: str, step: int | None = None) -> lora_lib.Adapters:
  """Adapters from a training workdir (latest checkpoint) or a PEFT adapter directory."""
  if os.path.isfile(os.path.join(path, "adapter_config.json")):
    from ftjax import peft_io
    return peft_io.read_adapters(path)
  if not os.path.isdir(path):
    raise UserError(f"{path}: not found (expected a training workdir or a PEFT adapter dir)")
  return load_workdir_adapters(path, step)[0]
