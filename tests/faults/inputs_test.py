"""Bad input ends in the project's own one-line error at start-up, never a silent wrong number."""

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from repsim_jax import data, similarity, train
from repsim_jax.models import convert
from _tiny import FIXTURE, REPO, tiny_config


def _png(path, value=128):
  from PIL import Image
  Image.fromarray(np.full((8, 8), value, np.uint8)).save(path)


def _folder(tmp_path, labels, splits=None):
  root = tmp_path / "folder"
  root.mkdir(exist_ok=True)
  lines = ["path,label" + (",split" if splits else "")]
  for i, lab in enumerate(labels):
    _png(root / f"{i}.png", 10 * i)
    lines.append(f"{i}.png,{lab}" + (f",{splits[i]}" if splits else ""))
  (root / "labels.csv").write_text("\n".join(lines) + "\n")
  return root


def _load(root, **kw):
  return data.load_dataset({"source": "image_folder", "root": str(root), "csv": "labels.csv",
                            "image_size": 8, **kw})


def test_class_list_comes_from_the_training_split(tmp_path):
  splits = ["train"] * 4 + ["test"]
  with pytest.raises(ValueError, match=r"label '2' of a test image is not a class of the "
                                       r"training split"):
    _load(_folder(tmp_path, [0, 1, 0, 1, 2], splits))
  # Integer labels {0, 5}: two classes, ids 0 and 1 (before: 6 classes, 4 of them empty).
  out, info = _load(_folder(tmp_path, [0, 5, 0, 5, 5], splits))
  assert info.num_classes == 2 and sorted(set(out["train"].labels)) == [0, 1]
  assert list(out["test"].labels) == [1]
  # An explicit class list keeps a class that only val/test has.
  out, info = _load(_folder(tmp_path, [0, 1, 0, 1, 2], splits), classes=("0", "1", "2"))
  assert info.num_classes == 3 and list(out["test"].labels) == [2]


def test_empty_or_stray_labels(tmp_path):
  with pytest.raises(ValueError, match="row 3 has an empty label"):
    _load(_folder(tmp_path, [0, 1, "", 1]))
  with pytest.raises(ValueError, match="labels mix integers and names"):
    _load(_folder(tmp_path, [0, 1, "oops", 1] * 3))


def test_undecodable_image_is_found_at_load(tmp_path):
  root = _folder(tmp_path, [0, 1, 0, 1])
  (root / "2.png").write_bytes(b"")
  with pytest.raises(ValueError, match=r"2.png: empty file \(0 bytes\)"):
    _load(root)
  (root / "2.png").write_bytes(b"not a png at all")
  with pytest.raises(ValueError, match=r"2.png: cannot decode image"):
    _load(root)


def test_bad_training_configs_fail_before_training(tmp_path):
  cases = [({"train.eval_splits": ("val", "tset")}, "the dataset has no 'tset' split"),
           ({"data.val_size": 0}, "the 'val' split of 'medical_gray' is empty"),
           ({"data.image_size": -8}, r"config.data.image_size=-8: expected 0 or a positive"),
           ({"method.name": "repsim"}, r"config.model.init is empty"),
           ({"method.name": "l2sp"}, r"config.model.init is empty"),
           ({"data.size": 4}, r"^config.data.size=4: expected >= 8 pixels"),
           ({"data.name": "xray"}, r"^config.data.name='xray': expected one of"),
           ({"analysis.sharpness.measures": "sam,flatness"},
            r"^config.analysis.sharpness.measures: expected a non-empty subset")]
  for overrides, message in cases:
    wd = tmp_path / f"run{len(os.listdir(tmp_path))}"
    with pytest.raises(ValueError, match=message):
      train.train_and_evaluate(tiny_config(tmp_path, **overrides), str(wd))
    assert not (wd / "checkpoints").exists(), overrides


def test_bad_weight_files(tmp_path, shared_dir):
  from safetensors.numpy import load_file, save_file
  src = os.path.join(FIXTURE, "torchvision_resnet18.safetensors")
  blob = open(src, "rb").read()
  (tmp_path / "cut.safetensors").write_bytes(blob[: len(blob) // 2])
  with pytest.raises(ValueError, match="cut.safetensors: not a readable .safetensors file"):
    convert.load_torchvision_resnet(tmp_path / "cut.safetensors", arch="resnet18")
  state = load_file(src)
  neg = dict(state, **{"bn1.running_var": -np.abs(state["bn1.running_var"])})
  save_file(neg, str(tmp_path / "neg.safetensors"))
  with pytest.raises(ValueError, match="neg.safetensors: BatchNorm variance 'bn1.running_var' "
                                       "has negative values"):
    convert.load_torchvision_resnet(tmp_path / "neg.safetensors", arch="resnet18")


def test_float16_weights_are_read_and_said(tmp_path, shared_dir, capsys):
  from safetensors.numpy import load_file, save_file
  state = load_file(os.path.join(FIXTURE, "torchvision_resnet18.safetensors"))
  save_file({k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in state.items()},
            str(tmp_path / "half.safetensors"))
  v = convert.load_torchvision_resnet(tmp_path / "half.safetensors", arch="resnet18")
  assert v["params"]["conv1"]["kernel"].dtype == np.float32
  assert "half.safetensors: 102 tensors are 16-bit floats" in capsys.readouterr().err


def test_similarity_refuses_meaningless_inputs():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(40, 6)).astype(np.float32)
  for bad, message in [(np.where(np.eye(40, 6) > 0, np.nan, x), "y contains NaN or Inf"),
                       (np.ones((40, 6)), "y is the same for every example")]:
    for fn in (similarity.linear_cka, similarity.mutual_knn, similarity.procrustes_distance):
      with pytest.raises(ValueError, match=message):
        fn(x, bad)
  # Scale: the feature form used to overflow float32 (‖XᵀX‖² at 1e6-sized features) and gave 0.
  y = rng.normal(size=(40, 3)).astype(np.float32) @ rng.normal(size=(3, 6)).astype(np.float32)
  ref = float(similarity.linear_cka(x, y, form="gram"))
  assert float(similarity.linear_cka(x * 1e6, y * 1e6, form="feature")) == pytest.approx(ref, rel=1e-4)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(max_size=300))
