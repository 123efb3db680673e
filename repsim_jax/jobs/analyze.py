"""The `analyze` job: every layer of a finished run against the weights it started from, with
every similarity measure, the cross-layer CKA matrix, task metrics and sharpness."""

from __future__ import annotations

import os

import jax
import numpy as np

from repsim_jax import evaluation, io, similarity


# ---------------------------------------------------------------------------------------------
# The `analyze` job: the full similarity and sharpness report for a run.
# ---------------------------------------------------------------------------------------------
def load_run_config(run_dir: str):
  import json
  import ml_collections
  path = os.path.join(run_dir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"config.run={run_dir!r}: no config.json (expected a repsim_jax run dir)")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def _head_classes(variables) -> int:
  head = variables["params"].get("head")
  return int(np.shape(head["kernel"])[-1]) if head is not None else 0


def _model_for(run_cfg, variables):
  from repsim_jax import models, parallel
  return models.get_model(run_cfg.model.name, _head_classes(variables), bn_axis_name=parallel.AXIS,
                          **dict(run_cfg.model.get("kwargs", {})))


def run(config, workdir: str) -> dict:
  """Similarity of every layer of `config.run` to its reference (default: the weights the run
  started from) with every measure, the cross-layer CKA matrix, task metrics and sharpness;
  with `config.baseline` (another run, e.g. full fine-tuning) the relative sharpness change."""
  import json
  from repsim_jax import checkpoint, data, metrics as metrics_lib, parallel, sharpness
  if not config.run:
    raise ValueError("config.run: name the run directory to analyse (configs/analyze.py:run=DIR)")
  sharpness.check_config(config.sharpness, "config.sharpness")
  run_cfg = load_run_config(config.run)
  with run_cfg.unlocked():
    run_cfg.train.eval_batch_size = config.batch_size
    run_cfg.train.batch_size = config.batch_size
  dp = parallel.DataParallel(config.parallel.backend, config.parallel.num_devices)
  dp.check_batch_size(config.batch_size, "config.batch_size")
  splits, info = data.load_dataset(run_cfg.data)
  if config.split not in splits:
    raise ValueError(f"config.split={config.split!r}: the dataset has splits {sorted(splits)}")
  _, eval_iter_fn = data.make_iters(run_cfg, splits, info, seed=run_cfg.seed)

  tuned = checkpoint.load_run_variables(config.run, config.step or None)
  ref_path = config.reference or run_cfg.model.init
  if not ref_path:
    raise ValueError("config.reference: the run started from random weights; name a reference "
                     "(run dir or weights file)")
  reference = checkpoint.load_pretrained(ref_path, run_cfg.model.name,
                                         **dict(run_cfg.model.get("kwargs", {})))
  reference.setdefault("batch_stats", {})
  tuned.setdefault("batch_stats", {})
  model_t, model_r = _model_for(run_cfg, tuned), _model_for(run_cfg, reference)
  step_t = evaluation.make_step(model_t, layers=None)
  feats_t = evaluation.extract_features(
      dp, dp.compile(step_t, donate_state=False, sharded_out=True), tuned,
      eval_iter_fn(config.split), config.max_examples, desc="[analyze] features of the run")
  feats_r = evaluation.extract_features(
      dp, dp.compile(evaluation.make_step(model_r, layers=None), donate_state=False,
                     sharded_out=True), reference, eval_iter_fn(config.split), config.max_examples,
      desc="[analyze] features of the reference")
  layers = step_t.layer_order
  measures = tuple(config.measures) or tuple(similarity.MEASURES)
  layerwise = evaluation.compare(feats_t, feats_r, measures, layers)
  names_a, names_b, matrix = similarity.cross_layer_similarity(
      {k: feats_t[k] for k in layers}, {k: feats_r[k] for k in layers})
  task = metrics_lib.classification_metrics(feats_t["logits"], feats_t["label"], info.task)

  probe = [{"image": b["image"], "label": b["label"]}
           for b, _ in zip(eval_iter_fn(config.split), range(config.probe_batches))]
  rng = jax.random.PRNGKey(config.seed)

  def sharp(run_dir, variables, model):
    loss_fn = jax.tree_util.Partial(evaluation.eval_loss, model, info.task,
                                    variables["batch_stats"])
    return sharpness.sharpness_report(loss_fn, variables["params"], probe, rng, config.sharpness)

  report = {"run": config.run, "reference": ref_path, "split": config.split,
            "num_examples": int(feats_t["label"].shape[0]), "task_metrics": task,
            "similarity": layerwise, "sharpness": sharp(config.run, tuned, model_t)}
  if config.baseline:
    base = checkpoint.load_run_variables(config.baseline)
    base.setdefault("batch_stats", {})
    report["baseline"] = config.baseline
    report["baseline_sharpness"] = sharp(config.baseline, base, _model_for(run_cfg, base))
    report["sharpness_relative_change"] = {
        k: float(sharpness.relative_change(v, report["baseline_sharpness"][k]))
        for k, v in report["sharpness"].items() if k != "loss"}
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    similarity.similarity_table(layerwise, os.path.join(workdir, "similarity.csv"))
    similarity.similarity_table((names_a, names_b, matrix),
                                os.path.join(workdir, "cross_layer_linear_cka.csv"))
    similarity.plot_heatmap(matrix, names_a, names_b,
                            os.path.join(workdir, "cross_layer_linear_cka.png"),
                            title="linear CKA between every pair of layers",
                            label="linear CKA", xlabel="reference model: layer",
                            ylabel="fine-tuned model: layer")
    io.write_text(os.path.join(workdir, "report.json"),
                                 json.dumps(report, indent=2, default=float) + "\n")
    io.write_text(os.path.join(workdir, "report.md"), markdown_report(report))
    print(markdown_report(report), flush=True)
  return report


def markdown_report(report: dict) -> str:
  lines = [f"# Analysis of `{report['run']}`", "",
           f"Reference: `{report['reference']}`; split `{report['split']}`, "
           f"{report['num_examples']} examples.", "", "## Task metrics", ""]
  lines += [f"- {k}: {v:.4f}" for k, v in report["task_metrics"].items() if not k.startswith("auc_")]
  sim = report["similarity"]
  measures = list(sim)
  layers = list(next(iter(sim.values())))
  lines += ["", "## Similarity to the reference, per layer", "",
            "| layer | " + " | ".join(measures) + " |",
            "| --- |" + " --- |" * len(measures)]
  for layer in layers:
    lines.append(f"| {layer} | " + " | ".join(f"{sim[m][layer]:.4f}" for m in measures) + " |")
  lines += ["", "Cross-layer linear CKA: `cross_layer_linear_cka.csv`, `cross_layer_linear_cka.png`.",
            "", "## Sharpness (eval mode, fixed probe batches)", ""]
  rel = report.get("sharpness_relative_change", {})
  for k, v in report["sharpness"].items():
    extra = f" ({100 * rel[k]:+.0f}% vs `{report['baseline']}`)" if k in rel else ""
    lines.append(f"- {k}: {v:.5g}{extra}")
  return "\n".join(lines) + "\n"
