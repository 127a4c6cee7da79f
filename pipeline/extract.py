"""``pipeline extract``: frozen CLIP image + caption embeddings, one feature file per shard.

Usable three ways, all idempotent (a shard with a done marker is skipped; output is written to a temp
file and renamed, so a killed task leaves nothing that looks finished):

- one process over every shard:           ``pipeline extract urls=/data/{000000..000999}.tar``
- a SLURM array task per shard (or range): ``pipeline extract urls=... shard=$SLURM_ARRAY_TASK_ID``
  (``shard=-1`` also picks up ``SLURM_ARRAY_TASK_ID`` from the environment)
- a multi-process accelerate/torchrun job: rank r takes shards ``r, r + world, ...``.

Images are embedded from the evaluation view (resize + center crop), captions as raw text; both are
L2-normalised and stored in fp16 with the sample keys, captions and one content digest per sample
(:func:`pipeline.data.sample_checks.sample_digest`, caption + image byte size), whose shard fingerprint the
done marker records and ``pipeline cluster`` carries into the assignments (docs/ARCHITECTURE.md section 4).

What a rerun redoes (docs/ARCHITECTURE.md section 9): a shard without a done marker; a shard whose marker
records ``bad_shard`` > 0 (it broke off or could not be read in full, e.g. a truncated download: the
features of the samples before the break were written, and a rerun retries it unless
``retry_incomplete=false``); a shard whose marker predates content fingerprints. An unreadable shard gets
no features and no marker. Both kinds are counted under ``bad_shard`` in the report, the first few are
named in warnings with a count of the rest, and the exit code is 1 while any remains.
"""

from __future__ import annotations

import errno
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.backbone import check_backbone, load_backbone
from pipeline.config import (
    BackboneConfig,
    ConfigError,
    load_config,
    parse_config_args,
)
from pipeline.data.config import ShardDataConfig
from pipeline.data.features import ShardFeatures, shard_state, shard_stem, write_features
from pipeline.data.sample_checks import sample_digest
from pipeline.data.shards import build_shard_loader
from pipeline.data.sources import NAMED, check_shard_urls, expand_sources, is_local, some_names
from pipeline.distributed import Distributed, array_task_id


@dataclass(frozen=True)
class ExtractConfig:
    """Frozen-feature extraction (docs/ARCHITECTURE.md section 4, step 1)."""

    urls: str = ""
    """Shards to embed (brace expansion; ``::`` separates sources). Feature files are named by shard
    file name, so shard names must be unique across sources."""
    out_dir: str = "runs/features"
    """Folder of ``<shard>.npz`` feature files and ``<shard>.done`` markers."""
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    """The frozen backbone (must match the one used for pretraining)."""
    batch_size: int = 256
    """Images per forward pass."""
    workers: int = 1
    """Decoding worker processes: 1 decodes in a worker process, overlapping the forward; 0 in this process.
    Shards are embedded one at a time and one shard is read by one worker, so more could only sit idle and
    are refused; parallelise over shards with ranks or array tasks instead."""
    shard: int = -1
    """Index of the first shard of this task (array jobs); -1 = ``SLURM_ARRAY_TASK_ID`` when set, else
    every shard (split across ranks)."""
    shards_per_task: int = 1
    """With ``shard >= 0``: how many consecutive shards this task embeds."""
    cpu: bool = False
    """Force the CPU even when a GPU is visible."""
    retry_incomplete: bool = True
    """Re-embed, on a rerun, shards whose done marker records ``bad_shard`` > 0 (read only up to a break,
    e.g. a truncated download that has since been repaired); false keeps their partial features."""

    def validate(self) -> None:
        if not self.urls:
            raise ConfigError("urls is empty: give the shards to embed")
        if self.batch_size < 1 or self.shards_per_task < 1 or self.workers < 0:
            raise ConfigError("batch_size and shards_per_task must be >= 1, workers >= 0")
        if self.workers > 1:
            raise ConfigError(f"workers={self.workers}: extraction embeds one shard at a time and a shard is read by "
                              "one worker, so only 0 or 1 can be used; parallelise over shards with ranks or array "
                              "tasks (shard=, shards_per_task=)")


