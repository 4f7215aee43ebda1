"""ftjax: LoRA and QLoRA fine-tuning of Hugging Face causal LMs in JAX."""
import glob as _glob
from importlib.util import find_spec as _find_spec
import os as _os


def _quiet_startup():
  """Defaults, set before jax and transformers load, against lines that look like failures and
  are not: transformers' advice that PyTorch is missing (ftjax needs no torch), and libtpu's
  startup errors on a machine with no accelerator at all, where the test extra installs libtpu
  for deviceless TPU compiles and JAX would otherwise try to start a TPU backend. There, JAX is
  told it has only the CPU (ftjax.plan --target=tpu-* still compiles for TPUs). A machine with a
  TPU chip or a GPU keeps JAX's own choice, and a user's JAX_PLATFORMS always wins. On a machine
  without an accelerator XLA's C++ log stays quiet too (TF_CPP_MIN_LOG_LEVEL=3, unless set): its
  "Very slow compile?" alarm after two minutes of compiling on a few cores asks for a bug report
  that is not due; failures still raise in Python."""
  _os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
  if "JAX_PLATFORMS" in _os.environ:
    cpu_only = _os.environ["JAX_PLATFORMS"] == "cpu"
  else:
    vendors = set()
    for path in _glob.glob("/sys/bus/pci/devices/*/vendor"):
      try:
        with open(path) as f:
          vendors.add(f.read().strip())
      except OSError:
        pass
    cpu_only = not ("0x1ae0" in vendors  # Google's PCI id: a TPU chip
                    or _glob.glob("/dev/accel*") or _glob.glob("/dev/nvidia*")
                    or _os.path.exists("/dev/kfd"))
    if cpu_only and _find_spec("libtpu") is not None:
      _os.environ["JAX_PLATFORMS"] = "cpu"
  if cpu_only:
    _os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

_quiet_startup()

from ftjax.ckpt import load_adapters
from ftjax.errors import UserError
from ftjax.sampling import generate
from ftjax.hf_io import load_hf
from ftjax.lora import Adapters
from ftjax.model import Model, ModelSpec, expert_load, forward

__all__ = ["Adapters", "Model", "ModelSpec", "UserError", "expert_load", "forward", "generate",
           "load_adapters", "load_hf"]
