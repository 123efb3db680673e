"""Data: MedMNIST / image-folder / TFDS / synthetic sources, the grain input pipeline, and the
iterators a config asks for."""

from repsim_jax.data.core import ArraySource, DatasetInfo, TASKS
from repsim_jax.data.iterators import input_shape, make_iters
from repsim_jax.data.load import load_dataset, SOURCES
from repsim_jax.data.medmnist import (CATALOGUE, NpzSpec, load_medmnist, load_npz,
                                      medmnist_filename)
from repsim_jax.data.pipeline import (AUGMENTS, StepIterator, make_eval_iter, make_train_iter,
                                      num_eval_steps)
from repsim_jax.data.synthetic import load_synthetic, write_synthetic_npz

__all__ = [
    "ArraySource", "AUGMENTS", "CATALOGUE", "DatasetInfo", "NpzSpec", "SOURCES", "StepIterator",
    "TASKS", "input_shape", "load_dataset", "load_medmnist", "load_npz", "load_synthetic", "make_eval_iter",
    "make_iters", "make_train_iter", "medmnist_filename", "num_eval_steps", "write_synthetic_npz",
]
