"""The benchmark tier's plumbing on the CPU: record() with pytest-benchmark's real fixture and a stand-in timer, and
gpu_summary on empty or broken files. (bash bench/run_gpu.sh dry runs the bench files' stand-in cases end to end:
tests/test_run_gpu.py.)"""
import importlib.util
import json
import os
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))
import gpu_summary  # noqa: E402


def bench_conftest(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_conftest_under_test", os.path.join(ROOT, "bench",
                                                                                          "conftest.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "GPU", False)
    monkeypatch.setattr(mod, "STANDIN", True)
    return mod


def test_bench_record_physics(benchmark, monkeypatch):
    """record() fills extra_info with the environment, the ceilings, the quantiles and the derived physics."""
    mod = bench_conftest(monkeypatch)
    monkeypatch.setattr(mod, "device_quantiles", lambda fn: (1.0, 2.0, 4.0))  # the stand-in timer, in ms
    calls = []
    info = mod.record(benchmark, lambda: calls.append(1), nbytes=6e9, flops=4e12)
    assert calls, "the host-clock rounds call fn"
    assert (info["ms_p20"], info["ms_p50"], info["ms_p80"]) == (1.0, 2.0, 4.0)
    assert info["device"] and info["torch"] and info["triton"] and info["git_sha"]
    assert info["GBps"] == pytest.approx(3000.0)  # 6 GB in 2 ms
    assert info["frac_copy_bw"] == pytest.approx(3000.0 / (mod.STANDIN_CEILINGS["copy_bw_TBps"] * 1e3))
    assert info["TFLOPs"] == pytest.approx(2000.0)
    assert info["frac_bf16_matmul"] == pytest.approx(2000.0 / mod.STANDIN_CEILINGS["bf16_matmul_TFLOPs"])
    assert info["ceilings_measured"] is False  # stand-in figures say so
    json.dumps(info)  # pytest-benchmark writes extra_info as JSON


def test_bench_standin_timer(monkeypatch):
    mod = bench_conftest(monkeypatch)
    p20, p50, p80 = mod.device_quantiles(lambda: sum(range(1000)))
    assert 0 < p20 <= p50 <= p80


def test_gpu_summary_broken_files(tmp_path):
    """An empty, a truncated and a wrong-shaped file each give one line in the table, not a traceback."""
    tag = "GPU_2026-01-01_abc"
    (tmp_path / f"kernels_rope_{tag}.json").write_text("")
    (tmp_path / f"kernels_lod_{tag}.json").write_text('{"benchmarks": [{"group": "x", ')
    (tmp_path / f"kernels_gist_{tag}.json").write_text(json.dumps(dict(benchmarks=[dict(group="g", params={},
                                                                                         extra_info=dict(ms_p50=1.0),
                                                                                         name="n")])))
    (tmp_path / f"train_small_{tag}.json").write_text("[1, 2")
    (tmp_path / f"gpu_tests_{tag}.xml").write_text("<testsuites><testsu")
    result = gpu_summary.summarize(str(tmp_path), tag)
    text = gpu_summary.table(result)
    broken = [line for line in text.splitlines() if line.startswith("broken: ")]
    assert len(broken) == 4, text
    assert any(f"kernels_rope_{tag}.json" in b and "empty" in b for b in broken)
    assert any(f"kernels_lod_{tag}.json" in b for b in broken)
    assert any(f"train_small_{tag}.json" in b for b in broken)
    assert any(f"gpu_tests_{tag}.xml" in b for b in broken)
    assert len(result["kernels"]) == 1  # the good file still counts
