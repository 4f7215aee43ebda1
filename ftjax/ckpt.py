"""Checkpoints of what is trained, and only that: adapters, optimizer state, step, rng, data position.

Orbax writes each step to a temporary directory and renames it when complete, so a kill at any
moment leaves the newest complete checkpoint restorable; a writer deletes the leftover temporary
directories when it starts. Beside the arrays, `meta` (JSON) records the resolved config, the LoRA
shape and the base model's spec: resuming on a different base or LoRA shape is refused instead of
silently loading mismatched adapters. A save that cannot be written (disk full, read-only, no
permission) stops the run with one line and leaves every complete checkpoint as it was.
"""
import contextlib
import errno
import json
import logging
import os
import shutil
import sys

import jax
import orbax.checkpoint as ocp

from ftjax import lora as lora_lib, peft_io
from ftjax.errors import UserError

# Orbax's JSON metadata beside the arrays (a few KiB per step): room a save needs beyond the bytes
# of the arrays, so that a nearly full disk is refused before a write fails half-way.
_METADATA_BYTES = 1 << 20
_STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)
# tensorstore reports failed writes as ValueError, with the OS's words in the message.
_STORAGE_MESSAGES = ("No space left on device", "Disk quota exceeded", "Read-only file system",
                     "Permission denied", "Operation not permitted")
# What a resume must match: rank and targets fix the shapes, alpha and rslora the scale. Dropout
# only changes training noise and may differ.
_LORA_SHAPE = ("rank", "alpha", "rslora", "targets")


def manager(workdir: str, keep: int, read_only: bool = False) -> ocp.CheckpointManager:
  # A kill mid-save leaves `<step>.orbax-checkpoint-tmp*` behind; orbax never takes it for a
  # checkpoint, and a writer removes it on start so a string of kills does not fill the disk.
  options = ocp.CheckpointManagerOptions(max_to_keep=keep or None, create=not read_only,
                                         read_only=read_only, enable_async_checkpointing=True,
                                         cleanup_tmp_directories=not read_only)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               options=options)


# The name a one-adapter workdir's adapter answers to (PEFT calls its only adapter "default").
DEFAULT_ADAPTER = "default"


def lora_meta(adapters: lora_lib.Adapters) -> dict:
  """The LoRA shape; `names` only for stacked adapters (a one-adapter meta is as it always was)."""
  meta = {"rank": adapters.rank, "alpha": adapters.alpha, "rslora": adapters.rslora,
          "dropout": adapters.dropout, "targets": list(adapters.targets)}
  if adapters.stacked:
    meta["names"] = list(adapters.names)
  return meta


def complete_steps(directory: str) -> list[int]:
  """Steps whose checkpoint orbax finished (renamed from its temporary name), oldest first."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def _storage_reason(e: BaseException) -> str | None:
  """Why a write failed, when it is the storage's fault (full, read-only, forbidden); else None."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in _STORAGE_ERRNOS:
      return e.strerror or os.strerror(e.errno)
    for words in _STORAGE_MESSAGES:
      if words in str(e):
        return words
    e = e.__cause__ or e.__context__
  return None


def _write_failed(mngr: ocp.CheckpointManager, reason: str) -> UserError:
  directory = str(mngr.directory)
  steps = complete_steps(directory)
  intact = (f"the newest complete checkpoint (step {steps[-1]}) is intact" if steps
            else "no checkpoint was complete yet")
  return UserError(f"{directory}: cannot write a checkpoint ({reason}); {intact}. Free space (or "
                   "fix the directory's permissions) and rerun the same command to resume")


def wait(mngr: ocp.CheckpointManager):
  """Blocks until the save in flight is written; a storage failure becomes a UserError."""
  try:
    mngr.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except  (re-raised unless the storage failed)
    reason = _storage_reason(e)
    if reason is None:
      raise
    raise _write_failed(mngr, reason) from None


