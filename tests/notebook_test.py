"""experiments/colab_tpu.ipynb runs top to bottom on CPU with no network (nbclient), ending with
the study's table and plot inline."""

import os

import pytest

from studies_test import REPO, assert_report_tables_match_csvs

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")


@pytest.mark.slow
def test_colab_notebook_runs_on_the_tiny_setting(tmp_path, monkeypatch):
  monkeypatch.setenv("REPSIM_NOTEBOOK_SETTING", "tiny")
  monkeypatch.setenv("REPSIM_NOTEBOOK_WORKDIR", str(tmp_path / "study"))
  path = os.path.join(REPO, "experiments", "colab_tpu.ipynb")
  nb = nbformat.read(path, as_version=4)
  nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": os.path.dirname(path)}}).execute()
  outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  last = nb.cells[-1].outputs
  assert any("text/markdown" in o.get("data", {}) and "RepSim vs the fine-tuning baselines"
             in o["data"]["text/markdown"] for o in last)
  assert any("image/png" in o.get("data", {}) for o in last)
  devices = "".join(o.get("text", "") for o in nb.cells[3].outputs)
  assert "devices" in devices
  assert_report_tables_match_csvs(str(tmp_path / "study"))
