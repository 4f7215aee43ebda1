"""User errors: one line naming the file, key or line, never a traceback.

Code raises `UserError` for anything a user can fix (a bad path, a malformed row, a mistyped
config key). The entry points wrap `main` with `run_cli`, which prints `error: <message>` and exits 1.
Anything else is our bug and keeps its traceback.
"""
import sys


class UserError(Exception):
  """A mistake in the user's input; the message names the culprit and the fix."""


def run_cli(main):
  """Wraps an absl `main(argv)` so a `UserError` exits 1 with one line on stderr."""

  def wrapped(argv):
    try:
      return main(argv)
    except UserError as e:
      print(f"error: {e}", file=sys.stderr, flush=True)
      sys.exit(1)

  return wrapped
