"""``pipeline cluster``: fit domains and concepts on extracted features, assign every shard, summarise.

Modes (``mode=...``):
- ``all``: fit on a sample, assign every shard, write the summary (single job);
- ``fit``: fit on a sample and write ``hierarchy.npz`` only;
- ``assign``: assign one shard (``shard=<i>``, the i-th finished feature file; an array task) or all;
- ``summarize``: merge the per-shard assignments into ``concepts.json``, ``summary.md`` and a plot.

Outputs under ``out_dir``: ``hierarchy.npz``, ``assign/<shard>.npz`` (keys, captions, domain, concept,
similarity, and the per-sample content digests and shard fingerprint carried over from the feature file),
``concepts.json`` (id, domain, name, size, example captions), ``summary.md``, ``concept_sizes.png``.

Concept names. ``fit`` stores each concept's cleaned medoid caption (at most ``name_max_words`` words)
in ``hierarchy.npz``; ``summarize`` writes the names stage 1 trains with into ``concepts.json``: those
captions cut, with the tokenizer of ``name_tokenizer``, to the text tokens a name may have next to
``name_prompt_tokens`` prompt tokens (docs/ARCHITECTURE.md section 4). The fit happens here, before any
prompt exists, so the budget comes from these two settings; stage 1 checks its names against its own
model and prompt length and refuses names that do not fit, and ``mode=summarize`` alone refits them.

Assigning needs feature files with content fingerprints (docs/ARCHITECTURE.md section 4): the stage-1
stream uses them to refuse a clustering applied to other shards with the same names and keys. Feature
files written before fingerprints are refused by ``mode=all`` and ``mode=assign`` before any work (rerun
``pipeline extract``, which redoes them); ``mode=fit`` does not bind anything and accepts them.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import open_clip

from pipeline.backbone import register_tiny_archs
from pipeline.config import ConfigError, load_config, parse_config_args
from pipeline.data.clustering import (
    Hierarchy,
    KMeansConfig,
    clean_caption,
    fit_hierarchy,
    fit_name_to_tokens,
    name_token_budget,
    token_counter,
)
from pipeline.data.features import (
    Assignments,
    ContentMismatch,
    feature_count,
    finished_stems,
    read_assignments,
    read_features,
    stored_fingerprint,
    write_assignments,
)
from pipeline.data.sources import some_names
from pipeline.fileio import atomic_write, atomic_write_json, atomic_write_text
from pipeline.inputs import require_dir, require_file


@dataclass(frozen=True)
class ClusterConfig:
    """Cross-modal hierarchical clustering (docs/ARCHITECTURE.md section 4)."""

    features_dir: str = "runs/features"
    """Folder of per-shard feature files written by ``pipeline extract``."""
    out_dir: str = "runs/clusters"
    """Where the hierarchy, assignments and summary go."""
    mode: str = "all"
    """``all``, ``fit``, ``assign`` or ``summarize`` (see the module docstring)."""
    shard: int = -1
    """``mode=assign``: index of the feature file to assign (array task id); -1 = every file."""
    n_domains: int = 16
    """Level-1 clusters (k-means on caption embeddings)."""
    concepts_per_domain: int = 32
    """Level-2 clusters per domain (k-means on joint image+caption embeddings)."""
    min_points_per_concept: int = 8
    """A domain with n sampled points gets at most n // this many concepts (no singleton concepts)."""
    fit_sample: int = 1_000_000
    """At most this many points (uniformly sampled across shards) are used to fit centroids. 1M 512-d pairs
    fit in ~8 GiB of RAM (docs/BENCHMARKS.md); faiss further subsamples each k-means to
    ``k * kmeans.max_points_per_centroid`` points, so a larger sample mostly buys better medoid names."""
    kmeans: KMeansConfig = field(default_factory=KMeansConfig)
    """k-means settings."""
    name_max_words: int = 12
    """Concept names (medoid captions) are cut to this many words."""
    name_tokenizer: str = "ViT-B-16"
    """open_clip architecture of the stage-1 backbone: its tokenizer counts a name's tokens and its text
    context length bounds them (every OpenAI/LAION CLIP shares one BPE and the 77-token context; the
    tiny in-repo architectures have shorter contexts). Empty = names are cut by words only."""
    name_prompt_tokens: int = 4
    """Text prompt tokens of stage 1 (its ``n_ctx_text``; 4 for the default ``init_words`` "a photo of a"):
    a name may have ``context length - 2 (SOS/EOT) - name_prompt_tokens - 1 (".")`` tokens."""
    examples_per_concept: int = 3
    """Example captions per concept in the summary."""
    seed: int = 0
    """Seed of the fit sample."""

    def validate(self) -> None:
        validate_cluster(self)


MODES = ("all", "fit", "assign", "summarize")


