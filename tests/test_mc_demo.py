"""bench/mc_demo.sh: the demonstration's whole chain at its smoke size (what the GPU size runs, at toy sizes, so a
device run fails on nothing the CPU could catch), its bad input, and the GPU size's configuration."""
import json
import os
import subprocess
import sys

import pytest

import train
from configs import load_config
from conftest import ROOT
from megacontext import MegaContextConfig
from tiling import check_capacity

SCRIPT = os.path.join(ROOT, "bench", "mc_demo.sh")


def demo(*args, env=None, timeout=900):
    full = {**os.environ, **(env or {})}
    full["PATH"] = os.path.dirname(sys.executable) + os.pathsep + full.get("PATH", "")  # `python` is this one
    full.pop("TRITON_INTERPRET", None)
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, env=full, cwd=ROOT, timeout=timeout)


def test_mc_demo_smoke_runs_the_whole_chain(data_dir, tmp_path):
    run, out = tmp_path / "run", tmp_path / "out"
    p = demo("--size", "smoke", env=dict(DATA_DIR=data_dir, RUN_DIR=str(run), OUT=str(out)))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for stage in ("base", "gist", "lens_counterfactual", "lens_attention", "lens_oracle"):
        assert (run / stage / "ckpt.pt").exists(), stage
    report = json.loads((out / "mc_demo_smoke.json").read_text())
    assert report["size"] == "smoke" and report["command"] == "bash bench/mc_demo.sh --size smoke"
    assert report["device"] == "cpu" and report["torch"] and report["date"] and report["kernels"]
    assert report["gate"]["threshold"] == 0.0 and report["gate"]["trials"] >= 100
    assert set(report["gate"]["per_task"]) == {"passkey", "multikey", "vartrack"}
    assert report["base"]["steps"] == 2 and report["base"]["tokens_per_s"] > 0 and report["base"]["mfu"] is None
    s = report["summary"]
    assert s["kept"] in ("counterfactual", "attention", "oracle")
    assert set(s["tasks"]) == {"passkey", "multikey", "vartrack"}  # {task: {method: {"4x": accuracy}}}
    assert all(set(v) == {"truncation", "lens", "oracle"} and all(set(a) == {"4x"} for a in v.values())
               for v in s["tasks"].values())
    assert set(s["teachers"]) == set(s["teachers_val"]) == {"counterfactual", "attention", "oracle"}
    assert s["teachers"][s["kept"]] == {t: v["lens"] for t, v in s["tasks"].items()}
    assert "gap_share" in s["nll_long_range"] or s["nll_long_range"] == {}
    assert any(t["target"].startswith("passkey 4x: truncation") for t in report["targets"])
    md = (out / "mc_demo_smoke.md").read_text()
    assert "| vartrack | 4x |" in md and "LensNet (oracle)" in md
    for name in ("select_counterfactual", "harness_test"):  # a finished harness is skipped when run again
        assert (run / f"{name}.json").exists()
    assert p.stdout.strip().splitlines()[-1].startswith("=== done")


def test_mc_demo_bad_size_and_missing_gpu_data(tmp_path):
    p = demo("--size", "huge")
    assert p.returncode == 2 and p.stderr.strip() == "error: --size must be cpu, gpu or smoke, got 'huge'"
    hide = tmp_path / "hide"  # the device machine has no rustbpe: a module that fails to import stands in for that
    hide.mkdir()
    (hide / "rustbpe.py").write_text("raise ImportError('not on this machine')\n")
    p = demo("--size", "gpu", env=dict(DATA_DIR=str(tmp_path / "none"), RUN_DIR=str(tmp_path / "run"),
                                       PYTHONPATH=str(hide)), timeout=60)
    assert p.returncode == 1 and "cannot train the tokenizer (no rustbpe)" in p.stderr, p.stderr[-2000:]
    assert len(p.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_mc_demo_gpu_size_fits_its_budget_and_histories():
    """The GPU size's config: the working context of 1,024 entries is inside the base's block, and the budget holds
    the harness's longest history (1M tokens; check_capacity is exact over every shorter one)."""
    cfg = load_config(train.TrainConfig, [os.path.join(ROOT, "configs", "mc_demo_gpu.py")])
    assert cfg.w_max == cfg.block_size == 1024 and cfg.retrieval_mix == 1.0
    assert 30e6 <= 12 * cfg.n_layer * cfg.n_embd**2 <= 100e6  # the 30-100M parameters (non-embedding)
    mc = MegaContextConfig(block_k=cfg.block_k, w_max=cfg.w_max, recent_tokens=cfg.recent_tokens)
    mc.validate()
    check_capacity(1 << 24, mc.block_k, mc.recent_tokens, mc.w_max - mc.block_k)  # 16M, with the harness's margin
    script = open(SCRIPT).read()
    assert "--retrieval-budget 1024" in script and "--retrieval-histories 8192,65536,1048576" in script