def test_fuzz_weight_readers(tmp_path, blob):
  """Random bytes as a weights file: the project's ValueError, never a crash or a hang."""
  for suffix, reader in ((".safetensors", convert.load_torchvision_resnet),
                         (".pth", convert.load_torchvision_resnet),
                         (".npz", convert.load_big_vision_vit_npz)):
    path = tmp_path / f"w{suffix}"
    path.write_bytes(blob)
    with pytest.raises(ValueError, match=r"w\.(safetensors|pth|npz)"):
      reader(path, arch="vit_ti16" if suffix == ".npz" else "resnet18")


PTH = os.path.join(REPO, "tests", "fixtures", "dtypes.pth")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(member=st.sampled_from(["data.pkl", "data/0", "data/3", "byteorder"]),
       edits=st.lists(st.tuples(st.integers(0, 10 ** 4), st.integers(0, 255)), min_size=1,
                      max_size=4),
       cut=st.one_of(st.none(), st.integers(0, 900)))
def test_fuzz_pth_members(tmp_path, member, edits, cut):
  """A real torch.save file with a corrupted pickle, storage or byte order (the zip's CRCs made
  to match, so the reader itself must cope): a state dict or the ValueError, never a crash."""
  import zipfile
  with zipfile.ZipFile(PTH) as z:
    members = {n: z.read(n) for n in z.namelist()}
  name = next(n for n in members if n.endswith("/" + member))
  blob = bytearray(members[name])
  for pos, value in edits:
    if blob:
      blob[pos % len(blob)] = value
  members[name] = bytes(blob[:cut] if cut is not None else blob)
  path = tmp_path / "w.pth"
  with zipfile.ZipFile(path, "w") as z:
    for n, b in members.items():
      z.writestr(n, b)
  try:
    state = convert._read_state_dict(path)  # pylint: disable=protected-access
  except ValueError as e:
    assert str(e).startswith("w.pth: ") and "\n" not in str(e), str(e)
  else:
    assert all(isinstance(v, np.ndarray) for v in state.values())


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(0, 6), d=st.integers(0, 4), fill=st.sampled_from([0.0, 1.0, np.nan, np.inf]),
       measure=st.sampled_from(["linear_cka", "cca_similarity", "rsa", "procrustes_distance"]))
def test_fuzz_similarity_inputs(n, d, fill, measure):
  """Degenerate shapes and values: a ValueError naming the function, or a finite number."""
  x = np.full((n, d), fill, np.float32)
  y = np.random.default_rng(n * 10 + d).normal(size=(n, d)).astype(np.float32)
  try:
    v = float(getattr(similarity, measure)(x, y))
  except ValueError as e:
    assert str(e).startswith(measure + ":"), str(e)
  else:
    assert np.isfinite(v)


def test_command_line_errors_are_one_line(tmp_path):
  (tmp_path / "afile").write_text("x")
  out = subprocess.run(
      [sys.executable, "-m", "repsim_jax.main",
       "--config=configs/finetune.py:model=small_cnn,source=synthetic,dataset=medical_gray,"
       "size=16,steps=2,method=repsim", f"--workdir={tmp_path / 'afile'}"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 1
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and "afile: is a file" in lines[0], \
      out.stderr


def test_method_keys_the_method_does_not_read_are_warned(tmp_path, capsys):
  from repsim_jax import methods
  c = tiny_config(tmp_path, **{"method.q_mode": "procrustes", "method.lam": 3.0})
  train.validate(c)
  err = capsys.readouterr().err.strip().splitlines()
  assert err == ["warning: config.method.lam=3.0 (and q_mode) not used by method 'full_ft'"]
  # RepSim reads both; its learned Q reads q_lr, procrustes mode does not.
  rep = tiny_config(tmp_path, **{"method.name": "repsim", "method.q_mode": "procrustes",
                                 "method.lam": 3.0, "method.q_lr": 0.5})
  assert methods.unused_keys(rep.method) == ["q_lr"]
  rep.method.q_mode = "learned"
  assert methods.unused_keys(rep.method) == []


@pytest.mark.parametrize("score", ["h_score", "transrate", "nleep"])
def test_scores_warn_when_there_are_fewer_examples_than_dimensions(score):
  from repsim_jax.transferability import scores
  rng = np.random.default_rng(0)
  f, y = rng.normal(size=(40, 64)), rng.integers(0, 3, 40)
  with pytest.warns(RuntimeWarning, match=rf"{score}: 40 examples for 64 feature dimensions"):
    getattr(scores, score)(f, y)
  import warnings
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    getattr(scores, score)(rng.normal(size=(200, 8)), rng.integers(0, 3, 200))
