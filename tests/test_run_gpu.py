"""bench/run_gpu.sh on the CPU: the dry part end to end (env, the warm-up's plan, the pyramid sweep on the torch
reference, the bench files' stand-in cases through record() and pytest-benchmark, a tiny training run, the summary and
its table), argument errors, and the summary's targets on synthetic files."""
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
    files = {f.name.split("_cpu_")[0] for f in tmp_path.iterdir()}
    assert files == {"run", "pyramid", "kernels", "train", "ncu", "summary"} and len(list(tmp_path.iterdir())) <= 8
    (summary,) = tmp_path.glob("summary_cpu_*.json")
    result = json.loads(summary.read_text())
    assert [x["phase"] for x in result["phases"]] == ["env", "warm", "pyramid", "kernels", "train_tiny", "ncu"]
    assert all(x["status"] in ("0", "absent") for x in result["phases"]), result["phases"]
    (train,) = result["train"]
    assert train["config"] == "tiny" and train["tokens_per_s"] > 0 and train["data"] == "random token ids"
    assert {(r["provider"], r["mode"]) for r in result["sweep"]} == {(p, m) for p in ("triton", "sdpa")
                                                                    for m in ("fwd", "full")}
    assert all(r["ms"] > 0 and r["TFLOPs"] > 0 for r in result["sweep"])
    names = {k["name"] for k in result["kernels"]}  # record() ran for the bench files' stand-in cases
    assert any("rope" in n for n in names) and any("gist_pool" in n for n in names)
    assert all(k["ms_p50"] > 0 and k["frac_copy_bw"] > 0 for k in result["kernels"])
    assert result["ceilings"]["ceilings_measured"] is False  # stand-ins say so
    assert [t["value"] for t in result["targets"]] == [None] * len(result["targets"])  # no headline shape on a CPU
    run = json.loads(next(tmp_path.glob("run_cpu_*.json")).read_text())
    assert run["phases"] == result["phases"] and run["env"]["device"] == "cpu"
    assert p.stdout.strip().splitlines()[-1].startswith("train tiny")  # the table comes last


def test_run_gpu_usage(tmp_path):
    for args in ((), ("c",), ("all",)):  # no part, an unknown part, a GPU part on a CPU
        p = run_script(*args, out=tmp_path)
        assert p.returncode == 2 and ("usage" in p.stderr or "needs a CUDA GPU" in p.stderr), p.stderr


def bench_row(group, provider, ms, **extra):
    return dict(group=group, name=f"test_x[{provider}]", params=dict(provider=provider),
                extra_info=dict(ms_p50=ms, copy_bw_TBps=3.0, bf16_matmul_TFLOPs=700.0, **extra))


def sweep_row(T, provider, mode, ms, **extra):
    return dict(D=128, T=T, provider=provider, mode=mode, ms=ms, **extra)


def test_gpu_summary_targets(tmp_path):
    tag = "GPU_2026-01-01_abc"
    rows = [bench_row("rope-4x4096x32/8x128-full", "triton", 1.0, frac_copy_bw=0.93),
            bench_row("rope-4x4096x32/8x128-full", "compiled", 0.9)]  # torch.compile faster: target missed
    (tmp_path / f"kernels_{tag}.json").write_text(json.dumps(dict(benchmarks=rows)))
    sweep = [sweep_row(65536, "triton", "fwd", 2.0, frac_bf16_matmul=0.6), sweep_row(65536, "sdpa", "fwd", 30.0),
             sweep_row(65536, "triton", "full", 10.0), sweep_row(65536, "sdpa", "full", 30.0),
             sweep_row(4096, "triton", "fwd", 0.2), sweep_row(4096, "sdpa", "fwd", 0.1)]
    (tmp_path / f"pyramid_{tag}.json").write_text(json.dumps(dict(rows=sweep)))
    (tmp_path / f"gpu_tests_{tag}.xml").write_text('<testsuites><testsuite tests="10" failures="1" errors="0" '
                                                   'skipped="2"/></testsuites>')
    (tmp_path / f"train_{tag}.jsonl").write_text(json.dumps(dict(config="small", tokens_per_s=1e6, mfu=0.41)) + "\n")
    (tmp_path / f"run_{tag}.json").write_text(json.dumps(dict(env=dict(device="GPU"), ceilings=dict(
        copy_bw_TBps=4.2, bf16_matmul_TFLOPs=690.0, ceilings_measured=True))))
    phases = tmp_path / "phases.tsv"
    phases.write_text("env\t25\t9\t0\npyramid\t120\t120\t124\n")
    result = gpu_summary.summarize(str(tmp_path), tag, str(phases), 300)
    got = {t["figure"]: (t["value"], t["ok"]) for t in result["targets"]}
    assert got["RoPE fwd+bwd, copy-bandwidth fraction"] == (0.93, True)
    assert got["RoPE fwd+bwd vs torch.compile"][1] is False
    assert got["pyramid fwd 64k D128 vs dense SDPA"] == (15.0, True)
    assert got["pyramid fwd 64k D128, GEMM fraction (visited tiles)"] == (0.6, True)
    assert got["pyramid fwd+bwd 64k D128 vs dense SDPA"] == (3.0, False)
    assert got["pyramid fwd 4k D128 vs dense SDPA"] == (0.5, False)
    assert got["pyramid fwd 64k D128 vs FlexAttention"] == (None, None)  # flex missing: not measured, not failed
    assert result["gpu_tests"] == dict(tests=10, failures=1, errors=0, skipped=2)
    assert result["ceilings"]["bf16_matmul_TFLOPs"] == 690.0
    text = gpu_summary.table(result)
    assert "7 passed, 1 failed" in text and "pyramid 120/120 s [124]" in text
    assert text.splitlines()[-1].startswith("train small") and ">= 40%" in text
    assert json.loads((tmp_path / f"run_{tag}.json").read_text())["phases"][1]["status"] == "124"


def test_gpu_summary_ncu(tmp_path):
    """The figures the table takes from an Nsight Compute report (its section layout), or the line saying why not."""
    report = tmp_path / "ncu.txt"
    report.write_text("  _lod_attn_fwd_kernel (529, 16, 1)x(256, 1, 1)\n"
                      "    Elapsed Cycles                cycle    8,671,220\n"
                      "    SM Active Cycles              cycle 5,039,814.02\n    Registers Per Thread  register/thread"
                      "               239\n    Achieved Occupancy                        %        12.47\n")
    n = gpu_summary.ncu_figures(str(report))
    assert n["registers"] == "239" and n["achieved_occupancy"] == "12.47" and abs(n["sm_busy"] - 0.5812) < 1e-4
    report.write_text("ncu not installed: skipped\n")
    assert gpu_summary.ncu_figures(str(report)) == dict(note="ncu not installed: skipped")