def _free_bytes(directory: str) -> int:
  try:
    return shutil.disk_usage(directory).free
  except OSError:  # storage the OS cannot measure: leave the verdict to the write itself
    return 1 << 62


def save(mngr: ocp.CheckpointManager, state, meta: dict, force: bool = False) -> bool:
  """Starts writing `state` at its step (asynchronously) once the previous save is complete."""
  step = int(jax.device_get(state["step"]))
  wait(mngr)  # a failure of the previous save surfaces here, before another write starts
  directory = str(mngr.directory)
  # Every host checks the whole state's size: a bound, as each writes only its own shards.
  need = sum(x.nbytes for x in jax.tree.leaves(state)) + _METADATA_BYTES
  free = _free_bytes(directory)
  if free < need:
    raise _write_failed(mngr, f"No space left on device: step {step} needs about "
                              f"{need / 2**20:.1f} MiB, {free / 2**20:.1f} MiB free")
  try:
    return mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)), force=force)
  except Exception as e:  # pylint: disable=broad-except  (re-raised unless the storage failed)
    reason = _storage_reason(e)
    if reason is None:
      raise
    raise _write_failed(mngr, reason) from None


def _flat(value, prefix="") -> dict:
  """{"rope.theta": 1e4, ...} from nested dicts, in the JSON form (tuples read back as lists)."""
  value = json.loads(json.dumps(value))
  if not isinstance(value, dict):
    return {prefix: value}
  out = {}
  for k, v in value.items():
    out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
  return out


def _differences(saved, now) -> str:
  """`key: saved -> now` for the (nested) fields that differ."""
  saved, now = _flat(saved), _flat(now)
  keys = [k for k in dict.fromkeys(list(saved) + list(now)) if saved.get(k) != now.get(k)]
  shown = ", ".join(f"{k}: {saved.get(k)} -> {now.get(k)}" for k in keys[:4])
  return shown + (f" (and {len(keys) - 4} more)" if len(keys) > 4 else "")


# Config keys whose change alters what a checkpoint means: the base its adapters were trained on
# and how it computes, the adapters' shape, and what data position N points at. A resume refuses a
# change to any of them. Every other key is safe to change on resume (train.steps to extend,
# optim.*, periods of logging, eval and checkpoints, mesh, remat, kernels, eval data).
MEANING_KEYS = ("model.path", "model.dtype", "quant.mode", "quant.group_size", "tokenizer.path",
                "lora.rank", "lora.alpha", "lora.rslora", "lora.targets", "data.train",
                "data.format", "data.seq_len", "data.packing", "train.batch_size", "seed")


def changed_meaning(saved: dict, now: dict) -> list[str]:
  """`key: old -> new` for each meaning key (and the base's config.json) that differs."""
  old_cfg, new_cfg = _flat(saved.get("config") or {}), _flat(now["config"])
  keys = [k for k in MEANING_KEYS if k in old_cfg and old_cfg.get(k) != new_cfg.get(k)]
  if "int4" not in (old_cfg.get("quant.mode"), new_cfg.get("quant.mode")):
    keys = [k for k in keys if k != "quant.group_size"]  # only int4 reads it
  out = [f"{k}: {old_cfg.get(k)!r} -> {new_cfg.get(k)!r}" for k in keys]
  old_lora, new_lora = saved.get("lora") or {}, now["lora"]
  for k in _LORA_SHAPE:  # what the adapters really are (init_from may set them, not lora.*)
    if old_lora.get(k) != new_lora.get(k) and f"lora.{k}" not in " ".join(out):
      out.append(f"adapters {k}: {old_lora.get(k)!r} -> {new_lora.get(k)!r}")
  old_names, new_names = old_lora.get("names") or [], new_lora.get("names") or []
  if old_names != new_names:  # one adapter per named data.train source
    out.append(f"adapters names: {old_names!r} -> {new_names!r}")
  if _flat(saved.get("base")) != _flat(now["base"]):
    out.append(f"base config.json ({_differences(saved.get('base'), now['base'])})")
  return out


