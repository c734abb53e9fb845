"""The regression gate against a real MLflow registry: a champion and a challenger with
fabricated per-prompt scores either side of the noise, differently scored champions,
and an unproven judge."""

from __future__ import annotations

import json

import numpy as np
import pytest
from mlflow import MlflowClient

from assets.diffusion_model import REGISTERED_NAME
from assets.eval_report import PER_PROMPT_ARTIFACT, run_gate

FINGERPRINT = {"suite_version": "v1", "judge_sha256": "abc", "images_per_prompt": 4}
JUDGE_OK = {"min_accuracy": 0.98, "accuracy": {"shape": 1.0, "colour": 0.99}}


@pytest.fixture
def registry(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("gate", artifact_location=str(tmp_path / "artifacts"))
    client.create_registered_model(REGISTERED_NAME)
    rng = np.random.default_rng(0)
    champion_scores = {f"p{i}": float(v) for i, v in enumerate(rng.uniform(0.3, 0.7, 112))}

    def version(scores: dict | None, fingerprint: dict = FINGERPRINT) -> tuple[str, str]:
        run = client.create_run(exp).info.run_id
        if scores is not None:  # what eval_report logs to the model's run
            folder = tmp_path / run
            folder.mkdir()
            doc = {"fingerprint": fingerprint, "scores": scores}
            (folder / "per_prompt.json").write_text(json.dumps(doc))
            client.log_artifact(run, str(folder / "per_prompt.json"), "eval_report")
        v = client.create_model_version(REGISTERED_NAME, f"runs:/{run}/model", run_id=run)
        return v.version, run

    champ_version, _ = version(champion_scores)
    client.set_registered_model_alias(REGISTERED_NAME, "champion", champ_version)
    return uri, client, version, champion_scores, champ_version


def _challenge(uri, client, version, scores, fingerprint=FINGERPRINT, judge=JUDGE_OK):
    v, run = version(None)
    client.set_registered_model_alias(REGISTERED_NAME, "challenger", v)
    doc = {"fingerprint": fingerprint, "scores": scores}
    return v, run_gate(uri, run, doc, judge)


def test_gate_refuses_a_challenger_worse_beyond_noise(registry):
    uri, client, version, champion, champ_v = registry
    worse = {k: s - 0.25 for k, s in champion.items()}
    _, gate = _challenge(uri, client, version, worse)
    assert not gate["promote"] and gate["ci_high"] < 0
    assert client.get_model_version_by_alias(REGISTERED_NAME, "champion").version == champ_v


def test_gate_promotes_a_challenger_within_noise(registry):
    uri, client, version, champion, _ = registry
    rng = np.random.default_rng(1)
    close = {k: s - 0.01 + float(rng.normal(0, 0.1)) for k, s in champion.items()}
    v, gate = _challenge(uri, client, version, close)
    assert gate["promote"] and gate["ci_low"] < 0 < gate["ci_high"]
    assert client.get_model_version_by_alias(REGISTERED_NAME, "champion").version == v


def test_gate_refuses_to_compare_differently_scored_models(registry):
    uri, client, version, champion, champ_v = registry
    other = {**FINGERPRINT, "images_per_prompt": 2}
    _, gate = _challenge(uri, client, version, champion, fingerprint=other)
    assert not gate["promote"] and "images_per_prompt" in gate["reason"]
    assert PER_PROMPT_ARTIFACT == "eval_report/per_prompt.json"
    assert client.get_model_version_by_alias(REGISTERED_NAME, "champion").version == champ_v


def test_gate_refuses_when_the_judge_fails_its_own_bar(registry):
    uri, client, version, champion, _ = registry
    weak = {"min_accuracy": 0.98, "accuracy": {"shape": 0.83, "colour": 1.0}}
    better = {k: s + 0.2 for k, s in champion.items()}
    _, gate = _challenge(uri, client, version, better, judge=weak)
    assert not gate["promote"] and "{'shape': 0.83}" in gate["reason"]