def select_shards(cfg: ExtractConfig, rank: int, world_size: int) -> list[str]:
    """The shard URLs this process embeds."""
    shards = [u for source in expand_sources(cfg.urls) for u in source]
    stems = [shard_stem(u) for u in shards]
    if len(set(stems)) != len(stems):
        raise ConfigError("urls: two shards share a file name; feature files would overwrite each other")
    start = cfg.shard if cfg.shard >= 0 else array_task_id()
    if start is None:
        return shards[rank::world_size]
    first = start * cfg.shards_per_task
    if first >= len(shards):
        raise ConfigError(f"shard={start} x shards_per_task={cfg.shards_per_task} is past the {len(shards)} shards")
    return shards[first : first + cfg.shards_per_task][rank::world_size]


@torch.no_grad()
def embed_shard(url: str, model, preprocess, tokenizer, cfg: ExtractConfig, device) -> tuple[ShardFeatures, dict]:
    """Embed every readable sample of one shard; returns the features and the reader's counters."""
    # allow_empty: an empty shard is a finished (empty) result; an unreadable one is told apart by run(),
    # which also reports bad shards itself (aggregated over the run), so the reader stays quiet about them
    data = ShardDataConfig(urls=url, resampled=False, batch_size=cfg.batch_size, workers=cfg.workers,
                           shuffle_buffer=0, allow_empty=True)
    loader = build_shard_loader(data, preprocess=preprocess, tokenizer=tokenizer, shard_warnings=0)
    keys, captions, digests, images, texts = [], [], [], [], []
    for batch in loader:
        img = model.encode_image(batch["image"].to(device, dtype=_dtype(model)), normalize=True)
        txt = model.encode_text(batch["text"].to(device), normalize=True)
        images.append(img.float().cpu().numpy().astype(np.float16))
        texts.append(txt.float().cpu().numpy().astype(np.float16))
        keys.extend(batch["key"])
        captions.extend(batch["caption"])
        digests.extend(sample_digest(c, n) for c, n in zip(batch["caption"], batch["nbytes"]))
    dim = int(model.text_projection.shape[-1]) if hasattr(model, "text_projection") else 0
    feats = ShardFeatures(
        _objects(keys), _objects(captions),
        np.concatenate(images) if images else np.zeros((0, dim), np.float16),
        np.concatenate(texts) if texts else np.zeros((0, dim), np.float16),
        np.asarray(digests, dtype=np.uint64),
    )
    return feats, loader.stats


def _objects(strings: list[str]) -> np.ndarray:
    # object arrays: a fixed-width str array would size every entry by the longest caption
    out = np.empty(len(strings), dtype=object)
    out[:] = strings
    return out


