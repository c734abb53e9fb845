"""The mixed-caption sampler: deterministic, at the configured ratio, and loud about
configurations that cannot give the blend."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from corpus.caption_mix import (
    MixConfig,
    MixConfigError,
    build_mixed_sampler,
    epoch_manifest,
    normalize_caption,
    prepare_captions,
    read_manifest,
    realized,
)


def recaptioned(n: int, **cols) -> pd.DataFrame:
    df = pd.DataFrame(
        {
            "key": [f"{i:09d}" for i in range(n)],
            "shard": [f"{i // 1000:05d}" for i in range(n)],
            "split": "train",
            "alt_text": [f"alt {i}" for i in range(n)],
            "short_caption": [f"a red circle {i}" for i in range(n)],
            "descriptive_caption": [
                f"A large red circle in the center, number {i}." for i in range(n)
            ],
        }
    )
    for k, v in cols.items():
        df[k] = v
    return df


def test_choice_is_a_function_of_seed_epoch_and_key_only():
    cfg = MixConfig(synthetic_ratio=0.7, seed=3)
    caps = prepare_captions(recaptioned(2000), cfg)
    a = epoch_manifest(caps, cfg, epoch=1)
    # The same rows in another order (a re-sharded or resumed run) choose the same way.
    shuffled = prepare_captions(recaptioned(2000).sample(frac=1, random_state=1), cfg)
    b = epoch_manifest(shuffled, cfg, epoch=1)
    pd.testing.assert_frame_equal(a, b)
    other_epoch = epoch_manifest(caps, cfg, epoch=2)
    other_seed = epoch_manifest(caps, MixConfig(synthetic_ratio=0.7, seed=4), epoch=1)
    assert (a["source"] != other_epoch["source"]).mean() > 0.2
    assert (a["source"] != other_seed["source"]).mean() > 0.2


@pytest.mark.parametrize("ratio", [0.95, 0.65, 0.0, 1.0])
def test_realized_ratio_within_binomial_tolerance(ratio):
    n = 20000
    cfg = MixConfig(synthetic_ratio=ratio, caption_dropout=0.1)
    stats = realized(epoch_manifest(prepare_captions(recaptioned(n), cfg), cfg, 0))
    kept = stats["synthetic"] + stats["alt_text"]
    tol = 4 * math.sqrt(ratio * (1 - ratio) / kept)  # 4 sigma; exact at 0 and 1
    assert abs(stats["synthetic_ratio"] - ratio) <= tol
    assert abs(stats["dropout"] - 0.1) <= 4 * math.sqrt(0.1 * 0.9 / n)


def test_manifest_captions_follow_the_source():
    cfg = MixConfig(synthetic_ratio=0.5, caption_kind="short", caption_dropout=0.2)
    caps = prepare_captions(recaptioned(500), cfg)
    m = epoch_manifest(caps, cfg, 0).merge(caps, on="key")
    assert (
        m.loc[m.source == "synthetic", "caption"] == m.loc[m.source == "synthetic", "synthetic"]
    ).all()
    assert (
        m.loc[m.source == "alt_text", "caption"] == m.loc[m.source == "alt_text", "alt_text"]
    ).all()
    assert (m.loc[m.source == "dropped", "caption"] == "").all()
    assert m["caption"].str.startswith("A red circle").sum() == (m.source == "synthetic").sum()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"synthetic_ratio": 1.2}, "synthetic_ratio must be in [0, 1]"),
        ({"synthetic_ratio": -0.1}, "synthetic_ratio must be in [0, 1]"),
        ({"caption_kind": "poetic"}, "unknown caption_kind 'poetic'"),
        ({"caption_dropout": 1.0}, "caption_dropout"),
        ({"ratio": 0.9}, "mixed_sampler.ratio: unknown key"),
    ],
)
def test_bad_configuration_is_a_clear_error(settings, message):
    with pytest.raises(MixConfigError) as e:
        MixConfig.from_dict(settings)
    assert message in str(e.value)


def test_missing_synthetic_caption_names_the_samples():
    df = recaptioned(10)
    df.loc[[2, 7], "descriptive_caption"] = [None, "   "]
    with pytest.raises(MixConfigError) as e:
        prepare_captions(df, MixConfig())
    assert "2 of 10 samples lack a descriptive synthetic caption" in str(e.value)
    assert "000000002" in str(e.value) and "000000007" in str(e.value)
    # Alt-text only needs no synthetic caption at all.
    assert len(prepare_captions(df, MixConfig(synthetic_ratio=0.0))) == 10


def test_normalisation_removes_distributional_tells():
    assert normalize_caption("  a red  circle \n") == "A red circle"
    assert normalize_caption("A photo of a red circle.") == "A red circle."
    assert normalize_caption("This image shows two blue stars.") == "Two blue stars."
    assert normalize_caption("caption: a cat<|endoftext|>") == "A cat"
    assert normalize_caption("<bos>A red star.<eos><pad><pad>") == "A red star."
    looped = "A red star in the center. A red star in the center. It is large."
    assert normalize_caption(looped) == "A red star in the center. It is large."
    assert normalize_caption("{caption}") == ""
    assert normalize_caption(None) == ""
    # Words that merely contain a prefix's words stay.
    assert normalize_caption("An image of a dog next to a photo of a cat") == (
        "A dog next to a photo of a cat"
    )


def test_sampler_folder_records_every_epoch(tmp_path):
    rec = tmp_path / "recaptioned"
    rec.mkdir()
    df = recaptioned(300)
    df.loc[:49, "split"] = "eval"  # held-out images never enter the blend
    df.to_parquet(rec / "00000.parquet")
    out = tmp_path / "sampler"
    summary = build_mixed_sampler(rec, out, MixConfig(epochs=3))
    assert summary["samples"] == 250
    assert [e["epoch"] for e in summary["epochs"]] == [0, 1, 2]
    m = read_manifest(out, 2)
    assert len(m) == 250 and m["key"].is_unique and m["key"].min() == "000000050"
    with pytest.raises(MixConfigError, match=r"raise mixed_sampler\.epochs to at least 4"):
        read_manifest(out, 3)
    # A rebuild with fewer epochs leaves no stale manifest behind.
    build_mixed_sampler(rec, out, MixConfig(epochs=1))
    assert sorted(p.name for p in out.glob("epoch-*")) == ["epoch-0000.parquet"]
