"""Tests for repsim_jax.models.convert: reference fixtures, round trips and error messages."""

import functools
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import save_file

from repsim_jax.models import get_model
from repsim_jax.models import convert, pth

FIXTURES = Path(__file__).parents[1].parent / "shared" / "fixtures"
_TINY_VIT = dict(depth=2, width=32, heads=4, mlp_dim=64)  # image 32, patch 8 from the file


def _fixture(stem):
  if not (FIXTURES / f"{stem}.safetensors").is_file():
    pytest.skip(f"reference fixture {stem} not found under {FIXTURES} (../shared is only "
                f"present in the project's CI / dev checkout)")
  return FIXTURES / f"{stem}.safetensors", np.load(FIXTURES / f"{stem}_io.npz")


@functools.lru_cache(maxsize=None)
def _jitted_apply(model):
  return jax.jit(lambda v, x: model.apply(v, x, train=False))


def _random_variables(model, x_shape, seed):
  """Well-scaled random variables of the model's shapes, drawn with NumPy (no init compile)."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x_shape)))
  rng = np.random.default_rng(seed)

  def draw(path, sds):
    name, shape = path[-1].key, sds.shape
    if name == "kernel":
      return np.float32(np.sqrt(2.0 / np.prod(shape[:-1]))) * rng.normal(size=shape).astype(
          np.float32)
    if name in ("scale", "var"):
      return (1.0 + 0.2 * rng.uniform(-1, 1, size=shape)).astype(np.float32)
    return (0.1 * rng.normal(size=shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _assert_same_tree(a, b):
  fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
  assert set(fa) == set(fb)
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=str(k))


# ---------------------------------------------------------------------------------------------
# Reference fixtures made with torchvision / timm (the acceptance test).

@pytest.mark.parametrize("stem,loader,arch,kw", [
    ("torchvision_resnet18", convert.load_torchvision_resnet, "resnet18", {}),
    ("torchvision_bottleneck_1111", convert.load_torchvision_resnet, "resnet50",
     {"stage_sizes": (1, 1, 1, 1)}),
    ("timm_vit_tiny_patch16_224", convert.load_timm_vit, "vit_ti16", {}),
])
def test_converted_models_reproduce_reference_outputs(stem, loader, arch, kw):
  path, io = _fixture(stem)
  variables = loader(path, arch=arch, **kw)
  num_classes = variables["params"]["head"]["bias"].shape[0]
  assert num_classes == io["logits"].shape[1]
  model = get_model(arch, num_classes, precision=jax.lax.Precision.HIGHEST, **kw)
  x = jnp.asarray(io["input"].transpose(0, 2, 3, 1))  # NCHW -> NHWC
  logits, reps = _jitted_apply(model)(variables, x)
  assert np.abs(np.asarray(reps["pre_logits"]) - io["pre_logits"]).max() <= 1e-4
  assert np.abs(np.asarray(logits) - io["logits"]).max() <= 1e-4
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(variables))


# ---------------------------------------------------------------------------------------------
# Google ViT .npz: written here from timm-layout Flax params (the inverse mapping), read back.

def _to_google_npz(params, heads, layout="vision_transformer", prefix=""):
  """Writes Flax timm-layout ViT params in google-research/vision_transformer or big_vision keys."""
  p = jax.tree.map(np.asarray, params)
  d = p["pos_embed"].shape[-1]
  dh = d // heads
  ln1, mha, ln2, mlp = {"vision_transformer": ("LayerNorm_0", "MultiHeadDotProductAttention_1",
                                               "LayerNorm_2", "MlpBlock_3"),
                        "big_vision": ("LayerNorm_0", "MultiHeadDotProductAttention_0",
                                       "LayerNorm_1", "MlpBlock_0")}[layout]
  out = {"embedding/kernel": p["patch_embed"]["kernel"], "embedding/bias": p["patch_embed"]["bias"],
         "cls": p["cls_token"], "Transformer/encoder_norm/scale": p["norm"]["scale"],
         "Transformer/encoder_norm/bias": p["norm"]["bias"], "head/kernel": p["head"]["kernel"],
         "head/bias": p["head"]["bias"]}
  if layout == "vision_transformer":
    out["Transformer/posembed_input/pos_embedding"] = p["pos_embed"]
  else:  # big_vision: positions of the patch grid only; cls is prepended after adding them.
    assert not p["pos_embed"][:, 0].any()
    out["pos_embedding"] = p["pos_embed"][:, 1:]
  i = 0
  while f"blocks_{i}" in p:
    b, bp = p[f"blocks_{i}"], f"Transformer/encoderblock_{i}/"
    for name, src in ((ln1, b["norm1"]), (ln2, b["norm2"])):
      out[f"{bp}{name}/scale"], out[f"{bp}{name}/bias"] = src["scale"], src["bias"]
    qkv_k, qkv_b = b["attn"]["qkv"]["kernel"], b["attn"]["qkv"]["bias"]
    for j, name in enumerate(("query", "key", "value")):
      out[f"{bp}{mha}/{name}/kernel"] = qkv_k[:, j * d:(j + 1) * d].reshape(d, heads, dh)
      out[f"{bp}{mha}/{name}/bias"] = qkv_b[j * d:(j + 1) * d].reshape(heads, dh)
    out[f"{bp}{mha}/out/kernel"] = b["attn"]["proj"]["kernel"].reshape(heads, dh, d)
    out[f"{bp}{mha}/out/bias"] = b["attn"]["proj"]["bias"]
    for j, fc in enumerate(("fc1", "fc2")):
      out[f"{bp}{mlp}/Dense_{j}/kernel"] = b["mlp"][fc]["kernel"]
      out[f"{bp}{mlp}/Dense_{j}/bias"] = b["mlp"][fc]["bias"]
    i += 1
  return {prefix + k: v for k, v in out.items()}


def test_big_vision_npz_round_trip_of_timm_fixture(tmp_path):
  path, io = _fixture("timm_vit_tiny_patch16_224")
  timm_vars = convert.load_timm_vit(path, arch="vit_ti16")
  npz = tmp_path / "ViT-Ti_16.npz"
  np.savez(npz, **_to_google_npz(timm_vars["params"], heads=3))
  variables = convert.load_big_vision_vit_npz(npz, arch="vit_ti16")
  _assert_same_tree(variables, timm_vars)
  model = get_model("vit_ti16", 1000, precision=jax.lax.Precision.HIGHEST)
  logits, _ = _jitted_apply(model)(variables, jnp.asarray(io["input"].transpose(0, 2, 3, 1)))
  assert np.abs(np.asarray(logits) - io["logits"]).max() <= 1e-4


@pytest.mark.parametrize("layout,prefix", [("vision_transformer", ""),
                                           ("vision_transformer", "opt/target/"),
                                           ("big_vision", "")])
def test_big_vision_npz_layouts_round_trip(tmp_path, layout, prefix):
  model = get_model("vit_ti16", 7, image_size=32, patch_size=8, **_TINY_VIT)
  params = _random_variables(model, (1, 32, 32, 3), seed=0)["params"]
  if layout == "big_vision":
    params["pos_embed"][:, 0] = 0.0
  npz = tmp_path / "vit.npz"
  np.savez(npz, **_to_google_npz(params, heads=4, layout=layout, prefix=prefix))
  variables = convert.load_big_vision_vit_npz(npz, arch="vit_ti16", **_TINY_VIT)
  _assert_same_tree(variables, {"params": params})


def test_big_vision_npz_errors(tmp_path):
  model = get_model("vit_ti16", 7, image_size=32, patch_size=8, **_TINY_VIT)
  params = _random_variables(model, (1, 32, 32, 3), seed=1)["params"]
  arrays = _to_google_npz(params, heads=4)
  key = "Transformer/encoderblock_1/MlpBlock_3/Dense_0/bias"
  np.savez(tmp_path / "broken.npz", **{k: v for k, v in arrays.items() if k != key})
  with pytest.raises(ValueError, match=f"broken.npz: missing key '{key}'"):
    convert.load_big_vision_vit_npz(tmp_path / "broken.npz", arch="vit_ti16", **_TINY_VIT)
  np.savez(tmp_path / "deeper.npz", **arrays)
  # The file has 2 blocks; a depth-1 model leaves block 1 unused.
  with pytest.raises(ValueError, match="deeper.npz: unexpected key 'Transformer/encoderblock_1/"):
    convert.load_big_vision_vit_npz(tmp_path / "deeper.npz", arch="vit_ti16",
                                    **{**_TINY_VIT, "depth": 1})
  np.savez(tmp_path / "gap.npz", **{k: v for k, v in arrays.items() if k != "cls"})
  with pytest.raises(ValueError, match="gap.npz: missing key 'cls'"):
    convert.load_big_vision_vit_npz(tmp_path / "gap.npz", arch="vit_ti16", **_TINY_VIT)


# ---------------------------------------------------------------------------------------------
# torchvision / timm state dicts written from random Flax variables.

def _to_torchvision(variables):
  out = {}
  for coll in ("params", "batch_stats"):
    for (*mods, leaf), v in traverse_util.flatten_dict(variables[coll]).items():
      v = np.asarray(v)
      names = []
      for m in mods:
        if m.startswith("layer"):
          stage, block = m.split("_")
          names += [stage, block]
        else:
          names.append({"head": "fc", "downsample_conv": "downsample.0",
                        "downsample_bn": "downsample.1"}.get(m, m))
      tleaf = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
               "var": "running_var"}[leaf]
      if v.ndim == 4:
        v = v.transpose(3, 2, 0, 1)
      elif v.ndim == 2:
        v = v.T
      out[".".join(names + [tleaf])] = np.ascontiguousarray(v)
      if leaf == "mean":
        out[".".join(names + ["num_batches_tracked"])] = np.array(7, np.int64)
  return out


@pytest.fixture(scope="module")
def small_resnet_state():
  model = get_model("resnet_small", 6)
  variables = _random_variables(model, (1, 32, 32, 3), seed=2)
  return variables, _to_torchvision(variables)


def test_torchvision_round_trip_and_errors(tmp_path, small_resnet_state):
  variables, state = small_resnet_state
  assert "layer1.0.bn1.num_batches_tracked" in state
  good = tmp_path / "small.safetensors"
  save_file(state, str(good))
  _assert_same_tree(convert.load_torchvision_resnet(good, arch="resnet_small"), variables)

  def write(name, sd):
    save_file(sd, str(tmp_path / name))
    return tmp_path / name

  missing = write("missing.safetensors",
                  {k: v for k, v in state.items() if k != "layer2.0.downsample.1.running_var"})
  with pytest.raises(ValueError,
                     match="missing.safetensors: missing key 'layer2.0.downsample.1.running_var'"):
    convert.load_torchvision_resnet(missing, arch="resnet_small")
  bad_shape = write("shape.safetensors",
                    {**state, "layer3.0.conv2.weight": np.zeros((64, 64, 1, 1), np.float32)})
  with pytest.raises(ValueError, match="shape.safetensors: key 'layer3.0.conv2.weight' has the "
                                       "wrong shape"):
    convert.load_torchvision_resnet(bad_shape, arch="resnet_small")
  extra = write("extra.safetensors", {**state, "layer5.0.conv1.weight": np.zeros(3, np.float32)})
  with pytest.raises(ValueError, match="extra.safetensors: unexpected key 'layer5.0.conv1.weight'"):
    convert.load_torchvision_resnet(extra, arch="resnet_small")
  # Wrong arch: resnet18's stem has 64 channels, the file 16.
  with pytest.raises(ValueError, match="small.safetensors: key .* has the wrong shape"):
    convert.load_torchvision_resnet(good, arch="resnet18")
  with pytest.raises(ValueError, match="arch"):
    convert.load_torchvision_resnet(good, arch="resnet_tiny")
  # DataParallel 'module.' prefixes are stripped.
  wrapped = write("ddp.safetensors", {"module." + k: v for k, v in state.items()})
  _assert_same_tree(convert.load_torchvision_resnet(wrapped, arch="resnet_small"), variables)


def test_headless_state_dict_gives_headless_variables(tmp_path, small_resnet_state):
  variables, state = small_resnet_state
  path = tmp_path / "features.safetensors"
  save_file({k: v for k, v in state.items() if not k.startswith("fc.")}, str(path))
  loaded = convert.load_torchvision_resnet(path, arch="resnet_small")
  assert "head" not in loaded["params"]
  _assert_same_tree(loaded["params"],
                    {k: v for k, v in variables["params"].items() if k != "head"})


def _to_timm(params):
  out = {}
  for (*mods, leaf), v in traverse_util.flatten_dict(params).items():
    v = np.asarray(v)
    names = [m.replace("blocks_", "blocks.") for m in mods]
    if names == ["patch_embed"]:
      names = ["patch_embed", "proj"]
    if leaf in ("cls_token", "pos_embed"):
      out[leaf] = v
      continue
    if leaf == "kernel":
      v = v.transpose(3, 2, 0, 1) if v.ndim == 4 else v.T
    out[".".join(names + ["weight" if leaf in ("kernel", "scale") else "bias"])] = (
        np.ascontiguousarray(v))
  return out


def test_timm_round_trip_infers_geometry(tmp_path):
  model = get_model("vit_ti16", 3, image_size=32, patch_size=8, **_TINY_VIT)
  params = _random_variables(model, (1, 32, 32, 3), seed=3)["params"]
  path = tmp_path / "tiny_vit.safetensors"
  save_file(_to_timm(params), str(path))
  _assert_same_tree(convert.load_timm_vit(path, arch="vit_ti16", **_TINY_VIT),
                    {"params": params})
  # The registry's width (192) does not fit this file.
  with pytest.raises(ValueError, match="tiny_vit.safetensors: key '.*' has the wrong shape"):
    convert.load_timm_vit(path, arch="vit_ti16")


def test_unreadable_inputs(tmp_path):
  (tmp_path / "w.ckpt").write_bytes(b"")
  with pytest.raises(ValueError, match="path: expected a .safetensors or .pth file"):
    convert.load_torchvision_resnet(tmp_path / "w.ckpt", arch="resnet18")
  with pytest.raises(FileNotFoundError):
    convert.load_timm_vit(tmp_path / "absent.safetensors", arch="vit_ti16")
  with pytest.raises(ValueError, match="expected a .npz"):
    convert.load_big_vision_vit_npz(tmp_path / "w.ckpt", arch="vit_ti16")


OURS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")  # .pth by torch


def test_pth_tensors_of_every_storage_type_without_torch():
  # dtypes.pth was written by torch.save (tests/fixtures/make_pth.py); no torch needed to read it.
  got = pth.load(os.path.join(OURS, "dtypes.pth"), "dtypes.pth")
  expected = np.load(os.path.join(OURS, "dtypes_expected.npz"))
  assert sorted(got) == sorted(expected.files)
  for k in expected.files:
    np.testing.assert_array_equal(np.asarray(got[k], expected[k].dtype), expected[k], err_msg=k)
  assert got["f16"].dtype == np.float16 and got["i64"].dtype == np.int64
  assert got["bool"].dtype == np.bool_ and got["scalar"].shape == ()


def test_torchvision_pth_without_torch_equals_the_safetensors(tmp_path):
  state = dict(np.load(os.path.join(OURS, "resnet_small_torchvision.npz")))
  save_file(state, str(tmp_path / "same.safetensors"))
  ref = convert.load_torchvision_resnet(tmp_path / "same.safetensors", arch="resnet_small")
  # Saved as {"state_dict": ..., "epoch": 3}, as training scripts do.
  got = convert.load_torchvision_resnet(os.path.join(OURS, "resnet_small_torchvision.pth"),
                                        arch="resnet_small")
  _assert_same_tree(got, ref)


# ---------------------------------------------------------------------------------------------
# Keras ResNet .h5 (RadImageNet's layout): fixtures written by Keras (tests/fixtures/make_keras.py).

_TINY_KERAS = dict(width=8, stage_sizes=(2, 1, 1, 1))


def _keras_outputs(path, io, **kw):
  variables = convert.load_keras_resnet(path, **kw)
  num_classes = (int(variables["params"]["head"]["bias"].shape[0])
                 if "head" in variables["params"] else 0)
  model = get_model("resnet50_keras", num_classes, precision=jax.lax.Precision.HIGHEST, **kw)
  logits, reps = _jitted_apply(model)(variables, jnp.asarray(io["input"]))
  return num_classes, np.asarray(logits), np.asarray(reps["pre_logits"])


@pytest.mark.parametrize("stem", ["keras_resnet_tiny", "keras_resnet_tiny_notop"])
def test_keras_resnet_reproduces_keras_outputs(stem):
  # The whole-model file (Keras 3 legacy save, `model_weights` group) and the weights-only one
  # (top-level `layer_names`, as RadImageNet's `_notop` files): same weights, same features.
  io = np.load(os.path.join(OURS, "keras_resnet_tiny_io.npz"))
  num_classes, logits, pre_logits = _keras_outputs(os.path.join(OURS, f"{stem}.h5"), io,
                                                   **_TINY_KERAS)
  assert np.abs(pre_logits - io["pre_logits"]).max() <= 1e-4 * np.abs(io["pre_logits"]).max()
  if stem.endswith("notop"):
    assert num_classes == 0
  else:
    assert num_classes == 3
    assert np.abs(logits - io["logits"]).max() <= 1e-4


@pytest.mark.slow
def test_keras_applications_resnet50_reproduces_keras(tmp_path):
  # keras.applications.ResNet50 itself (random weights, random BatchNorm statistics), 64 px.
  if importlib.util.find_spec("keras") is None:  # not imported here: it would pick a backend
    pytest.skip("the Keras check needs keras (the test extra has it)")
  out = subprocess.run([sys.executable, os.path.join(OURS, "make_keras.py"), str(tmp_path),
                        "--full"], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, KERAS_BACKEND="jax"))
  assert out.returncode == 0, out.stderr[-2000:]
  io = np.load(tmp_path / "keras_resnet50_io.npz")
  num_classes, logits, pre_logits = _keras_outputs(tmp_path / "keras_resnet50.h5", io)
  assert num_classes == 4
  assert np.abs(pre_logits - io["pre_logits"]).max() <= 1e-4 * np.abs(io["pre_logits"]).max()
  assert np.abs(logits - io["logits"]).max() <= 1e-4


def test_keras_reader_errors(tmp_path):
  import h5py
  tiny = os.path.join(OURS, "keras_resnet_tiny.h5")
  with pytest.raises(ValueError, match=r"keras_resnet_tiny.h5: Keras ResNet weights need a "
                     r"Keras-layout model \(config.model.name='resnet50_keras'\), got 'resnet50'"):
    convert.load_keras_resnet(tiny, arch="resnet50", **_TINY_KERAS)
  with pytest.raises(ValueError, match="keras_resnet_tiny.h5: key '.*' has the wrong shape"):
    convert.load_keras_resnet(tiny)  # the registry's width 64 is not this file's 8
  with h5py.File(tmp_path / "new.weights.h5", "w") as f:  # Keras 3's own weights layout
    f.create_dataset("layers/conv2d/vars/0", data=np.zeros((7, 7, 3, 8), np.float32))
    f.create_group("vars")
  with pytest.raises(ValueError, match=r"new.weights.h5: no 'layer_names' attribute.*Keras 3's "
                     r"\.weights\.h5 layout"):
    convert.load_keras_resnet(tmp_path / "new.weights.h5")
  (tmp_path / "text.h5").write_text("not hdf5")
  with pytest.raises(ValueError, match="text.h5: not a readable HDF5 file"):
    convert.load_keras_resnet(tmp_path / "text.h5")
  with h5py.File(tmp_path / "nan.h5", "w") as f, h5py.File(tiny, "r") as src:
    src.copy("model_weights", f)
    ds = f["model_weights/conv1_bn/conv1_bn/moving_variance"]
    ds[0] = -1.0
  with pytest.raises(ValueError, match=r"nan.h5: BatchNorm variance 'conv1_bn/moving_variance' "
                     "has negative values"):
    convert.load_keras_resnet(tmp_path / "nan.h5", **_TINY_KERAS)


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None,
                    reason="torch is installed, so pre-1.6 .pth files are readable")
def test_pre_zip_pth_without_torch_says_how_to_convert(tmp_path):
  (tmp_path / "resnet.pth").write_bytes(b"\x80\x02")
  with pytest.raises(ValueError, match=r"resnet.pth: not a torch zip checkpoint .*torch.save"):
    convert.load_torchvision_resnet(tmp_path / "resnet.pth", arch="resnet18")


def test_pth_that_would_run_code_is_refused(tmp_path):
  import pickle
  import zipfile
  path = tmp_path / "evil.pth"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("evil/data.pkl", pickle.dumps({"w": os.system}))
  with pytest.raises(ValueError, match=r"evil.pth: holds posix.system|evil.pth: holds os.system"):
    convert.load_torchvision_resnet(path, arch="resnet18")


def test_pth_state_dict_with_torch(tmp_path, small_resnet_state):
  torch = pytest.importorskip("torch", reason="torch not installed: .pth loading is optional")
  variables, state = small_resnet_state
  path = tmp_path / "resnet.pth"
  torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in state.items()}}, str(path))
  _assert_same_tree(convert.load_torchvision_resnet(path, arch="resnet_small"), variables)


# ---------------------------------------------------------------------------------------------
# Self-supervised releases: DINOv2 ViTs and the prefixes SSL checkpoints put on the backbone.

DINOV2 = "timm_vit_small_patch14_reg4_dinov2_depth2"


@pytest.mark.parametrize("suffix,size", [("", 98), ("_hr", 126)])
def test_dinov2_reproduces_timm_at_native_and_resampled_sizes(shared_dir, suffix, size):
  """Registers, LayerScale, patch-only position embeddings; at 126 px the 7x7 grid is resampled
  to 9x9 as timm's dynamic_img_size does (bicubic, antialiased)."""
  path, io = _fixture(DINOV2)
  variables = convert.load_timm_vit(path, arch="vit_s14_reg4_dinov2", depth=2)
  model = get_model("vit_s14_reg4_dinov2", 10, depth=2, image_size=98,
                    precision=jax.lax.Precision.HIGHEST)
  x = jnp.asarray(io["input" + suffix].transpose(0, 2, 3, 1))
  assert x.shape[1] == size
  logits, reps = _jitted_apply(model)(variables, x)
  assert np.abs(np.asarray(logits) - io["logits" + suffix]).max() <= 1e-4
  assert np.abs(np.asarray(reps["pre_logits"]) - io["pre_logits" + suffix]).max() <= 1e-4


