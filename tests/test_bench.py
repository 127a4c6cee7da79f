"""The benchmark machinery: every variant measured, FLOP ordering, document blocks replaced in place."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import bench_meta  # noqa: E402
import run_all  # noqa: E402


def test_replace_section_only_touches_its_block():
    doc = "# B\n\nprose a\n\n<!-- bench:x -->\nold x\n<!-- /bench:x -->\n\nprose b\n<!-- bench:y -->\nold y\n<!-- /bench:y -->\n"
    out = run_all.replace_section(doc, "x", "new x\n| t |", "X")
    assert "old x" not in out and "new x\n| t |" in out and "old y" in out
    assert out.startswith("# B\n\nprose a\n\n<!-- bench:x -->") and "prose b" in out
    assert run_all.replace_section(out, "x", "new x\n| t |", "X") == out  # idempotent
    added = run_all.replace_section(doc, "z", "zz", "Zed")
    assert added.startswith(doc.rstrip("\n")) and added.endswith("## Zed\n\n<!-- bench:z -->\nzz\n<!-- /bench:z -->\n")
    # a body with regex replacement syntax is inserted literally
    assert r"\1 \g<0>" in run_all.replace_section(doc, "y", r"\1 \g<0>", "Y")


def test_every_benchmark_is_declared_with_an_existing_script():
    for name, bench in run_all.BENCHES.items():
        assert (ROOT / "bench" / bench.script).exists(), name
        assert bench.gpu == name.startswith("gpu-")


def test_benchmarks_doc_has_a_block_for_every_benchmark():
    doc = (ROOT / "docs" / "BENCHMARKS.md").read_text()
    blocks = re.findall(r"<!-- bench:(\S+) -->", doc)
    assert sorted(blocks) == sorted(run_all.BENCHES)
    assert all(f"<!-- /bench:{name} -->" in doc for name in blocks)


def _check_meta(result: dict) -> None:
    v = result["variants"]
    assert list(v) == ["plain", "prometar", "prometar_first_order", "regularized_only"]
    # work, not time, is deterministic: each variant does strictly more than the one below it
    assert v["prometar"]["gflop"] > v["prometar_first_order"]["gflop"] > v["regularized_only"]["gflop"]
    assert v["regularized_only"]["gflop"] > v["plain"]["gflop"] > 0 and v["plain"]["flop_ratio"] == 1.0
    assert v["prometar"]["time_s"]["median"] > v["plain"]["time_s"]["median"]
    table = bench_meta.markdown(result)
    assert sum(line.startswith(f"| {n} |") for n in v for line in table.splitlines()) == 4


def test_meta_bench_measures_every_variant():
    result = bench_meta.run(["--iters", "2", "--warmup", "1", "--batch", "4", "--classes", "6", "--flops", "--no-memory"])
    _check_meta(result)


@pytest.mark.slow
def test_run_all_quick_writes_blocks(tmp_path):
    doc = tmp_path / "B.md"
    doc.write_text("# Benchmarks\n\nhand-written\n\n<!-- bench:cluster -->\nold\n<!-- /bench:cluster -->\n")
    cmd = [sys.executable, "bench/run_all.py", "--quick", "--only", "cluster,meta-10", "--doc", str(doc)]
    subprocess.run(cmd, cwd=ROOT, check=True, timeout=900)
    text = doc.read_text()
    assert "hand-written" in text and "old" not in text
    assert "`python bench/bench_cluster.py --n 50000 --reps 1` (quick)" in text
    assert "## Meta overhead, tiny-vit, 10-class label space" in text and "| prometar |" in text


@pytest.mark.gpu
def test_meta_bench_on_gpu_in_bf16():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    result = bench_meta.run(["--device", "cuda", "--autocast", "bf16", "--iters", "3", "--batch", "4", "--classes", "6",
                             "--flops"])
    _check_meta(result)
    assert all(e["peak_mib"] > 0 for e in result["variants"].values())


def test_label_bench_extrapolation_and_table():
    import bench_labels

    assert bench_labels.extrapolate({50: 100.0}, 1000) is None  # one size says nothing about growth
    assert bench_labels.extrapolate({10: 5.0, 50: 100.0, 200: 400.0}, 1000) == pytest.approx(2000.0)
    row = {"time_s": 2.0, "warmup_s": 3.0, "gflop": 10.0, "peak_over_idle_mib": 50.0, "maxrss_mib": 900.0}
    result = {"args": {"arch": "a", "device": "cpu", "autocast": "no", "batch": 4, "threads": 1, "memory_limit_gib": 20},
              "torch": "t", "growth": {},
              "rows": {"plain": {"50": {**row, "time_s": 1.0, "gflop": 5.0}, "1000": {"error": "exit status -9: Killed"}},
                       "prometar": {"50": row, "1000": {"skipped": "extrapolated peak 30.0 GiB > 20 GiB limit"}}}}
    table = bench_labels.markdown(result)
    assert "| 50 | prometar | 2.00 | 2.00 | 10 | 2.00 | 50 | 900 | 3.00 |" in table
    assert "| 1000 | prometar | extrapolated peak 30.0 GiB > 20 GiB limit |" in table
    assert "| 1000 | plain | exit status -9: Killed |" in table  # a failed size is reported, not filled in


@pytest.mark.slow
def test_label_bench_measures_both_variants_per_size():
    import bench_labels

    result = bench_labels.run(["--arch", "tiny-vit", "--classes", "4,8", "--threads", "1", "--memory-limit-gib", "16"])
    for variant in ("plain", "prometar"):
        rows = result["rows"][variant]
        assert set(rows) == {"4", "8"} and all(r["time_s"] > 0 and r["gflop"] > 0 for r in rows.values())
        assert rows["8"]["gflop"] > rows["4"]["gflop"]  # more classes, more text-tower work
    assert result["rows"]["prometar"]["8"]["gflop"] > result["rows"]["plain"]["8"]["gflop"]
    assert set(result["growth"]) == {"plain", "prometar"}


def test_profile_operator_classes():
    import profile_meta

    assert profile_meta.op_class("aten::mm") == "matmul"
    assert profile_meta.op_class("aten.bmm.default") == "matmul"  # flop-counter spelling
    assert profile_meta.op_class("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert profile_meta.op_class("aten::gelu_backward") == "elementwise & norms"
    assert profile_meta.op_class("aten::native_layer_norm") == "elementwise & norms"
    assert profile_meta.op_class("aten::copy_") == "copies & layout"
    assert profile_meta.op_class("aten::view") == "dispatch"
    assert profile_meta.op_class("ProfilerStep*") == "other"


def test_profile_accounts_for_the_whole_iteration():
    import profile_meta

    result = profile_meta.run(["--classes", "6", "--threads", "1", "--top", "5"])
    plain, meta = result["variants"]["plain"], result["variants"]["prometar"]
    for r in (plain, meta):
        classes = r["classes"]
        # the classes split the profiled wall time (the remainder, Python and autograd, goes to "other")
        assert sum(c["self_ms"] for c in classes.values()) == pytest.approx(r["wall_ms"], rel=0.05)
        assert sum(c["gflop"] for c in classes.values()) == pytest.approx(r["gflop"])  # every counted op classified
        assert classes["matmul"]["gflop"] > 0.8 * r["gflop"]  # a transformer's FLOPs are its matmuls
        assert len(r["top"]) == 5 and r["top"][0]["self_ms"] >= r["top"][-1]["self_ms"]
    assert meta["gflop"] > 2 * plain["gflop"]
    table = profile_meta.markdown(result)
    assert "| prometar | matmul |" in table and "Top operators of prometar" in table


def test_attention_input_ab_times_both_modes():
    import ab_attention_input

    result = ab_attention_input.run(["--classes", "4", "--rounds", "2", "--variants", "plain"])
    r = result["rows"]["plain"]
    assert r["contiguous"]["min"] > 0 and r["strided"]["min"] > 0 and r["ratio"]["median"] > 0
    import pipeline.prompts as prompts_mod

    assert prompts_mod._ContiguousAttentionInput is ab_attention_input.MODES["contiguous"]  # restored after
    assert "| plain |" in ab_attention_input.markdown(result)
    with pytest.raises(SystemExit):  # an unknown variant is a usage error, before any model is built
        ab_attention_input.run(["--variants", "plain,nope"])
