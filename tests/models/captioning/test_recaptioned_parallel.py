"""Shards recaptioned side by side by separate processes into one folder: every key once,
and no writer deletes a file another one has in flight."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from models.captioning.recaption import remove_stale_temps
from tests.conftest import REPO


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_only_temps_of_dead_writers_on_this_machine_are_removed(tmp_path):
    host = socket.gethostname()
    live = tmp_path / f".00000.parquet.tmp-{host}-{os.getpid()}"
    dead = tmp_path / f".00001.parquet.tmp-{host}-{_dead_pid()}"
    elsewhere = tmp_path / ".00002.parquet.tmp-other-machine-1"
    for f in (live, dead, elsewhere):
        f.write_bytes(b"half a shard")
    assert remove_stale_temps(tmp_path) == [dead]
    assert live.exists() and elsewhere.exists() and not dead.exists()


@pytest.mark.slow  # two recaptioning processes
def test_two_processes_recaption_disjoint_shards_into_one_folder(
    tiny_raw, tiny_captioner, tmp_path
):
    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump(
            {
                "captioner": {"generation": {"mode": "greedy", "max_new_tokens": 16}},
                "recaptioned_dataset": {"backend": "prefix", "batch_size": 16},
            }
        )
    )
    out = tmp_path / "recaptioned"
    out.mkdir()
    # A writer in flight on this machine (this test process): neither run may delete it.
    in_flight = out / f".99999.parquet.tmp-{socket.gethostname()}-{os.getpid()}"
    in_flight.write_bytes(b"half a shard")
    index = pd.read_parquet(tiny_raw / "index.parquet")
    shards = sorted(index["shard"].unique())
    halves = [shards[0::2], shards[1::2]]
    cmd = [sys.executable, "-m", "models.captioning.recaption", "--params", str(params),
           "--raw", str(tiny_raw), "--captioner", str(tiny_captioner),
           "--out", str(out)]  # fmt: skip
    procs = [
        subprocess.Popen([*cmd, "--shards", *half], cwd=REPO, stdout=subprocess.PIPE, text=True)
        for half in halves
    ]
    for proc in procs:
        out_text, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out_text
    df = pd.concat([pd.read_parquet(p) for p in sorted(out.glob("*.parquet"))])
    assert df["key"].is_unique and sorted(df["key"]) == sorted(index["key"])
    assert sorted(df["shard"].unique()) == shards
    assert in_flight.exists()
    assert [p.name for p in out.glob(".*")] == [in_flight.name]


@pytest.mark.slow  # two worker processes
def test_worker_processes_write_what_one_process_writes(tiny_raw, tiny_captioner, tmp_path):
    """`recaptioned_dataset.workers: 2` captions the shards in two processes: the same
    rows as one process, each shard written once, and a shard already current is skipped."""
    import shutil

    import torch

    from models.captioning.recaption import RecaptionConfig, make_backend, recaption, worker_pool

    gen = {"mode": "beam", "num_beams": 2, "check_clauses": True, "max_new_tokens": 12}
    cfg = RecaptionConfig.from_dict({"batch_size": 16, "workers": 2, "generation": gen})
    backend = make_backend(cfg, tiny_captioner)
    shards = sorted(pd.read_parquet(tiny_raw / "index.parquet")["shard"].unique())
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // 2))  # as each worker has
    try:
        recaption(backend, tiny_raw, tmp_path / "one", shards, cfg.batch_size)
    finally:
        torch.set_num_threads(threads)
    (tmp_path / "two").mkdir()
    shutil.copy(tmp_path / "one" / f"{shards[0]}.parquet", tmp_path / "two")
    with worker_pool(cfg, tiny_captioner) as pool:
        status = recaption(backend, tiny_raw, tmp_path / "two", shards, cfg.batch_size, pool)
    assert status == {s: "skipped" if s == shards[0] else "captioned" for s in shards}
    for shard in shards:
        one = pd.read_parquet(tmp_path / "one" / f"{shard}.parquet")
        two = pd.read_parquet(tmp_path / "two" / f"{shard}.parquet")
        pd.testing.assert_frame_equal(one, two)
    assert not list((tmp_path / "two").glob(".*"))  # no temp file left behind
