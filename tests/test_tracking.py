"""Tracking: metrics.jsonl, W&B offline runs (same id on resume), rank gating, progress bars."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.tracking import Tracker, TrackingConfig, progress

from .helpers.wandb_offline import offline_run as _offline_run

CONFIG = {"model": {"backbone": {"arch": "tiny-vit"}}, "lr": 0.001}
OFF = TrackingConfig(wandb_mode="disabled")


def _lines(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_config_validation_names_the_key():
    assert load_config(TrackingConfig) == TrackingConfig()
    cfg = load_config(TrackingConfig, overrides=["tags=[sweep1,seed2]", "group=sweep1"])
    assert cfg.tags == ("sweep1", "seed2")
    for override, key in (["wandb_mode=onlin", "tracking.wandb_mode='onlin'"], ["log_every=0", "log_every"],
                          ["tags=[" + "x" * 65 + "]", "tracking.tags"]):
        with pytest.raises(ConfigError, match=key):
            load_config(TrackingConfig, overrides=[override])


def test_metrics_jsonl_and_resume_policy(tmp_path):
    with Tracker(tmp_path, OFF, CONFIG, is_main=True, resume=False) as tr:
        for step in (10, 20, 30):
            tr.log({"loss": torch.tensor(1.0 / step), "acc": np.float32(0.5), "n": 3}, step=step)
        assert len(_lines(tmp_path)) == 3  # flushed per call: a killed job keeps what it logged
        tr.summary({"best_acc": torch.tensor(0.75)})
        with pytest.raises(ValueError, match="not a scalar"):
            tr.log({"loss": torch.ones(2)}, step=40)
        with pytest.raises(ValueError, match="reserved"):
            tr.log({"step": 1}, step=40)
    rows = _lines(tmp_path)
    assert [r["step"] for r in rows] == [10, 20, 30]
    assert rows[0]["loss"] == pytest.approx(0.1) and rows[0]["acc"] == 0.5 and rows[0]["n"] == 3
    assert all(isinstance(r["time"], float) for r in rows) and rows[0]["time"] <= rows[2]["time"]
    assert json.loads((tmp_path / "summary.json").read_text()) == {"best_acc": 0.75}
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["config"] == CONFIG and info["git_revision"] and info["wandb_run_id"] is None
    assert not (tmp_path / "wandb").exists()

    # The job died after step 30 while writing a line; it resumes from the checkpoint at step 20.
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 40, "lo')
    with Tracker(tmp_path, OFF, CONFIG, is_main=True, resume=True, resume_step=20) as tr:
        tr.log({"loss": 9.0}, step=30)
    rows = _lines(tmp_path)
    assert [r["step"] for r in rows] == [10, 20, 30] and rows[1]["loss"] == pytest.approx(0.05)
    assert rows[2]["loss"] == 9.0 and "acc" not in rows[2]

    with Tracker(tmp_path, OFF, CONFIG, is_main=True, resume=False) as tr:  # a new run starts over
        tr.log({"loss": 1.0}, step=1)
    assert [r["step"] for r in _lines(tmp_path)] == [1]
    with pytest.raises(RuntimeError, match="after finish"):
        tr.log({"loss": 1.0}, step=2)


def test_non_main_rank_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    # wandb_mode=online: a non-main rank must not even try to start W&B (there is no network here).
    with Tracker(run_dir, TrackingConfig(wandb_mode="online"), CONFIG, is_main=False, resume=True) as tr:
        tr.log({"loss": torch.tensor(1.0)}, step=1)
        tr.summary({"x": 1})
        assert tr.should_log(20) and not tr.should_log(21)  # same answer as on the main rank
        assert tr.run is None
    assert not run_dir.exists()


def test_wandb_offline_run_and_resume(tmp_path, monkeypatch):
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path / "wb"),
                       "WANDB_CONFIG_DIR": str(tmp_path / "wb_config"), "WANDB_CACHE_DIR": str(tmp_path / "wb_cache"),
                       "WANDB_DATA_DIR": str(tmp_path / "wb_data")}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    import wandb
    cfg = TrackingConfig(wandb_mode="offline", project="tests", group="sweep-a", name="seed1", tags=("t1",))
    run_dir = tmp_path / "run"
    with Tracker(run_dir, cfg, CONFIG, is_main=True, resume=False) as tr:
        first_id = tr.run_id
        assert tr.run.id == first_id
        tr.log({"train/loss": torch.tensor(2.0), "train/acc": 0.25}, step=10)
        tr.log({"train/loss": torch.tensor(1.0), "train/acc": 0.5}, step=20)
        tr.summary({"best/acc": 0.5})
    assert (run_dir / "wandb_run_id.txt").read_text().strip() == first_id

    with Tracker(run_dir, cfg, CONFIG, is_main=True, resume=True, resume_step=20) as tr:
        assert tr.run_id == first_id and tr.run.id == first_id
        tr.log({"train/loss": torch.tensor(0.5)}, step=30)
    # finish() can return before W&B's writer process has flushed the run file; teardown waits for it.
    wandb.teardown()

    runs = sorted((run_dir / "wandb").glob("offline-run-*"))  # timestamp, then "-1" on a clash
    assert len(runs) == 2 and all(first_id in p.name for p in runs)
    first, resumed = _offline_run(runs[0]), _offline_run(runs[1])
    meta = first["run"]
    assert (meta.run_id, meta.project, meta.run_group, meta.display_name, list(meta.tags)) == (
        first_id, "tests", "sweep-a", "seed1", ["t1"])
    config = {u.key: json.loads(u.value_json) for u in meta.config.update}
    assert config["model"] == CONFIG["model"] and config["lr"] == 0.001 and config["git_revision"]
    assert first["history"][10]["train/loss"] == 2.0 and first["history"][20]["train/acc"] == 0.5
    assert json.loads(first["summary"]["best/acc"]) == 0.5
    assert resumed["run"].run_id == first_id and resumed["history"][30]["train/loss"] == 0.5
    assert [r["step"] for r in _lines(run_dir)] == [10, 20, 30]


def test_progress_only_on_main_rank_and_tty(monkeypatch):
    assert progress(range(3), is_main=False, desc="x", force=True).disable
    assert progress(range(3), is_main=True, desc="x").disable  # pytest's stderr is not a terminal
    bar = progress(5, is_main=True, desc="steps", force=True)
    assert not bar.disable and bar.total == 5
    bar.close()
    assert list(progress([1, 2], is_main=False)) == [1, 2]
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    bar = progress(range(3), is_main=True, desc="x")  # a terminal: shown without force
    assert not bar.disable
    bar.close()


def test_cpu_model_names_the_cpu():
    import platform

    from pipeline.tracking import cpu_model

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    if "model name" in info:  # Linux: the model name, which platform.processor() usually leaves empty
        assert cpu_model() and f": {cpu_model()}" in info
    else:
        assert cpu_model() == platform.processor()
