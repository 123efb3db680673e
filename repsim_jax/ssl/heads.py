"""The heads SSL objectives put on the backbone's `pre_logits` (dropped after pretraining).

BatchNorm in the heads is synchronised over the data-parallel axis like the backbone's, so the
statistics are the global batch's.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp


class MLP(nn.Module):
  """Dense -> [BN] -> ReLU/GELU ... -> Dense: SimCLR's and BYOL's projector, BYOL's predictor."""
  features: Sequence[int]          # hidden widths, then the output width
  batch_norm: bool = True
  activation: str = "relu"
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool = True):
    act = {"relu": nn.relu, "gelu": lambda y: nn.gelu(y, approximate=False)}[self.activation]
    for i, f in enumerate(self.features[:-1]):
      x = nn.Dense(f, use_bias=not self.batch_norm, name=f"dense{i}")(x)  # BN has the shift
      if self.batch_norm:
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                         axis_name=self.bn_axis_name if train else None, name=f"bn{i}")(x)
      x = act(x)
    return nn.Dense(self.features[-1], name=f"dense{len(self.features) - 1}")(x)


class DINOHead(nn.Module):
  """DINO's head: a GELU MLP to a bottleneck, L2-normalised, then a weight-normalised linear
  layer to `out_dim` prototypes whose norm is fixed at 1 (DINO's `norm_last_layer`)."""
  out_dim: int
  hidden_dim: int = 2048
  bottleneck_dim: int = 256

  @nn.compact
  def __call__(self, x, train: bool = True):
    del train
    x = MLP((self.hidden_dim, self.hidden_dim, self.bottleneck_dim), batch_norm=False,
            activation="gelu", name="mlp")(x)
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    v = self.param("last_layer", nn.initializers.truncated_normal(0.02),
                   (self.bottleneck_dim, self.out_dim))
    return x @ (v / jnp.maximum(jnp.linalg.norm(v, axis=0, keepdims=True), 1e-12))
