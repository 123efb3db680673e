"""The `transferability` job: every score of every source model on one target, at scale.

  python -m repsim_jax.main --workdir=runs/transfer \
    --config="configs/transferability.py:target=dermamnist,size=28,sources=\
imagenet=resnet18@weights/r18.safetensors;radimagenet=runs/radimagenet_r18"

Sources (`config.sources`): `name=model@path` items separated by `;` (or `,` in a
`--config.sources=` override, or newlines), or the path of a text file with one item a line
(`#` starts a comment). `path` is a repsim_jax run dir, a torchvision/timm `.safetensors`/`.pth`
or a ViT `.npz` (`checkpoint.load_pretrained`); `model` is a `models.MODEL_NAMES` entry and may
be left out (`name=path`) for a run dir, whose config.json names it. Names are used in file
names and CSV rows: letters, digits, `_`, `-`, `.`.

Per source, one data-parallel forward pass over the target's *train* split (the first
`config.max_examples` examples when > 0) caches, in `<workdir>/features/<source>__<target>.npz`
(written atomically):
  `features` (N, d) float32 pooled `pre_logits`; `label` (N,) or (N, L) multi-hot;
  `probs` (N, Z) float32 softmax of the source head's logits (absent when the source has no
  head; LEEP uses them, NCE their argmax); `fu` () the FU gradient ratio (NaN when not computed);
  `meta` a JSON string (source path, model, data config, max_examples) that must match for the
  cache to be reused.
A rerun reuses a matching cache and computes only the scores missing from `scores.csv`, so a
killed job resumes where it stopped. Scores are appended as `source,target,score,value` rows to
`<workdir>/scores.csv` (rewritten atomically after every source; a (source, target, score)
triple appears once).

Scores (`config.scores`, default all of `SCORES`): logme, leep, nleep, nce, h_score,
regularized_h_score, gbc, transrate, lp and fu (Juodelyte et al.; `ranking.rank_scores` combines
them into `lp_fu`). FU needs the parameter paths of an early and of the first conv layer
(`config.fu.early_layer` / `first_layer`; defaults per family in `FU_LAYERS`: our ResNets
`layer1_0/conv1` / `conv1`, small_cnn `block2/conv` / `block1/conv`); it is skipped for models
without such defaults (ViTs). It is computed on the first `config.fu.max_examples` target
images (eval preprocessing, BatchNorm in inference mode). Multi-label targets: LogME in its
regression mode on the multi-hot columns; the class-label scores are skipped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import warnings

import jax
import numpy as np
import scipy.special

from repsim_jax.transferability import scores as scores_lib
# The package re-exports the function `lp_fu`, which shadows the submodule as an attribute.
from repsim_jax.transferability.lp_fu import fu_score, lp_score

# Scores that read the source head's probabilities (skipped for a headless source).
HEAD_SCORES = ("leep", "nce")
# (early, first) conv parameter paths for FU, by model-name prefix.
FU_LAYERS = {"resnet": ("layer1_0/conv1", "conv1"), "small_cnn": ("block2/conv", "block1/conv")}
CSV_COLUMNS = ("source", "target", "score", "value")
_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


# ---------------------------------------------------------------------------------------------
# Sources.
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Source:
  """One pretrained model: `name` (CSV row / file names), registry `model`, weights `path`
  ("" = random initialisation, allowed only where the caller says so), `kwargs` for
  `models.get_model` (read from a run dir's config.json)."""
  name: str
  model: str
  path: str
  kwargs: tuple = ()


def _run_config(path: str) -> dict | None:
  cfg = os.path.join(path, "config.json")
  if os.path.isdir(path) and os.path.isfile(cfg):
    with open(cfg) as f:
      return json.load(f)
  return None


def parse_sources(spec: str, *, key: str = "config.sources",
                  allow_random: bool = False) -> list[Source]:
  """`name=model@path` items (`;`/`,`/newline separated) or a file of them -> [Source].

  Every path is checked here, so a typo fails before any model runs. With `allow_random`,
  `name=model@` (empty path) is a randomly initialised model (a from-scratch baseline).
  """
  from repsim_jax import models  # pylint: disable=g-import-not-at-top
  spec = (spec or "").strip()
  if not spec:
    raise ValueError(f"{key}: empty; expected name=model@path items separated by ';' or a file "
                     "listing them")
  if "=" not in spec and os.path.isfile(spec):
    with open(spec) as f:
      items = [line.split("#", 1)[0].strip() for line in f]
  else:
    items = re.split(r"[;,\n]", spec)
  out, seen = [], set()
  for item in (i.strip() for i in items):
    if not item:
      continue
    if "=" not in item:
      raise ValueError(f"{key}: item {item!r}: expected name=model@path")
    name, rest = (s.strip() for s in item.split("=", 1))
    if not _NAME.match(name):
      raise ValueError(f"{key}: source name {name!r}: use letters, digits, '_', '-', '.'")
    if name in seen:
      raise ValueError(f"{key}: source name {name!r} given twice")
    seen.add(name)
    model, path = (s.strip() for s in rest.split("@", 1)) if "@" in rest else ("", rest)
    if path:
      path = os.path.expanduser(path)
      if not os.path.exists(path):
        raise FileNotFoundError(f"{key}: source {name!r}: no such file or run directory: {path!r}")
    elif not allow_random:
      raise ValueError(f"{key}: source {name!r}: no weights path (expected {name}=model@path)")
    run_cfg = _run_config(path) if path else None
    if not model:
      if run_cfg is None:
        raise ValueError(f"{key}: source {name!r}: {path!r} is not a run dir with config.json; "
                         f"name its model: {name}=MODEL@{path}")
      model = run_cfg["model"]["name"]
    if model not in models.MODEL_NAMES:
      raise ValueError(f"{key}: source {name!r}: unknown model {model!r}; expected one of "
                       f"{', '.join(models.MODEL_NAMES)}")
    kwargs = ()
    if run_cfg is not None and run_cfg.get("model", {}).get("name") == model:
      kwargs = tuple(sorted((run_cfg["model"].get("kwargs") or {}).items()))
    out.append(Source(name, model, path, kwargs))
  if not out:
    raise ValueError(f"{key}: lists no sources")
  return out


def fu_layers(model_name: str, early: str = "", first: str = "") -> tuple[str, str] | None:
  """(early, first) conv parameter paths for FU: the given ones, else the family default."""
  if early and first:
    return early, first
  for prefix, layers in FU_LAYERS.items():
    if model_name.startswith(prefix):
      return layers
  return None


def _head_classes(variables) -> int:
  head = variables["params"].get("head")
  return int(np.shape(head["kernel"])[-1]) if head is not None else 0


# ---------------------------------------------------------------------------------------------
# Feature cache.
# ---------------------------------------------------------------------------------------------
def cache_path(workdir: str, source: str, target: str) -> str:
  return os.path.join(workdir, "features", f"{source}__{target}.npz")


def save_cache(path: str, arrays: dict, meta: dict) -> None:
  """np.savez to a temporary file, then rename: a reader never sees a partial cache."""
  from repsim_jax.io import save_npz  # pylint: disable=g-import-not-at-top
  save_npz(path, meta=np.asarray(json.dumps(meta, sort_keys=True)), **arrays)


def load_cache(path: str) -> tuple[dict, dict]:
  """-> ({name: array}, meta)."""
  with np.load(path, allow_pickle=False) as z:
    arrays = {k: z[k] for k in z.files if k != "meta"}
    meta = json.loads(str(z["meta"]))
  return arrays, meta


def _fingerprint(data_cfg) -> str:
  text = json.dumps(data_cfg.to_dict() if hasattr(data_cfg, "to_dict") else dict(data_cfg),
                    sort_keys=True, default=str)
  return hashlib.sha1(text.encode()).hexdigest()[:16]


def cache_meta(config, source: Source) -> dict:
  """What the cached features must have been made from to be reused."""
  return {"source_path": os.path.abspath(source.path), "model": source.model,
          "data": _fingerprint(config.data), "max_examples": int(config.max_examples),
          "seed": int(config.seed)}


def fu_settings(config, source: Source, task: str) -> dict | None:
  """The settings FU is computed with, or None when it is not wanted or not defined."""
  layers = fu_layers(source.model, config.fu.early_layer, config.fu.first_layer)
  if "fu" not in tuple(config.scores) or layers is None or task == "multilabel":
    return None
  return {"layers": list(layers), "max_examples": int(config.fu.max_examples),
          "batch_size": int(config.fu.batch_size), "margin": float(config.fu.margin)}


# ---------------------------------------------------------------------------------------------
# Extraction (data-parallel forward pass, then FU on one device).
# ---------------------------------------------------------------------------------------------
def _eval_iter(config, split_source, info):
  from repsim_jax import data  # pylint: disable=g-import-not-at-top
  from repsim_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  shape = data.input_shape(config, info)
  return pipeline.make_eval_iter(
      split_source, global_batch_size=config.batch_size, image_size=shape[0], channels=shape[2],
      mean=tuple(config.data.mean), std=tuple(config.data.std),
      process_index=jax.process_index(), process_count=jax.process_count())


def _first_images(batches, n: int) -> tuple[np.ndarray, np.ndarray]:
  """The first `n` real (unpadded) examples of this process's eval batches."""
  images, labels, total = [], [], 0
  for batch in batches:
    keep = np.asarray(batch["mask"]) > 0
    images.append(np.asarray(batch["image"])[keep])
    labels.append(np.asarray(batch["label"])[keep])
    total += int(keep.sum())
    if total >= n:
      break
  return np.concatenate(images)[:n], np.concatenate(labels)[:n]


def _load_source(source: Source) -> tuple[dict, int]:
  """({'params', 'batch_stats'}, number of source-head classes (0 = no head))."""
  from repsim_jax import checkpoint  # pylint: disable=g-import-not-at-top
  variables = checkpoint.load_pretrained(source.path, source.model, **dict(source.kwargs))
  variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
  return variables, _head_classes(variables)


def extract(config, source: Source, dp, train_split, info, fu: dict | None = None) -> dict:
  """Cache arrays for one source on the target's train split (see the module docstring);
  FU too when `fu` (from `fu_settings`) is given."""
  from repsim_jax import evaluation, models, parallel  # pylint: disable=g-import-not-at-top
  variables, head = _load_source(source)
  model = models.get_model(source.model, head, bn_axis_name=parallel.AXIS, **dict(source.kwargs))
  step = dp.compile(evaluation.make_step(model, layers=["pre_logits"]),
                    donate_state=False, sharded_out=True)
  feats = evaluation.extract_features(dp, step, variables, _eval_iter(config, train_split, info),
                                      config.max_examples, desc=f"[{source.name}] features")
  out = {"features": feats["pre_logits"].astype(np.float32), "label": feats["label"],
         "fu": np.asarray(np.nan, np.float64)}
  if head:
    # Softmax in float64 so rows sum to 1 to float32 precision (LEEP checks it).
    out["probs"] = scipy.special.softmax(feats["logits"].astype(np.float64), axis=1
                                         ).astype(np.float32)
  if fu is not None:
    out["fu"] = np.asarray(_fu(config, source, variables, head, fu, train_split, info), np.float64)
  return out


def _fu(config, source, variables, head, fu: dict, train_split, info) -> float:
  from repsim_jax import models  # pylint: disable=g-import-not-at-top
  layers = fu["layers"]
  n = fu["max_examples"] or len(train_split)
  if config.max_examples:
    n = min(n, config.max_examples)
  images, labels = _first_images(_eval_iter(config, train_split, info), n)
  # No BatchNorm axis name: FU runs outside the data-parallel map, in inference mode.
  model = models.get_model(source.model, head, **dict(source.kwargs))
  batch_stats = variables["batch_stats"]

  def apply_fn(params, x):
    return model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)

  return fu_score(apply_fn, variables["params"], images, labels, early_layer=layers[0],
                  first_layer=layers[1], margin=fu["margin"], batch_size=fu["batch_size"],
                  seed=config.seed)


