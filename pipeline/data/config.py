"""Typed configs of the data layer (webdataset shards, few-shot datasets).

Same conventions as :mod:`pipeline.config`: frozen dataclasses, one docstring per field, only
scalar types so every field can be set with a dotted ``key=value`` override. Several shard sources
are written as one ``::``-separated string, the convention open_clip and webdataset also use.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import ConfigError


@dataclass(frozen=True)
class ShardDataConfig:
    """A stream of image-text pairs read from webdataset shards (docs/ARCHITECTURE.md section 2)."""

    urls: str = ""
    """Shard URLs with brace expansion, e.g. ``/data/cc3m/{000000..000331}.tar``; anything
    ``webdataset.gopen`` opens works (``pipe:curl -s ...``, ``http(s)://``, ``gs://``...). Several
    sources are separated by ``::``."""
    weights: str = ""
    """Sampling weight of each ``::``-separated source in resampled mode, e.g. ``3::1``; empty means
    every source weighs the same. Ignored in single-pass mode (every shard is read once)."""
    resampled: bool = True
    """``True``: draw shards with replacement forever and cut an epoch at ``epoch_samples`` (training).
    ``False``: read every shard exactly once across all ranks and workers (extraction, evaluation)."""
    epoch_samples: int = 0
    """Samples per epoch summed over all ranks in resampled mode; each rank yields
    ``ceil(epoch_samples / (batch_size * world_size))`` batches. Required when ``resampled``."""
    batch_size: int = 64
    """Samples per batch on one rank."""
    workers: int = 2
    """DataLoader worker processes per rank (0 = read in the main process)."""
    shuffle_buffer: int = 1000
    """Size of the per-worker sample shuffle buffer; 0 disables shuffling (set 0 for extraction so
    samples come in shard order)."""
    shuffle_initial: int = 100
    """Samples collected before the shuffle buffer starts emitting (trades start-up time for mixing)."""
    seed: int = 0
    """Base seed of shard resampling and sample shuffling; combined with epoch, rank and worker."""
    drop_last: bool = False
    """Single-pass mode only: drop each worker's last partial batch (resampled batches are always full)."""
    image_keys: str = "jpg;jpeg;png;webp"
    """Semicolon-separated file extensions tried, in order, for a sample's image."""
    text_key: str = "txt"
    """File extension holding the caption."""
    max_image_pixels: int = 89_478_485
    """Images whose header declares more pixels (width x height) are skipped and counted as
    ``oversized_image`` without being decoded (a decompression bomb would otherwise take gigabytes of
    RAM). The default is PIL's own warning threshold (about 9459 x 9459); 0 turns this limit off, which
    leaves PIL's hard error at twice ``PIL.Image.MAX_IMAGE_PIXELS`` (also counted as oversized)."""
    max_member_bytes: int = 128 * 2**20
    """Tar members larger than this are not read into memory (the reader skips over their bytes); their
    sample is skipped and counted as ``oversized_member``. 0 = no limit."""
    allow_empty: bool = False
    """Single-pass mode: ``False`` raises at the end of a pass whose shards gave no usable sample at all
    (wrong URLs, every shard missing or corrupt); ``True`` lets such a pass end empty."""


@dataclass(frozen=True)
class FewShotConfig:
    """A downstream few-shot classification dataset and its base/new subset (docs/ARCHITECTURE.md section 6)."""

    dataset: str = "OxfordPets"
    """Dataset name from :data:`pipeline.data.datasets_meta.DATASETS` (``ImageNet``, ``EuroSAT``...)
    or ``folder`` for a generic labelled image folder at ``root``."""
    root: str = "data"
    """Directory holding the datasets in the CoOp layout (``<root>/oxford_pets/...``); for
    ``dataset=folder`` the labelled folder itself."""
    k_shot: int = 16
    """Training shots per class, sampled before the base/new split; 0 or negative keeps all images."""
    seed: int = 1
    """Seed of the shot sampling (the protocol averages seeds 1, 2, 3)."""
    subsample: str = "base"
    """Which classes to keep: ``all``, ``base`` (first ceil(n/2) labels) or ``new`` (the rest)."""
    shot_cache_dir: str = "cache/fewshot"
    """Where sampled shot indices are stored so every method trains on the same images."""
    split_file: str = ""
    """Override the split file (CoOp ``split_zhou_*.json`` format); empty uses the dataset's own."""
    augment: str = ""
    """Training augmentation preset (:mod:`pipeline.augment`): ``coop`` (random resized crop, scale 0.08-1,
    plus horizontal flip: natural images), ``noflip`` (the same crop, no flip: glyphs and digits, where a
    mirror image is another class or none), ``open_clip`` (open_clip's own, scale 0.9-1); empty = the
    dataset's choice (``DatasetInfo.augment``)."""


SUBSAMPLES = ("all", "base", "new")


def validate_shard_data(cfg: ShardDataConfig, world_size: int = 1) -> None:
    """Check values that types cannot express; raises :class:`ConfigError` naming the key."""
    if not cfg.urls:
        raise ConfigError("data.urls is empty: give at least one shard URL")
    if cfg.batch_size < 1:
        raise ConfigError(f"data.batch_size={cfg.batch_size} must be >= 1")
    if cfg.workers < 0:
        raise ConfigError(f"data.workers={cfg.workers} must be >= 0")
    if cfg.shuffle_buffer < 0 or cfg.shuffle_initial < 0:
        raise ConfigError("data.shuffle_buffer and data.shuffle_initial must be >= 0")
    if cfg.max_member_bytes < 0:
        raise ConfigError(f"data.max_member_bytes={cfg.max_member_bytes} must be >= 0 (0 = no limit)")
    if cfg.max_image_pixels < 0:
        raise ConfigError(f"data.max_image_pixels={cfg.max_image_pixels} must be >= 0 (0 = no limit of our own)")
    if cfg.resampled and cfg.epoch_samples < 1:
        raise ConfigError(f"data.epoch_samples={cfg.epoch_samples} must be >= 1 when data.resampled=true")
    n_sources = len(cfg.urls.split("::"))
    if cfg.weights:
        parts = cfg.weights.split("::")
        if len(parts) != n_sources:
            raise ConfigError(f"data.weights has {len(parts)} entries but data.urls has {n_sources} sources")
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise ConfigError(f"data.weights={cfg.weights!r}: entries must be numbers") from None
        if any(v < 0 for v in values) or sum(values) <= 0:
            raise ConfigError(f"data.weights={cfg.weights!r}: weights must be >= 0 with a positive sum")
    if world_size < 1:
        raise ConfigError(f"world_size={world_size} must be >= 1")


def validate_fewshot(cfg: FewShotConfig) -> None:
    """Check values that types cannot express; raises :class:`ConfigError` naming the key."""
    from pipeline.data.datasets_meta import DATASETS

    if cfg.dataset != "folder" and cfg.dataset not in DATASETS:
        raise ConfigError(f"fewshot.dataset={cfg.dataset!r}: expected 'folder' or one of {sorted(DATASETS)}")
    if cfg.subsample not in SUBSAMPLES:
        raise ConfigError(f"fewshot.subsample={cfg.subsample!r}: expected one of {SUBSAMPLES}")
