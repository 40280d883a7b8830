"""The public Python API (models/api.py): the README's example runs, and it boxes an array batch exactly as the
`weakloc label` pipeline boxes the same pictures read from files."""
from __future__ import annotations

import pathlib
import re

import numpy as np
import pytest
from PIL import Image

from weakloc.models import api
from weakloc.pipeline import label, results
from tests.helpers import RUNNER

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    text = README.read_text(encoding="utf-8")
    block = re.search(r"<!-- api-example -->\s*```python\n(.*?)```", text, re.S)
    assert block, "README.md lost its Python API example (after <!-- api-example -->)"
    return block.group(1)


def test_readme_example_runs(tmp_path, tiny_model_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(3)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(tmp_path / f"photo_{i}.jpg")
    code = readme_example().replace("fruit.keras", tiny_model_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert (tmp_path / "overlay.png").is_file()
    found = scope["found"]
    assert len(found) == 2 and all(r["width"] == 56 and r["height"] == 40 for r in found)
    assert all(0 <= b["xmin"] < b["xmax"] <= 56 and 0 <= b["ymin"] < b["ymax"] <= 40 for r in found
               for b in r["boxes"])


def test_api_boxes_equal_the_pipelines(tmp_path, tiny_model_path):
    """Same pictures, same model, same options: the array call and the Beam run give the same boxes."""
    rng = np.random.default_rng(4)
    pictures = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(5)]  # model input size: no resize
    (tmp_path / "in").mkdir()
    for i, p in enumerate(pictures):
        Image.fromarray(p).save(tmp_path / "in" / f"p{i}.png")
    label.run(["--input", str(tmp_path / "in" / "*.png"), "--model", tiny_model_path, "--output",
               str(tmp_path / "out"), "--top_k", "2", "--cam_threshold", "0.3", f"--runner={RUNNER}"])
    rows = {pathlib.Path(r["image_id"]).stem: r for r in results.read_table(str(tmp_path / "out")).to_pylist()}
    found = api.load(tiny_model_path, top_k=2, cam_threshold=0.3)(np.stack(pictures))
    for i, r in enumerate(found):
        mine = [(b["label"], round(b["xmin"], 3), round(b["ymin"], 3), round(b["xmax"], 3), round(b["ymax"], 3))
                for b in r["boxes"]]
        theirs = [(b["label"], round(b["xmin"], 3), round(b["ymin"], 3), round(b["xmax"], 3), round(b["ymax"], 3))
                  for b in rows[f"p{i}"]["boxes"]]
        assert mine == theirs
        assert [c["label"] for c in r["classes"]] == [c["label"] for c in rows[f"p{i}"]["classes"]]


def test_api_refuses_what_is_not_a_picture_batch(tiny_model_path):
    loc = api.load(tiny_model_path)
    with pytest.raises(ValueError, match="expected uint8 \\(H, W, 3\\)"):
        loc(np.zeros((1, 32, 32), np.uint8))