# ---------------------------------------------------------------------------------------------
# Scores from a cache.
# ---------------------------------------------------------------------------------------------
def applicable_scores(names, cache: dict, task: str) -> tuple[list[str], dict[str, str]]:
  """(scores computable from `cache`, {skipped score: why})."""
  ok, skipped = [], {}
  for name in names:
    if task == "multilabel" and name != "logme":
      skipped[name] = "needs single-label targets"
    elif name in HEAD_SCORES and "probs" not in cache:
      skipped[name] = "source has no classifier head"
    elif name == "fu" and not np.isfinite(float(cache.get("fu", np.nan))):
      skipped[name] = "no early/first conv layers for this model"
    else:
      ok.append(name)
  return ok, skipped


def _lp(f, y, cache, task, config):
  lp = config.lp
  return lp_score(f, y, n_components=lp.n_components, k=lp.k, pca_dim=lp.pca_dim or None,
                  batch_size=lp.batch_size, steps=lp.steps, learning_rate=lp.learning_rate,
                  seed=config.seed)


# config.scores entry -> (features, labels, cache, task, config) -> value, with the library's
# functions (so anyone can recompute a value from the cache). LEEP/NCE read the source head's
# probabilities, FU was computed at extraction; the others take the features.
SCORE_FNS = {
    "logme": lambda f, y, cache, task, config: scores_lib.logme(f, y,
                                                                multilabel=task == "multilabel"),
    "leep": lambda f, y, cache, task, config: scores_lib.leep(cache["probs"], y),
    "nleep": lambda f, y, cache, task, config: scores_lib.nleep(
        f, y, seed=config.seed, covariance_type=config.nleep.covariance_type),
    "nce": lambda f, y, cache, task, config: scores_lib.nce(np.argmax(cache["probs"], axis=1), y),
    "h_score": lambda f, y, cache, task, config: scores_lib.h_score(f, y),
    "regularized_h_score": lambda f, y, cache, task, config: scores_lib.regularized_h_score(f, y),
    "gbc": lambda f, y, cache, task, config: scores_lib.gbc(f, y),
    "transrate": lambda f, y, cache, task, config: scores_lib.transrate(f, y),
    "lp": _lp,
    "fu": lambda f, y, cache, task, config: float(cache["fu"]),
}
SCORES = tuple(SCORE_FNS)