def validate_cluster(cfg: ClusterConfig) -> None:
    """Value checks beyond types (called by ``load_config`` through ``ClusterConfig.validate``)."""
    if cfg.mode not in MODES:
        raise ConfigError(f"mode={cfg.mode!r}: expected one of {MODES}")
    for key in ("n_domains", "concepts_per_domain", "min_points_per_concept", "fit_sample", "name_max_words",
                "kmeans.niter", "kmeans.nredo", "kmeans.max_points_per_centroid"):
        value = getattr(cfg.kmeans, key[len("kmeans."):]) if key.startswith("kmeans.") else getattr(cfg, key)
        if value < 1:
            raise ConfigError(f"{key}={value} must be >= 1")
    if cfg.examples_per_concept < 0:
        raise ConfigError(f"examples_per_concept={cfg.examples_per_concept} must be >= 0")
    if cfg.name_prompt_tokens < 0:
        raise ConfigError(f"name_prompt_tokens={cfg.name_prompt_tokens} must be >= 0")
    if cfg.name_tokenizer:
        register_tiny_archs()
        if cfg.name_tokenizer not in open_clip.list_models():
            raise ConfigError(f"name_tokenizer={cfg.name_tokenizer!r} is not an open_clip architecture "
                              "(the stage-1 backbone's name, e.g. ViT-B-16; empty = cut names by words only)")
        context = open_clip.get_model_config(cfg.name_tokenizer)["text_cfg"].get("context_length", 77)
        if name_token_budget(context, cfg.name_prompt_tokens) < 1:
            raise ConfigError(f"name_prompt_tokens={cfg.name_prompt_tokens} leaves no token of {cfg.name_tokenizer}'s "
                              f"{context}-token text context for a concept name")


def name_fitter(cfg: ClusterConfig):
    """``medoid caption -> concept name``: cleaned, at most ``name_max_words`` words, and (with
    ``name_tokenizer``) cut to the tokens a name may have next to ``name_prompt_tokens`` prompt tokens."""
    if not cfg.name_tokenizer:
        return lambda caption: clean_caption(caption, cfg.name_max_words)
    register_tiny_archs()
    tokenizer = open_clip.get_tokenizer(cfg.name_tokenizer)
    count, budget = token_counter(tokenizer), name_token_budget(tokenizer.context_length, cfg.name_prompt_tokens)
    return lambda caption: fit_name_to_tokens(clean_caption(caption, cfg.name_max_words), count, budget)


def sample_features(features_dir: str, stems: list[str], n: int, seed: int):
    """Uniform sample (without replacement) of up to ``n`` points across shards: image, text, captions."""
    counts = [feature_count(Path(features_dir) / f"{stem}.npz") for stem in stems]
    total = sum(counts)
    if total == 0:
        raise ValueError(f"{features_dir}: no features to cluster")
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(total, size=min(n, total), replace=False))
    images, texts, captions = [], [], []
    offset = 0
    for stem, count in zip(stems, counts):
        local = chosen[(chosen >= offset) & (chosen < offset + count)] - offset
        offset += count
        if len(local) == 0:
            continue
        f = read_features(Path(features_dir) / f"{stem}.npz")
        images.append(f.image[local].astype(np.float32))
        texts.append(f.text[local].astype(np.float32))
        captions.extend(f.captions[local].tolist())
    return np.concatenate(images), np.concatenate(texts), captions


def fit(cfg: ClusterConfig, stems: list[str]) -> Hierarchy:
    image, text, captions = sample_features(cfg.features_dir, stems, cfg.fit_sample, cfg.seed)
    if len(image) < cfg.n_domains:
        raise ConfigError(f"n_domains={cfg.n_domains} exceeds the {len(image)} sampled points")
    hierarchy = fit_hierarchy(
        image, text, captions, cfg.n_domains, cfg.concepts_per_domain, cfg.kmeans,
        cfg.min_points_per_concept, clean=lambda c: clean_caption(c, cfg.name_max_words),
    )
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hierarchy.save(out / "hierarchy.npz")
    return hierarchy


def assign_shard(cfg: ClusterConfig, hierarchy: Hierarchy, stem: str) -> Path:
    """Assign one shard's samples; atomic write of ``assign/<stem>.npz`` with the feature file's content
    digests and fingerprint (refused for a feature file written before fingerprints)."""
    path = Path(cfg.features_dir) / f"{stem}.npz"
    f = read_features(path)
    if f.digest is None:
        raise ContentMismatch(_stale_message([stem], 1, cfg.features_dir))
    domain, concept, sim = hierarchy.assign(f.image.astype(np.float32), f.text.astype(np.float32))
    out = Path(cfg.out_dir) / "assign" / f"{stem}.npz"
    return write_assignments(out, Assignments(f.keys, f.captions, domain, concept, sim, f.digest))


def _stale_message(stale: list[str], total: int, features_dir: str) -> str:
    return (f"features_dir: {len(stale)} of the {total} feature files to assign in {features_dir} were written before "
            f"content fingerprints ({some_names(stale)}), so their assignments could not be bound to the shards' "
            "content; re-run `pipeline extract` with the same urls and out_dir (it re-embeds exactly those), then "
            "`pipeline cluster`")