def test_dinov2_official_layout_and_wrong_arch(shared_dir, tmp_path):
  """facebookresearch/dinov2 files (register_tokens, mask_token, a class position row) load
  into the same model as timm's conversion of them."""
  path, _ = _fixture(DINOV2)
  from safetensors.numpy import load_file
  timm_state = load_file(str(path))
  row = np.random.default_rng(0).normal(size=(1, 1, 384)).astype(np.float32)
  official = {k: v for k, v in timm_state.items() if k not in ("reg_token", "cls_token",
                                                               "pos_embed")}
  official.update(register_tokens=timm_state["reg_token"], mask_token=np.zeros((1, 384), np.float32),
                  cls_token=timm_state["cls_token"] - row,
                  pos_embed=np.concatenate([row, timm_state["pos_embed"]], axis=1))
  save_file(official, str(tmp_path / "dinov2_official.safetensors"))
  got = convert.load_timm_vit(tmp_path / "dinov2_official.safetensors",
                              arch="vit_s14_reg4_dinov2", depth=2)
  ref = convert.load_timm_vit(path, arch="vit_s14_reg4_dinov2", depth=2)
  fa, fb = (traverse_util.flatten_dict(t) for t in (got, ref))
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_allclose(fa[k], fb[k], atol=1e-6, err_msg=str(k))
  with pytest.raises(ValueError, match=r"num_registers=4 but arch 'vit_s16' has 0.*vit_s14_reg4"):
    convert.load_timm_vit(path, arch="vit_s16", depth=2)