def compute_score(name: str, cache: dict, task: str, config) -> float:
  """One score from cached arrays (`SCORE_FNS`)."""
  if name not in SCORE_FNS:
    raise ValueError(f"config.scores: unknown score {name!r}; expected some of {list(SCORES)}")
  return SCORE_FNS[name](cache["features"], cache["label"], cache, task, config)


# ---------------------------------------------------------------------------------------------
# scores.csv.
# ---------------------------------------------------------------------------------------------
def read_scores(path: str):
  import pandas as pd  # pylint: disable=g-import-not-at-top
  if not os.path.exists(path):
    return pd.DataFrame(columns=list(CSV_COLUMNS))
  df = pd.read_csv(path, dtype={"source": str, "target": str, "score": str})
  if list(df.columns) != list(CSV_COLUMNS):
    raise ValueError(f"{path}: expected columns {','.join(CSV_COLUMNS)}, has {list(df.columns)}")
  return df


def merge_scores(path: str, rows: list[dict], drop_pair: tuple[str, str] | None = None) -> None:
  """Adds `rows` to the CSV at `path`, replacing rows of the same (source, target, score);
  `drop_pair=(source, target)` first removes every row of that pair (its features changed)."""
  import pandas as pd  # pylint: disable=g-import-not-at-top
  from repsim_jax.io import write_text  # pylint: disable=g-import-not-at-top
  df = read_scores(path)
  if drop_pair is not None:
    df = df[~((df["source"] == drop_pair[0]) & (df["target"] == drop_pair[1]))]
  new = pd.DataFrame(rows, columns=list(CSV_COLUMNS))
  both = pd.concat([df, new], ignore_index=True) if len(df) else new
  both = both.drop_duplicates(["source", "target", "score"], keep="last")
  write_text(path, both.to_csv(index=False))


