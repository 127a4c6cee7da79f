"""Untrusted inputs: pickled code in weights and artifacts, shell syntax in shard URLs.

Each payload here *would* leave a marker file behind if it ran; the tests check that it is refused
with a clear error and the marker never appears. Checkpoint-level pickle refusal is in
``test_checkpoint.py``; config-level code execution (YAML tags, resolvers) in ``test_faults_config.py``.
"""

from __future__ import annotations

import os
import pickle
import shutil
import sys

import pytest
import torch

from pipeline.backbone import load_backbone
from pipeline.checkpoint import UnsafeCheckpointError, load_artifact
from pipeline.config import BackboneConfig
from pipeline.data.config import ShardDataConfig
from pipeline.data.shards import build_shard_loader

from .helpers.bad_shards import good, write_tar


def _one_shard(folder):
    folder.mkdir(parents=True)
    path = folder / "000000.tar"
    write_tar(path, [good(f"s{i}", i) for i in range(3)])
    return path


class _Payload:
    """Unpickling this runs ``open(path, "w")`` (stands in for any code: a shell, a download, ...)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_backbone_weights_with_pickled_code_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "backbone.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _Payload(marker)}, bad)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_backbone(BackboneConfig(arch="tiny-vit-s", pretrained=str(bad)))
    assert not marker.exists()


def test_artifact_with_pickled_code_is_refused_by_finetune(tmp_path):
    from pipeline import finetune

    from .helpers.fewshot_data import finetune_overrides, make_coop_dataset

    marker = tmp_path / "pwned"
    bad = tmp_path / "artifact.pt"
    torch.save({"kind": "artifact", "prompts": {}, "metadata": _Payload(marker)}, bad)
    with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
        load_artifact(bad)
    root = make_coop_dataset(tmp_path / "data")
    args = finetune_overrides(root, tmp_path / "runs", ("method=prometar", "init=artifact", f"artifact={bad}"))
    with pytest.raises(UnsafeCheckpointError):
        finetune.main(args)
    assert not marker.exists()


@pytest.mark.parametrize("workers", [0, 2])
def test_shell_syntax_in_shard_urls_never_reaches_a_shell(tmp_path, workers):
    """Paths and http(s) URLs are opened without a shell (files directly, remote ones through curl with
    the URL as one argument); only webdataset's documented ``pipe:`` form runs a command."""
    shard = _one_shard(tmp_path / "shards")
    marker = tmp_path / "pwned"
    hostile = [
        f"{shard}; touch {marker}",
        f"$(touch {marker}).tar",
        f"`touch {marker}`.tar",
        f"http://127.0.0.1:9/x.tar?$(touch {marker})",
        f"https://127.0.0.1:9/`touch {marker}`.tar",
    ]
    urls = "::".join([*hostile, str(shard)])
    loader = build_shard_loader(ShardDataConfig(urls=urls, batch_size=1, workers=workers, resampled=False))
    keys = [k for batch in loader for k in batch["key"]]
    assert len(keys) == 3  # the good shard is read in full
    assert loader.stats["bad_shard"] == len(hostile)  # each hostile URL: one unreadable shard, counted
    assert not marker.exists()


@pytest.mark.skipif(shutil.which("cat") is None, reason="needs cat")
def test_pipe_urls_run_their_command_as_documented(tmp_path):
    """The one place a shard URL reaches a shell: ``pipe:CMD`` (webdataset's documented scheme for
    streaming from object stores). It runs CMD and reads the shard from its stdout."""
    shard = _one_shard(tmp_path / "shards")
    ran = tmp_path / "ran"  # control for the test above: this marker *is* made, by the shell pipe: starts
    loader = build_shard_loader(ShardDataConfig(urls=f"pipe:touch {ran}; cat {shard}", batch_size=1, workers=0,
                                                resampled=False))
    assert sum(len(b["key"]) for b in loader) == 3
    assert ran.exists()


def test_no_shell_or_eval_in_the_package():
    """Static guard for docs/ARCHITECTURE.md section 9: no ``shell=True``, ``eval``/``exec``, unsafe YAML or pickle loads."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1] / "pipeline"
    banned = re.compile(r"shell\s*=\s*True|(?<![.\w])eval\(|(?<![.\w])exec\(|yaml\.load\(|yaml\.unsafe_load|pickle\.loads?\(|"
                        r"weights_only\s*=\s*False|allow_pickle\s*=\s*True")
    hits = [f"{p.relative_to(root)}:{i}: {line.strip()}" for p in sorted(root.rglob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1) if banned.search(line.split("#")[0])]
    assert not hits, hits
    assert sys.modules.get("os") is os  # the test itself imported nothing that patches the checks above
