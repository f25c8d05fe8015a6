"""bench/mc_demo.sh: the demonstration's whole chain at its smoke size (what the GPU size runs, at toy sizes, so a
device run fails on nothing the CPU could catch), its bad input, and the GPU size's configuration."""
import json
import lzma
import os
import shlex
import subprocess
import sys

import pytest
import torch

import prepare
import train
from configs import load_config
from conftest import ROOT
from megacontext import MegaContextConfig
from tiling import check_capacity

sys.path.insert(0, os.path.join(ROOT, "bench"))
import longctx  # noqa: E402

SCRIPT = os.path.join(ROOT, "bench", "mc_demo.sh")
PG1K = os.path.join(ROOT, "tokenizers", "pg1k.json")


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
    # resumed with a spent time budget and the harness results gone: the stages are done, the harness runs get
    # --time-limit 0 and the report still comes, its cells marked partial
    for f in run.glob("*.json"):
        if f.name != "gate.json":
            f.unlink()
    p = demo("--size", "smoke", env=dict(DATA_DIR=data_dir, RUN_DIR=str(run), OUT=str(out), BUDGET_S="1"))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert all(f"{stage}: done" in p.stdout for stage in ("base", "gist", "lens_counterfactual", "lens_attention",
                                                          "lens_oracle"))
    report = json.loads((out / "mc_demo_smoke.json").read_text())
    assert "test" in report["partial"] and report["test"]["retrieval"] == []
    assert "retrieval passkey, question last, at 512 tokens: 0/2 prompts" in report["partial"]["test"]
    assert "**Partial**: the harness's time limit cut" in (out / "mc_demo_smoke.md").read_text()

def plan(size, env=None):
    """`mc_demo.sh --size SIZE --plan`: ({stage: (seconds, command argv)}, total seconds, stdout)."""
    p = demo("--size", size, "--plan", env=env, timeout=60)
    assert p.returncode == 0 and not p.stderr, p.stderr
    lines, stages = p.stdout.splitlines(), {}
    for head, cmd in zip(lines, lines[1:]):
        if cmd.startswith("    ") and not head.startswith(" "):
            stages[head.split()[0]] = (int(head.split(" s  ")[0].split()[-1]), shlex.split(cmd))
    return stages, int(lines[-1].split("~")[1].split()[0]), p.stdout


def test_mc_demo_plan_fits_the_budget_and_runs_nothing(tmp_path):
    """--plan prints every stage of the chain with its estimate and the exact command it would run, runs nothing;
    the GPU size's total fits its 9-minute budget, the base's estimate is the table's measured H200 step, and the
    harness runs' time limits share what the budget leaves."""
    env = dict(RUN_DIR=str(tmp_path / "run"), DATA_DIR=str(tmp_path / "data"), OUT=str(tmp_path / "out"))
    stages, total, out = plan("gpu", env)
    assert list(stages) == ["prepare", "base", "gate", "gist", "lens_counterfactual", "lens_attention", "lens_oracle",
                            "select_counterfactual", "select_attention", "select_oracle", "harness_test",
                            "test_counterfactual", "test_attention", "report"]
    assert total == sum(sec for sec, _ in stages.values()) <= 540 and "(budget 540 s)" in out
    assert not os.listdir(tmp_path)  # nothing prepared, trained or written
    rows = {r[1]: r for r in (line.split("\t") for line in open(os.path.join(ROOT, "bench", "mc_demo_times.tsv"))
                              if line.startswith("gpu\t"))}
    assert "measured" in rows["base"][4] and "H200" in rows["base"][4] and "estimate" in rows["gist"][4]
    assert stages["base"][0] == round(float(rows["base"][3]) + 1600 * float(rows["base"][2]))
    assert stages["base"][1][:2] == ["python", "train.py"] and "--max_iters=1600" in stages["base"][1]
    limits = [float(cmd[cmd.index("--time-limit") + 1]) for stage, (_, cmd) in stages.items()
              if stage.startswith(("select", "harness", "test"))]
    assert len(limits) == 6 and 0 < sum(limits) <= 540 - sum(sec for st, (sec, _) in stages.items()
                                                            if not st.startswith(("select", "harness", "test")))
    smoke, _, _ = plan("smoke", env)
    assert "--time-limit" not in sum((cmd for _, cmd in smoke.values()), [])  # no budget, no limit
    p = demo("--size", "smoke", "--plan", env=dict(env, BUDGET_S="300"))
    assert "--time-limit" in p.stdout and "(budget 300 s)" in p.stdout


@pytest.mark.parametrize("size", ["cpu", "smoke", pytest.param("gpu", id="gpu_size")])  # (the id `gpu` = the marker)
def test_mc_demo_stage_configs_are_valid(size, tmp_path):
    """Every train.py command of every size resolves to a valid config (the GPU size's attention-teacher stage once
    asked for a block whose history fit its budget: refused at once on the device). The checkpoints the stages read
    are empty files here: the config only checks that they exist."""
    for stage in ("base", "gist"):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "ckpt.pt").touch()
    stages, _, _ = plan(size, dict(RUN_DIR=str(tmp_path)))
    trains = {stage: cmd[2:] for stage, (_, cmd) in stages.items() if cmd[1] == "train.py"}
    assert list(trains) == ["base", "gist", "lens_counterfactual", "lens_attention", "lens_oracle"]
    for stage, argv in trains.items():
        cfg = load_config(train.TrainConfig, argv)
        assert cfg.stage == stage.split("_")[0] and cfg.out_dir.endswith(stage), stage


