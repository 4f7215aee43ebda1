"""Checkpoints of what is trained, and only that: adapters, optimizer state, step, rng, data position.

Orbax writes each step to a temporary directory and renames it when complete, so a kill at any
moment leaves the newest complete checkpoint restorable; a writer deletes the leftover temporary
directories when it starts. Beside the arrays, `meta` (JSON) records the resolved config, the LoRA
shape, the base model's spec and a fingerprint of data.train's files: a resume that would change
what the checkpoint means (another base, LoRA shape, or data) is refused, from the metadata alone,
before anything loads. A save that cannot be written (disk full, read-only, no permission) or
whose state is not finite stops the run with one line and leaves every complete checkpoint as it
was.
"""
import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import sys

import jax
import jax.numpy as jnp
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


def finish(mngr: ocp.CheckpointManager):
  """Lets the save in flight complete when a run stops on an error of its own (a metrics write
  that failed, a bug): that checkpoint is kept. A failure of the save itself is left for the
  next run to report; this one already has its line."""
  try:
    mngr.wait_until_finished()
  except Exception:  # pylint: disable=broad-except
    pass


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
  if not bool(jax.device_get(_all_finite(state))):
    steps = complete_steps(directory)
    newest = f"the newest complete one (step {steps[-1]}) is intact" if steps else "none was saved"
    raise UserError(f"step {step}: the adapters (or their optimizer state) hold non-finite "
                    f"values (inf or nan) after this step's update; not saved, so no checkpoint "
                    f"has them ({newest}). Lower optim.lr (or raise optim.warmup_steps) and rerun "
                    "the same command")
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


@jax.jit
def _all_finite(tree):
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves] or [jnp.array(True)]))


def workdir_error(workdir: str, need: int) -> UserError | None:
  """Before anything slow: a workdir that cannot hold the first checkpoint (`need` bytes) or is
  not a writable directory. Checks the nearest existing directory; creates nothing."""
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    return UserError(f"workdir={workdir}: is a file, not a directory; set --config.workdir to a "
                     "directory (it is created if missing)")
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    return UserError(f"workdir={workdir}: {existing} is a file, so the workdir cannot be "
                     "created; set --config.workdir to a directory")
  if not os.access(existing, os.W_OK | os.X_OK):
    return UserError(f"workdir={workdir}: {existing} is not writable (permission denied or a "
                     "read-only file system); use a workdir you can write to")
  free = _free_bytes(existing)
  if free < need + _METADATA_BYTES:
    return UserError(f"workdir={workdir}: No space left on device: a checkpoint needs about "
                     f"{(need + _METADATA_BYTES) / 2**20:.1f} MiB, {free / 2**20:.1f} MiB free on "
                     f"{existing}; free space or use a workdir on another disk")
  return None


def storage_error(path: str, e: BaseException) -> UserError | None:
  """A failed write of `path` as one line when the storage is at fault (full, read-only,
  forbidden, or a file where a directory should be); None for anything else."""
  if isinstance(e, (NotADirectoryError, FileExistsError)):
    return UserError(f"{path}: cannot write it ({e.strerror}: a file stands where a directory "
                     "should be); use another workdir")
  reason = _storage_reason(e)
  if reason is None:
    return None
  return UserError(f"{path}: cannot write it ({reason}); what was written before is intact. Free "
                   "space (or fix the directory's permissions) and rerun the same command")


# ------------------------------------------------------------------------------------------------
# What the data is: a resume on the same data.train path with other bytes would train on rows the
# checkpoint's data position never meant.


def data_fingerprint(sources: dict) -> dict:
  """{source name ("" when unnamed): {"path", "sha256", "bytes", "lines"}} of data.train's local
  files (a saved dataset dir: all its files); a hub name has no fingerprint (only its path)."""
  out = {}
  for name, path in sources.items():
    if os.path.isfile(path):
      files = [path]
    elif os.path.isdir(path):
      files = sorted(os.path.join(root, f) for root, _, names in os.walk(path) for f in names)
    else:
      out[name] = {"path": path}
      continue
    digest, size, lines = hashlib.sha256(), 0, 0
    for file in files:
      digest.update(os.path.relpath(file, path).encode() + b"\0")
      with open(file, "rb") as f:
        while chunk := f.read(1 << 22):
          digest.update(chunk)
          size, lines = size + len(chunk), lines + chunk.count(b"\n")
    out[name] = {"path": path, "sha256": digest.hexdigest(), "bytes": size, "lines": lines}
  return out


