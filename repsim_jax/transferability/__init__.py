"""Transferability scores of source models on a target set, and the ranking harness (DESIGN.md §5).

Scores (higher is better): ``logme``, ``leep``, ``nleep``, ``nce``, ``h_score``,
``regularized_h_score``, ``gbc``, ``transrate``, and the gradient-aware ``lp_fu``
(``lp_score`` x ``fu_score``, combined across sources by ``ranking.lp_fu_combine``).
"""

from repsim_jax.transferability import ranking
from repsim_jax.transferability.lp_fu import fu_score
from repsim_jax.transferability.lp_fu import knn_true_class_probability
from repsim_jax.transferability.lp_fu import lp_fu
from repsim_jax.transferability.lp_fu import lp_score
from repsim_jax.transferability.lp_fu import nca_fit
from repsim_jax.transferability.lp_fu import nca_objective
from repsim_jax.transferability.lp_fu import triplet_margin_loss
from repsim_jax.transferability.ranking import friedman_nemenyi
from repsim_jax.transferability.ranking import lp_fu_combine
from repsim_jax.transferability.ranking import mean_ranks
from repsim_jax.transferability.ranking import mean_weighted_tau
from repsim_jax.transferability.ranking import rank_scores
from repsim_jax.transferability.ranking import read_reference_table
from repsim_jax.transferability.ranking import weighted_tau_table
from repsim_jax.transferability.scores import gaussian_mixture_posteriors
from repsim_jax.transferability.scores import gbc
from repsim_jax.transferability.scores import h_score
from repsim_jax.transferability.scores import ledoit_wolf
from repsim_jax.transferability.scores import leep
from repsim_jax.transferability.scores import logme
from repsim_jax.transferability.scores import logme_fixed_point
from repsim_jax.transferability.scores import nce
from repsim_jax.transferability.scores import nleep
from repsim_jax.transferability.scores import pca_transform
from repsim_jax.transferability.scores import regularized_h_score
from repsim_jax.transferability.scores import transrate

__all__ = [
    "ranking", "fu_score", "knn_true_class_probability", "lp_fu", "lp_score", "nca_fit",
    "nca_objective", "triplet_margin_loss", "friedman_nemenyi", "lp_fu_combine", "mean_ranks",
    "mean_weighted_tau", "rank_scores", "read_reference_table", "weighted_tau_table",
    "gaussian_mixture_posteriors", "gbc", "h_score", "ledoit_wolf", "leep", "logme",
    "logme_fixed_point", "nce", "nleep", "pca_transform", "regularized_h_score", "transrate",
]