def _dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def run(cfg: ExtractConfig, rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu") -> dict:
    """Embed the unfinished shards of ``rank``; returns counts (done, skipped, samples, bad data).

    Unfinished: no done marker, a marker that records an incomplete read (``bad_shard`` > 0) while
    ``cfg.retry_incomplete``, or a marker written before content fingerprints (see the module
    docstring). Ranks work on disjoint shards and never communicate, so this needs no process group.
    """
    shards = select_shards(cfg, rank, world_size)
    out = Path(cfg.out_dir)
    state = {u: shard_state(out, shard_stem(u)) for u in shards}
    redo = ("missing", "stale", "incomplete") if cfg.retry_incomplete else ("missing", "stale")
    todo = [u for u in shards if state[u] in redo]
    # a missing shard would read as zero samples and be marked done for good: refuse before any work
    missing = [u for u in todo if is_local(u) and not Path(u).is_file()]
    if missing:
        raise ConfigError(f"urls: {len(missing)} of the {len(todo)} shards to embed do not exist (first: "
                          f"{missing[0]}); fix urls or its {{first..last}} range")
    report = {"shards": len(shards), "already_done": len(shards) - len(todo), "extracted": 0, "samples": 0,
              "failed": 0, "incomplete": 0, "bad_shard": 0}
    for kind, why in (("stale", "were written before content fingerprints; re-embedding them so `pipeline cluster` "
                                "can bind its assignments to the shards' content"),
                      ("incomplete", "were read only in part last time (bad_shard in their done marker); retrying "
                                     "them (retry_incomplete=false keeps their partial features)")):
        again = [u for u in todo if state[u] == kind]
        if again:
            warnings.warn(f"{len(again)} shards {why}: {some_names(again)}", stacklevel=2)
    if not todo:
        return report
    backbone = load_backbone(cfg.backbone, device=device, seed=0)
    problems = _ProblemShards()
    for url in todo:
        stem = shard_stem(url)
        for stale in out.glob(f".{stem}.*.tmp*"):  # left by a task killed mid-write
            stale.unlink(missing_ok=True)
        t0 = time.perf_counter()
        feats, stats = embed_shard(url, backbone.model, backbone.preprocess_val, backbone.tokenizer, cfg, device)
        for k, v in stats.items():  # every shard's skips count, the unreadable ones' bad_shard included
            if k not in ("samples", "shards"):
                report[k] = report.get(k, 0) + v
        if len(feats) == 0 and stats.get("bad_shard"):  # unreadable (e.g. a failed download): retry on a rerun
            report["failed"] += 1
            problems.add(url, "unreadable: no features written and no done marker (a rerun retries it)")
            continue
        try:
            write_features(out, stem, feats, meta={**stats, "seconds": round(time.perf_counter() - t0, 3)})
        except OSError as e:
            if e.errno == errno.ENOSPC:  # every later shard would fail the same way: stop, naming where
                e.add_note(f"pipeline extract: disk full while writing the features of {url} to {out}; nothing of "
                           "that shard was left behind, a rerun continues from it")
            raise
        report["extracted"] += 1
        report["samples"] += len(feats)
        if stats.get("bad_shard"):
            report["incomplete"] += 1
            problems.add(url, f"read only up to a break (truncated or unreadable partway): features of its "
                              f"{len(feats)} samples written, its done marker records bad_shard="
                              f"{stats['bad_shard']} and a rerun retries it unless retry_incomplete=false")
    problems.summarize()
    return report


class _ProblemShards:
    """Warns about the first few unreadable or incomplete shards as they come, then once with the count."""

    def __init__(self, limit: int = NAMED):
        self.limit, self.urls = limit, []

    def add(self, url: str, what: str) -> None:
        self.urls.append(url)
        if len(self.urls) <= self.limit:
            warnings.warn(f"{url}: {what}", stacklevel=3)

    def summarize(self) -> None:
        if len(self.urls) > self.limit:
            warnings.warn(f"{len(self.urls)} shards were unreadable or read only in part (bad_shard), only the first "
                          f"{self.limit} were named as they came: {some_names(self.urls)}", stacklevel=3)


def main(argv: list[str] | None = None) -> int:
    path, overrides = parse_config_args(argv, "pipeline extract", __doc__.splitlines()[0], "ExtractConfig")
    cfg = load_config(ExtractConfig, path, overrides)
    preflight(cfg)
    dist = Distributed(cpu=cfg.cpu)  # launcher variables -> rank, world size, device
    try:
        report = run(cfg, dist.rank, dist.world_size, dist.device)
    finally:
        dist.shutdown()
    print(f"extract [rank {dist.rank}/{dist.world_size}]: {report}")
    return 1 if report["failed"] or report["incomplete"] else 0  # an array task shows what a rerun retries


def preflight(cfg: ExtractConfig) -> None:
    """Before a process group or a backbone: the architecture and checkpoint exist, ``urls`` names shards."""
    check_backbone(cfg.backbone, key="backbone")
    check_shard_urls(cfg.urls, "urls")


if __name__ == "__main__":
    from pipeline.config import run_main  # user errors: one line on stderr, exit status 2

    raise SystemExit(run_main(main))