def check_fingerprints(cfg: ClusterConfig, stems: list[str]) -> None:
    """Refuse, before any work, feature files that carry no content fingerprint (one error naming a few)."""
    stale = [s for s in stems if stored_fingerprint(Path(cfg.features_dir) / f"{s}.npz") is None]
    if stale:
        raise ContentMismatch(_stale_message(stale, len(stems), cfg.features_dir))


def summarize(cfg: ClusterConfig, hierarchy: Hierarchy) -> dict:
    """Concept sizes and example captions over every assignment file; writes json, markdown and a plot."""
    sizes: Counter = Counter()
    examples: dict[int, list[str]] = defaultdict(list)
    files = sorted((Path(cfg.out_dir) / "assign").glob("*.npz"))
    for path in files:
        a = read_assignments(path)
        sizes.update(a.concept.tolist())
        order = np.argsort(-a.sim)  # most typical captions first
        for i in order:
            c = int(a.concept[i])
            if len(examples[c]) < cfg.examples_per_concept:
                examples[c].append(str(a.captions[i]))
    name = name_fitter(cfg)  # hierarchy.names are cleaned medoid captions; refitting them is idempotent
    concepts = [
        {"id": c, "domain": int(hierarchy.concept_domain[c]), "name": name(hierarchy.names[c]),
         "size": int(sizes.get(c, 0)), "examples": examples.get(c, [])}
        for c in range(hierarchy.n_concepts)
    ]
    out = Path(cfg.out_dir)
    atomic_write_json(out / "concepts.json", concepts, indent=1)
    _write_summary(out, concepts, hierarchy, len(files))
    return {"concepts": len(concepts), "samples": int(sum(sizes.values())), "shards": len(files)}


def _write_summary(out: Path, concepts: list[dict], hierarchy: Hierarchy, n_shards: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = np.array([c["size"] for c in concepts])
    lines = [
        "# Concept clustering summary", "",
        f"{hierarchy.n_domains} domains, {hierarchy.n_concepts} concepts, {int(sizes.sum())} samples from {n_shards} shards.",
        f"Concept size: min {sizes.min()}, median {int(np.median(sizes))}, max {sizes.max()}.", "",
        "| concept | domain | size | name | example captions |", "|---|---|---|---|---|",
    ]
    for c in sorted(concepts, key=lambda c: -c["size"]):
        ex = " / ".join(e.replace("|", " ")[:60] for e in c["examples"])
        lines.append(f"| {c['id']} | {c['domain']} | {c['size']} | {c['name'].replace('|', ' ')} | {ex} |")
    atomic_write_text(out / "summary.md", "\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(sizes, bins=min(50, max(5, len(sizes) // 4)))
    ax.set_xlabel("samples per concept")
    ax.set_ylabel("concepts")
    ax.set_title("Concept size distribution")
    fig.tight_layout()
    atomic_write(out / "concept_sizes.png", lambda fh: fig.savefig(fh, format="png", dpi=100))
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    path, overrides = parse_config_args(argv, "pipeline cluster", __doc__.splitlines()[0], "ClusterConfig")
    cfg = load_config(ClusterConfig, path, overrides)
    require_dir(cfg.features_dir, "features_dir", "it is the out_dir of `pipeline extract`")
    stems = finished_stems(cfg.features_dir)
    if not stems:
        raise SystemExit(f"pipeline cluster: no finished feature files in {cfg.features_dir}")
    out = Path(cfg.out_dir)
    if cfg.mode in ("assign", "summarize"):  # they continue a fit: check its outputs before any work
        require_file(out / "hierarchy.npz", "out_dir", f"mode={cfg.mode} needs the hierarchy of mode=fit (or all) "
                     "in the same out_dir; run that first")
    if cfg.mode == "summarize" and not any((out / "assign").glob("*.npz")):
        raise ConfigError(f"out_dir: no assignment files in {out / 'assign'}; run mode=assign first")
    if cfg.mode in ("all", "assign") and cfg.shard < len(stems):  # before the fit: it would be wasted
        check_fingerprints(cfg, stems if cfg.shard < 0 else [stems[cfg.shard]])
    if cfg.mode in ("all", "fit"):
        hierarchy = fit(cfg, stems)
        print(f"fitted {hierarchy.n_domains} domains, {hierarchy.n_concepts} concepts -> {out / 'hierarchy.npz'}")
        if cfg.mode == "fit":
            return 0
    else:
        hierarchy = Hierarchy.load(out / "hierarchy.npz")
    if cfg.mode in ("all", "assign"):
        if cfg.shard >= len(stems):
            raise SystemExit(f"pipeline cluster: shard={cfg.shard} but only {len(stems)} feature files")
        for stem in stems if cfg.shard < 0 else [stems[cfg.shard]]:
            assign_shard(cfg, hierarchy, stem)
        if cfg.mode == "assign":
            return 0
    stats = summarize(cfg, hierarchy)
    print(f"summary: {stats} -> {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    from pipeline.config import run_main  # user errors: one line on stderr, exit status 2

    raise SystemExit(run_main(main))
