"""Samples/s of our shard reader vs open_clip_train's webdataset loader, side by side in one run.

Both read the same generated shards with the same worker count, batch size, open_clip preprocessing
(``tiny-vit``'s 32 px transforms) and tokenizer. Two settings:

* ``single_pass``: every sample once, no shuffle (ours: ``resampled=False``; open_clip: its
  evaluation path, ``is_train=False``);
* ``train``: shard resampling with a 1000-sample shuffle buffer and an epoch of ``--train-samples``
  (ours: ``resampled=True``; open_clip: ``is_train=True, dataset_resampled=True``).

Repetitions alternate the two readers so drifting machine load hits both alike. Prints one JSON
object with min/median/max samples/s per reader and setting and the ratio of medians (ours / open_clip).

    python bench/bench_reader.py --workers 2 --reps 3
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
from common import cli, spread
from PIL import Image

from pipeline.backbone import load_backbone
from pipeline.config import BackboneConfig
from pipeline.data.config import ShardDataConfig
from pipeline.data.shard_writer import Pair, write_shards
from pipeline.data.shards import build_shard_loader
from pipeline.digits_demo.data import patch_open_clip_train_wds


def make_shards(out: Path, n_shards: int, per_shard: int, size: int) -> str:
    """Write ``n_shards`` shards of random-texture JPEGs with short captions; returns the URL pattern."""
    rng = np.random.default_rng(0)

    def pairs():
        for i in range(n_shards * per_shard):
            buf = io.BytesIO()
            small = rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8)
            Image.fromarray(small).resize((size, size), Image.BILINEAR).save(buf, "JPEG", quality=90)
            yield Pair(buf.getvalue(), f"a generated picture number {i} with some texture")

    write_shards(pairs(), out, per_shard)
    return str(out / f"{{000000..{n_shards - 1:06d}}}.tar")


def run_ours(urls: str, bb, args, train: bool) -> int:
    cfg = ShardDataConfig(urls=urls, resampled=train, epoch_samples=args.train_samples, batch_size=args.batch_size,
                          workers=args.workers, shuffle_buffer=1000 if train else 0, shuffle_initial=100)
    loader = build_shard_loader(cfg, preprocess=bb.preprocess_train if train else bb.preprocess_val,
                                tokenizer=bb.tokenizer)
    return sum(b["image"].shape[0] for b in loader)


def run_open_clip(urls: str, bb, args, train: bool) -> int:
    from open_clip_train.data import get_wds_dataset

    ns = Namespace(train_data=urls, val_data=urls, dataset_resampled=train, train_num_samples=args.train_samples,
                   val_num_samples=None, train_data_upsampling_factors=None, seed=0,
                   batch_size=args.batch_size, workers=args.workers, world_size=1)
    info = get_wds_dataset(ns, bb.preprocess_train if train else bb.preprocess_val, is_train=train,
                           tokenizer=bb.tokenizer)
    return sum(images.shape[0] for images, _ in info.dataloader)


def timed(fn, *a) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = fn(*a)
    return n / (time.perf_counter() - t0), n


def run(argv: list[str]) -> dict:
    """Run the benchmark; returns a JSON-able dict (see :func:`markdown`)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--samples-per-shard", type=int, default=250)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--train-samples", type=int, default=2000)
    args = ap.parse_args(argv)
    patch_open_clip_train_wds()  # open_clip_train 3.3's training loader needs it with webdataset 1.0
    bb = load_backbone(BackboneConfig(arch="tiny-vit", pretrained=""))
    result = {"args": vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        urls = make_shards(Path(tmp), args.shards, args.samples_per_shard, args.image_size)
        for setting, train in (("single_pass", False), ("train", True)):
            rates = {"ours": [], "open_clip": []}
            counts = {}
            for rep in range(args.reps):
                order = ("ours", "open_clip") if rep % 2 == 0 else ("open_clip", "ours")
                for name in order:
                    fn = run_ours if name == "ours" else run_open_clip
                    rate, counts[name] = timed(fn, urls, bb, args, train)
                    rates[name].append(rate)
            ratio = statistics.median(rates["ours"]) / statistics.median(rates["open_clip"])
            result[setting] = {"samples": counts, **{k: spread(v) for k, v in rates.items()},
                               "ratio_ours_over_open_clip": round(ratio, 3)}
    return result


def markdown(result: dict) -> str:
    a = result["args"]
    lines = [f"{a['shards']} shards x {a['samples_per_shard']} samples ({a['image_size']} px JPEG), batches of "
             f"{a['batch_size']}, {a['workers']} workers, {a['reps']} repetitions alternating the readers.", "",
             "| setting | reader | samples/s min | median | max | ratio of medians (ours / open_clip) |",
             "|---|---|---:|---:|---:|---:|"]
    for setting in ("single_pass", "train"):
        r = result[setting]
        for i, name in enumerate(("ours", "open_clip")):
            ratio = f"**{r['ratio_ours_over_open_clip']:.2f}**" if i == 0 else ""
            x = r[name]
            lines.append(f"| {setting} | {name} | {x['min']:.0f} | {x['median']:.0f} | {x['max']:.0f} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    cli(run, markdown, argv)


if __name__ == "__main__":
    main()