def restore_latest(mngr: ocp.CheckpointManager, abstract_state, meta: dict, workdir: str):
  """The newest checkpoint's state, or None; refuses one whose meaning the config would change.

  Reads only: a refused or unreadable workdir is left exactly as it was.
  """
  step = mngr.latest_step()
  if step is None:
    return None
  where = os.path.join(str(mngr.directory), str(step))
  try:
    saved = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  except Exception as e:  # pylint: disable=broad-except
    raise _restore_failed(where, "read the checkpoint's metadata", e) from None
  changes = changed_meaning(saved, meta)
  if changes:
    raise UserError(f"{workdir}: its checkpoint (step {step}) was trained with other settings "
                    f"({'; '.join(changes)}), and resuming would change what it means. Use a new "
                    f"--config.workdir, or start a new workdir from its adapters with "
                    f"--config.lora.init_from={workdir}")
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
  except Exception as e:  # pylint: disable=broad-except
    raise _restore_failed(where, "restore the checkpoint", e) from None
  return restored["state"]


def _restore_failed(where: str, what: str, e: BaseException) -> UserError:
  """'damaged, delete it' only when a file is missing or unreadable; any other failure (a
  sharding or orbax mismatch, a bug) names its cause and leaves the user's checkpoints alone."""
  if _missing_or_unreadable(e):
    return UserError(f"{where}: cannot {what}: a file is missing or unreadable ({_first_line(e)}); "
                     "it is damaged: delete that directory to resume from the one before it, or "
                     "use another workdir")
  return UserError(f"{where}: cannot {what} ({_first_line(e)}); the checkpoints are kept as "
                   "they are")


# How orbax and tensorstore word a file that is gone, cut short or unreadable.
_MISSING_WORDS = ("NOT_FOUND", "No such file", "does not exist", "not found", "DATA_LOSS",
                  "Error reading", "Permission denied", "Unexpected end", "truncated",
                  "Expecting value", "FAILED_PRECONDITION", "Failed to open")


