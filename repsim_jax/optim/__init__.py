"""Optimisers: Riemannian (Stiefel) transforms for RepSim's Q matrices, as optax transforms."""

from repsim_jax.optim import stiefel
from repsim_jax.optim.stiefel import (
    identity_init,
    orthogonality_error,
    procrustes_init,
    project_gradients,
    project_tangent,
    retract,
    stiefel_adam,
    stiefel_retraction,
    stiefel_sgd,
    tangent_momentum,
)
