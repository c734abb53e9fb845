"""The `generate` command and the MLflow pyfunc model: prompts (optionally expanded,
unfaithful expansions replaced by the prompt itself) drawn by a tiny random exported
model, written as a grid, PNGs and prompts.json; and the registered pyfunc with an
expander artifact answering `params={"expand": N}` through the same function."""

from __future__ import annotations

import io
import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from PIL import Image

import models.expansion.model as expansion_model
from models.diffusion.text_to_image import load_text_to_image
from models.expansion.train import train_expander
from models.expansion.upsample import Drawn
from models.registry.model_registry import register_text_to_image
from models.serving.generate import main, text_to_images
from tests.models.diffusion.test_diffusers_export import _recapflow_export
from tests.models.expansion.test_expansion import CAPTION, _recaptioned, tiny_expander_config

QUERY = "a red circle"
FAITHFUL = "A large red circle in the top left, on a white background."
CONTRADICTS = "A large blue circle in the top left, on a white background."
DROPS = "A large square in the top left, on a white background."


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serving") / "diffusion_model"
    _recapflow_export(root, "recapflow-tiny-patch", text_map_channels=8)
    return root


@pytest.fixture(scope="module")
def expander_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("expander")
    cfg = tiny_expander_config(max_steps=2, expansions=1, candidates=1, eval_queries=1)
    out = tmp / "prompt_expander"
    train_expander(cfg, _recaptioned(tmp / "rec", [CAPTION, FAITHFUL] * 10), out, progress=False)
    return out


@pytest.fixture
def sampled(monkeypatch):
    """The expander's sampling replaced by known candidates, so which are drawn is exact."""

    def fake_expand(model, tok, queries, n, **kwargs):
        return [[CONTRADICTS, FAITHFUL, DROPS, FAITHFUL.replace("large", "small")][:n]] * len(
            queries
        )

    monkeypatch.setattr(expansion_model, "expand", fake_expand)


def test_only_faithful_expansions_are_drawn_and_the_prompt_fills_the_rest(exported, sampled):
    pipeline = load_text_to_image(exported)
    images, rows = text_to_images(pipeline, [QUERY], expand=3, expander=(None, None), steps=2)
    assert rows == [
        Drawn(QUERY, FAITHFUL, True),
        Drawn(QUERY, FAITHFUL.replace("large", "small"), True),
        Drawn(QUERY, QUERY, False),
    ]
    assert images.shape == (3, 3, 32, 32)


def test_bad_requests_say_what_is_wrong(exported):
    pipeline = load_text_to_image(exported)
    with pytest.raises(ValueError, match="needs a prompt expander"):
        text_to_images(pipeline, [QUERY], expand=2)
    with pytest.raises(ValueError, match="non-empty"):
        text_to_images(pipeline, ["  "])


def test_the_command_writes_a_grid_the_images_and_which_prompt_drew_each(
    exported, expander_dir, tmp_path
):
    out = tmp_path / "generated"
    argv = ["a red circle", "two blue stars", "--model", str(exported), "--steps", "2"]
    rows = main([*argv, "--expand", "2", "--expander", str(expander_dir), "--out", str(out)])
    records = json.loads((out / "prompts.json").read_text())
    assert [r["query"] for r in records] == ["a red circle"] * 2 + ["two blue stars"] * 2
    assert [r["prompt"] for r in records] == [r.prompt for r in rows]
    # Whatever the two-step expander wrote, what was drawn keeps the prompt's claims.
    keep = expansion_model.keep_faithful
    for r in records:
        assert not r["expanded"] or keep([r["query"]], [[r["prompt"]]], 1)[0]
        assert Image.open(out / r["image"]).size == (32, 32)
    assert Image.open(out / "grid.png").size[0] > Image.open(out / "000.png").size[0]
    # The same seed draws the same images.
    again = tmp_path / "again"
    main([*argv, "--expand", "2", "--expander", str(expander_dir), "--out", str(again)])
    assert (again / "grid.png").read_bytes() == (out / "grid.png").read_bytes()


def test_a_missing_registered_model_says_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(FileNotFoundError, match="make run"):
        main(["a star", "--out", str(tmp_path / "out")])


def test_the_registered_pyfunc_expands_with_its_expander_artifact(
    exported, expander_dir, tmp_path, sampled
):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("serving")
    with mlflow.start_run() as run:
        pass
    reg = register_text_to_image(uri, run.info.run_id, exported, expander_dir=expander_dir)
    model = mlflow.pyfunc.load_model(reg["uri"])
    plain = model.predict(pd.DataFrame({"prompt": [QUERY, "two blue stars"]}), params={"steps": 2})
    assert list(plain["prompt"]) == [QUERY, "two blue stars"]
    assert not plain["expanded"].any()
    # The params reach the sampler: another seed draws another image.
    reseeded = model.predict(pd.DataFrame({"prompt": [QUERY]}), params={"seed": 1, "steps": 2})
    assert reseeded["png"][0] != plain["png"][0]
    drawn = model.predict(pd.DataFrame({"prompt": [QUERY]}), params={"expand": 2, "steps": 2})
    assert list(drawn["prompt"]) == [FAITHFUL, FAITHFUL.replace("large", "small")]
    assert all(png.startswith(b"\x89PNG") for png in drawn["png"])
    # The command resolves the registered model to the same folder and draws the same image.
    out = tmp_path / "generated"
    main([QUERY, "--model", reg["uri"], "--tracking-uri", uri, "--steps", "2", "--out", str(out)])
    alone = model.predict(pd.DataFrame({"prompt": [QUERY]}), params={"steps": 2})["png"][0]
    assert Image.open(out / "000.png").tobytes() == Image.open(io.BytesIO(alone)).tobytes()
