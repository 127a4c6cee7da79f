"""Bundled real demo data: scikit-learn's handwritten digits (1797 8x8 scans shipped inside the package).

Everything is built from those images, offline, under ``DemoConfig.cache_dir`` (``cache/demo``):

* ``digits/images/<name>/<idx>.png`` + ``digits/split_zhou_Digits.json``: a few-shot classification
  set in the CoOp layout (``FewShotConfig(dataset="Digits", root=cache_dir)``), classes ``zero..nine``;
  test and val images are held out per class and never reach the shards;
* ``shards/{000000..}.tar``: image-caption pairs from the train images, each written with several
  differently worded captions;
* ``backbone.pt``: a tiny CLIP trained from scratch on those shards by open_clip's own trainer
  (``python -m open_clip_train.main``, CPU), loadable with
  ``load_backbone(BackboneConfig(arch=cfg.arch, pretrained=".../backbone.pt"))``.

``python -m pipeline.digits_demo.data`` builds what is missing (the backbone is cached, keyed by the config)
and prints the backbone's zero-shot accuracy on the held-out test digits.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.backbone import load_backbone
from pipeline.config import BackboneConfig
from pipeline.data.fewshot import Datum, read_split_file, write_split_file
from pipeline.data.shard_writer import Pair, read_shard_index, write_shards
from pipeline.fileio import atomic_write, atomic_write_json


@dataclass(frozen=True)
class DemoConfig:
    """The bundled demo: scikit-learn's handwritten digits as shards, a few-shot set and a backbone."""

    cache_dir: str = "cache/demo"
    """Where shards, the few-shot dataset, the open_clip_train logs and ``backbone.pt`` are kept."""
    arch: str = "tiny-vit-demo"
    """Backbone architecture trained from scratch: an in-repo open_clip config; ``tiny-vit-demo`` has
    9 layers per tower (enough for depth-9 deep prompts) at width 32 so it trains in minutes on CPU."""
    epochs: int = 8
    """open_clip_train epochs over the caption shards."""
    batch_size: int = 64
    """Contrastive batch size of the backbone training."""
    lr: float = 2e-3
    """Peak AdamW learning rate (cosine schedule)."""
    warmup: int = 30
    """Warmup steps (open_clip_train's default of 10000 is far longer than this whole run)."""
    workers: int = 1
    """open_clip_train data workers (one leaves the other core of a 2-core machine for compute)."""
    captions_per_image: int = 3
    """Differently worded captions written per training image (each a separate shard sample)."""
    samples_per_shard: int = 500
    """Samples per webdataset shard."""
    test_per_class: int = 50
    """Images per digit held out from everything as the test split (zero-shot accuracy)."""
    val_per_class: int = 10
    """Images per digit in the few-shot validation split (also never in the shards)."""
    seed: int = 0
    """Seed of the image split, caption wording and backbone training."""

CLASSNAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Varied wordings so the text tower learns the digit word, not one fixed sentence. {w} = word, {n} = numeral.
CAPTIONS = (
    "a photo of the digit {w}.", "a handwritten {w}.", "the number {w} written by hand.",
    "a scanned image of a handwritten {w}.", "{w}", "digit {w} ({n})", "a blurry low resolution {w}.",
    "an image showing the numeral {n}, {w}.", "a small grayscale picture of a {w}.",
    "someone wrote the number {w}.", "a {w} on a white background.", "handwriting: {n} ({w})",
)
EVAL_TEMPLATES = ("a photo of the digit {}.", "a handwritten {}.", "a {} on a white background.")
"""Class prompts of the zero-shot check (averaged text embeddings)."""


