"""ftjax: LoRA and QLoRA fine-tuning of Hugging Face causal LMs in JAX."""
from ftjax.ckpt import load_adapters
from ftjax.errors import UserError
from ftjax.sampling import generate
from ftjax.hf_io import load_hf
from ftjax.lora import Adapters
from ftjax.model import Model, ModelSpec, forward

__all__ = ["Adapters", "Model", "ModelSpec", "UserError", "forward", "generate", "load_adapters",
           "load_hf"]