def test_mc_demo_smoke_chain_under_triton(data_dir, tmp_path, monkeypatch, capsys, triton_backend):
    """The smoke size's stage commands (from --plan) with the Triton kernels forced, in the interpreter: the shapes
    the GPU runs (head dim 32: the pyramidal kernel refuses 16). One step of each training stage on shorter blocks and
    one retrieval prompt of the harness, in this process (the interpreter is on here), keep it to about a minute."""
    run = tmp_path / "run"
    stages, _, _ = plan("smoke", dict(RUN_DIR=str(run), DATA_DIR=data_dir, OUT=str(tmp_path / "out")))
    short = dict(base=["--max_iters=1"], gist=["--max_iters=1", "--block_size=512"],
                 lens_counterfactual=["--max_iters=1", "--block_size=256"], lens_attention=["--max_iters=1"],
                 lens_oracle=["--max_iters=1", "--block_size=256"],
                 harness_test=["--histories", "", "--retrieval-methods", "lens", "--tasks", "passkey",
                               "--controls", "", "--trials", "1", "--in-block-trials", "0", "--no-plot"])
    monkeypatch.chdir(ROOT)
    for stage, extra in short.items():
        python, script, *argv = stages[stage][1]  # (--plan keeps the oracle teacher)
        assert python == "python" and script in ("train.py", "bench/longctx.py"), stages[stage][1]
        (train.main if script == "train.py" else longctx.main)(argv + extra)
    out = capsys.readouterr()
    assert (out.out + out.err).count("kernels: backend=triton triton=") == 6 and "interpreter=off" not in out.out
    for stage in ("base", "gist", "lens_counterfactual", "lens_attention", "lens_oracle"):
        assert torch.load(run / stage / "ckpt.pt", map_location="cpu", weights_only=False)["step"] == 1, stage
    res = json.loads((run / "harness_test.json").read_text())
    assert res["kernels"] == "triton" and [r["trials"] for r in res["retrieval"]] == [1]


def test_mc_demo_bad_size():
    p = demo("--size", "huge")
    assert p.returncode == 2 and p.stderr.strip() == "error: --size must be cpu, gpu or smoke, got 'huge'"


def test_mc_demo_prepares_missing_data_without_rustbpe(tmp_path):
    """The GPU machine has no rustbpe: missing data are tokenized from the corpus (CORPUS) with the committed
    tokenizer. A module that fails to import stands in for rustbpe; a tiny corpus for the books."""
    hide, corpus, data = tmp_path / "hide", tmp_path / "corpus", tmp_path / "data"
    hide.mkdir()
    corpus.mkdir()
    (hide / "rustbpe.py").write_text("raise ImportError('not on this machine')\n")
    for split in ("train", "val", "test"):
        books = [dict(id=f"{split}{i}", author="a", title="t", text=f"Book {i} of {split}. " * 200) for i in range(3)]
        with lzma.open(corpus / f"{split}.jsonl.xz", "wt") as f:
            f.write("".join(json.dumps(b) + "\n" for b in books))
    # --n_layer=0 goes to the base stage, which refuses it in one line: the test is about what comes before
    p = demo("--size", "gpu", "--n_layer=0", env=dict(DATA_DIR=str(data), RUN_DIR=str(tmp_path / "run"),
                                                      CORPUS=str(corpus), PYTHONPATH=str(hide)), timeout=120)
    assert p.returncode == 1 and p.stderr.strip().splitlines()[-1] == "error: n_layer must be >= 1, got 0", p.stderr
    assert "tokenizer: reusing tokenizers/pg1k.json (vocab 1024)" in p.stdout
    meta = prepare.load_meta(str(data))
    assert meta["tokenizer_sha256"] == prepare.read_tokenizer_json(PG1K)["sha256"] and meta["max_docs"] == 120
    assert {s: meta["splits"][s]["n_docs"] for s in prepare.SPLITS} == {"train": 3, "val": 3, "test": 3}
    assert open(data / "tokenizer.json", "rb").read() == open(PG1K, "rb").read()


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


def test_throughput_random_tokens_refuses_drills_in_one_line(tmp_path):
    """Random ids have no tokenizer: the GPU demo's config with its retrieval mix left on is one line, not a traceback;
    with the drills off the demo's config runs (here the CPU one at toy sizes)."""
    script = os.path.join(ROOT, "bench", "train_throughput.py")
    p = subprocess.run([sys.executable, script, os.path.join(ROOT, "configs", "mc_demo.py"), "--random-tokens",
                        "--vocab=1024", "--retrieval_mix=0", "--copy_steps=0", "--short_steps=0", "--steps=2",
                        "--log-every=1", "--batch_size=1", "--block_size=64", "--n_layer=1", "--device=cpu",
                        "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0 and len(list(tmp_path.glob("train_mc_demo_*.json"))) == 1, p.stderr[-2000:]
    cmd = [sys.executable, script, os.path.join(ROOT, "configs", "mc_demo_gpu.py"), "--random-tokens", "--vocab=1024"]
    for extra, mix, copy in (([], 1.0, 600), (["--retrieval_mix=0"], 0.0, 600), (["--copy_steps=0"], 1.0, 0)):
        p = subprocess.run(cmd + extra, capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert p.returncode == 1 and p.stderr.strip() == (
            f"error: --random-tokens has no tokenizer, and the retrieval drills need one (retrieval_mix={mix}, "
            f"copy_steps={copy}); pass --retrieval_mix=0 --copy_steps=0"), p.stderr[-2000:]