def digit_images(upscale: int = 4) -> tuple[list[Image.Image], np.ndarray]:
    """sklearn's digits as RGB PIL images (dark ink on white, ``8*upscale`` px square) and labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = []
    for a in d.images:  # values 0..16, ink = high
        gray = (255 - a * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        im = Image.fromarray(gray).resize((8 * upscale, 8 * upscale), Image.BILINEAR)
        images.append(im.convert("RGB"))
    return images, d.target.astype(int)


def split_indices(labels: np.ndarray, test_per_class: int, val_per_class: int, seed: int) -> dict[str, list[int]]:
    """Per-class random train/val/test split of image indices (test and val held out)."""
    rng, out = random.Random(f"digits-{seed}"), {"train": [], "val": [], "test": []}
    for y in range(len(CLASSNAMES)):
        idx = [int(i) for i in np.flatnonzero(labels == y)]
        rng.shuffle(idx)
        out["test"] += idx[:test_per_class]
        out["val"] += idx[test_per_class:test_per_class + val_per_class]
        out["train"] += idx[test_per_class + val_per_class:]
    return {k: sorted(v) for k, v in out.items()}


def build_fewshot_set(cfg: DemoConfig) -> Path:
    """Write ``<cache>/digits`` (PNG images + CoOp split file); returns the split file path."""
    d = Path(cfg.cache_dir) / "digits"
    split_path = d / "split_zhou_Digits.json"
    if split_path.is_file():
        return split_path
    images, labels = digit_images()
    parts = split_indices(labels, cfg.test_per_class, cfg.val_per_class, cfg.seed)
    splits = {}
    for s, idx in parts.items():
        splits[s] = []
        for i in idx:
            path = d / "images" / CLASSNAMES[labels[i]] / f"{i:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            images[i].save(path)
            splits[s].append(Datum(str(path), int(labels[i]), CLASSNAMES[labels[i]]))
    # Written (atomically) last: its presence means the folder is complete.
    write_split_file(split_path, splits, d / "images")
    return split_path


def caption_pairs(cfg: DemoConfig, train: list[Datum]) -> list[Pair]:
    """``captions_per_image`` differently worded captions per training image, shuffled."""
    rng, pairs = random.Random(f"captions-{cfg.seed}"), []
    for x in train:
        for tpl in rng.sample(CAPTIONS, cfg.captions_per_image):
            pairs.append(Pair(image=x.path, caption=tpl.format(w=x.classname, n=x.label),
                              meta={"label": x.label, "classname": x.classname}))
    rng.shuffle(pairs)  # mixed classes in every shard, so sequential reading still gives varied batches
    return pairs


def build_shards(cfg: DemoConfig) -> str:
    """Write the caption shards (once); returns their brace-expanded URL pattern."""
    out = Path(cfg.cache_dir) / "shards"
    if not (out / "sizes.json").is_file():
        train = read_split_file(build_fewshot_set(cfg), Path(cfg.cache_dir) / "digits" / "images")["train"]
        # the folder is the demo's own cache: a build killed before sizes.json (written last) is redone
        write_shards(caption_pairs(cfg, train), out, cfg.samples_per_shard, overwrite=True)
    n = len(read_shard_index(out))
    return str(out / f"{{000000..{n - 1:06d}}}.tar")


def _train_spec(cfg: DemoConfig) -> str:
    spec = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "cache_dir"}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def open_clip_train_args(cfg: DemoConfig, urls: str, n_samples: int, logs: Path) -> list[str]:
    """Command-line arguments for ``open_clip_train.main`` on CPU for the demo backbone."""
    return [
        "--model", cfg.arch, "--train-data", urls, "--dataset-type", "webdataset",
        "--train-num-samples", str(n_samples), "--batch-size", str(cfg.batch_size),
        "--epochs", str(cfg.epochs), "--lr", str(cfg.lr), "--wd", "0.1", "--warmup", str(cfg.warmup),
        "--workers", str(cfg.workers), "--device", "cpu", "--precision", "fp32", "--seed", str(cfg.seed),
        "--logs", str(logs), "--name", "demo", "--save-frequency", "0", "--report-to", "",
        "--log-every-n-steps", "10",
    ]


def export_backbone(checkpoint: str | Path, out: str | Path) -> Path:
    """Keep only the model weights of an open_clip_train checkpoint (drops optimizer and the DDP
    ``module.`` prefix); written atomically. Returns ``out``."""
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    sd = ckpt["state_dict"] if isinstance(ckpt, dict) and "state_dict" in ckpt else ckpt
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    return atomic_write(out, lambda f: torch.save(sd, f))


def train_cached_backbone(cfg: DemoConfig, spec: str, inputs: Callable[[], tuple[str, int]], record: dict,
                          force: bool = False, env: dict[str, str] | None = None) -> tuple[Path, float]:
    """Train ``<cfg.cache_dir>/backbone.pt`` with open_clip_train unless ``backbone.json`` records ``spec``;
    returns (path, training seconds, 0 when cached).

    ``inputs()`` returns the training shards' URL pattern and sample count; it is only called when training.
    ``record`` is stored in the manifest next to the spec, the training time and the sample count. Shared by the digits demo
    and the suite (:mod:`pipeline.suite.data`)."""
    cache = Path(cfg.cache_dir)
    out, manifest = cache / "backbone.pt", cache / "backbone.json"
    if not force and out.is_file() and manifest.is_file() and json.loads(manifest.read_text())["spec"] == spec:
        return out, 0.0
    urls, n_samples = inputs()
    logs = cache / "open_clip_logs"
    shutil.rmtree(logs / "demo", ignore_errors=True)  # open_clip_train refuses an existing run name
    t0 = time.time()
    cmd = [sys.executable, "-m", "pipeline.digits_demo.data", "open-clip-train",
           *open_clip_train_args(cfg, urls, n_samples, logs)]
    subprocess.run(cmd, check=True, env=env)
    seconds = time.time() - t0
    export_backbone(logs / "demo" / "checkpoints" / f"epoch_{cfg.epochs}.pt", out)
    atomic_write_json(manifest, {"spec": spec, **record, "train_seconds": seconds, "n_samples": n_samples},
                      indent=None)
    return out, seconds


def train_backbone(cfg: DemoConfig, force: bool = False) -> tuple[Path, float]:
    """Train (or reuse) ``<cache>/backbone.pt``; returns (path, training seconds, 0 when cached)."""
    def inputs() -> tuple[str, int]:
        urls = build_shards(cfg)
        return urls, sum(read_shard_index(Path(cfg.cache_dir) / "shards").values())

    return train_cached_backbone(cfg, _train_spec(cfg), inputs, {"config": dataclasses.asdict(cfg)}, force)


@torch.no_grad()
def zero_shot_accuracy(backbone, items: list[Datum], classnames, templates=EVAL_TEMPLATES, batch_size=256) -> float:
    """Top-1 accuracy of plain CLIP zero-shot classification (template-averaged class embeddings)."""
    model = backbone.model
    weights = []
    for name in classnames:
        t = model.encode_text(backbone.tokenizer([tpl.format(name) for tpl in templates]))  # [T, D]
        t = torch.nn.functional.normalize(t, dim=-1).mean(0)
        weights.append(torch.nn.functional.normalize(t, dim=0))
    weights = torch.stack(weights, dim=1)  # [D, C]
    correct = 0
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        x = torch.stack([backbone.preprocess_val(Image.open(d.path).convert("RGB")) for d in chunk])
        f = torch.nn.functional.normalize(model.encode_image(x), dim=-1)  # [B, D]
        pred = (f @ weights).argmax(dim=1)
        correct += int((pred == torch.tensor([d.label for d in chunk])).sum())
    return correct / len(items)


def build_demo(cfg: DemoConfig | None = None, force: bool = False) -> dict:
    """Build (or reuse) everything; returns paths, timings and the held-out zero-shot accuracy."""
    cfg = cfg if cfg is not None else DemoConfig()
    t0 = time.time()
    split = build_fewshot_set(cfg)
    urls = build_shards(cfg)
    ckpt, train_s = train_backbone(cfg, force)
    backbone = load_backbone(BackboneConfig(arch=cfg.arch, pretrained=str(ckpt)))
    test = read_split_file(split, Path(cfg.cache_dir) / "digits" / "images")["test"]
    acc = zero_shot_accuracy(backbone, test, CLASSNAMES)
    return {"shards": urls, "split_file": str(split), "backbone": str(ckpt), "arch": cfg.arch,
            "train_seconds": round(train_s, 1), "total_seconds": round(time.time() - t0, 1),
            "zero_shot_top1": round(acc, 4), "n_test": len(test), "chance": 1 / len(CLASSNAMES)}


def patch_open_clip_train_wds() -> None:
    """Make open_clip_train's training loader work with webdataset 1.0, and reproducible.

    1. webdataset 1.0's ``tar_file_expander`` yields an empty dict after every shard (an end-of-shard
       marker); open_clip_train 3.3's ``group_by_keys_nothrow`` indexes it and dies with
       ``KeyError: 'fname'`` on the first shard. Asking the expander for no marker restores the stream
       it expects. Only the module attribute that ``get_wds_dataset`` looks up at call time is replaced.
    2. open_clip_train's sample shuffle buffer is ``wds.shuffle(bufsize, initial)`` without a seed, and
       webdataset then seeds it from the process id and the clock: the order of the samples, hence the
       trained backbone, changed from run to run with the same ``--seed``. The shuffle is seeded instead
       from the DataLoader worker's seed (which open_clip_train derives from ``--seed``) and the number of
       times the worker has started it (one per epoch), so the same arguments train the same weights.
       Only open_clip_train's own reference to webdataset is redirected (``open_clip_train.data.wds``);
       ``webdataset.shuffle`` itself, which our shard reader uses with its own generator, is untouched.

    Idempotent.
    """
    import open_clip_train.data as ocd
    import webdataset
    from webdataset.tariterators import tar_file_expander, url_opener

    def tarfile_to_samples_nothrow(src, handler=ocd.log_and_continue):
        files = tar_file_expander(url_opener(src, handler=handler), handler=handler, eof_value=None)
        return ocd.group_by_keys_nothrow(files, handler=handler)

    ocd.tarfile_to_samples_nothrow = tarfile_to_samples_nothrow
    ocd.wds = _WebdatasetSeededShuffle(webdataset)


class _WebdatasetSeededShuffle:
    """``webdataset`` as open_clip_train.data sees it once patched: every attribute is webdataset's, except
    ``shuffle`` without a seed or generator, which becomes a :class:`_WorkerSeededShuffle`
    (:func:`patch_open_clip_train_wds`)."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        return getattr(self._module, name)

    def shuffle(self, bufsize=1000, initial=100, rng=None, seed=None, **kwargs):
        if rng is not None or seed is not None:  # the caller chose its randomness: leave it alone
            return self._module.shuffle(bufsize, initial, rng=rng, seed=seed, **kwargs)
        return _WorkerSeededShuffle(bufsize, initial, kwargs)


