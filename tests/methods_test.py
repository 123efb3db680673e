"""Each fine-tuning method's defining behaviour."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from repsim_jax import config_lib, methods, metric_writers, parallel, similarity, train
from repsim_jax.checkpoint import load_run_variables
from repsim_jax.methods import repsim
from repsim_jax.optim import stiefel
from train_test import max_rel_err, tiny_config


def on_axis(fn, *args):
  """Runs `fn` with the data axis bound (one device), as inside the trainer's step."""
  return jax.vmap(lambda *a: fn(*a), axis_name=parallel.AXIS)(
      *jax.tree.map(lambda x: jnp.asarray(x)[None], args))


def random_orthogonal(rng, d, proper=False):
  q, r = np.linalg.qr(rng.normal(size=(d, d)))
  q = q * np.sign(np.diag(r))
  if proper and np.linalg.det(q) < 0:
    q[:, 0] *= -1
  return q


def repsim_term(mode, f, p, q=None):
  cfg = config_lib.method_config("repsim", q_mode=mode)
  m = methods.get_method(cfg)
  params = {"model": {}, "method": {} if q is None else {repsim.Q_KEY: {"pre_logits": q}}}
  def term_and_diagnostics(f, p, params):
    reps, ref_reps = {"pre_logits": f}, {"pre_logits": p}
    loss, metrics = m.loss(params, reps, ref_reps, {}, jnp.int32(0))
    return loss, {**metrics, **m.diagnostics(params, reps, ref_reps)}

  loss, metrics = on_axis(term_and_diagnostics, f, p, params)
  return float(loss[0]), jax.tree.map(lambda x: float(x[0]), metrics)


def test_repsim_at_procrustes_q_is_the_procrustes_distance_and_rotation_invariant():
  rng = np.random.default_rng(0)
  f = rng.normal(size=(64, 8))
  p = f @ random_orthogonal(rng, 8) + 0.3 * rng.normal(size=(64, 8))
  term, metrics = repsim_term("procrustes", f, p)
  assert term == pytest.approx(float(similarity.procrustes_distance(f, p)), rel=1e-4)
  rotated, _ = repsim_term("procrustes", f @ random_orthogonal(rng, 8), p)
  assert rotated == pytest.approx(term, rel=1e-4)
  # The identity baseline is not invariant: rotating F changes it.
  ident, _ = repsim_term("identity", f, p)
  ident_rot, _ = repsim_term("identity", f @ random_orthogonal(rng, 8), p)
  assert abs(ident - ident_rot) > 0.1
  assert metrics["cka/pre_logits"] == pytest.approx(float(similarity.linear_cka(f, p)), rel=1e-4)


@pytest.mark.parametrize("d_f,d_p", [(32, 32), (40, 24)])
def test_procrustes_term_with_fewer_examples_than_features(d_f, d_p):
  # n < d: the n × n route gives the d × d SVD route's value and gradient.
  rng = np.random.default_rng(3)
  f = repsim.normalize(jnp.asarray(rng.normal(size=(12, d_f)), jnp.float32))
  p = repsim.normalize(jnp.asarray(rng.normal(size=(12, d_p)), jnp.float32))

  def full(f):
    q = jax.lax.stop_gradient(repsim.procrustes_q(f, p))
    with jax.default_matmul_precision("highest"):  # no TF32 in the reference on GPUs
      return jnp.sum((f @ q - p) ** 2)

  np.testing.assert_allclose(repsim.procrustes_term(f, p), full(f), rtol=1e-5)
  np.testing.assert_allclose(jax.grad(lambda f: repsim.procrustes_term(f, p))(f),
                             jax.grad(full)(f), rtol=1e-4, atol=1e-6)
  if d_f == d_p:  # square Q: the minimum is the Procrustes distance
    np.testing.assert_allclose(repsim.procrustes_term(f, p), similarity.procrustes_distance(f, p),
                               rtol=1e-4)


