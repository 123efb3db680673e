"""The input pipelines a config asks for: `make_iters(cfg, splits, info, seed=...)`."""

from __future__ import annotations

import jax

from repsim_jax.data import pipeline


def input_shape(cfg, info) -> tuple[int, int, int]:
  """(size, size, channels) the model sees: `config.data.image_size` / `channels` when set,
  else the dataset's own."""
  size = cfg.data.image_size or info.image_shape[0]
  return (size, size, cfg.data.channels or info.image_shape[2])


def make_iters(cfg, splits, info, *, seed: int, raw_train: bool = False):
  """(train iterator, `eval_iter(split)`): this process's slice of every global batch of
  `config.train.batch_size` (eval: `eval_batch_size`, ordered, padded, with a mask).
  `raw_train`: training images in [0, 1], neither augmented nor normalised (SSL makes its views
  on device)."""
  shape = input_shape(cfg, info)
  common = dict(global_batch_size=cfg.train.batch_size, image_size=shape[0], channels=shape[2],
                mean=tuple(cfg.data.mean), std=tuple(cfg.data.std),
                process_index=jax.process_index(), process_count=jax.process_count())
  train_common = dict(common, mean=0.0, std=1.0) if raw_train else common
  train_iter = pipeline.make_train_iter(splits["train"],
                                        augment="none" if raw_train else cfg.data.augment,
                                        seed=seed, worker_count=cfg.data.worker_count,
                                        **train_common)
  eval_batch = cfg.train.eval_batch_size or cfg.train.batch_size

  def eval_iter(split):
    return pipeline.make_eval_iter(splits[split], **dict(common, global_batch_size=eval_batch))

  return train_iter, eval_iter