class _WorkerSeededShuffle:
    """A webdataset pipeline stage: a shuffle buffer seeded from the DataLoader worker's seed and the number
    of times this worker has started it (one per epoch). A plain object, so workers may be spawned."""

    def __init__(self, bufsize: int, initial: int, kwargs: dict):
        self.bufsize, self.initial, self.kwargs = bufsize, initial, kwargs
        self.starts = 0

    def __call__(self, src):
        import open_clip_train.data as ocd
        from webdataset.filters import _shuffle

        generator = random.Random(f"{ocd.pytorch_worker_seed()}-{self.starts}")
        self.starts += 1
        return _shuffle(src, self.bufsize, self.initial, rng=generator, **self.kwargs)


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.digits_demo.data [--cache-dir DIR] [--force] [--epochs N]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["open-clip-train"]:
        # open_clip_train resolves --model in its own process: register the in-repo archs there first
        from open_clip_train.main import main as oc_main

        from pipeline.backbone import register_tiny_archs

        register_tiny_archs()
        patch_open_clip_train_wds()
        # open_clip_train sets the root logger to INFO, which lets torch print its compile stats at exit
        logging.getLogger("torch").setLevel(logging.WARNING)
        oc_main(argv[1:])
        return 0
    ap = argparse.ArgumentParser(prog="python -m pipeline.digits_demo.data", description=__doc__.split("\n")[0])
    ap.add_argument("--cache-dir", default=DemoConfig.cache_dir)
    ap.add_argument("--epochs", type=int, default=DemoConfig.epochs)
    ap.add_argument("--force", action="store_true", help="retrain the backbone even if cached")
    args = ap.parse_args(argv)
    result = build_demo(DemoConfig(cache_dir=args.cache_dir, epochs=args.epochs), force=args.force)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    from pipeline.config import run_main  # user errors: one line on stderr, exit status 2

    raise SystemExit(run_main(main))
