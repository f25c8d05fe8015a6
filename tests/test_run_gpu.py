"""bench/run_gpu.sh's CPU-side steps: the dry part end to end (plans, a tiny training run on random ids, the JSON and
the table), argument errors, and the summary's targets on a synthetic pytest-benchmark file."""
import json
import os
import subprocess
import sys

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))
import gpu_summary  # noqa: E402

SCRIPT = os.path.join(ROOT, "bench", "run_gpu.sh")


def run_script(*args, out):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OUT=str(out), MC_KERNELS="torch")  # the script's `python` is this interpreter, venv or not
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)


def test_run_gpu_dry(tmp_path):
    p = run_script("dry", out=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    (summary,) = tmp_path.glob("summary_cpu_*.json")
    result = json.loads(summary.read_text())
    (train,) = result["train"]
    assert train["config"] == "tiny" and train["tokens_per_s"] > 0 and train["data"] == "random token ids"
    assert [t["value"] for t in result["targets"]] == [None] * len(gpu_summary.TARGETS)  # nothing measured on a CPU
    assert p.stdout.strip().splitlines()[-1].startswith("train tiny")  # the table comes last


def test_run_gpu_usage(tmp_path):
    for args in ((), ("c",), ("a",)):  # no part, an unknown part, a GPU part on a CPU
        p = run_script(*args, out=tmp_path)
        assert p.returncode == 2 and ("usage" in p.stderr or "needs a CUDA GPU" in p.stderr), p.stderr


def bench_row(group, provider, ms, **extra):
    return dict(group=group, name=f"test_x[{provider}]", params=dict(provider=provider),
                extra_info=dict(ms_p50=ms, copy_bw_TBps=3.0, bf16_matmul_TFLOPs=700.0, **extra))


def test_gpu_summary_targets(tmp_path):
    tag = "GPU_2026-01-01_abc"
    lod = "lod_attention-T65536-H16-D128-W1024.256-"
    rows = [bench_row("rope-4x4096x32/8x128-full", "triton", 1.0, frac_copy_bw=0.93),
            bench_row("rope-4x4096x32/8x128-full", "compiled", 0.9),  # torch.compile faster: target missed
            bench_row(lod + "fwd", "triton", 2.0, frac_bf16_matmul=0.55),
            bench_row(lod + "fwd", "sdpa", 30.0), bench_row(lod + "full", "triton", 10.0),
            bench_row(lod + "full", "sdpa", 30.0)]
    (tmp_path / f"kernels_rope_{tag}.json").write_text(json.dumps(dict(benchmarks=rows[:2])))
    (tmp_path / f"kernels_lod_{tag}.json").write_text(json.dumps(dict(benchmarks=rows[2:])))
    (tmp_path / f"gpu_tests_{tag}.xml").write_text('<testsuites><testsuite tests="10" failures="1" errors="0" '
                                                   'skipped="2"/></testsuites>')
    result = gpu_summary.summarize(str(tmp_path), tag)
    got = {t["figure"]: (t["value"], t["ok"]) for t in result["targets"]}
    assert got["RoPE fwd+bwd, copy-bandwidth fraction"] == (0.93, True)
    assert got["RoPE fwd+bwd vs torch.compile"][1] is False
    assert got["pyramid T=65536 fwd vs dense SDPA"] == (15.0, True)
    assert got["pyramid T=65536 fwd+bwd vs dense SDPA"] == (3.0, False)
    assert got["pyramid T=65536 fwd vs FlexAttention"] == (None, None)  # flex missing: not measured, not failed
    assert result["gpu_tests"] == dict(tests=10, failures=1, errors=0, skipped=2)
    assert result["ceilings"] == dict(copy_bw_TBps=3.0, bf16_matmul_TFLOPs=700.0)
    assert "7 passed, 1 failed" in gpu_summary.table(result)