def format_table(df, target: str) -> str:
  """Sources x scores table of one target's rows, as fixed-width text."""
  sub = df[df["target"] == target]
  if sub.empty:
    return "(no scores)"
  table = sub.pivot(index="source", columns="score", values="value")
  table = table[[s for s in SCORES if s in table.columns] +
                [s for s in table.columns if s not in SCORES]]
  buf = io.StringIO()
  buf.write(table.to_string(float_format=lambda v: f"{v:.4g}"))
  return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# The job.
# ---------------------------------------------------------------------------------------------
def validate(config) -> None:
  from repsim_jax import config_lib  # pylint: disable=g-import-not-at-top
  if not config.data.name:
    raise ValueError("config.data.name: name the target dataset (configs/transferability.py:"
                     "target=NAME)")
  unknown = [s for s in config.scores if s not in SCORES]
  if unknown:
    raise ValueError(f"config.scores: unknown score {unknown[0]!r}; expected some of "
                     f"{list(SCORES)}")
  config_lib.check_positive(config, "batch_size")
  if config.max_examples < 0:
    raise ValueError(f"config.max_examples={config.max_examples}: expected >= 0 (0 = all)")
  if not _NAME.match(target_name(config)):
    raise ValueError(f"config.target_name={target_name(config)!r}: use letters, digits, "
                     "'_', '-', '.'")


