"""Stage 1 entry point, one process: runs, learns, checkpoints, resumes, writes a loadable artifact."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from pipeline import pretrain
from pipeline.checkpoint import list_checkpoints, load_artifact, load_checkpoint
from pipeline.config import ConfigError

from .helpers.tasks import make_task_data, pretrain_overrides


@pytest.fixture(scope="module")
def task_data(tmp_path_factory):
    return make_task_data(tmp_path_factory.mktemp("tasks"))


def test_pretrain_runs_and_writes_artifact(task_data, tmp_path):
    run = tmp_path / "run"
    assert pretrain.main(pretrain_overrides(task_data, run, steps=4)) == 0
    art = load_artifact(run / "artifact.pt")
    assert set(art.prompts) == {"text", "vision"} and art.prompts["text"].shape[0] == 2
    assert art.metadata["backbone.arch"] == "tiny-vit-s" and art.metadata["steps"] == 4
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4]
    for key in ("outer_loss", "query_acc_after", "gamma_mean", "meta_grad_norm_regulator", "samples_per_s",
                "regulator_update", "regulator_relative_change", "regulator_grad_norm", "prompts_grad_norm",
                "data/samples", "nonfinite_steps", "lr"):
        assert key in lines[-1], key
    assert all(x["regulator_update"] > 0 for x in lines)  # the regulator learns from step 1
    assert [s for s, _ in list_checkpoints(run)] == [2, 4]
    # a rerun of the finished run trains nothing and leaves the artifact's bytes alone (stage-2 runs record
    # its sha256, so a rewritten file would orphan their results)
    before = (run / "artifact.pt").stat()
    assert pretrain.main(pretrain_overrides(task_data, run, steps=4)) == 0
    after = (run / "artifact.pt").stat()  # untouched: the same file (an atomic rewrite makes a new inode)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert [s for s, _ in list_checkpoints(run)] == [2, 4]
    with pytest.raises(ConfigError, match="already holds checkpoints"):  # never overwrite another run
        pretrain.main(pretrain_overrides(task_data, run, steps=4, extra=("checkpoint.resume=false",)))


class _PreemptAfter:
    """Stands in for the signal handler: reports a preemption request at the n-th check (one per step)."""

    def __init__(self, n):
        self.n, self.checks = n, 0

    def __call__(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    @property
    def requested(self):
        self.checks += 1
        return self.checks >= self.n


def test_preempt_then_resume_equals_uninterrupted(task_data, tmp_path, monkeypatch):
    from pipeline import pretrain_loop

    full = tmp_path / "full"
    assert pretrain.main(pretrain_overrides(task_data, full, steps=5)) == 0
    part = tmp_path / "part"
    monkeypatch.setattr(pretrain_loop, "PreemptionHandler", _PreemptAfter(3))
    assert pretrain.main(pretrain_overrides(task_data, part, steps=5)) == 0  # preempted: exit 0 for requeue
    assert [s for s, _ in list_checkpoints(part)] == [2, 3] and not (part / "artifact.pt").exists()
    monkeypatch.undo()
    assert pretrain.main(pretrain_overrides(task_data, part, steps=5)) == 0
    a, b = load_artifact(full / "artifact.pt"), load_artifact(part / "artifact.pt")
    for k in a.prompts:
        assert torch.allclose(a.prompts[k], b.prompts[k], atol=1e-6, rtol=0), k
    for k in a.regulator_state:
        assert torch.allclose(a.regulator_state[k], b.regulator_state[k], atol=1e-6, rtol=0), k
    lines = [json.loads(x) for x in (part / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4, 5]
    # the resumed run measures the regulator's change from the same phi_0 as the uninterrupted one
    uninterrupted = json.loads((full / "metrics.jsonl").read_text().splitlines()[-1])
    assert lines[-1]["regulator_relative_change"] == pytest.approx(uninterrupted["regulator_relative_change"], rel=1e-5)
    ckpt = load_checkpoint(list_checkpoints(part)[-1][1])
    assert ckpt["step"] == 5 and ckpt["world_size"] == 1


def test_bad_configs_fail_before_training(task_data, tmp_path):
    with pytest.raises(ConfigError, match="n_way=9"):
        pretrain.main(pretrain_overrides(task_data, tmp_path / "a", extra=("episodes.n_way=9",)))
    with pytest.raises(ConfigError, match="prompts.type=none"):
        pretrain.main(pretrain_overrides(task_data, tmp_path / "b", extra=("model.prompts.type=none",)))
    with pytest.raises(ConfigError, match="optim.stepz"):
        pretrain.main(pretrain_overrides(task_data, tmp_path / "c", extra=("optim.stepz=3",)))
    assert not (tmp_path / "a" / "checkpoints").exists()


def test_concept_names_longer_than_the_text_context_are_refused(task_data, tmp_path):
    """A clustering whose names were fitted for another model or prompt length: refused before training,
    naming the cluster settings that refit them (tiny-vit-s: 24-token context, 4 prompt tokens)."""
    clusters = tmp_path / "clusters"
    shutil.copytree(task_data["clusters_dir"], clusters)
    concepts = json.loads((clusters / "concepts.json").read_text())
    concepts[0]["name"] = " ".join(["zanzibarkilimanjaro expedition"] * 6)
    (clusters / "concepts.json").write_text(json.dumps(concepts))
    data = {**task_data, "clusters_dir": str(clusters)}
    with pytest.raises(ConfigError, match="name_tokenizer=tiny-vit-s name_prompt_tokens=4"):
        pretrain.main(pretrain_overrides(data, tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()
