"""How good a frozen representation is for a labelled task (DESIGN §9's quality indicators):
k-NN accuracy (`ssl.knn`, the SSL monitor's) and linear-probe accuracy, from features alone."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from repsim_jax.ssl import knn


def _standardise(train_x, test_x):
  mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
  return (train_x - mu) / sd, (test_x - mu) / sd


def probe_objective(params, x, y, l2: float):
  """Mean softmax cross-entropy of the linear classifier `params` (w, b) + ½·l2·‖w‖²."""
  w, b = params
  logits = x @ w + b
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return ce + 0.5 * l2 * jnp.sum(w * w)


@functools.partial(jax.jit, static_argnames=("num_classes", "steps"))
def fit_linear_probe(x, y, num_classes: int, l2: float = 1e-3, steps: int = 100):
  """(w, b) minimising `probe_objective` on standardised features by L-BFGS (`steps`
  iterations, full batch, from zero). Deterministic: no sampling."""
  x = jnp.asarray(x, jnp.float32)
  f = functools.partial(probe_objective, x=x, y=y, l2=l2)
  params = (jnp.zeros((x.shape[1], num_classes)), jnp.zeros((num_classes,)))
  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(f)

  def step(carry, _):
    p, state = carry
    value, grad = value_and_grad(p, state=state)
    updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=f)
    return (optax.apply_updates(p, updates), state), None

  (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
  return params


def linear_probe_accuracy(train_x, train_y, test_x, test_y, num_classes: int,
                          l2: float = 1e-3, steps: int = 100) -> float:
  """Accuracy on (test_x, test_y) of a linear probe fitted on (train_x, train_y); both sets are
  standardised with the train set's per-feature mean and std."""
  tr, te = _standardise(np.asarray(train_x, np.float32), np.asarray(test_x, np.float32))
  w, b = fit_linear_probe(tr, jnp.asarray(train_y), num_classes, l2, steps)
  return float(np.mean(np.asarray(te @ w + b).argmax(-1) == np.asarray(test_y)))


def quality(bank_x, bank_y, query_x, query_y, num_classes: int, *, k: int = 20,
            temperature: float = 0.07, l2: float = 1e-3) -> dict[str, float]:
  """{knn_accuracy, linear_probe_accuracy}: the bank (train) split votes / fits, the query
  (val) split is scored."""
  return {"knn_accuracy": knn.knn_accuracy(bank_x, bank_y, query_x, query_y, num_classes, k,
                                           temperature, False),
          "linear_probe_accuracy": linear_probe_accuracy(bank_x, bank_y, query_x, query_y,
                                                         num_classes, l2)}
