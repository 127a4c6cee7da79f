"""The evaluation protocol (docs/ARCHITECTURE.md section 6): base / new / HM, all-class, domain
generalization and cross-dataset accuracy of a prompted model, and the run's ``results.json``.

Every subset is evaluated in its own label space (``base`` = first ceil(n/2) classes relabelled
0..m-1, ``new`` = the rest relabelled 0..n-m-1); targets (other datasets) on all their test classes.
The model is the last epoch's prompts (``<run_dir>/prompts.pt``, written by :mod:`pipeline.finetune_loop`);
a zero-shot run has none and uses frozen CLIP with the dataset's template. Accuracies are in percent.
``results.json`` holds accuracies, counts, the run config and the git revision. The command line is
:mod:`pipeline.evaluate`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from pipeline.backbone import check_backbone, load_backbone
from pipeline.checkpoint import git_revision, load_artifact
from pipeline.config import ConfigError, from_dict
from pipeline.data.config import FewShotConfig
from pipeline.data.datasets_meta import DATASETS
from pipeline.data.fewshot import ImageListDataset, Splits, build_fewshot, load_splits
from pipeline.fileio import atomic_write_json
from pipeline.finetune_config import FinetuneConfig
from pipeline.inputs import require_dir, require_file
from pipeline.prompts import PromptedCLIP, Prompts
from pipeline.zeroshot import zeroshot_weights

RESULTS_FILE = "results.json"
PROMPTS_FILE = "prompts.pt"


def harmonic_mean(base: float, new: float) -> float:
    """HM = 2BN / (B + N) (0 when both are 0)."""
    return 2 * base * new / (base + new) if base + new > 0 else 0.0


@torch.no_grad()
def accuracy(model: PromptedCLIP, prompts: Prompts | None, items, classnames: Sequence[str], template: str,
             transform, batch_size: int = 100, workers: int = 0) -> dict:
    """Top-1 accuracy (percent) and counts of ``items`` among ``classnames`` (labels 0..len-1).

    With ``prompts`` (possibly ``{}`` for a prompt-free learner) the classifier is the prompted class
    texts; with ``None`` it is frozen CLIP's ``template`` classifier (zero-shot).
    """
    device = model.clip.logit_scale.device
    if prompts is None:
        text = zeroshot_weights(model, classnames, (template,))
    else:
        text = model.encode_classes(classnames, prompts)  # [C, D]
    loader = DataLoader(ImageListDataset(items, transform), batch_size=batch_size, shuffle=False,
                        num_workers=workers)
    correct, total = 0, 0
    per_class = torch.zeros(len(classnames), 2, dtype=torch.long)  # [C, (correct, total)]
    for images, labels in loader:
        feats = model.encode_image(images.to(device), prompts or None, normalize=True)
        pred = (feats @ text.to(feats.dtype).t()).argmax(-1).cpu()
        hit = pred == labels
        correct += int(hit.sum())
        total += int(labels.numel())
        per_class.index_add_(0, labels, torch.stack([hit.long(), torch.ones_like(labels)], dim=1))
    if total == 0:
        raise ValueError("no test images to evaluate")
    return {"accuracy": 100.0 * correct / total, "correct": correct, "total": total,
            "n_classes": len(classnames), "per_class_accuracy": [round(100.0 * c / max(t, 1), 4)
                                                               for c, t in per_class.tolist()]}


def evaluate(cfg: FinetuneConfig, model: PromptedCLIP, prompts: Prompts | None, transform) -> dict:
    """Every evaluation ``cfg.eval`` asks for; returns the ``results.json`` payload (without metadata)."""
    out: dict = {}
    for subset in cfg.eval.subsets:
        fs = build_fewshot(replace(cfg.data, subsample=subset))
        out[subset] = accuracy(model, prompts, fs.test, fs.classnames, fs.template, transform,
                               cfg.eval.batch_size, cfg.eval.workers)
        out[subset]["classnames"] = list(fs.classnames)
    if "base" in out and "new" in out:
        out["hm"] = harmonic_mean(out["base"]["accuracy"], out["new"]["accuracy"])
    targets = {}
    for name in cfg.eval.targets:
        fs = build_fewshot(replace(cfg.data, dataset=name, subsample="all", k_shot=0, split_file=""))
        targets[name] = accuracy(model, prompts, fs.test, fs.classnames, fs.template, transform,
                                 cfg.eval.batch_size, cfg.eval.workers)
    if targets:
        out["targets"] = targets
    return out


def check_dataset(data: FewShotConfig, what: str = "data", need: Sequence[str] = ("test",)) -> Splits:
    """The split lists of ``data`` (file lists only, no image is decoded), or :class:`ConfigError` naming
    the missing file or folder; ``what`` says which setting asked for the dataset. Every split in
    ``need`` must be non-empty and its first image must exist (a wrong ``data.root`` or image folder
    would otherwise fail at the first batch, or only at evaluation after training)."""
    if data.split_file:
        require_file(data.split_file, "data.split_file")
    require_dir(data.root, "data.root", f"{what}: dataset {data.dataset} is read from there")
    try:
        splits, image_root = load_splits(data.dataset, data.root, data.split_file)
    except FileNotFoundError as e:
        missing = e.filename or str(e)
        raise ConfigError(f"{what}: dataset {data.dataset} under data.root={data.root}: {missing} does not exist "
                          "(expected the CoOp layout, see pipeline.data.datasets_meta)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{what}: dataset {data.dataset} under data.root={data.root} is malformed: "
                          f"{type(e).__name__}: {e}") from None
    for split in need:
        if not splits[split]:
            raise ConfigError(f"{what}: dataset {data.dataset} under data.root={data.root} has no {split} images")
        first = splits[split][0].path
        if not Path(first).is_file():
            raise ConfigError(f"{what}: dataset {data.dataset}: its {split} split lists {first}, which does not "
                              f"exist (images are expected under {image_root})")
    return splits


def write_results(run_dir: str | Path, cfg: FinetuneConfig, cfg_dict: dict, results: dict, extra: dict | None = None) -> Path:
    """``<run_dir>/results.json`` (atomic): accuracies, counts, identity of the run, config, git revision."""
    payload = {"dataset": cfg.data.dataset, "method": cfg.method, "name": cfg.label, "seed": cfg.seed,
               "init": cfg.init, "trained_on": cfg.data.subsample, "k_shot": cfg.data.k_shot, **results,
               **(extra or {}), "config": cfg_dict, "git_revision": git_revision(), "time": time.time()}
    path = Path(run_dir) / RESULTS_FILE
    atomic_write_json(path, payload)
    return path


def read_run(run_dir: str | Path):
    """The config (typed and as a dict) of a run folder written by :mod:`pipeline.finetune`."""
    run_dir = require_dir(run_dir, "run_dir", "give a run folder written by pipeline.finetune")
    info_file = require_file(run_dir / "run_info.json", "run_dir",
                             "not a run folder of pipeline.finetune, or its training never started")
    try:
        stored = json.loads(info_file.read_text())["config"]
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"run_dir: {info_file} holds no readable run config ({type(e).__name__}: {e})") from None
    return from_dict(FinetuneConfig, stored), stored  # checked like a user config: plain data, known keys


def load_run(run_dir: str | Path, cfg: FinetuneConfig | None = None):
    """The config, model, prompts (``None`` for zero-shot) and eval transform of a saved run."""
    run_dir = Path(run_dir)
    stored, cfg_dict = read_run(run_dir)
    cfg = cfg or stored
    if cfg.method != "zeroshot":
        require_file(run_dir / PROMPTS_FILE, "run_dir", "the run has not finished training; rerun pipeline.finetune")
    backbone = load_backbone(cfg.model.backbone, device="cpu" if cfg.cpu or not torch.cuda.is_available()
                             else "cuda", seed=cfg.model.seed)
    model = PromptedCLIP(backbone, cfg.model.prompts)
    prompts = None
    if cfg.method != "zeroshot":
        art = load_artifact(run_dir / PROMPTS_FILE)
        device = backbone.device
        prompts = {k: v.to(device) for k, v in art.prompts.items()}
    return cfg, cfg_dict, model, prompts, backbone.preprocess_val


def preflight(cfg: FinetuneConfig, run_dir: str | Path) -> None:
    """Before the backbone is built: the run's prompts, the backbone's files and every dataset to read."""
    if cfg.method != "zeroshot":
        require_file(Path(run_dir) / PROMPTS_FILE, "run_dir", "the run has not finished training; rerun pipeline.finetune")
    check_backbone(cfg.model.backbone, cfg.model.prompts, key="model.backbone", prompts_key="model.prompts")
    for s in cfg.eval.subsets:
        if s not in ("all", "base", "new"):
            raise ConfigError(f"--subsets: {s!r} is not one of all/base/new")
    if cfg.eval.subsets:
        check_dataset(cfg.data, "data", need=("test",))
    for name in cfg.eval.targets:
        if name not in DATASETS:
            raise ConfigError(f"--targets: {name!r} is not a dataset; expected some of {sorted(DATASETS)}")
        check_dataset(replace(cfg.data, dataset=name, subsample="all", k_shot=0, split_file=""),
                      f"targets ({name})", need=("test",))