def test_learned_q_converges_to_the_procrustes_minimum():
  # A square Q moved by retractions from I stays in SO(d) (det +1: the manifold O(d) has two
  # components), so the target rotation is a proper one.
  rng = np.random.default_rng(1)
  f = rng.normal(size=(128, 6)).astype(np.float32)
  p = (f @ random_orthogonal(rng, 6, proper=True) + 0.2 * rng.normal(size=(128, 6))).astype(np.float32)
  fn, pn = repsim.normalize(jnp.asarray(f)), repsim.normalize(jnp.asarray(p))
  target = float(jnp.sum((fn @ repsim.procrustes_q(fn, pn) - pn) ** 2))
  q = stiefel.identity_init(6, 6)
  tx = stiefel.stiefel_sgd(0.2, momentum=0.9)
  state = tx.init(q)

  @jax.jit
  def step(q, state):
    g = jax.grad(lambda q: jnp.sum((fn @ q - pn) ** 2))(q)
    u, state = tx.update(g, state, q)
    return optax.apply_updates(q, u), state

  for _ in range(300):
    q, state = step(q, state)
  learned, metrics = repsim_term("learned", f, p, q)
  assert learned == pytest.approx(target, rel=1e-3, abs=1e-5)
  assert metrics["orth_err/pre_logits"] < 1e-5


def test_cka_mode_is_one_minus_cka():
  rng = np.random.default_rng(2)
  f, p = rng.normal(size=(40, 5)), rng.normal(size=(40, 5))
  term, _ = repsim_term("cka", f, p)
  assert term == pytest.approx(1 - float(similarity.linear_cka(f, p)), rel=1e-5)


def test_bss_penalises_the_smallest_singular_values():
  rng = np.random.default_rng(3)
  u, _ = np.linalg.qr(rng.normal(size=(32, 4)))
  v = random_orthogonal(rng, 4)
  s = np.array([5.0, 3.0, 0.5, 0.2])
  f = (u * s) @ v.T
  for k, expected in [(1, 0.2 ** 2), (2, 0.2 ** 2 + 0.5 ** 2)]:
    m = methods.get_method(config_lib.method_config("bss", bss_k=k, lam=1.0))
    loss, _ = on_axis(lambda f: m.loss({}, {"pre_logits": f}, None, None, jnp.int32(0)), f)
    assert float(loss[0]) == pytest.approx(expected, rel=1e-4)


def test_l2sp_gradient_at_the_pretrained_weights():
  rng = np.random.default_rng(4)
  model_params = {"conv": {"kernel": rng.normal(size=(3, 3))}, "head": {"kernel": rng.normal(size=(3, 2))}}
  cfg = config_lib.method_config("l2sp", alpha=0.7, beta=0.3)
  m = methods.get_method(cfg)
  ref = {"params": model_params}
  grad = jax.grad(lambda p: m.loss(p, None, None, ref, 0)[0])({"model": model_params, "method": {}})
  # At w = w0 the backbone term has zero gradient; the head gets β·w.
  np.testing.assert_allclose(grad["model"]["conv"]["kernel"], 0.0, atol=0)
  np.testing.assert_allclose(grad["model"]["head"]["kernel"], 0.3 * model_params["head"]["kernel"], rtol=1e-6)
  moved = jax.tree.map(lambda x: x + 1.0, model_params["conv"])
  g2 = jax.grad(lambda p: m.loss(p, None, None, ref, 0)[0])(
      {"model": {"conv": moved, "head": model_params["head"]}, "method": {}})
  np.testing.assert_allclose(g2["model"]["conv"]["kernel"], 0.7 * np.ones((3, 3)), rtol=1e-6)


def test_delta_is_the_feature_map_distance():
  rng = np.random.default_rng(5)
  a, b = rng.normal(size=(4, 3, 3, 6)), rng.normal(size=(4, 3, 3, 6))
  cfg = config_lib.method_config("delta", lam=2.0, beta=0.0, layers=("layer1",))
  m = methods.get_method(cfg)
  loss, _ = m.loss({"model": {"head": {"kernel": np.zeros((2, 2))}}}, {"layer1": a}, {"layer1": b},
                   None, jnp.int32(0))
  assert float(loss) == pytest.approx(2.0 * np.mean(np.sum((a - b) ** 2, -1)), rel=1e-5)


@pytest.mark.parametrize("name", ["sam", "asam"])
def test_sam_gradient_is_taken_at_the_ascent_point(name):
  cfg = config_lib.method_config(name, rho=0.1, eta=0.01)
  m = methods.get_method(cfg)
  a = jnp.array([[3.0, 0.5], [0.5, 1.0]])
  loss = lambda p: 0.5 * p["model"]["w"] @ a @ p["model"]["w"] + jnp.sum(p["model"]["w"] ** 3)
  params = {"model": {"w": jnp.array([1.0, -2.0])}, "method": {}}
  grad_fn = lambda p: (jax.grad(loss)(p), None)
  g = jax.grad(loss)(params)["model"]["w"]
  w = params["model"]["w"]
  if name == "sam":
    eps = 0.1 * g / jnp.linalg.norm(g)
  else:
    t = jnp.abs(w) + 0.01
    eps = 0.1 * t * t * g / jnp.linalg.norm(t * g)
  expected = jax.grad(loss)({"model": {"w": w + eps}, "method": {}})["model"]["w"]
  grads, _ = on_axis(lambda p: m.gradients(grad_fn, p), params)
  np.testing.assert_allclose(grads["model"]["w"][0], expected, rtol=1e-5)