def _prefixed(state, prefix):
  return {prefix + k: v for k, v in state.items()}


def test_moco_checkpoints_keep_the_query_encoder_and_drop_heads(tmp_path):
  state = dict(np.load(os.path.join(OURS, "resnet_small_torchvision.npz")))
  backbone = {k: v for k, v in state.items() if not k.startswith("fc.")}
  save_file(backbone, str(tmp_path / "plain.safetensors"))
  ref = convert.load_torchvision_resnet(tmp_path / "plain.safetensors", arch="resnet_small")
  mlp = {"fc.0.weight": np.ones((32, 128), np.float32), "fc.0.bias": np.ones(32, np.float32),
         "fc.2.weight": np.ones((16, 32), np.float32), "fc.2.bias": np.ones(16, np.float32)}
  shifted = {k: np.asarray(v + 1) for k, v in backbone.items()}
  layouts = {  # MoCo v1/v2: query + key encoders, the queue; MoCo v3: base + momentum + predictor
      "moco_v2": {**_prefixed({**backbone, **mlp}, "module.encoder_q."),
                  **_prefixed({**shifted, **mlp}, "module.encoder_k."),
                  "module.queue": np.zeros((16, 8), np.float32),
                  "module.queue_ptr": np.zeros(1, np.int64)},
      "moco_v3": {**_prefixed({**backbone, **mlp}, "module.base_encoder."),
                  **_prefixed({**shifted, **mlp}, "module.momentum_encoder."),
                  **_prefixed(mlp, "module.predictor.")},
      "dino_backbone": {**_prefixed(backbone, "backbone."),
                        "head.mlp.0.weight": np.ones((8, 128), np.float32)},
  }
  for name, layout in layouts.items():
    save_file(layout, str(tmp_path / f"{name}.safetensors"))
    got = convert.load_torchvision_resnet(tmp_path / f"{name}.safetensors", arch="resnet_small")
    assert "head" not in got["params"], name
    _assert_same_tree(got, ref)


