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


def test_lars_equals_optax_lars():
  """Our LARS takes each trust-ratio norm once; the steps are optax.lars' (a zero leaf and a
  bias, which gets neither decay nor the trust ratio, included)."""
  import optax
  from repsim_jax.optim import optimizers as opt
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(3, 3, 4, 8)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(8,)), jnp.float32), "z": jnp.zeros((4, 4))}
  ours = opt.lars(0.1, 1e-4, 0.9)
  ref = optax.lars(0.1, weight_decay=1e-4, weight_decay_mask=opt._decay_mask,
                   trust_ratio_mask=opt._decay_mask, momentum=0.9)
  sa, sb, pa, pb = ours.init(params), ref.init(params), params, params
  for _ in range(3):
    g = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
    ua, sa = ours.update(g, sa, pa)
    ub, sb = ref.update(g, sb, pb)
    pa, pb = optax.apply_updates(pa, ua), optax.apply_updates(pb, ub)
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
  assert float(jnp.abs(pa["w"] - params["w"]).max()) > 0