def _data_changes(saved: dict | None, now: dict | None) -> list[str]:
  """`data.train P: content changed (...)` for each source whose path is the same but whose bytes
  are not; a checkpoint from before fingerprints (no saved entry) is not compared."""
  out = []
  for name, old in (saved or {}).items():
    new = (now or {}).get(name) or {}
    if old.get("path") != new.get("path") or not old.get("sha256") or not new.get("sha256"):
      continue  # another path shows as data.train itself; a hub name is not fingerprinted
    if old["sha256"] != new["sha256"]:
      label = f"data.train {name}={old['path']}" if name else f"data.train {old['path']}"
      out.append(f"{label}: its content changed since the checkpoint ({old['lines']} -> "
                 f"{new['lines']} lines, {old['bytes']} -> {new['bytes']} bytes, sha256 "
                 f"{old['sha256'][:12]} -> {new['sha256'][:12]})")
  return out


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
  return out + _data_changes(saved.get("data"), now.get("data"))


def check_resume(workdir: str, meta: dict) -> int | None:
  """The step of the workdir's newest checkpoint, or None for a fresh workdir; refuses one whose
  meaning the config would change (changed_meaning). Reads the checkpoint's metadata only, so it
  runs before the data and the base load, and creates or changes nothing."""
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  steps = complete_steps(directory)
  if not steps:
    return None
  with quiet_reader():
    mngr = manager(workdir, keep=0, read_only=True)
    try:
      saved = mngr.restore(steps[-1], args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # pylint: disable=broad-except
      raise restore_failed(directory, steps[-1], "read the checkpoint's metadata", e,
                           resume=True) from None
    finally:
      mngr.close()
  changes = changed_meaning(saved, meta)
  if changes:
    raise UserError(f"{workdir}: its checkpoint (step {steps[-1]}) was trained with other settings "
                    f"({'; '.join(changes)}), and resuming would change what it means. Use a new "
                    f"--config.workdir, or start a new workdir from its adapters with "
                    f"--config.lora.init_from={workdir}")
  return steps[-1]


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state):
  """The state saved at `step` (which check_resume accepted), placed as `abstract_state` says."""
  with quiet_reader():
    try:
      restored = mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state)))
    except Exception as e:  # pylint: disable=broad-except
      raise restore_failed(str(mngr.directory), step, "restore the checkpoint", e,
                           resume=True) from None
  return restored["state"]


def restore_failed(directory: str, step: int, what: str, e: BaseException, *,
                   resume: bool) -> UserError:
  """The one line for a checkpoint at `directory`/`step` that cannot be read (`what`: "restore
  the checkpoint", ...). 'Damaged' only when a file is missing, cut short or unreadable; then it
  names the previous complete step and how to use it: for training (resume=True), what to delete;
  for export/generate/eval, --step=N. Any other failure (a sharding or orbax mismatch, a bug)
  names its cause and leaves the user's checkpoints alone."""
  where = os.path.join(directory, str(step))
  if not _missing_or_unreadable(e):
    return UserError(f"{where}: cannot {what} ({_first_line(e)}); the checkpoints are kept as "
                     "they are")
  before = [s for s in complete_steps(directory) if s < step]
  if resume:
    fix = (f"delete {where} to resume from step {before[-1]}, the previous complete checkpoint, "
           "or use another workdir" if before else
           f"delete {where} to start from scratch (it is the only checkpoint), or use another "
           "workdir")
  else:
    fix = (f"use --step={before[-1]}, the previous complete checkpoint" if before else
           "it is the only checkpoint: there is no earlier step to use")
  return UserError(f"{where}: cannot {what}: a file is missing or unreadable ({_first_line(e)}); "
                   f"it is damaged: {fix}")


@contextlib.contextmanager
def quiet_reader():
  """Around orbax reads: no absl/orbax log lines, and none of the reports of a failed read's
  sibling reads still in flight on orbax's reader threads, which come by the hundred, during the
  read and late (when their futures are collected, or once the event loop has gone): a damaged
  checkpoint is one line."""
  _drop_failed_read_noise()
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    absl_logger.setLevel(level)