def test_dino_training_checkpoint_reads_the_teacher(tmp_path):
  """dino_resnet_small.pth (torch.save): {"student": DDP keys, "teacher": ...}; teacher = the
  fixture's weights with a DINO head, student only a first conv + 1 (reading it would fail)."""
  state = dict(np.load(os.path.join(OURS, "resnet_small_torchvision.npz")))
  save_file({k: v for k, v in state.items() if not k.startswith("fc.")},
            str(tmp_path / "plain.safetensors"))
  ref = convert.load_torchvision_resnet(tmp_path / "plain.safetensors", arch="resnet_small")
  got = convert.load_torchvision_resnet(os.path.join(OURS, "dino_resnet_small.pth"),
                                        arch="resnet_small")
  _assert_same_tree(got, ref)


def test_dino_vit_with_backbone_prefix_and_head(shared_dir, tmp_path):
  path, io = _fixture("timm_vit_tiny_patch16_224")
  from safetensors.numpy import load_file
  timm_state = load_file(str(path))
  body = {k: v for k, v in timm_state.items() if not k.startswith("head.")}
  save_file({**_prefixed(body, "backbone."),
             "head.mlp.0.weight": np.ones((8, 192), np.float32),
             "head.last_layer.weight_v": np.ones((16, 8), np.float32)},
            str(tmp_path / "dino_vit.safetensors"))
  got = convert.load_timm_vit(tmp_path / "dino_vit.safetensors", arch="vit_ti16")
  assert "head" not in got["params"]
  model = get_model("vit_ti16", 0, precision=jax.lax.Precision.HIGHEST)
  _, reps = _jitted_apply(model)(got, jnp.asarray(io["input"].transpose(0, 2, 3, 1)))
  assert np.abs(np.asarray(reps["pre_logits"]) - io["pre_logits"]).max() <= 1e-4
