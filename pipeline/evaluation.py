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

import hashlib
import json
import math
import os
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

    Per-image results for paired statistics (:mod:`pipeline.suite.stats`): ``hits`` is one ``'0'``/``'1'``
    per item in the order of ``items``, and ``items_sha`` (:func:`items_fingerprint`) identifies which
    images were evaluated, in which order and with which labels.
    """
    device = model.clip.logit_scale.device
    if prompts is None:
        text = zeroshot_weights(model, classnames, (template,))
    else:
        text = model.encode_classes(classnames, prompts)  # [C, D]
    loader = DataLoader(ImageListDataset(items, transform), batch_size=batch_size, shuffle=False,
                        num_workers=workers)
    correct, total, hits = 0, 0, []
    per_class = torch.zeros(len(classnames), 2, dtype=torch.long)  # [C, (correct, total)]
    for images, labels in loader:
        feats = model.encode_image(images.to(device), prompts or None, normalize=True)
        pred = (feats @ text.to(feats.dtype).t()).argmax(-1).cpu()
        hit = pred == labels
        correct += int(hit.sum())
        hits.append("".join("1" if h else "0" for h in hit.tolist()))
        total += int(labels.numel())
        per_class.index_add_(0, labels, torch.stack([hit.long(), torch.ones_like(labels)], dim=1))
    if total == 0:
        raise ValueError("no test images to evaluate")
    return {"accuracy": 100.0 * correct / total, "correct": correct, "total": total,
            "n_classes": len(classnames), "per_class_accuracy": [round(100.0 * c / max(t, 1), 4)
                                                               for c, t in per_class.tolist()],
            "hits": "".join(hits), "items_sha": items_fingerprint(items)}


def items_fingerprint(items) -> str:
    """First 16 hex digits of the sha256 of ``<path>\\t<label>`` lines, one per item, in order.

    Paths are taken relative to the items' common folder, so the same test images under another data
    root give the same fingerprint; two runs' ``hits`` are pairable image by image only when it agrees.
    """
    paths = [str(x.path) for x in items]
    try:
        top = os.path.commonpath([os.path.dirname(p) for p in paths]) if paths else ""
    except ValueError:  # absolute and relative paths mixed, or several drives: keep the paths as they are
        top = ""
    lines = "\n".join(f"{Path(os.path.relpath(p, top)).as_posix() if top else p}\t{int(x.label)}"
                      for p, x in zip(paths, items))
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()[:16]


def evaluate(cfg: FinetuneConfig, model: PromptedCLIP, prompts: Prompts | None, transform) -> dict:
    """Every evaluation ``cfg.eval`` asks for; returns the ``results.json`` payload (without metadata)."""
    out: dict = {}
    for subset in cfg.eval.subsets:
        if cfg.eval.split == "val":
            # the subset's whole validation split (not the min(K, 4)-shot val sampled for training): settings
            # are chosen on it, and the test split is not read at all
            fs = build_fewshot(replace(cfg.data, subsample=subset, k_shot=0))
            items = fs.val
        else:
            fs = build_fewshot(replace(cfg.data, subsample=subset))
            items = fs.test
        out[subset] = accuracy(model, prompts, items, fs.classnames, fs.template, transform,
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
        check_dataset(cfg.data, "data", need=(cfg.eval.split,))
    for name in cfg.eval.targets:
        if name not in DATASETS:
            raise ConfigError(f"--targets: {name!r} is not a dataset; expected some of {sorted(DATASETS)}")
        check_dataset(replace(cfg.data, dataset=name, subsample="all", k_shot=0, split_file=""),
                      f"targets ({name})", need=("test",))


# --- reading results.json (pipeline.report and pipeline.suite.stats) ---------------------------------------

SUBSETS = ("base", "new", "all")
DEFAULT_SUBSETS = ("base", "new")
"""What a ``results.json`` must hold when it does not record ``config.eval.subsets`` (the protocol's default)."""


class MalformedResults(ValueError):
    """A ``results.json`` that the report cannot use; the message says why."""


def _accuracy(value, where: str) -> float:
    if not isinstance(value, dict):
        raise MalformedResults(f"{where} is {type(value).__name__}, not an object with an accuracy")
    if "accuracy" not in value:
        raise MalformedResults(f"{where} has no 'accuracy'")
    acc = value["accuracy"]
    if isinstance(acc, bool) or not isinstance(acc, int | float) or not math.isfinite(acc):
        raise MalformedResults(f"{where}.accuracy={acc!r} is not a finite number")
    return float(acc)


def parse_results(r) -> dict:
    """One report row from the parsed content of a ``results.json``; :class:`MalformedResults` says why not.

    Needs ``dataset`` (text), ``seed`` (integer), ``name`` or ``method`` (text), and an accuracy for every
    class subset the run evaluated: ``config.eval.subsets`` when the file records it, else base and new.
    Optional subsets (``all``) and ``targets`` must be well formed when present.
    """
    if not isinstance(r, dict):
        raise MalformedResults(f"top level is a JSON {type(r).__name__}, not an object")
    for key in ("dataset", "seed"):
        if key not in r:
            raise MalformedResults(f"missing key {key!r}")
    if not isinstance(r["dataset"], str) or not r["dataset"]:
        raise MalformedResults(f"dataset={r['dataset']!r} is not a dataset name")
    if isinstance(r["seed"], bool) or not isinstance(r["seed"], int):
        raise MalformedResults(f"seed={r['seed']!r} is not an integer")
    name = r.get("name") or r.get("method")
    if not isinstance(name, str) or not name:
        raise MalformedResults("missing key 'name' or 'method' (the method label)")
    subsets = DEFAULT_SUBSETS
    cfg_eval = r.get("config", {}).get("eval", {}) if isinstance(r.get("config"), dict) else {}
    if isinstance(cfg_eval, dict) and isinstance(cfg_eval.get("subsets"), list | tuple):
        subsets = tuple(cfg_eval["subsets"])
    row = {"dataset": r["dataset"], "name": name, "seed": r["seed"]}
    for s in SUBSETS:
        if s in r:
            row[s] = _accuracy(r[s], s)
        elif s in subsets:
            raise MalformedResults(f"missing key {s!r} (the run evaluated {', '.join(subsets)})")
    targets = r.get("targets", {})
    if not isinstance(targets, dict):
        raise MalformedResults(f"targets is {type(targets).__name__}, not an object")
    row["targets"] = {k: _accuracy(v, f"targets.{k}") for k, v in targets.items()}
    return row


def read_results_json(path: Path):
    """The parsed content of one ``results.json`` file; :class:`MalformedResults` names what is wrong."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise MalformedResults(f"not UTF-8 text ({e.reason})") from None
    except json.JSONDecodeError as e:  # truncated by a killed writer, or edited by hand
        raise MalformedResults(f"invalid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except OSError as e:
        raise MalformedResults(f"unreadable ({e.strerror or e})") from None


def read_results(path: Path) -> dict:
    """The report row of one ``results.json`` file; :class:`MalformedResults` names what is wrong."""
    return {**parse_results(read_results_json(path)), "run_dir": str(path.parent)}
