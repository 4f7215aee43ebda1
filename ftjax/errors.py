"""User errors: one line naming the file, key or line, never a traceback.

Code raises `UserError` for anything a user can fix (a bad path, a malformed row, a mistyped
config key). The entry points wrap `main` with `run_cli`, which prints `error: <message>` and exits 1,
and parse their flags with `parse_flags`, which does the same for a mistake on the command line.
Anything else is our bug and keeps its traceback. docs/errors.md lists every error and its fix.
"""
import sys
import traceback

from absl import flags


class UserError(Exception):
  """A mistake in the user's input; the message names the culprit and the fix."""


def _exit(message: str):
  _end_progress_bars()
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(1)


def _end_progress_bars():
  """A progress bar ends mid-line (it redraws with \r): finish it, so the error starts a line."""
  tqdm = sys.modules.get("tqdm")
  for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", None) or []):
    bar.close()


def run_cli(main):
  """Wraps an absl `main(argv)` so a `UserError` exits 1 with one line on stderr."""

  def wrapped(argv):
    try:
      return main(argv)
    except UserError as e:
      _exit(str(e))

  return wrapped


def _innermost(e: BaseException) -> BaseException:
  """ml_collections wraps a KeyError in an AttributeError whose argument is the KeyError."""
  while e.args and isinstance(e.args[0], BaseException):
    e = e.args[0]
  return e


def _unknown_key(argv, e: BaseException) -> str:
  """The line for `--config.a.b=...` naming a key the locked config does not have."""
  text = str(_innermost(e).args[0]) if _innermost(e).args else str(e)
  key, _, hint = text.partition("\n")  # "'rnak'" and 'Did you mean "rank" instead of "rnak"?'
  key = key.strip("'\"")
  overrides = [a.split("=", 1)[0] for a in argv[1:] if a.startswith(("--config.", "-config."))]
  flag = next((o for o in overrides if key in o.split(".")[1:]), overrides[0] if overrides else "")
  hint = f" {hint.strip()}" if hint.strip() else ""
  return (f"{flag}: the config has no key {key!r}.{hint} Every key, with its meaning, is in "
          "ftjax/config.py")


def parse_flags(argv, flag_values=flags.FLAGS):
  """absl's flag parser for `app.run(..., flags_parser=parse_flags)`: a mistake on the command line
  (an unknown flag or config key, a value of the wrong type, a missing --config file) exits 1 with
  one `error:` line instead of absl's usage dump or, for config overrides, a Python traceback.

  An exception raised by the config file's own code keeps its traceback: it points into that code.
  """
  try:
    args = flag_values(argv)
  except flags.Error as e:
    # One line; a multi-line message is a config file's traceback, which absl embeds: keep it.
    _exit(str(e))
  except (KeyError, AttributeError) as e:
    # ml_collections walks `--config.a.b` through the locked config in config_path.py; anything
    # raised elsewhere came from the config file's code.
    if not any("config_path" in frame.filename for frame in traceback.extract_tb(e.__traceback__)):
      raise
    _exit(_unknown_key(argv, e))
  except OSError as e:  # a missing --config file, hit while applying an override to it
    _exit(_config_file_error(argv, e))
  # ml_collections defers a missing --config file's error to the first use of the config (it
  # stands in an object that raises OSError on any attribute); surface it here, where it is still
  # the user's command line at fault.
  for name in flag_values:
    try:
      getattr(flag_values[name].value, "lock", None)
    except OSError as e:
      _exit(_config_file_error(argv, e, name))
  return args


def _config_file_error(argv, e: OSError, name: str = "config") -> str:
  given = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith(f"--{name}=")), "")
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  return f"--{name}={given}: cannot load the config file ({lines[-1] if lines else e})"