def _drop_failed_read_noise():
  """From the first read on, for the rest of the process (the reports come late): asyncio's
  "Future (or Task) exception was never retrieved" for abandoned reads (a Task's when more than
  one read failed, depending on timing), and the RuntimeError('Event loop is closed') that
  tensorstore's threads raise as unraisable exceptions. Anything else shows."""
  if getattr(sys.unraisablehook, "_ftjax_quiet", False):
    return
  hook = sys.unraisablehook

  def quiet(unraisable):
    e = unraisable.exc_value
    if not (isinstance(e, RuntimeError) and "Event loop is closed" in str(e)
            or _raised_in_orbax(e)):
      hook(unraisable)

  quiet._ftjax_quiet = True
  sys.unraisablehook = quiet
  logging.getLogger("asyncio").addFilter(lambda record: not record.getMessage().startswith(
      ("Future exception was never retrieved", "Task exception was never retrieved")))


def _raised_in_orbax(e: BaseException | None) -> bool:
  """An abandoned sibling read of a failed restore (a coroutine of orbax's reader, collected
  later): the restore itself already said what is wrong."""
  tb = getattr(e, "__traceback__", None)
  while tb is not None:
    if "/orbax/" in tb.tb_frame.f_code.co_filename:
      return True
    tb = tb.tb_next
  return False


# How orbax and tensorstore word a file that is gone, cut short or unreadable.
_MISSING_WORDS = ("NOT_FOUND", "No such file", "does not exist", "not found", "DATA_LOSS",
                  "Error reading", "Permission denied", "Unexpected end", "truncated",
                  "Expecting value", "FAILED_PRECONDITION", "Failed to open", "OUT_OF_RANGE",
                  "Error decoding")


def _missing_or_unreadable(e: BaseException) -> bool:
  """A damaged or incomplete checkpoint (files missing, cut short or unreadable), as opposed to
  anything else a restore can raise (a sharding or orbax mismatch, a bug)."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, EOFError,
                      json.JSONDecodeError, UnicodeDecodeError)):
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
  with quiet_reader():
    mngr = manager(workdir, keep=0, read_only=True)
  step = mngr.latest_step() if step is None else step
  if step is None or step not in mngr.all_steps():
    steps = complete_steps(path)
    mngr.close()
    raise UserError(f"{path}: no checkpoint" + (f" for step {step} (complete: "
                                                 f"{', '.join(map(str, steps)) or 'none'})"
                                                 if step is not None else ""))
  return mngr, step


def _read(mngr: ocp.CheckpointManager, workdir: str, step: int, args):
  """mngr.restore(step, args) for export/generate/eval, quietly; a checkpoint that cannot be
  read is one line (restore_failed: for a damaged one, the previous complete step as --step)."""
  try:
    with quiet_reader():
      return mngr.restore(step, args=args)
  except Exception as e:  # pylint: disable=broad-except
    raise restore_failed(os.path.join(workdir, "checkpoints"), step, "read the checkpoint", e,
                         resume=False) from None
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
  # The arrays onto this process's first device: without a target, orbax refuses a checkpoint
  # that a multi-host run (another topology) saved.
  here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  try:
    saved = ocp.StandardCheckpointHandler().metadata(mngr.directory / str(step) / "state").tree
  except Exception:  # pylint: disable=broad-except  (_read names a damaged checkpoint)
    saved = None
  target = None if saved is None else jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here), saved)
  state = _read(mngr, workdir, step,
                ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
  lm = meta["lora"]
  params = {target: state["adapters"][target] for target in lm["targets"]}
  adapters = lora_lib.Adapters(params, rank=lm["rank"], alpha=lm["alpha"], rslora=lm["rslora"],
                               dropout=0.0, names=tuple(names))
  if names and name is not None:
    adapters = lora_lib.unstack(adapters)[name]
  return adapters, meta


def load_adapters(path: str, step: int | None = None, spec=None) -> lora_lib.Adapters:
  """Adapters from a training workdir (latest checkpoint; several adapters come stacked) or a
  PEFT adapter directory (spec: the base's ModelSpec, for peft_io.read_adapters)."""
  if os.path.isfile(os.path.join(path, "adapter_config.json")):
    return peft_io.read_adapters(path, spec)
  if not os.path.isdir(path):
    raise UserError(f"{path}: not found (expected a training workdir or a PEFT adapter dir)")
  return load_workdir_adapters(path, step)[0]