def test_linear_probe_leaves_the_backbone_bit_identical(tmp_path):
  pre = str(tmp_path / "pre")
  train.train_and_evaluate(tiny_config(tmp_path, **{"train.num_steps": 5, "train.eval_splits": ()}),
                           pre)
  cfg = tiny_config(tmp_path, **{"model.init": pre, "train.num_steps": 10, "train.eval_splits": (),
                                 "method.name": "linear_probe"})
  train.train_and_evaluate(cfg, str(tmp_path / "lp"))
  before, after = load_run_variables(pre), load_run_variables(str(tmp_path / "lp"))
  for key in ("params", "batch_stats"):
    b = {k: v for k, v in before[key].items() if k != "head"}
    a = {k: v for k, v in after[key].items() if k != "head"}
    assert jax.tree.all(jax.tree.map(np.array_equal, a, b))


def test_lp_ft_probes_first_then_trains_everything(tmp_path):
  pre = str(tmp_path / "pre")
  train.train_and_evaluate(tiny_config(tmp_path, **{"train.num_steps": 5, "train.eval_splits": ()}),
                           pre)
  cfg = tiny_config(tmp_path, **{"model.init": pre, "train.eval_splits": (), "method.name": "lp_ft",
                                 "method.lp_steps": 6, "train.checkpoint_every": 6,
                                 "train.num_steps": 8})
  wd = str(tmp_path / "lpft")
  train.train_and_evaluate(cfg, wd)
  before = load_run_variables(pre)
  backbone = lambda v: {k: x for k, x in v["params"].items() if k != "head"}  # noqa: E731
  for step, changed in ((6, False), (8, True)):
    after = load_run_variables(wd, step)
    same = jax.tree.all(jax.tree.map(np.array_equal, backbone(after), backbone(before)))
    assert same != changed
    assert not np.array_equal(after["params"]["head"]["kernel"],
                              load_run_variables(wd, 6 if changed else 8)["params"]["head"]["kernel"])


@pytest.mark.parametrize("mode", ["learned", pytest.param("covariance", marks=pytest.mark.slow)])
def test_repsim_trains_data_parallel_like_one_device(tmp_path, mode):
  """The regulariser uses global-batch statistics, so 8 devices = 1 device."""
  pre = str(tmp_path / "pre")
  train.train_and_evaluate(tiny_config(tmp_path, **{"train.num_steps": 5, "train.eval_splits": ()}),
                           pre)
  finals = []
  for n in (1, 8):
    cfg = tiny_config(tmp_path, **{"model.init": pre, "train.num_steps": 10, "train.eval_splits": (),
                                   "method.name": "repsim", "method.q_mode": mode,
                                   "method.lam": 5.0, "parallel.num_devices": n,
                                   "train.checkpoint_every": 0, "train.log_every": 4})
    wd = str(tmp_path / f"{mode}{n}")
    finals.append(train.fit(cfg, wd).state)
    # Diagnostics are computed on exactly the logged steps (every 4th and the last).
    rows = [r for r in metric_writers.read_metrics(wd) if r["split"] == "train"]
    assert [r["step"] for r in rows] == [4, 8, 10]
    for r in rows:
      assert 0 <= r["orth_err/pre_logits"] < 1e-5
      if mode == "learned":
        assert 0.5 < r["cka/pre_logits"] <= 1.0 + 1e-6
  # float32 sums over 8 shards vs 1 differ in order and λ = 5 amplifies that a little (2e-4 with
  # the XNNPACK/YNNPACK kernels of an AVX-512 CPU); a regulariser on per-device statistics would
  # differ at O(1e-1).
  assert max_rel_err(finals[1].params, finals[0].params) <= 5e-4
  q = finals[1].params["method"][repsim.Q_KEY]["pre_logits"]
  assert float(stiefel.orthogonality_error(jnp.asarray(q))) < 1e-5
