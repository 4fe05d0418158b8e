"""The prepared GPU check (benchmarks/gpu_check.py) in its dry mode: every step's code on this CPU
with small shapes, so the script is known to work before a GPU machine runs it."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_dry_run_measures_every_step_and_writes_its_tables(tmp_path, monkeypatch):
    pytest.importorskip("triton", reason="the kernel step runs the Triton kernel under its interpreter")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the script turns it on for the dry run
    gpu_check = _load_script()
    report = gpu_check.main(["--dry", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "gpu_check.json").read_text()) == json.loads(json.dumps(report))
    assert report["dry"] and report["environment"]["device"] == "cpu"

    # the kernel step: PIIP-TSB's first interaction shape at 128/96/64 (the T branch's 8x8 tokens
    # sampling the S branch's 6x6 map ... whichever comes first), float32 and bfloat16
    rows = report["kernel"]
    assert [r["dtype"] for r in rows] == ["float32", "bfloat16"]
    assert rows[0]["shape"] == rows[1]["shape"] and "Lq16 M16" in rows[0]["shape"]
    for row, tolerance in zip(rows, (1e-5, 2 ** -8)):  # bf16: the output rounded once to bf16
        errors = [row[k] for k in ("output_rel_l2", "grad_value_rel_l2", "grad_locations_rel_l2", "grad_weights_rel_l2")]
        assert all(0 <= e < tolerance for e in errors), (row["dtype"], errors)
        assert all(row[k] > 0 for k in ("kernel_fwd_ms", "pure_fwd_ms", "kernel_fwd_bwd_ms", "pure_fwd_bwd_ms"))

    # the models step: both models, forward and training step, compile off (no compile when dry)
    models = report["models"]
    assert [(m["model"], m["pass"]) for m in models] == [
        ("PIIP-TSB 128/96/64", "backbone forward"), ("ViTDet-B 128", "backbone forward"),
        ("PIIP-TSB 128/96/64", "train step (Mask R-CNN)"), ("ViTDet-B 128", "train step (Mask R-CNN)")]
    for m in models:
        assert "error" not in m and "skipped" not in m, m
        assert math.isfinite(m["images_per_s"]) and m["images_per_s"] > 0 and not m["compile"]
    assert models[2]["input_size"] == [128 * 800 // 1333, 128]  # the authors' detection aspect

    table = (tmp_path / "gpu_check.md").read_text()
    assert "DRY RUN" in table and table.count("| PIIP-TSB 128/96/64 |") == 2
    assert "| N1 Lq16 M16" in table


def test_the_real_check_refuses_to_start_without_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the real check would run")
    gpu_check = _load_script()
    with pytest.raises(SystemExit, match="no CUDA device here; run with --dry"):
        gpu_check.main(["--out", str(tmp_path)])


def test_a_short_budget_skips_the_cases_it_cannot_start(tmp_path):
    """Cases past the budget are recorded as skipped, not lost and not run (and the table says so)."""
    gpu_check = _load_script()
    setting = gpu_check.GPU
    budget = gpu_check.Budget(0.0)
    rows = gpu_check.measure_models(setting, budget, reserve_s=60.0)
    assert len(rows) == 8 and all(r["skipped"].startswith("budget") for r in rows)
    assert [r["compile"] for r in rows] == [False] * 4 + [True] * 4  # uncompiled pairs first
    report = {"dry": False, "environment": {"device": "cuda", "torch": "x", "triton": "y", "msda_kernel": "triton"},
              "tests": {"status": "ok", "passed": 7}, "kernel": [], "models": rows}
    assert gpu_check.markdown(report).count("budget") == 8