def _missing_or_unreadable(e: BaseException) -> bool:
  """A damaged or incomplete checkpoint (files missing, cut short or unreadable), as opposed to
  anything else a restore can raise (a sharding or orbax mismatch, a bug)."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, EOFError)):
      return True
    if any(w in str(e) for w in _MISSING_WORDS):
      return True
    e = e.__cause__ or e.__context__
  return False


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return text.splitlines()[0][:300] if text else type(e).__name__


def _open_step(workdir: str, step: int | None):
  path = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(path):
    raise UserError(f"{workdir}: no checkpoints/ directory (is it a training workdir?)")
  with _quiet_reader():
    mngr = manager(workdir, keep=0, read_only=True)
  step = mngr.latest_step() if step is None else step
  if step is None or step not in mngr.all_steps():
    steps = complete_steps(path)
    mngr.close()
    raise UserError(f"{path}: no checkpoint" + (f" for step {step} (complete: "
                                                 f"{', '.join(map(str, steps)) or 'none'})"
                                                 if step is not None else ""))
  return mngr, step


@contextlib.contextmanager
def _quiet_reader():
  """Reading a checkpoint prints nothing a user needs: orbax notes every read-only open ("Given
  directory is read only", "read_only=True, setting save_interval_steps=0"), and when one read of
  a damaged checkpoint fails, its other reads in flight find their event loop closed and Python
  prints each as an ignored exception (sys.unraisablehook): hundreds of lines, some after the
  restore has raised, so that filter stays."""
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(max(level, logging.ERROR))
  if not getattr(sys.unraisablehook, "drops_closed_loop", False):
    hook = sys.unraisablehook

    def filtered(unraisable):
      if not (isinstance(unraisable.exc_value, RuntimeError)
              and str(unraisable.exc_value) == "Event loop is closed"):
        hook(unraisable)

    filtered.drops_closed_loop = True
    sys.unraisablehook = filtered
  try:
    yield
  finally:
    absl_logger.setLevel(level)


def _read(mngr: ocp.CheckpointManager, workdir: str, step: int, args):
  """mngr.restore(step, args), quietly; a damaged checkpoint (files missing, cut short or not
  JSON) is one line naming the previous complete step and how to use it."""
  try:
    with _quiet_reader():
      return mngr.restore(step, args=args)
  except Exception as e:  # pylint: disable=broad-except  (re-raised unless the files are damaged)
    if not (_missing_or_unreadable(e) or isinstance(e, json.JSONDecodeError)):
      raise
    earlier = [s for s in complete_steps(str(mngr.directory)) if s < step]
    use = (f"the previous complete checkpoint is step {earlier[-1]}: add --step={earlier[-1]} to "
           "use it" if earlier else "no earlier checkpoint to use instead")
    reason = _first_line(e)
    reason = reason if len(reason) <= 200 else reason[:200] + "..."
    raise UserError(f"{os.path.join(workdir, 'checkpoints', str(step))}: damaged, cannot be read "
                    f"({reason}); {use}") from None
  finally:
    mngr.close()


def _names(meta: dict) -> list[str]:
  return list(meta["lora"].get("names") or [])


def _read_meta(workdir: str, step: int | None) -> tuple[dict, int]:
  mngr, step = _open_step(workdir, step)
  return _read(mngr, workdir, step, ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"], step


def checkpoint_step(workdir: str, step: int | None = None) -> int:
  """The step a read of the workdir uses: `step` if it has a checkpoint, else the latest."""
  mngr, step = _open_step(workdir, step)
  mngr.close()
  return step


def workdir_adapter_names(workdir: str, step: int | None = None) -> list[str]:
  """The adapters a training workdir holds: data.train's source names in order, or
  ["default"] (DEFAULT_ADAPTER) for a one-adapter workdir (one unnamed source)."""
  return _names(_read_meta(workdir, step)[0]) or [DEFAULT_ADAPTER]


def load_workdir_adapters(workdir: str, step: int | None = None,
                          name: str | None = None) -> tuple[lora_lib.Adapters, dict]:
  """(Adapters, meta) of a training workdir's latest (or given) checkpoint.

  A workdir of several adapters gives them stacked (lora.stack, `names` set), or with `name` just
  that one; a one-adapter workdir answers to name None or "default". Another name is a UserError
  that lists the workdir's adapters. A damaged checkpoint is a UserError naming the step before.
  """
  meta, step = _read_meta(workdir, step)
  names = _names(meta)
  if name is not None and name not in (names or [DEFAULT_ADAPTER]):
    raise UserError(f"--adapter={name}: {workdir} (checkpoint step {step}) has no adapter of "
                    f"that name; it has {', '.join(names or [DEFAULT_ADAPTER])}")
  mngr, step = _open_step(workdir, step)
  state = _read(mngr, workdir, step,
                ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  lm = meta["lora"]
  params = {target: state["adapters"][target] for target in lm["targets"]}
  adapters = lora_lib.Adapters(params, rank=lm["rank"], alpha=lm["alpha"], rslora=lm["rslora"],
                               dropout=0.0, names=tuple(names))
  if names and name is not None:
    adapters = lora_lib.unstack(adapters)[name]
  return adapters, meta


def load_adapters(path: str, step: int | None = None) -> lora_lib.Adapters:
  """Adapters from a training workdir (latest checkpoint; several adapters come stacked) or a
  PEFT adapter directory."""
  if os.path.isfile(os.path.join(path, "adapter_config.json")):
    return peft_io.read_adapters(path)
  if not os.path.isdir(path):
    raise UserError(f"{path}: not found (expected a training workdir or a PEFT adapter dir)")
  return load_workdir_adapters(path, step)[0]
