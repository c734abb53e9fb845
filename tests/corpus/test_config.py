"""One typed builder for every params.yaml section (corpus/config.py): unknown keys and
wrong types named by their full dotted key, nested defaults, and values shared by several
sections stated once (corpus/params.py SHARED_PARAMS) and read the same by DVC."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from corpus.caption_mix import MixConfig, MixConfigError
from corpus.config import ConfigError, build_config
from corpus.params import SHARED_PARAMS, RawDatasetParams, load_params, section_params
from models.captioning.recaption import RecaptionConfig
from models.captioning.train import CaptionerTrainConfig
from models.diffusion.autoencoder import AutoencoderConfig
from models.diffusion.train import DiffusionTrainConfig
from models.evaluation.reference_clip import ReferenceClipConfig
from models.evaluation.report import EvalReportConfig
from models.evaluation.world_judge import JudgeConfig
from models.expansion.train import ExpanderConfig
from models.feedback.pool import PoolConfig
from models.feedback.preference import PreferenceConfig
from models.feedback.rich_train import RichConfig
from tests.conftest import REPO

EVAL_PATHS = {"model": "m", "judge": "j", "reference_clip": "r", "out": "o"}
# Every section of params.yaml and its config; `operations` holds schedule settings only.
SECTIONS = {
    "raw_alt_text_dataset": RawDatasetParams.from_dict,
    "captioner": CaptionerTrainConfig.from_dict,
    "recaptioned_dataset": RecaptionConfig.from_dict,
    "mixed_sampler": MixConfig.from_dict,
    "autoencoder": AutoencoderConfig.from_dict,
    "diffusion_model": DiffusionTrainConfig.from_dict,
    "world_judge": JudgeConfig.from_dict,
    "reference_clip": ReferenceClipConfig.from_dict,
    "eval_report": lambda d: EvalReportConfig.from_dict({**d, **EVAL_PATHS}),
    "prompt_expander": ExpanderConfig.from_dict,
    "feedback_pool": PoolConfig.from_dict,
    "preference_model": PreferenceConfig.from_dict,
    "rich_feedback_model": RichConfig.from_dict,
}


@dataclass(frozen=True)
class Inner:
    steps: int = 10
    lr: float = 1e-3
    name: str | None = None


@dataclass(frozen=True)
class Outer:
    inner: Inner = field(default_factory=Inner)
    maybe: Inner | None = None
    sizes: tuple[int, ...] = (1, 2)
    kind: Literal["a", "b"] = "a"
    flag: bool = False
    extra: dict = field(default_factory=dict)


def test_an_unknown_nested_key_is_named_by_its_dotted_path():
    with pytest.raises(ConfigError) as e:
        build_config(Outer, {"inner": {"stepz": 3}}, "section")
    assert str(e.value).startswith("section.inner.stepz: unknown key; known: ['lr', 'name'")
    with pytest.raises(ConfigError, match=r"^section\.maybe\.x: unknown key"):
        build_config(Outer, {"maybe": {"x": 1}}, "section")


def test_a_value_of_the_wrong_type_is_named_by_its_dotted_path():
    cases = [
        ({"inner": {"steps": "10"}}, "section.inner.steps: expected int, got str '10'"),
        ({"inner": {"steps": 2.5}}, "section.inner.steps: expected int, got float 2.5"),
        ({"inner": {"steps": True}}, "section.inner.steps: expected int, got bool True"),
        ({"flag": 1}, "section.flag: expected bool, got int 1"),
        ({"sizes": [1, "x"]}, "section.sizes[1]: expected int, got str 'x'"),
        ({"sizes": 3}, "section.sizes: expected tuple"),
        ({"inner": 3}, "section.inner: expected a mapping of Inner settings, got int 3"),
        ({"kind": "c"}, "section.kind: 'c' is not one of ['a', 'b']"),
        ({"extra": [1]}, "section.extra: expected dict"),
    ]
    for values, message in cases:
        with pytest.raises(ConfigError) as e:
            build_config(Outer, values, "section")
        assert str(e.value).startswith(message), (values, str(e.value))


def test_a_float_written_the_way_yaml_reads_as_text_says_so():
    values = yaml.safe_load("inner: {lr: 1e-3}")  # YAML 1.1: no dot, so a string
    with pytest.raises(ConfigError, match=r"section\.inner\.lr: expected float.*write 1\.0e-3"):
        build_config(Outer, values, "section")


def test_nested_defaults_and_values_kept_as_given():
    cfg = build_config(Outer, {"inner": {"steps": 3}, "sizes": [4, 5], "maybe": None}, "s")
    assert cfg.inner == Inner(steps=3) and cfg.maybe is None and cfg.sizes == (4, 5)
    assert build_config(Outer, {"inner": None}, "s").inner == Inner()  # `inner:` left empty
    assert build_config(Outer, {"maybe": {"lr": 1}}, "s").maybe.lr == 1  # an int stays an int
    assert build_config(Outer, {"inner": Inner(steps=7)}, "s").inner.steps == 7  # built already
    # A section's own defaults for a nested config hold when the key is absent ...
    assert CaptionerTrainConfig.from_dict({}).concepts.max_steps == 800
    # ... and a nested dict starts from the nested class's defaults.
    cfg = DiffusionTrainConfig.from_dict({"diffusion": {"max_steps": 6}})
    assert cfg.diffusion.max_steps == 6 and cfg.diffusion.lr == 1e-3
    assert cfg.text_encoder.pretrain.max_steps == 300


def test_a_required_key_that_is_missing_is_named():
    @dataclass(frozen=True)
    class NeedsPath:
        path: str

    with pytest.raises(ConfigError, match=r"^section\.path: required"):
        build_config(NeedsPath, {}, "section")


def test_each_configs_own_checks_still_run():
    with pytest.raises(MixConfigError, match="synthetic_ratio must be in"):
        MixConfig.from_dict({"synthetic_ratio": 1.5})
    with pytest.raises(MixConfigError, match=r"mixed_sampler\.ratio: unknown key"):
        MixConfig.from_dict({"ratio": 0.9})
    with pytest.raises(ValueError, match="noise rates must sum to 1"):
        RawDatasetParams.from_dict({"noise": {"plain": 0.9}})
    with pytest.raises(ValueError, match="candidates=9 > num_beams=3"):
        CaptionerTrainConfig.from_dict({"generation": {"mode": "beam", "candidates": 9}})


@pytest.fixture(scope="module")
def committed() -> dict:
    return load_params(REPO / "params.yaml")


def test_every_section_of_the_committed_params_builds(committed):
    assert set(committed) == {*SECTIONS, "operations"}
    for section, build in SECTIONS.items():
        build(section_params(committed, section))
    raw = RawDatasetParams.from_dict(section_params(committed, "raw_alt_text_dataset"))
    assert raw.world.image_size == committed["raw_alt_text_dataset"]["world"]["image_size"]


@pytest.mark.parametrize("section", list(SECTIONS))
def test_every_section_names_its_own_unknown_keys(committed, section):
    values = {**section_params(committed, section), "typo_key": 1}
    with pytest.raises(ValueError, match=rf"^{section}\.typo_key: unknown key; known: \["):
        SECTIONS[section](values)


@pytest.mark.parametrize(
    ("section", "nested"),
    [
        ("diffusion_model", ("diffusion", "max_stepz")),
        ("diffusion_model", ("text_encoder", "pretrain", "max_stepz")),
        ("captioner", ("dsc", "max_stepz")),
        ("captioner", ("generation", "beams")),
        ("raw_alt_text_dataset", ("world", "max_objectz")),
        ("recaptioned_dataset", ("generation", "beams")),
    ],
)
def test_an_unknown_key_deep_in_a_section_is_named_in_full(committed, section, nested):
    values = section_params(committed, section)
    node = values
    for key in nested[:-1]:
        node = node.setdefault(key, {})
    node[nested[-1]] = 1
    dotted = ".".join((section, *nested))
    with pytest.raises(ValueError, match=rf"^{dotted}: unknown key"):
        SECTIONS[section](values)


def test_shared_values_are_stated_once_and_read_by_each_consumer(committed):
    for section, shared in SHARED_PARAMS.items():
        for key, source in shared.items():
            src_section, _, src_key = source.partition(".")
            assert key not in committed[section], f"{section}.{key} is stated twice"
            assert section_params(committed, section)[key] == committed[src_section][src_key]
    judge = JudgeConfig.from_dict(section_params(committed, "world_judge"))
    clip = ReferenceClipConfig.from_dict(section_params(committed, "reference_clip"))
    ae = AutoencoderConfig.from_dict(section_params(committed, "autoencoder"))
    assert judge.resolution == clip.resolution == ae.resolution
    rec = RecaptionConfig.from_dict(section_params(committed, "recaptioned_dataset"))
    assert rec.generation == CaptionerTrainConfig.from_dict(committed["captioner"]).generation


def test_a_shared_value_stated_again_is_refused(committed):
    params = {**committed, "world_judge": {**committed["world_judge"], "resolution": 48}}
    with pytest.raises(ValueError, match=r"world_judge\.resolution: stated once in params\.yaml"):
        section_params(params, "world_judge")


def test_dvc_stages_list_the_shared_values_they_read():
    """`dvc repro` and `dvc exp run -S autoencoder.resolution=...` see a shared value
    change in every stage that reads it, as Dagster's assets do."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for section, shared in SHARED_PARAMS.items():
        assert section in stages[section]["params"]
        for source in shared.values():
            assert source in stages[section]["params"], (section, source)
