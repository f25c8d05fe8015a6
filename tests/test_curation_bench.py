"""bench/curation.py end to end at toy sizes on the synthetic corpus: the summary the issue asks for, the token files
smaller after curation, the asked needles still reached and the library reached through a mount."""
import json
import os
import sys

import torch
from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))
import curation  # noqa: E402


def test_curation_bench_small(data_dir, tmp_path):
    policy = tmp_path / "p.py"
    policy.write_text("min_age = 1024\nkeep_recent = 256\nmin_idle = 1024\ndelete_age = 2048\n")
    out, threads = str(tmp_path / "cur"), torch.get_num_threads()
    try:
        curation.main(["--data-dir", data_dir, "--tokens", "4096", "--needles", "4", "--library", "2048",
                       "--library-needles", "2", "--own", "512", "--budget", "128", "--threads", "1",
                       "--policy", str(policy), "--out", out])
    finally:
        torch.set_num_threads(threads)
    r = json.load(open(out + ".json"))
    s = r["summary"]
    assert {"bytes_before", "bytes_after", "accessed_retrieval_before", "accessed_retrieval_after",
            "unaccessed_retrieval_after", "mounted_retrieval", "cache_hit_rate"} <= set(s)
    assert s["measure"] == "needle_raw" and s["bytes_after"] < s["bytes_before"] / 2
    assert s["tree_bytes_after"] < s["tree_bytes_before"] and r["curation"]["delete_spans"] > 0
    assert s["accessed_retrieval_after"] == s["accessed_retrieval_before"] == 1.0  # the oracle reaches them
    assert s["mounted_retrieval"] == s["library_own_retrieval"] == 1.0
    assert 0 < s["cache_hit_rate"] <= 1 and r["curation"]["compact_blocks"] > 0
    assert "token files before" in open(out + ".md").read()
