import json
import subprocess
import sys

import pytest

from repsim_jax import config_lib, io


def test_parse_arg_types_and_unknown_key():
  c = config_lib.parse_arg("steps=10,lr=0.5,name=x,flag=false", steps=1, lr=0.1, name="", flag=True)
  assert (c.steps, c.lr, c.name, c.flag) == (10, 0.5, "x", False)
  with pytest.raises(ValueError, match="unknown key 'stepz'"):
    config_lib.parse_arg("stepz=3", steps=1)
  with pytest.raises(ValueError, match="expected int"):
    config_lib.parse_arg("steps=abc", steps=1)


def test_check_choice_names_the_key():
  c = config_lib.train_config()
  c.optim.name = "adamx"
  with pytest.raises(ValueError, match=r"config.optim.name='adamx': expected one of"):
    config_lib.check_choice(c, "optim.name", ("sgd", "adam"))


def test_atomic_write_leaves_no_temp(tmp_path):
  p = tmp_path / "r.json"
  io.write_text(str(p), "{}")
  io.write_text(str(p), json.dumps({"a": 1}))
  assert json.loads(p.read_text()) == {"a": 1}
  assert [f.name for f in tmp_path.iterdir()] == ["r.json"]


@pytest.mark.parametrize("args,message", [
    (["--config=configs/finetune.py:modell=resnet18"], "unknown key 'modell'"),
    (["--config=configs/finetune.py", "--config.optim.nme=sgd"],
     "--config.optim.nme=sgd: the config has no key 'nme' (Did you mean \"name\""),
    (["--config=configs/nosuch.py"], "No such file or directory: 'configs/nosuch.py'"),
    (["--config=configs/finetune.py", "--config.train.num_steps=abc"],
     "flag --config.train.num_steps=abc: invalid literal for int()"),
    (["--config=configs/finetune.py", "--config.optim.name=adamx"], "config.optim.name='adamx'"),
])
def test_cli_bad_config_fails_with_one_line(tmp_path, args, message):
  proc = subprocess.run([sys.executable, "-m", "repsim_jax.main", *args,
                         f"--workdir={tmp_path}/w"], capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert message in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_renaming_the_method_brings_its_defaults_and_keeps_what_was_set():
  # DELTA's λ is 0.01, RepSim's 1: a sweep over method.name must not run DELTA at RepSim's.
  m = config_lib.renamed_method(config_lib.method_config("repsim", q_mode="procrustes"), "delta")
  assert (m.name, m.lam, m.q_mode) == ("delta", 0.01, "procrustes")
  assert config_lib.renamed_method(config_lib.method_config("full_ft", lam=0.5), "bss").lam == 0.5
  c = config_lib.set_keys(config_lib.load_config("configs/finetune.py", "method=repsim"),
                          {"method.name": "bss", "method.rho": 0.1})
  assert (c.method.name, c.method.lam, c.method.rho) == ("bss", 0.001, 0.1)


@pytest.mark.parametrize("overrides,expected", [
    (["--config.method.name=delta", "--config.method.alpha=0.5"], "delta 0.01 0.5"),
    (["--config.method.name=delta", "--config.method.lam=2.0"], "delta 2.0 0.01")])
def test_command_line_method_name_override_renames_the_method(overrides, expected):
  # main's own config loading, in a fresh process (absl's flags are process-global).
  show = ("import sys; from absl import flags; from repsim_jax import main; flags.FLAGS(sys.argv);"
          " m = main._config().method; print(m.name, m.lam, m.alpha)")
  out = subprocess.run([sys.executable, "-c", show, "--config=configs/finetune.py:method=repsim",
                        "--workdir=unused", *overrides],
                       capture_output=True, text=True, timeout=300)
  assert out.stdout.strip() == expected, out.stderr[-2000:]
