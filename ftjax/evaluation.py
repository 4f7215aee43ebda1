"""In-training evaluation: eval loss over data.eval, and exact match of greedy decodes."""
import functools

import jax
from jax.experimental import multihost_utils
import numpy as np

from ftjax import data, lora, objectives, pairs, sharding, step as step_lib
from ftjax.metrics import by_adapter, log0
from ftjax.prepare import Data, Run
from ftjax.sampling import generate


def eval_step_fn(adapters: lora.Adapters, mesh, objective=objectives.SFT, reference=None):
  """The jitted eval step, run under the mesh as the train step is (so FSDP gathers quantized
  weights as packed integers there too, not as dequantized floats); `reference`: DPO's."""
  fn = sharding.with_mesh(mesh, jax.jit(functools.partial(step_lib.eval_step, adapters=adapters,
                                                          objective=objective)))
  if reference is None:
    return fn  # (adapter_params, model, batch), lowerable for HLO checks
  return lambda adapter_params, model, batch: fn(adapter_params, model, batch, reference)


def evaluate(eval_fn, adapter_params, model, batches, mesh, host_table=None,
             adapter: int | None = None, metrics: dict | None = None) -> float:
  """Mean token loss over the eval set (batches of `eval_rows` rows); `adapter`: the index of the
  stacked adapter the batches' rows use (the step then returns one sum per adapter). A
  preference objective: its loss, and TRL's metrics (rewards/accuracies, ...) into `metrics`."""
  metrics = {} if metrics is None else metrics
  total, count, sums = 0.0, 0.0, None
  for batch in batches:
    out = jax.device_get(eval_fn(adapter_params, model, sharding.place_batch(batch, mesh, host_table)))
    if isinstance(out, dict):  # a preference objective: the sums objectives.finish takes
      out = {k: float(v if adapter is None else v[adapter]) for k, v in out.items()}
      sums = out if sums is None else {k: sums[k] + v for k, v in out.items()}
      continue
    t, n = out
    if adapter is not None:
      t, n = t[adapter], n[adapter]
    total, count = total + float(t), count + float(n)
  if sums is not None:  # the loss, and TRL's metrics in `metrics`
    finished = {k: float(v) for k, v in objectives.finish(sums).items()}
    metrics.update(finished)
    return finished["loss"]
  return total / max(count, 1.0)


def eval_metrics(eval_fn, adapter_params, model, d: Data, cfg, mesh, host_table=None) -> dict:
  """{"eval_loss", "eval_ppl"}; with several adapters each one's on its own eval data
  (`eval_loss/NAME`, `eval_ppl/NAME`), and `eval_loss` their mean."""
  losses, extra = {}, {}
  batches = pairs.eval_batches if cfg.data.format == pairs.FORMAT else data.eval_batches
  for k, (name, examples) in enumerate(d.eval_examples.items()):
    adapter = k if d.names else None
    extra[name] = {}
    losses[name] = evaluate(eval_fn, adapter_params, model, batches(
        examples, batch_size=eval_rows(cfg, mesh), seq_len=cfg.data.seq_len,
        pad_id=d.tokenizer.pad_id, process_index=jax.process_index(),
        process_count=jax.process_count(), adapter_id=adapter), mesh, host_table, adapter,
        extra[name])
  out = by_adapter("eval_loss", losses)
  if any(extra.values()):  # a preference objective: TRL's metrics, eval_rewards/margins, ...
    for key in (k for k in next(iter(extra.values())) if k != "loss"):
      out.update(by_adapter(f"eval_{key}", {n: m[key] for n, m in extra.items()}))
    return out  # a pair loss has no perplexity
  return {**out, **{k.replace("eval_loss", "eval_ppl"): float(np.exp(v)) for k, v in out.items()}}


def eval_rows(cfg, mesh) -> int:
  """Rows per eval forward: training's micro-batch (batch_size / grad_accum), so that eval fits
  wherever training does; the whole batch when the micro-batch does not split over the devices."""
  micro = cfg.train.batch_size // cfg.train.grad_accum
  parallel = mesh.shape["data"] * mesh.shape["fsdp"]
  return micro if micro % parallel == 0 and micro % jax.process_count() == 0 else (
      cfg.train.batch_size)


def exact_match(cfg, model, adapters, tokenizer, rows, n: int, mesh) -> tuple[float, int, str]:
  """Greedy-decodes the first n eval prompts (of `rows`) in one left-padded batch, under the mesh;
  returns the fraction whose completion equals the reference exactly, how many were decoded, and
  one sample."""
  asked = [data.prompt_and_reference(tokenizer, cfg.data.format, row) for row in rows[:n]]
  width = max(len(p) for p, _ in asked)
  tokens = np.full((len(asked), width), tokenizer.pad_id, np.int32)
  mask = np.zeros((len(asked), width), bool)
  for i, (prompt, _) in enumerate(asked):
    tokens[i, width - len(prompt):], mask[i, width - len(prompt):] = prompt, True
  longest = max(len(tokenizer.encode(ref)) for _, ref in asked)
  # chat data: stop where training taught to stop, at the template's end of turn (as generate does)
  chat = cfg.data.format == "messages" or (cfg.data.format == pairs.FORMAT
                                           and isinstance(rows[0]["prompt"], list))
  eot = data.end_of_turn_id(tokenizer) if chat else None
  out = host_value(sharding.with_mesh(mesh, generate)(
      model, tokens, adapters=adapters, max_new_tokens=longest + 8, prompt_mask=mask,
      stop_ids=() if eot is None else (eot,)))
  texts = [data.decode_completion(tokenizer, row) for row in out]
  hits = sum(t.strip() == ref.strip() for t, (_, ref) in zip(texts, asked))
  sample = f"{data.decode_prompt(tokenizer, asked[0][0])!r} -> {texts[0]!r}"
  return hits / len(asked), len(asked), sample


def host_value(x) -> np.ndarray:
  """The whole of an array on this host. Under a mesh whose batch axes span processes, generate's
  output is spread over other hosts' devices, which np.asarray cannot read: every process then
  takes part in one gather (each decoded the same prompts, so each gets every row)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(x)


def report_exact_match(r: Run, writer, adapters, when: str, step: int) -> dict:
  """{"exact_match"} at `step`: of the base (adapters None) or the given adapters (lora.init_from's
  before training, the trained ones after); with several, each one's on its own eval prompts
  (`exact_match/NAME`) and their mean."""
  model = sharding.with_device_embedding(r.model, r.host_table, r.mesh)
  names = r.data.names or ("",)
  each = (lora.unstack(adapters) if r.data.names else {"": adapters}) if adapters is not None \
      else dict.fromkeys(names)
  ems = {}
  for name in names:
    ems[name], n, sample = exact_match(r.cfg, model, each[name], r.data.tokenizer,
                                       r.data.eval_rows[name], r.cfg.train.eval_generate, r.mesh)
    log0(f"{when}: {name + ': ' if name else ''}exact match {ems[name]:.1%} on {n} eval "
         f"prompts; sample {sample}")
  out = by_adapter("exact_match", ems)
  writer.write(step, out)
  return out


def eval_losses(ev: dict) -> dict:
  """What of evaluate's metrics the progress bar and the returned metrics carry."""
  return {k: v for k, v in ev.items() if k.startswith(("eval_loss", "eval_rewards/"))}
