"""Tests for repsim_jax.models: registry, representations, BatchNorm, head replacement, dtypes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from repsim_jax.models import MODEL_NAMES, get_model, replace_head

_TINY_VIT = dict(image_size=32, patch_size=8, depth=2, width=32, heads=4, mlp_dim=64)


def _shapes(model, x_shape, **apply_kw):
  x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  out = jax.eval_shape(jax.jit(lambda v, x: model.apply(v, x, **apply_kw)), variables, x)
  return variables, out


@functools.lru_cache(maxsize=None)
def _jitted_apply(model, train, mutable):
  return jax.jit(lambda v, x: model.apply(v, x, train=train, mutable=mutable or False))


def _apply(model, variables, x, train=False, mutable=()):
  """Jitted, cached apply: one XLA compile per (model, mode) instead of eager dispatch."""
  return _jitted_apply(model, train, tuple(mutable))(variables, x)


def _init(model, x, seed):
  """Random variables of the right shapes without model.init.

  Random-key initialisers (threefry) cost seconds of CPU compile per model; the tests only
  need well-scaled, non-trivial values, so they draw them with NumPy (He-scaled kernels,
  non-unit norm scales, non-zero biases and BatchNorm statistics).
  """
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  rng = np.random.default_rng(seed)

  def draw(path, sds):
    name, shape = path[-1].key, sds.shape
    if name == "kernel":
      value = rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
    elif name in ("scale", "var"):
      value = 1.0 + 0.2 * rng.uniform(-1, 1, size=shape)
    else:  # bias, mean, cls_token, pos_embed
      value = 0.1 * rng.normal(size=shape)
    return jnp.asarray(value, jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _count(tree):
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


def test_registry_names_and_errors():
  assert set(MODEL_NAMES) == {"resnet18", "resnet50", "resnet50_keras", "resnet_small",
                              "vit_ti16", "vit_s16",
                              "vit_b16", "small_cnn", *(f"vit_{s}14{r}_dinov2" for s in "sbl"
                                                        for r in ("", "_reg4"))}
  with pytest.raises(ValueError, match="name") as e:
    get_model("resnet1000", 10)
  for n in MODEL_NAMES:
    assert n in str(e.value)
  with pytest.raises(ValueError, match="num_classes"):
    get_model("resnet18", -1)
  with pytest.raises(ValueError, match="kwargs.*'depth'"):
    get_model("resnet18", 10, depth=3)


# Reference parameter counts of torchvision resnet18/resnet50, keras.applications.ResNet50 (its
# trainable weights) and timm vit_{tiny,small,base}_patch16_224 (1000 classes); the ResNet
# counts exclude BatchNorm running statistics.
@pytest.mark.parametrize("name,expected", [
    ("resnet18", 11_689_512), ("resnet50", 25_557_032), ("resnet50_keras", 25_583_592),
    ("vit_ti16", 5_717_416),
    ("vit_s16", 22_050_664), ("vit_b16", 86_567_656)])
def test_param_counts_match_reference_implementations(name, expected):
  variables, _ = _shapes(get_model(name, 1000), (1, 224, 224, 3))
  assert _count(variables["params"]) == expected


def _expected_reps(name, n, s):
  if name.startswith("resnet"):
    width = 16 if name == "resnet_small" else 64
    exp = 4 if name.startswith("resnet50") else 1
    out = {"stem": (n, s // 4, s // 4, width)}
    for i in range(4):
      hw = s // 4 // 2**i
      out[f"layer{i + 1}"] = (n, hw, hw, width * 2**i * exp)
    out["pre_logits"] = (n, width * 8 * exp)
    return out
  if name.startswith("vit"):
    d = {"ti": 192, "s": 384, "b": 768, "l": 1024}[name.split("_")[1][:-2]]
    patch, regs = int(name.split("_")[1][-2:]), 4 if "reg4" in name else 0
    t = (s // patch) ** 2 + 1 + regs
    depth = 24 if d == 1024 else 12
    return {**{f"block{i}": (n, t, d) for i in range(depth)}, "pre_logits": (n, d)}
  return {"block1": (n, s // 2, s // 2, 16), "block2": (n, s // 4, s // 4, 32),
          "block3": (n, s // 8, s // 8, 64), "pre_logits": (n, 64)}


@pytest.mark.parametrize("name", [n for n in MODEL_NAMES if not n.startswith("vit_l14")])
def test_reps_keys_order_and_shapes(name):
  size = 28 if "14" in name else 32  # a multiple of the patch
  kw = {"image_size": size} if name.startswith("vit") else {}
  model = get_model(name, 7, **kw)
  variables, (logits, reps) = _shapes(model, (3, size, size, 3))
  expected = _expected_reps(name, 3, size)
  # Order survives jit (shallow to deep, pre_logits last).
  assert list(reps) == list(expected)
  assert {k: tuple(v.shape) for k, v in reps.items()} == expected
  assert logits.shape == (3, 7) and logits.dtype == jnp.float32
  assert ("batch_stats" in variables) == (not name.startswith("vit"))
  paths = traverse_util.flatten_dict(variables["params"], sep="/")
  assert paths["head/kernel"].shape == (expected["pre_logits"][1], 7)
  assert all(isinstance(p, str) for p in paths)
  assert [p for p in paths if p.startswith("head")] == ["head/bias", "head/kernel"]


def test_param_paths_follow_torchvision_names():
  variables, _ = _shapes(get_model("resnet50", 10), (1, 64, 64, 3))
  paths = traverse_util.flatten_dict(variables["params"], sep="/")
  # Bottleneck v1.5: the stride-2 conv of layer2_0 is the 3x3 conv2; downsample is 1x1.
  assert paths["layer2_0/conv2/kernel"].shape == (3, 3, 128, 128)
  assert paths["layer2_0/downsample_conv/kernel"].shape == (1, 1, 256, 512)
  assert paths["layer1_0/downsample_bn/scale"].shape == (256,)
  assert "layer1_1/downsample_conv/kernel" not in paths
  stats = traverse_util.flatten_dict(variables["batch_stats"], sep="/")
  assert set(stats) == {p[:-len("scale")] + s for p in paths if p.endswith("/scale")
                        for s in ("mean", "var")}


def test_cifar_stem_keeps_resolution():
  _, (_, reps) = _shapes(get_model("resnet_small", 4, stem="cifar"), (2, 28, 28, 1))
  assert reps["stem"].shape == (2, 28, 28, 16)
  assert reps["layer4"].shape == (2, 4, 4, 128)


def _np_conv3x3(x, k):
  """Plain NumPy 'same' 3x3 conv, stride 1, zero padding 1. x (N,H,W,C), k (3,3,C,O)."""
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  h, w = x.shape[1:3]
  return sum(np.einsum("nhwc,co->nhwo", xp[:, i:i + h, j:j + w], k[i, j])
             for i in range(3) for j in range(3))


def test_batchnorm_running_stats_closed_form():
  model = get_model("small_cnn", 3)
  x = np.random.default_rng(0).normal(size=(4, 16, 16, 3)).astype(np.float32)
  variables = _init(model, x, 1)
  _, updates = _apply(model, variables, x, train=True, mutable=["batch_stats"])
  conv = _np_conv3x3(x.astype(np.float64),
                     np.asarray(variables["params"]["block1"]["conv"]["kernel"], np.float64))
  new = updates["batch_stats"]["block1"]["bn"]
  old = jax.tree.map(np.asarray, variables["batch_stats"]["block1"]["bn"])
  # torchvision's momentum 0.1 = flax's 0.9; biased batch variance.
  np.testing.assert_allclose(new["mean"], 0.9 * old["mean"] + 0.1 * conv.mean(axis=(0, 1, 2)),
                             atol=1e-5)
  np.testing.assert_allclose(new["var"], 0.9 * old["var"] + 0.1 * conv.var(axis=(0, 1, 2)),
                             rtol=1e-5)


def test_train_mode_equals_eval_mode_with_batch_statistics():
  # Invariance: train-mode BatchNorm = eval-mode BatchNorm whose running stats are the batch's.
  model = get_model("resnet_small", 5)
  x = np.random.default_rng(1).normal(size=(6, 32, 32, 3)).astype(np.float32)
  variables = _init(model, x, 2)
  (logits_train, _), updates = _apply(model, variables, x, train=True,
                                       mutable=["batch_stats"])
  batch_stats = jax.tree.map(lambda new, old: (new - 0.9 * old) / 0.1,
                             updates["batch_stats"], variables["batch_stats"])
  logits_eval, _ = _apply(model, {"params": variables["params"], "batch_stats": batch_stats}, x)
  np.testing.assert_allclose(logits_eval, logits_train, atol=2e-4, rtol=2e-4)
  # ... and differs from eval mode with the initial statistics.
  logits_init, _ = _apply(model, variables, x)
  assert np.abs(np.asarray(logits_init) - np.asarray(logits_train)).max() > 1e-2


def test_bn_axis_name_synchronises_statistics_across_shards():
  x = np.random.default_rng(2).normal(size=(8, 16, 16, 3)).astype(np.float32)
  full = get_model("small_cnn", 3)
  variables = _init(full, x, 3)
  (logits_full, _), stats_full = _apply(full, variables, x, train=True, mutable=["batch_stats"])

  def sharded(model):
    fn = lambda xs: model.apply(variables, xs, train=True, mutable=["batch_stats"])
    return jax.jit(jax.vmap(fn, axis_name="data"))(x.reshape(2, 4, 16, 16, 3))

  (logits_sync, _), stats_sync = sharded(get_model("small_cnn", 3, bn_axis_name="data"))
  np.testing.assert_allclose(np.asarray(logits_sync).reshape(8, 3), logits_full, atol=1e-5)
  for a, b in zip(jax.tree.leaves(stats_sync), jax.tree.leaves(stats_full)):
    np.testing.assert_allclose(a[0], b, atol=1e-6)
    np.testing.assert_allclose(a[1], b, atol=1e-6)
  # Without the axis name each shard normalises with its own statistics.
  (logits_local, _), _ = sharded(get_model("small_cnn", 3))
  assert np.abs(np.asarray(logits_local).reshape(8, 3) - logits_full).max() > 1e-4


@pytest.mark.parametrize("name,kw", [("resnet_small", {}), ("vit_ti16", _TINY_VIT)])
def test_replace_head_keeps_backbone_and_builds_new_task(name, kw):
  x = np.random.default_rng(3).normal(size=(2, 32, 32, 3)).astype(np.float32)
  old = get_model(name, 10, **kw)
  variables = _init(old, x, 4)
  params = replace_head(variables["params"], 4, jax.random.key(5))
  assert params["head"]["kernel"].shape == (variables["params"]["head"]["kernel"].shape[0], 4)
  np.testing.assert_array_equal(params["head"]["bias"], np.zeros(4))
  flat_old = traverse_util.flatten_dict(variables["params"])
  flat_new = traverse_util.flatten_dict(params)
  backbone = [p for p in flat_old if p[0] != "head"]
  assert set(backbone) == {p for p in flat_new if p[0] != "head"}
  for p in backbone:
    np.testing.assert_array_equal(flat_new[p], flat_old[p])

  new_vars = {**variables, "params": params}
  logits, reps = _apply(get_model(name, 4, **kw), new_vars, x)
  _, reps_old = _apply(old, variables, x)
  np.testing.assert_array_equal(reps["pre_logits"], reps_old["pre_logits"])
  expected = reps["pre_logits"] @ params["head"]["kernel"] + params["head"]["bias"]
  np.testing.assert_allclose(logits, expected, atol=1e-5)

  # num_classes=0: no head, logits are the features.
  headless = replace_head(variables["params"], 0, jax.random.key(6))
  assert "head" not in headless
  feats, reps0 = _apply(get_model(name, 0, **kw), {**variables, "params": headless}, x)
  np.testing.assert_array_equal(feats, reps0["pre_logits"])
  np.testing.assert_array_equal(feats, reps_old["pre_logits"])
  with pytest.raises(ValueError, match="feature_dim"):
    replace_head(headless, 3, jax.random.key(0))
  with pytest.raises(ValueError, match="params"):
    replace_head(variables, 3, jax.random.key(0))


@pytest.mark.parametrize("name,kw", [("resnet_small", {}), ("small_cnn", {}),
                                     ("vit_ti16", _TINY_VIT)])
def test_bfloat16_computation_keeps_float32_params(name, kw):
  x = np.random.default_rng(4).normal(size=(4, 32, 32, 3)).astype(np.float32)
  model16 = get_model(name, 6, dtype=jnp.bfloat16, **kw)
  variables = _init(model16, x, 7)
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(variables))
  logits16, reps16 = _apply(model16, variables, x)
  assert logits16.dtype == jnp.float32 and reps16["pre_logits"].dtype == jnp.float32
  first = next(iter(reps16))
  assert reps16[first].dtype == jnp.bfloat16
  # Same parameters in float32 give nearly the same function.
  logits32, _ = _apply(get_model(name, 6, **kw), variables, x)
  scale = np.abs(np.asarray(logits32)).max()
  assert np.isfinite(np.asarray(logits16)).all()
  assert np.abs(np.asarray(logits16) - np.asarray(logits32)).max() <= 0.05 * scale + 1e-3
  # bf16 training step: batch statistics updated in float32.
  _, upd = _apply(model16, variables, x, train=True, mutable=["batch_stats"])
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(upd))


def _np_layer_norm(x, p, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _np_vit(params, x, cfg):
  """Independent NumPy float64 forward of a timm-layout ViT (per-head loop, erf GELU)."""
  from scipy.special import erf
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  n, s = x.shape[0], cfg["image_size"]
  ps, d, h = cfg["patch_size"], cfg["width"], cfg["heads"]
  g = s // ps
  patches = x.reshape(n, g, ps, g, ps, 3).transpose(0, 1, 3, 2, 4, 5).reshape(n, g * g, -1)
  tok = patches @ p["patch_embed"]["kernel"].reshape(-1, d) + p["patch_embed"]["bias"]
  tok = np.concatenate([np.repeat(p["cls_token"], n, 0), tok], 1) + p["pos_embed"]
  dh = d // h
  for i in range(cfg["depth"]):
    b = p[f"blocks_{i}"]
    y = _np_layer_norm(tok, b["norm1"])
    qkv = y @ b["attn"]["qkv"]["kernel"] + b["attn"]["qkv"]["bias"]
    heads = []
    for j in range(h):
      q, k, v = (qkv[..., c * d + j * dh: c * d + (j + 1) * dh] for c in range(3))
      a = q @ k.transpose(0, 2, 1) / np.sqrt(dh)
      a = np.exp(a - a.max(-1, keepdims=True))
      heads.append((a / a.sum(-1, keepdims=True)) @ v)
    tok = tok + np.concatenate(heads, -1) @ b["attn"]["proj"]["kernel"] + b["attn"]["proj"]["bias"]
    y = _np_layer_norm(tok, b["norm2"]) @ b["mlp"]["fc1"]["kernel"] + b["mlp"]["fc1"]["bias"]
    y = 0.5 * y * (1 + erf(y / np.sqrt(2)))
    tok = tok + y @ b["mlp"]["fc2"]["kernel"] + b["mlp"]["fc2"]["bias"]
  cls = _np_layer_norm(tok, p["norm"])[:, 0]
  return cls @ p["head"]["kernel"] + p["head"]["bias"], cls


def test_vit_matches_numpy_reference():
  model = get_model("vit_ti16", 5, precision=jax.lax.Precision.HIGHEST, **_TINY_VIT)
  x = np.random.default_rng(5).normal(size=(2, 32, 32, 3)).astype(np.float32)
  params = _init(model, x, 8)["params"]  # non-trivial norms, biases, cls and positions
  logits, reps = _apply(model, {"params": params}, x)
  ref_logits, ref_cls = _np_vit(params, x.astype(np.float64), _TINY_VIT)
  np.testing.assert_allclose(reps["pre_logits"], ref_cls, atol=1e-4)
  np.testing.assert_allclose(logits, ref_logits, atol=1e-4)
  with pytest.raises(ValueError, match="x: expected .* multiples of the patch size"):
    model.apply({"params": params}, np.zeros((1, 36, 36, 3), np.float32))
  # Another multiple of the patch resamples the position embeddings: the same grid does not.
  same = _apply(model, {"params": params}, np.asarray(x))[0]
  np.testing.assert_array_equal(same, logits)
  assert _apply(model, {"params": params}, np.zeros((1, 64, 64, 3), np.float32))[0].shape == (1, 5)


def test_position_resampling_weights_match_pytorch_antialiased_bicubic():
  from repsim_jax.models import vit
  # Upsampling by 2 (torch: F.interpolate(torch.arange(4.)[None, None], 8, mode="bicubic",
  # antialias=True)): rows sum to one, the taps mirror around each output's centre.
  m = vit.resize_matrix(4, 8)
  np.testing.assert_allclose(m.sum(1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(m[::-1, ::-1], m, atol=1e-7)
  # Same size: the identity; a linear ramp stays linear away from the borders (cubic kernels
  # reproduce linear functions).
  np.testing.assert_allclose(vit.resize_matrix(5, 5), np.eye(5), atol=1e-7)
  ramp = vit.resize_matrix(6, 9) @ np.arange(6.0)
  centres = (np.arange(9) + 0.5) * 6 / 9 - 0.5
  np.testing.assert_allclose(ramp[2:-2], centres[2:-2], atol=1e-5)
