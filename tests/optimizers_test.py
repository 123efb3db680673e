import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from repsim_jax import config_lib
from repsim_jax.optim import optimizers


def params():
  return {"model": {"conv": {"kernel": jnp.ones((3, 3)), "bias": jnp.ones((3,))},
                    "head": {"kernel": jnp.ones((3, 2))}}, "method": {}}


def cfg(**kw):
  c = config_lib.train_config().optim
  c.update(dict(name="sgd", lr=0.1, weight_decay=0.0, warmup_steps=0, schedule="constant"))
  c.update(kw)
  return c


def one_update(c, grads=None):
  p = params()
  tx, _ = optimizers.make_optimizer(c, 100, p)
  g = grads or jax.tree.map(jnp.ones_like, p)
  u, _ = tx.update(g, tx.init(p), p)
  return u, tx.init(p)


def test_lr_multipliers_scale_each_group_first_match_wins():
  u, _ = one_update(cfg(lr_mults=(("head", 10.0), ("conv/bias", 0.5), ("conv", 2.0))))
  np.testing.assert_allclose(u["model"]["head"]["kernel"], -1.0)
  np.testing.assert_allclose(u["model"]["conv"]["bias"], -0.05)
  np.testing.assert_allclose(u["model"]["conv"]["kernel"], -0.2)


def test_freeze_gives_zero_updates_and_no_state():
  c = cfg(name="adam", freeze="conv")
  u, state = one_update(c)
  np.testing.assert_array_equal(u["model"]["conv"]["kernel"], 0.0)
  assert np.all(np.asarray(u["model"]["head"]["kernel"]) < 0)
  adam_leaves = sum(x.size for x in jax.tree.leaves(state))
  assert adam_leaves == 2 * 6 + 2  # mu, nu of the 3x2 head kernel only; Adam and schedule counts
  with pytest.raises(ValueError, match="freezes every parameter"):
    one_update(cfg(freeze="."))


def test_warmup_cosine_schedule_and_coupled_weight_decay():
  c = cfg(schedule="cosine", warmup_steps=10, lr=1.0)
  s = optimizers.learning_rate_schedule(c, 110)
  assert float(s(0)) == 0.0 and float(s(5)) == pytest.approx(0.5)
  assert float(s(10)) == pytest.approx(1.0)
  assert float(s(60)) == pytest.approx(0.5, abs=1e-6)  # half way through the cosine
  u, _ = one_update(cfg(weight_decay=0.1), grads=jax.tree.map(jnp.zeros_like, params()))
  np.testing.assert_allclose(u["model"]["conv"]["kernel"], -0.1 * 0.1)  # decays weights
  np.testing.assert_allclose(u["model"]["conv"]["bias"], 0.0)            # not biases


def test_clipping_bounds_the_global_norm():
  g = jax.tree.map(lambda x: 100.0 * jnp.ones_like(x), params())
  u, _ = one_update(cfg(clip_norm=1.0, lr=1.0), grads=g)
  assert float(optax.tree.norm(u)) == pytest.approx(1.0, rel=1e-5)
