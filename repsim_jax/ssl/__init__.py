"""Self-supervised pretraining (DESIGN §8): SimCLR, BYOL and DINO as objectives of the trainer.

`losses` (NT-Xent, BYOL, DINO), `augment` (views made on device), `heads` (projector,
predictor, DINO head), `objectives` (what the SSL step computes, the EMA target) and `knn` (the
k-NN monitor that shows the representation improving without labels).
"""

from repsim_jax.ssl import augment, heads, knn, losses, objectives
from repsim_jax.ssl.objectives import NAMES, OBJECTIVES, get_objective

__all__ = ["augment", "heads", "knn", "losses", "objectives", "NAMES", "OBJECTIVES",
           "get_objective"]
