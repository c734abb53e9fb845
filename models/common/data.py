"""Images and texts of the raw dataset as tensors for training and captioning.

The tiny corpus fits in memory (20k x 3 x 64 x 64 uint8 is 245 MB), so shards are
decoded once into one uint8 tensor and batches are slices of it: data loading never
limits CPU training.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from corpus.shards import IMAGE_EXTS, split_member_name


def _decode(data: bytes, size: int) -> np.ndarray:
    return fit_square(Image.open(io.BytesIO(data)).convert("RGB"), size)


def fit_square(img: Image.Image, size: int) -> np.ndarray:
    """HxWx3 uint8 of an RGB image at size x size, the way every training image is read:
    judges trained on renders see them exactly as the models saw the corpus."""
    if img.size != (size, size):
        # Centre-crop to a square, then resize: what open_clip's preprocessing does.
        w, h = img.size
        s = min(w, h)
        img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def read_shard_images(
    tar: Path, size: int, keys: set[str] | None = None
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(key -> HxWx3 uint8, key -> why it could not be read) for one shard's images
    (optionally only `keys`)."""
    out, failed = {}, {}
    with tarfile.open(tar, "r") as tf:
        for m in tf:
            key, ext = split_member_name(m.name)
            if ext in IMAGE_EXTS and (keys is None or key in keys):
                try:
                    out[key] = _decode(tf.extractfile(m).read(), size)
                except (OSError, SyntaxError, ValueError) as e:
                    failed[key] = f"undecodable image in {tar.name}: {type(e).__name__}: {e}"
    return out, failed


def load_images_lenient(
    raw_dir: Path, keys: Sequence[str], shards: Sequence[str], size: int
) -> tuple[torch.Tensor, list[str], dict[str, str]]:
    """(uint8 (N, 3, size, size), the keys of those N images in `keys` order, {key: why}
    for the images that are missing or no longer decode)."""
    wanted: dict[str, set[str]] = {}
    for k, s in zip(keys, shards, strict=True):
        wanted.setdefault(s, set()).add(k)
    found: dict[str, np.ndarray] = {}
    failed: dict[str, str] = {}
    for shard, ks in wanted.items():
        got, bad = read_shard_images(Path(raw_dir) / f"{shard}.tar", size, ks)
        found.update(got)
        failed.update(bad)
        failed.update({k: f"not in shard {shard}.tar" for k in ks - got.keys() - bad.keys()})
    ok = [k for k in keys if k in found]
    arr = np.stack([found[k] for k in ok]) if ok else np.zeros((0, size, size, 3), np.uint8)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous(), ok, failed


def load_images(
    raw_dir: Path, keys: Sequence[str], shards: Sequence[str], size: int
) -> torch.Tensor:
    """uint8 (N, 3, size, size) in the order of `keys`; any unreadable image raises."""
    images, _, failed = load_images_lenient(raw_dir, keys, shards, size)
    if failed:
        examples = dict(list(failed.items())[:3])
        raise KeyError(f"{len(failed)} indexed images could not be read, e.g. {examples}")
    return images


def normalize_images(
    images: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """uint8 (B,3,H,W) -> float normalised at the model's input size."""
    x = images.float().div_(255.0)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", antialias=True)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


class ImageTensorDataset(torch.utils.data.Dataset):
    """uint8 images with per-image tensors of the same length (CLIP text ids, word
    targets); an item is {"images": ..., name: ...}."""

    def __init__(self, images: torch.Tensor, **tensors: torch.Tensor):
        for name, t in tensors.items():
            if len(t) != len(images):
                raise ValueError(f"{len(images)} images but {len(t)} {name}")
        self.images, self.tensors = images, tensors

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"images": self.images[i], **{k: t[i] for k, t in self.tensors.items()}}


class ImageTextDataset(torch.utils.data.Dataset):
    """(image uint8, token ids) pairs; `collate` pads to the longest in the batch."""

    def __init__(self, images: torch.Tensor, token_ids: Sequence[Sequence[int]], pad_id: int):
        if len(images) != len(token_ids):
            raise ValueError(f"{len(images)} images but {len(token_ids)} texts")
        self.images, self.token_ids, self.pad_id = images, [list(t) for t in token_ids], pad_id

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, list[int]]:
        return self.images[i], self.token_ids[i]

    def collate(self, batch: list[tuple[torch.Tensor, list[int]]]) -> dict[str, torch.Tensor]:
        images = torch.stack([b[0] for b in batch])
        n = max(len(b[1]) for b in batch)
        ids = torch.full((len(batch), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, (_, t) in enumerate(batch):
            ids[i, : len(t)] = torch.tensor(t, dtype=torch.long)
            mask[i, : len(t)] = 1
        return {"images": images, "input_ids": ids, "attention_mask": mask}


class LengthBucketBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Shuffled batches of similar text length: padding to the longest caption of a
    random batch would double the tokens a descriptive-caption step processes.

    Indices are shuffled, cut into pools of `pool` batches, sorted by length inside a
    pool, batched, and the batches shuffled again, so every epoch differs (by seed)."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, pool: int = 50):
        self.lengths, self.batch_size, self.seed, self.pool = list(lengths), batch_size, seed, pool
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.lengths) // self.batch_size

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        order = torch.randperm(len(self.lengths), generator=g).tolist()
        batches = []
        span = self.batch_size * self.pool
        for start in range(0, len(order), span):
            chunk = sorted(order[start : start + span], key=lambda i: self.lengths[i])
            batches += [
                chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)
            ]
        batches = [b for b in batches if len(b) == self.batch_size]  # drop_last
        for i in torch.randperm(len(batches), generator=g).tolist():
            yield batches[i]
