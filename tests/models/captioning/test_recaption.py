from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml

from models.captioning.recaption import make_backend, recaption
from tests.conftest import REPO


def _params(tmp_path, max_new_tokens: int):
    path = tmp_path / "params.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                # The decoding is the captioner's (corpus/params.py SHARED_PARAMS).
                "captioner": {
                    "generation": {"mode": "greedy", "max_new_tokens": max_new_tokens},
                },
                "recaptioned_dataset": {
                    "backend": "prefix",
                    "batch_size": 16,
                    "short_max_new_tokens": 4,
                },
            }
        )
    )
    return path


def test_recaptioned_shards_hold_every_key_once(tiny_raw, tiny_captioner, tmp_path):
    backend = make_backend({"generation": {"max_new_tokens": 8}}, tiny_captioner)
    out = tmp_path / "recaptioned"
    status = recaption(backend, tiny_raw, out)
    index = pd.read_parquet(tiny_raw / "index.parquet")
    df = pd.concat([pd.read_parquet(p) for p in sorted(out.glob("*.parquet"))])
    assert set(status.values()) == {"captioned"} and len(status) == index["shard"].nunique()
    assert sorted(df["key"]) == sorted(index["key"])
    assert list(df.columns[:6]) == [
        "key",
        "shard",
        "split",
        "alt_text",
        "short_caption",
        "descriptive_caption",
    ]
    assert (df["captioner_version"] == backend.version).all()
    assert recaption(backend, tiny_raw, out) == {s: "skipped" for s in status}
    # Same weights, another decoding: other captions, so every shard is redone.
    beam = make_backend({"generation": {"max_new_tokens": 8, "mode": "beam"}}, tiny_captioner)
    assert recaption(beam, tiny_raw, out) == {s: "captioned" for s in status}


@pytest.mark.slow  # recaptioning killed and rerun as processes
def test_killed_recaptioning_resumes_without_duplicates_or_holes(
    tiny_raw, tiny_captioner, tmp_path
):
    out = tmp_path / "recaptioned"
    cmd = [
        sys.executable,
        "-m",
        "models.captioning.recaption",
        "--params",
        str(_params(tmp_path, 120)),
        "--raw",
        str(tiny_raw),
        "--captioner",
        str(tiny_captioner),
        "--out",
        str(out),
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list(out.glob("*.parquet")):
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    n_shards = pd.read_parquet(tiny_raw / "index.parquet")["shard"].nunique()
    assert 1 <= len(first) < n_shards, "the kill should land mid-run"

    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.count("skipped") == len(first)
    for name, mtime in first.items():  # finished shards are not redone
        assert (out / name).stat().st_mtime_ns == mtime
    df = pd.concat([pd.read_parquet(p) for p in sorted(out.glob("*.parquet"))])
    index = pd.read_parquet(tiny_raw / "index.parquet")
    assert df["key"].is_unique and sorted(df["key"]) == sorted(index["key"])
    assert not list(out.glob(".*tmp*"))  # no half-written file left behind


def test_an_unreadable_image_in_a_shard_is_skipped_and_reported(tiny_raw, tiny_captioner, tmp_path):
    import io
    import shutil
    import tarfile

    from models.captioning.recaption import shard_rejections

    raw = tmp_path / "raw"
    shutil.copytree(tiny_raw, raw)
    index = pd.read_parquet(raw / "index.parquet")
    shard = index["shard"].iloc[0]
    victim = index.loc[index["shard"] == shard, "key"].iloc[3]
    members = []
    with tarfile.open(raw / f"{shard}.tar") as tf:  # rewrite the shard with one image broken
        for m in tf:
            data = tf.extractfile(m).read()
            members.append((m.name, b"\x89PNG garbage" if m.name == f"{victim}.png" else data))
    with tarfile.open(raw / f"{shard}.tar", "w") as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))

    backend = make_backend({"generation": {"max_new_tokens": 4}}, tiny_captioner)
    out = tmp_path / "recaptioned"
    recaption(backend, raw, out, [shard])
    df = pd.read_parquet(out / f"{shard}.parquet")
    rejected = shard_rejections(out / f"{shard}.parquet")
    assert victim not in set(df["key"]) and list(rejected) == [victim]
    assert "undecodable image" in rejected[victim]
    assert len(df) + 1 == (index["shard"] == shard).sum()