def target_name(config) -> str:
  return config.target_name or config.data.name


def run(config, workdir: str):
  """Scores every source of `config.sources` on the target; returns the target's rows
  (pandas DataFrame `source,target,score,value`)."""
  from repsim_jax import config_lib, data, parallel  # pylint: disable=g-import-not-at-top
  validate(config)
  sources = parse_sources(config.sources)
  target = target_name(config)
  dp = parallel.DataParallel(config.parallel.backend, config.parallel.num_devices)
  dp.check_batch_size(config.batch_size, "config.batch_size")
  splits, info = data.load_dataset(config.data)
  if "train" not in splits:
    raise ValueError(f"config.data: the target has no train split (splits: {sorted(splits)})")
  main = jax.process_index() == 0
  if main:
    config_lib.write_config(config, workdir)
  csv_path = os.path.join(workdir, "scores.csv")
  for source in sources:
    done = set()
    if not config.recompute:
      df = read_scores(csv_path)
      done = set(df[(df["source"] == source.name) & (df["target"] == target)]["score"])
    path = cache_path(workdir, source.name, target)
    meta = cache_meta(config, source)
    fu = fu_settings(config, source, info.task)
    cache, stale = None, False
    if os.path.exists(path):
      cache, old_meta = load_cache(path)
      old_fu = old_meta.pop("fu", None)
      if old_meta != meta:
        print(f"[{source.name}] cache {path} was made with other settings; extracting again",
              flush=True)
        cache, stale = None, True
      elif fu is not None and old_fu != fu:
        done.discard("fu")  # FU wanted with settings the cache does not have
      else:
        fu = old_fu
    # Stale features make the CSV rows computed from them stale too.
    todo_all = [s for s in config.scores if stale or s not in done]
    if not todo_all:
      print(f"[{source.name}] all scores present; skipped", flush=True)
      continue
    if cache is None:
      print(f"[{source.name}] extracting features of {target} (train split) with "
            f"{source.model} from {source.path}", flush=True)
      cache = extract(config, source, dp, splits["train"], info, fu)
      if main:
        save_cache(path, cache, {**meta, "fu": fu})
    elif "fu" in todo_all and fu is not None and fu != old_fu:
      print(f"[{source.name}] computing FU ({fu['layers'][0]} / {fu['layers'][1]})", flush=True)
      variables, head = _load_source(source)
      cache["fu"] = np.asarray(_fu(config, source, variables, head, fu, splits["train"], info),
                               np.float64)
      if main:
        save_cache(path, cache, {**meta, "fu": fu})
    todo, skipped = applicable_scores(todo_all, cache, info.task)
    for name, why in skipped.items():
      print(f"[{source.name}] {name}: skipped ({why})", flush=True)
    if not main:
      continue
    rows = []
    for name in todo:
      try:
        with warnings.catch_warnings(record=True) as said:
          warnings.simplefilter("always", RuntimeWarning)
          value = float(compute_score(name, cache, info.task, config))
        for w in said:
          if issubclass(w.category, RuntimeWarning):
            print(f"[{source.name}] warning: {str(w.message).splitlines()[0]}", flush=True)
      except ValueError as e:
        raise ValueError(f"score {name} of source {source.name!r} on {target}: "
                         f"{str(e).splitlines()[0]}") from e
      if not np.isfinite(value):
        print(f"[{source.name}] warning: {name} = {value}", flush=True)
      rows.append({"source": source.name, "target": target, "score": name, "value": value})
    if rows or stale:
      merge_scores(csv_path, rows, drop_pair=(source.name, target) if stale else None)
    print(f"[{source.name}] {len(rows)} scores -> {csv_path}", flush=True)
  df = read_scores(csv_path)
  df = df[df["target"] == target].reset_index(drop=True)
  if main:
    print(f"\nTransferability to {target} ({info.task}, {len(sources)} sources):", flush=True)
    print(format_table(df, target), flush=True)
  return df
