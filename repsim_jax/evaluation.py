"""Model variables on whole splits: task metrics, features, and similarity to another model.

One data-parallel loop, `run`: eval batches (padded to the global batch, with a mask) go through
a compiled per-device `step(variables, batch, rng) -> (0, {"logits", layer: (n, d) features})`
(`make_step`; representations pooled on device with `similarity.pool_features`), and come back
to the host with the padding dropped. `evaluate` turns the logits into task metrics and loss,
`extract_features` keeps the representations, `compare` measures two models' features of the
same examples with every measure asked for, layers of equal shape vmapped in one jitted call.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from repsim_jax import metrics as metrics_lib, parallel, progress, similarity


def per_example_loss(logits, labels, task: str):
  """Cross-entropy per example: softmax for single-label tasks, sigmoid per label otherwise."""
  logits = logits.astype(jnp.float32)
  if task == "multilabel":
    return optax.sigmoid_binary_cross_entropy(logits, labels.astype(jnp.float32)).mean(-1)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


# Jitted: on host arrays op by op, each op of the loss would compile on first use.
_host_loss = jax.jit(per_example_loss, static_argnames="task")


def eval_loss(model, task, batch_stats, params, batch):
  """Eval-mode (running BatchNorm statistics) mean task loss: what sharpness is measured on."""
  logits, _ = model.apply({"params": params, "batch_stats": batch_stats}, batch["image"],
                          train=False)
  return jnp.mean(per_example_loss(logits, batch["label"], task))


def make_step(model, layers: Sequence[str] | None = (), pool: str = "mean"):
  """Per-device `step(variables, batch, rng) -> (0, {"logits", layer: (n, d) features})`.

  `layers=()`: logits only (task evaluation); `None`: every representation of the model;
  otherwise those named. `step.layer_order` lists them shallow to deep once the step has been
  traced (pytrees sort dict keys).
  """

  def step(variables, batch, rng):
    del rng
    logits, reps = model.apply(variables, batch["image"], train=False)
    names = list(reps) if layers is None else list(layers)
    step.layer_order[:] = names
    out = {name: similarity.pool_features(reps[name], pool).astype(jnp.float32) for name in names}
    out["logits"] = logits.astype(jnp.float32)
    return jnp.zeros(()), out

  step.layer_order = list(layers or ())
  return step


def run(dp, step_fn, variables, batches, *, max_examples: int = 0, max_batches: int = 0,
        desc: str = "eval") -> dict:
  """{output: (N, ...) host array, "label": (N, ...)} of a compiled `make_step` over `batches`
  (an eval iterator with "mask"), `variables` already placed by `dp`. Every process gets the
  whole split."""
  rng = dp.put_replicated(np.zeros((), np.int32))
  chunks, labels, total = [], [], 0
  total = len(batches) if hasattr(batches, "__len__") else None
  if max_batches:
    total = min(total or max_batches, max_batches)
  for i, batch in enumerate(progress.track(batches, total, desc)):
    if max_batches and i >= max_batches:
      break
    _, out = step_fn(variables, dp.put_batch({"image": batch["image"]}), rng)
    out = dp.get_sharded(out)
    # This process's labels and mask, gathered with the other processes'.
    lab = parallel.gather_host({"l": batch["label"], "m": batch["mask"]})
    keep = lab["m"] > 0
    chunks.append({k: v[keep] for k, v in out.items()})
    labels.append(lab["l"][keep])
    total += int(keep.sum())
    if max_examples and total >= max_examples:
      break
  out = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
  out["label"] = np.concatenate(labels)
  if max_examples:
    out = {k: v[:max_examples] for k, v in out.items()}
  return out


def task_metrics(logits, labels, task: str) -> dict:
  """`metrics.classification_metrics` plus the mean loss and the number of examples."""
  out = metrics_lib.classification_metrics(logits, labels, task)
  labels_for_loss = labels if task == "multilabel" else labels.astype(np.int32)
  out["loss"] = float(np.mean(_host_loss(logits, labels_for_loss, task)))
  out["num_examples"] = int(labels.shape[0])
  return out


def evaluate(dp, step_fn, variables, batches, task: str, max_batches: int = 0,
             desc: str = "eval") -> dict:
  """Task metrics of placed `variables` on `batches` (`step_fn` from `make_step(model)`)."""
  out = run(dp, step_fn, variables, batches, max_batches=max_batches, desc=desc)
  return task_metrics(out["logits"], out["label"], task)


def extract_features(dp, step_fn, variables, batches, max_examples: int = 0,
                     desc: str = "features") -> dict:
  """`run` for host `variables` (placed here), e.g. a checkpoint or pretrained weights."""
  return run(dp, step_fn, dp.put_replicated(variables), batches, max_examples=max_examples,
             desc=desc)


def compare(feats_a: dict, feats_b: dict, measures=("linear_cka",), layers=None) -> dict:
  """{measure: {layer: value}} between two models' features of the same examples."""
  names = [n for n in (layers or feats_a) if n not in ("label", "logits") and n in feats_b]
  a = {n: feats_a[n] for n in names}
  b = {n: feats_b[n] for n in names}
  return {m: {k: float(v) for k, v in similarity.layerwise_similarity(a, b, measure=m).items()}
          for m in measures}


def similarity_to(dp, model, variables: dict, reference: dict, batches_fn, measures,
                  max_examples: int = 0) -> dict:
  """{measure: {layer: value}} of every representation of `model` under host `variables` to the
  same model under `reference`, on the examples `batches_fn()` yields."""
  step = make_step(model, layers=None)
  compiled = dp.compile(step, donate_state=False, sharded_out=True)
  fa = extract_features(dp, compiled, variables, batches_fn(), max_examples)
  fb = extract_features(dp, compiled, reference, batches_fn(), max_examples)
  return compare(fa, fb, tuple(measures), step.layer_order)
