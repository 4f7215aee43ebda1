"""Every recipe in configs/ loads, says how to run it, and uses only known keys with sane values."""
import glob
import importlib.util
import os

import pytest

from ftjax import prepare
from ftjax.config import defaults

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(p for p in glob.glob(os.path.join(REPO, "configs", "*.py")))


def load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# The demos build their base when loaded; tests/test_demo.py runs them in a scratch directory
# (demo_moe's base: tests/test_moe.py).
DEMOS = ("demo.py", "demo_chat.py", "demo_dpo.py", "demo_moe.py")


@pytest.mark.parametrize(
    "path", [p for p in RECIPES if not p.endswith(DEMOS)],
    ids=os.path.basename)
def test_recipe(path):
  module = load(path)
  name = os.path.relpath(path, REPO)
  assert f"python -m ftjax.train --config={name}" in module.__doc__
  cfg = module.get_config()
  # same keys as the defaults: a recipe cannot invent a key nothing reads
  assert set(cfg.to_dict()) == set(defaults().to_dict())
  for section in defaults().keys():
    if isinstance(defaults()[section], type(defaults())):
      assert set(cfg[section].keys()) == set(defaults()[section].keys()), section
  prepare.check_config(cfg)
