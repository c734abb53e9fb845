"""Each kind of bad input is repaired (and counted) or skipped with a reason; nothing is
lost: input = kept + rejected, and the run goes on."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from corpus.raw_dataset import build_raw_dataset
from corpus.sample_check import Sample, SampleLimits, check_sample, clean_alt_text
from corpus.shards import read_preview
from tests.conftest import small_raw_params


def _img(mode: str = "RGB", size=(32, 32), fmt: str = "PNG", color=None) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color if color is not None else 128).save(buf, format=fmt)
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tf.addfile(ti, io.BytesIO(data))


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            _add(tf, name, data)


def _sample(key: str, png: bytes, caption: bytes = b"a caption") -> list[tuple[str, bytes]]:
    return [
        (f"{key}.png", png),
        (f"{key}.txt", caption),
        (f"{key}.json", json.dumps({"url": f"http://x/{key}"}).encode()),
    ]


@pytest.fixture
def bad_webdataset(tmp_path: Path) -> Path:
    root = tmp_path / "img2dataset"
    root.mkdir()
    good = _img()
    cmyk_jpeg = _img("CMYK", fmt="JPEG", color=(0, 255, 255, 0))
    bomb = _img("1", size=(10_000, 5_000))  # 50 Mpx of one bit: a few KB on disk
    members = (
        _sample("000", good)
        + _sample("001", b"\xff\xd8\xff\xe0 not really a jpeg")
        + _sample("002", good[: len(good) // 2])
        + _sample("003", good, "caf\xe9 cr\xe8me".encode("latin-1"))
        + _sample("004", good, b"   ")
        + [("005.jpg", cmyk_jpeg), ("005.txt", b"cmyk")]
        + _sample("006", _img("L"))
        + _sample("007", _img("RGBA", color=(255, 0, 0, 0)))
        + _sample("008", _img("P"))
        + _sample("009", _img(size=(2000, 40)))
        + _sample("010", bomb)
        + [("../../etc/evil.png", good), ("../../etc/evil.txt", b"x")]
        + [("011.txt", b"caption without an image")]
        + _sample("012", good)
    )
    _write_tar(root / "00000.tar", members)
    # A second shard repeats key 000 and ends in a truncated member.
    with tarfile.open(root / "00001.tar", "w") as tf:
        for name, data in _sample("000", good) + _sample("100", good):
            _add(tf, name, data)
        ti = tarfile.TarInfo("101.png")
        ti.size = len(good)
        tf.addfile(ti, io.BytesIO(good))
    data = (root / "00001.tar").read_bytes()
    cut = data.index(b"101.png") + 512 + len(good) // 3  # header, then a third of the data
    (root / "00001.tar").write_bytes(data[:cut])
    # A symlink member in a third shard, and a shard that is not a tar at all.
    with tarfile.open(root / "00002.tar", "w") as tf:
        ti = tarfile.TarInfo("200.png")
        ti.type, ti.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(ti)
        for name, data in _sample("201", good):
            _add(tf, name, data)
    (root / "00003.tar").write_bytes(b"this is not a tar archive" * 40)
    return root


def test_every_bad_input_is_repaired_or_rejected_with_its_reason(bad_webdataset, tmp_path):
    params = small_raw_params(source="webdataset", input_path=str(bad_webdataset))
    report = build_raw_dataset(params, tmp_path / "raw", progress=False)
    m = report.manifest
    index = pd.read_parquet(tmp_path / "raw" / "index.parquet").set_index("key")
    rejected = pd.read_parquet(tmp_path / "raw" / "rejected.parquet")
    reasons = dict(zip(rejected["key"].fillna("<shard>"), rejected["reason"], strict=True))

    assert m["counts"]["input"] == m["counts"]["kept"] + m["counts"]["rejected"]
    assert m["counts"]["kept"] == len(index) and m["counts"]["rejected"] == len(rejected)
    assert reasons["001"] == "corrupt_image"
    assert reasons["002"] == "truncated_image"
    assert reasons["010"] == "decompression_bomb"
    assert reasons["../../etc/evil"] == "unsafe_member"
    assert reasons["200"] == "unsafe_member"  # symlink member
    assert reasons["011"] == "missing_image"
    assert reasons["101"] == "truncated_tar_member"
    assert reasons["<shard>"] == "unreadable_shard"
    assert (rejected["key"] == "000").sum() == 1 and "duplicate_key" in set(rejected["reason"])
    assert set(index.index) == {
        "000",
        "003",
        "004",
        "005",
        "006",
        "007",
        "008",
        "009",
        "012",
        "100",
        "201",
    }
    assert index.loc["003", "alt_text"] == "café crème"
    assert index.loc["004", "alt_text"] == ""
    assert (index.loc["009", ["width", "height"]] == [1024, 20]).all()
    repairs = m["repaired_by_kind"]
    for kind in (
        "alt_text_not_utf8",
        "empty_alt_text",
        "converted_CMYK",
        "converted_L",
        "converted_RGBA",
        "converted_P",
        "resized_oversized",
    ):
        assert repairs.get(kind, 0) >= 1, kind
    # Every kept image decodes as RGB; the red-but-transparent RGBA was put on white.
    for tar in sorted((tmp_path / "raw").glob("*.tar")):
        for data, _ in read_preview(tar, 100):
            assert Image.open(io.BytesIO(data)).mode == "RGB"


def test_caption_cleaning():
    limits = SampleLimits(max_alt_text_chars=10)
    assert clean_alt_text(b"\xef\xbb\xbfhello", limits) == ("hello", [])
    assert clean_alt_text("a\x00b\tc", limits) == ("a b c", ["alt_text_control_chars"])
    assert clean_alt_text("x" * 30, limits) == ("x" * 10, ["alt_text_truncated"])
    assert clean_alt_text(None, limits)[1] == ["missing_alt_text", "empty_alt_text"]


def test_too_small_and_oversized_limits_are_configurable():
    tiny = Sample("k", "u", "o", _img(size=(4, 4)), b"c")
    assert check_sample(tiny, SampleLimits()).reason == "too_small"
    big = Sample("k", "u", "o", _img(size=(300, 100)), b"c")
    out = check_sample(big, SampleLimits(max_side=150))
    assert (out.width, out.height) == (150, 50) and out.repairs == ["resized_oversized"]


def test_folder_source_with_sidecars_and_a_link_outside(tmp_path):
    root = tmp_path / "folder"
    (root / "sub").mkdir(parents=True)
    (root / "a.png").write_bytes(_img())
    (root / "a.txt").write_bytes(b"first")
    (root / "sub" / "b.jpg").write_bytes(_img(fmt="JPEG"))
    (root / "sub" / "b.txt").write_bytes("na\xefve".encode("latin-1"))
    (root / "c.png").write_bytes(b"garbage")
    outside = tmp_path / "secret.png"
    outside.write_bytes(_img())
    (root / "d.png").symlink_to(outside)
    params = small_raw_params(source="folder", input_path=str(root))
    report = build_raw_dataset(params, tmp_path / "raw", progress=False)
    index = pd.read_parquet(tmp_path / "raw" / "index.parquet").set_index("key")
    assert dict(index["alt_text"]) == {"a": "first", "sub_b": "naïve"}
    assert report.manifest["rejected_by_reason"] == {"corrupt_image": 1, "unsafe_member": 1}


def test_missing_input_folder_is_a_clear_error(tmp_path):
    params = small_raw_params(source="webdataset", input_path=str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="needs input_path to be an existing folder"):
        build_raw_dataset(params, tmp_path / "raw", progress=False)


def test_a_tar_cut_between_members_is_not_read_as_a_shorter_valid_one(tmp_path):
    """Python's tarfile stops silently at a header cut short; the last sample read is
    rejected as truncated (it may lack members) and the shard's earlier samples kept."""
    root = tmp_path / "wds"
    root.mkdir()
    full = root / "00000.tar"
    _write_tar(full, [m for k in ("a", "b", "c") for m in _sample(k, _img())])
    with tarfile.open(full) as tf:
        cut = next(m.offset for m in tf.getmembers() if m.name.startswith("c."))
    full.write_bytes(full.read_bytes()[: cut + 100])  # inside c's first header
    params = small_raw_params(source="webdataset", input_path=str(root))
    report = build_raw_dataset(params, tmp_path / "raw", progress=False)
    index = pd.read_parquet(tmp_path / "raw" / "index.parquet")
    assert list(index["key"]) == ["a"]
    rejected = pd.read_parquet(tmp_path / "raw" / "rejected.parquet")
    assert list(rejected["key"]) == ["b"] and rejected["reason"].iloc[0] == "truncated_tar_member"
    assert "no end-of-archive marker" in rejected["detail"].iloc[0]
    assert report.counts["input"] == report.counts["kept"] + report.counts["rejected"]
