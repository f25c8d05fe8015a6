"""sm_90 ahead-of-time compile check (bench/compile_sm90.py), no GPU needed: the default tier compiles one kept config
per kernel at its largest shapes; `pytest -m sm90` compiles every kept config at every GPU-tier and benchmark shape
(several minutes). The checker itself is tested on records that must fail, and on the constexpr-if-return bug."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPT = os.path.join(ROOT, "bench", "compile_sm90.py")


def run_check(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled kernels: a fresh process
    out = tmp_path / "sm90"
    p = subprocess.run([sys.executable, SCRIPT, "--out", str(out), *args], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=3600)
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-4000:]
    with open(f"{out}.json") as f:
        return json.load(f)


def check_records(result, kernels):
    recs = result["records"]
    assert {r["kernel"] for r in recs} >= kernels
    for r in recs:
        assert "error" not in r, r
        assert r["smem"] <= result["smem_limit"] and r["registers"] <= 255
        if r["dtype"] in ("bfloat16", "float16"):
            assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        if r["kernel"].startswith("lod_attn"):  # attention tiles run on tensor cores
            assert r["tile_loops"] and all(t["mma"] > 0 for t in r["tile_loops"]), r


ALL = {"gauss_rope", "gist_pool_fwd", "gist_pool_bwd", "lod_attn_fwd", "lod_attn_dq", "lod_attn_dkdv"}


def test_sm90_compile_ci(tmp_path):
    check_records(run_check(tmp_path, "--subset", "ci", "--no-probe"), ALL)


@pytest.mark.sm90
def test_sm90_compile_all(tmp_path):
    result = run_check(tmp_path, "--subset", "all")
    check_records(result, ALL)
    probe = {p["strategy"]: p["tile"]["insts"] for p in result["rope_probe"]}  # the RoPE choice still holds
    assert probe["rotate once (pre-rotated keys)"] < min(probe["cos/sin tables per tile"], probe["recompute per tile"])


def test_sm90_verdict_fails_what_it_should():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from compile_sm90 import verdict
    ok = dict(kernel="k", dtype="bfloat16", kept=True, registers=128, spill_stores=0, spill_loads=0, smem=1024,
              smem_est=2048)
    assert verdict(ok) == ""
    assert "spills" in verdict({**ok, "spill_stores": 8})
    assert verdict({**ok, "spill_stores": 8, "dtype": "float32"}) == ""  # fp32 IEEE dots may spill; bf16 may not
    assert "227" not in verdict(ok) and "shared memory" in verdict({**ok, "smem": 240 * 1024, "smem_est": None})
    assert "estimate" in verdict({**ok, "smem": 4096})
    assert "compile error" in verdict({**ok, "error": "x"})
    assert verdict({**ok, "kept": False, "spill_stores": 8, "smem": 10 ** 6}) == ""  # pruned: informational


BUGGY = '''
import triton, triton.language as tl

@triton.jit
def _tile(x, y, BWD: tl.constexpr):
    if not BWD:
        return x
    return tl.dot(x, tl.trans(y))  # generated even when BWD is False: [M, N/2] x [M, N]^T

@triton.jit
def buggy(X, O, BWD: tl.constexpr):
    r = tl.arange(0, 32)
    x = tl.load(X + r[:, None] * 32 + r[None, :])
    y = tl.load(X + r[:, None] * 32 + tl.arange(0, 16)[None, :])
    tl.store(O + r[:, None] * 32 + r[None, :], _tile(x, y, BWD))
'''


def test_sm90_compile_catches_constexpr_return_bug(tmp_path):
    """The old forward's bug: statements after a constexpr-if return are still generated. The interpreter runs it; an
    sm_90 compile fails, and the checker's compile path reports it."""
    (tmp_path / "buggy.py").write_text(BUGGY)
    code = ("import sys, torch; sys.path.insert(0, %r); sys.path.insert(0, %r); import compile_sm90 as c, buggy\n"
            "x = torch.empty(16, dtype=torch.float16, device='meta')\n"
            "try:\n    c.compile_sm90(buggy.buggy, (x, x), dict(BWD=False))\nexcept Exception as e:\n"
            "    print('FAILED', type(e).__name__)\nelse:\n    print('COMPILED')\n"
            % (os.path.join(ROOT, "bench"), str(tmp_path)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert "FAILED" in p.stdout, p.stdout + p.stderr[-3000:]
