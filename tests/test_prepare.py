"""prepare.py: tokenizer round-trips, special tokens, shard/offset layout, synthetic facts, bad input, no clobbering.

Tiny vocabularies (512-1024) and corpora keep the file in ~15 s on 2 cores. The real-corpus tests skip when
../shared/data/pg is absent.
"""
import json
import lzma
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("hypothesis")  # an optional test dependency: missing, the file skips instead of failing collection
pytest.importorskip("tiktoken")
from hypothesis import given, settings, strategies as st  # noqa: E402

import prepare  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = prepare.DEFAULT_DATA
needs_corpus = pytest.mark.skipif(not os.path.isdir(CORPUS), reason=f"no book corpus at {CORPUS}")
SYN = dict(synthetic=True, vocab_size=512, syn_docs=6, syn_chars=20_000, syn_kv=3)  # prepares in ~1 s


def run_cli(*args, cwd=ROOT, script=None):
    cmd = [sys.executable, script or os.path.join(ROOT, "prepare.py"), *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)


def snapshot(d):
    return {n: open(os.path.join(d, n), "rb").read() for n in sorted(os.listdir(d))}


@pytest.fixture(scope="module")
def syn_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("syn"))
    prepare.prepare(None, out, seed=3, **SYN)
    return out


@pytest.fixture(scope="module")
def small_enc(syn_dir):
    return prepare.load_tokenizer(syn_dir)


@pytest.fixture(scope="module")
def book_enc():
    if not os.path.isdir(CORPUS):
        pytest.skip(f"no book corpus at {CORPUS}")
    books = prepare.read_books(os.path.join(CORPUS, "val.jsonl.xz"), max_docs=3)
    tok = prepare.train_tokenizer([b["text"] for b in books[:2]], 1024, 1_500_000)
    return prepare.encoding_from_json(tok), books[2]["text"]


@needs_corpus
def test_tokenizer_roundtrip_books(book_enc):
    enc, held_out = book_enc  # a book the BPE never saw
    ids = enc.encode_ordinary(held_out)
    assert enc.decode(ids) == held_out
    assert max(ids) < 1024 - len(prepare.SPECIAL_TOKENS)  # plain text never yields a special id
    assert len(held_out) / len(ids) > 2.0, "a 1k BPE should compress an English book past 2 chars/token"


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=200)
       | st.lists(st.sampled_from(["\x00", "\x07", "\r\n", "\t", " ", "é", "ß", "中文", "日本語", "😀", "\u200b",
                                   "👩‍👩‍👧", "\u0301", "\ufeff", "12345", "<|bos|>", "<|", "|>", "pass key"]),
                  max_size=60).map("".join))
def test_tokenizer_roundtrip_unicode(small_enc, s):
    assert small_enc.decode(small_enc.encode_ordinary(s)) == s
    assert small_enc.decode_bytes(small_enc.encode_ordinary(s)) == s.encode("utf-8")


def test_special_tokens(small_enc, syn_dir):
    meta, n = prepare.load_meta(syn_dir), len(prepare.SPECIAL_TOKENS)
    assert meta["special_tokens"] == {t: 512 - n + j for j, t in enumerate(prepare.SPECIAL_TOKENS)}
    assert small_enc.n_vocab == meta["vocab_size"] == 512
    for tok, i in meta["special_tokens"].items():
        assert small_enc.encode(tok, allowed_special="all") == [i]
        assert small_enc.encode_single_token(tok) == i
        assert i not in small_enc.encode_ordinary(f"x {tok} y{tok}")  # the literal string is just text
        with pytest.raises(ValueError):
            small_enc.encode(tok)  # tiktoken's default refuses marker strings in untrusted text
    prompt = "<|passkey|>68231<|/passkey|><|key|>a<|value|>1<|query|>a<|eot|><|pad|>"
    assert small_enc.decode(small_enc.encode(prompt, allowed_special="all")) == prompt


def test_shards_and_offsets(syn_dir, small_enc):
    docs, _ = prepare.make_synthetic(SYN["syn_docs"], SYN["syn_chars"], SYN["syn_kv"], seed=3)
    meta, bos = prepare.load_meta(syn_dir), small_enc.encode_single_token(prepare.BOS)
    for split in prepare.SPLITS:
        tokens, offsets = prepare.load_split(syn_dir, split)
        assert tokens.dtype == np.uint16 and offsets.dtype == np.int64
        info = meta["splits"][split]
        assert len(offsets) == info["n_docs"] + 1 == len(docs[split]) + 1
        assert offsets[0] == 0 and offsets[-1] == len(tokens) == info["n_tokens"]
        assert (tokens[offsets[:-1]] == bos).all() and (tokens == bos).sum() == info["n_docs"]
        assert os.path.getsize(os.path.join(syn_dir, f"{split}.bin")) == 2 * info["n_tokens"]
        for i, d in enumerate(docs[split]):
            doc = prepare.doc_tokens(syn_dir, split, i)
            assert doc[0] == bos and small_enc.decode(doc[1:].tolist()) == d["text"]
        assert [d["id"] for d in info["docs"]] == [d["id"] for d in docs[split]]
    assert not [n for n in os.listdir(syn_dir) if ".tmp-" in n]


def test_synthetic_deterministic(tmp_path, syn_dir):
    a, b, c = (str(tmp_path / n) for n in "abc")
    prepare.prepare(None, a, seed=3, **SYN)
    prepare.prepare(None, b, seed=4, **SYN)
    snap = snapshot(a)
    del snap["meta.json"]  # holds timings
    assert snap == {k: v for k, v in snapshot(syn_dir).items() if k != "meta.json"}
    assert prepare.load_meta(a)["facts"] == prepare.load_meta(syn_dir)["facts"]
    assert prepare.load_meta(b)["facts"] != prepare.load_meta(a)["facts"]
    assert open(os.path.join(b, "train.bin"), "rb").read() != snap["train.bin"]


def test_synthetic_facts_findable(syn_dir, small_enc):
    docs, _ = prepare.make_synthetic(SYN["syn_docs"], SYN["syn_chars"], SYN["syn_kv"], seed=3)
    meta = prepare.load_meta(syn_dir)
    for split, facts in meta["facts"].items():
        n_docs = meta["splits"][split]["n_docs"]
        assert len(facts) == n_docs * (SYN["syn_kv"] + 2)  # passkey + kv pairs + final answer, per doc
        for f in facts:
            text = docs[split][f["doc"]]["text"]
            assert text[f["char"]:f["char"] + len(f["value"])] == f["value"]
            doc = prepare.doc_tokens(syn_dir, split, f["doc"])
            span = doc[f["token"]:f["token"] + f["n_tokens"]].tolist()
            assert small_enc.decode(span) == f["value"], (f, small_enc.decode(span))
            if f["kind"] == "passkey":
                assert text[f["char"] - 16:f["char"]] == "The pass key is "
            if f["kind"] == "answer":  # the question closes the doc and its answer repeats a planted fact
                assert text[f["question_char"]:].startswith("Question: what is ")
                assert any(g["kind"] != "answer" and (g["key"], g["value"]) == (f["key"], f["value"])
                           for g in facts if g["doc"] == f["doc"])


def test_tokenizer_reused_without_rustbpe(tmp_path, syn_dir, monkeypatch):
    out = str(tmp_path / "o")
    os.makedirs(out)
    shutil.copy(os.path.join(syn_dir, "tokenizer.json"), out)
    monkeypatch.setitem(sys.modules, "rustbpe", None)  # `import rustbpe` now raises ImportError
    prepare.prepare(None, out, splits=["val"], **{**SYN, "vocab_size": None}, seed=3)
    assert snapshot(out)["val.bin"] == snapshot(syn_dir)["val.bin"]
    with pytest.raises(ValueError, match="--vocab-size 1024.*has vocab 512"):
        prepare.prepare(None, out, splits=["val"], **{**SYN, "vocab_size": 1024})


def test_partial_rerun_keeps_other_splits(tmp_path):
    out = str(tmp_path / "o")
    prepare.prepare(None, out, seed=3, **SYN)
    before = prepare.load_meta(out)
    after = prepare.prepare(None, out, splits=["val"], seed=3, **SYN)  # reuses tokenizer.json, redoes val only
    assert after["splits"] == before["splits"] | {"val": after["splits"]["val"]} and after["facts"] == before["facts"]
    assert after["timing"]["bpe_s"] == before["timing"]["bpe_s"]
    other = prepare.prepare(None, out, splits=["val"], seed=4, **SYN)  # another corpus: stale splits are dropped
    assert list(other["splits"]) == ["val"] and list(other["facts"]) == ["val"]
    with pytest.raises(ValueError, match="rerun prepare.py --splits train"):
        prepare.load_split(out, "train")  # the seed-3 train shard is still on disk but no longer described


@pytest.mark.parametrize("content, expect", [
    (b"this is not xz at all", "corrupt xz"),
    (lzma.compress(b'{"id": "a", "text": "fine"}\n{"id": "b", "text": '), ":2: bad JSON"),
    (lzma.compress(b'{"id": "a", "title": "no text field"}\n'), ":1: bad JSON"),
    (lzma.compress(b'{"id": "a", "text": "fine"}\n')[:-8], "corrupt xz"),  # truncated stream
], ids=["not-xz", "bad-json", "no-text", "truncated"])
def test_cli_bad_data_file(tmp_path, content, expect):
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    (data / "train.jsonl.xz").write_bytes(content)
    r = run_cli("--data", data, "--out", out, "--vocab-size", 512, "--splits", "train")
    assert r.returncode != 0
    msg = r.stderr.strip().splitlines()
    assert len(msg) == 1 and expect in msg[0] and "train.jsonl.xz" in msg[0], r.stderr
    assert not out.exists() or not os.listdir(out)


def test_cli_bad_args(tmp_path):
    (tmp_path / "f").write_text("a file, not a directory")
    small = ["--synthetic", "--syn-docs", 2, "--syn-chars", 2000]
    for args, expect in [(["--vocab-size", 100], "--vocab-size 100"), (["--vocab-size", 70000], "--vocab-size 70000"),
                         (["--splits", "train,dev"], "--splits"), (["--max-docs", 0], "--max-docs 0"),
                         (["--data", tmp_path / "nope"], "not found"), (["--out", tmp_path / "f" / "sub"], "/f/sub")]:
        extra = ([] if "--data" in args else small) + ([] if "--out" in args else ["--out", tmp_path / "o"])
        r = run_cli(*args, *extra)
        assert r.returncode != 0 and expect in r.stderr and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
    assert not (tmp_path / "o").exists() or not os.listdir(tmp_path / "o")


def test_failure_does_not_clobber(tmp_path, monkeypatch):
    out = str(tmp_path / "o")
    prepare.prepare(None, out, seed=3, **SYN)
    before = snapshot(out)
    real = prepare._write_tokens
    calls = []

    def flaky(f, *a, **kw):  # the second split fails after the first one has been staged
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return real(f, *a, **kw)

    monkeypatch.setattr(prepare, "_write_tokens", flaky)
    with pytest.raises(OSError, match="simulated"):
        prepare.prepare(None, out, seed=5, **SYN)  # another seed: the train split would differ
    assert snapshot(out) == before  # nothing replaced, no temp files left behind


def test_cli_fallback_is_loud(tmp_path):
    repo = tmp_path / "repo"  # prepare.py (and the durable writes it uses) alone: no ../shared/data/pg next to it
    repo.mkdir()
    for name in ("prepare.py", "durable.py"):
        shutil.copy(os.path.join(ROOT, name), repo)
    r = run_cli("--vocab-size", 512, "--syn-docs", 3, "--syn-chars", 3000, cwd=repo, script=str(repo / "prepare.py"))
    assert r.returncode == 0, r.stderr
    assert "!!!" in r.stderr and "SYNTHETIC" in r.stderr
    meta = prepare.load_meta(str(repo / "data" / "synthetic"))
    assert meta["synthetic"] and meta["splits"]["train"]["n_docs"] == 3


@needs_corpus
def test_cli_real_subset(tmp_path):
    out = str(tmp_path / "pg")
    r = run_cli("--max-docs", 2, "--vocab-size", 1024, "--bpe-chars", 2_000_000, "--out", out)
    assert r.returncode == 0, r.stderr
    meta, enc = prepare.load_meta(out), prepare.load_tokenizer(out)
    assert meta["vocab_size"] == enc.n_vocab == 1024 and not meta["synthetic"]
    assert meta["timing"]["bpe_chars"] <= 2_000_000
    for split in prepare.SPLITS:
        books = prepare.read_books(os.path.join(CORPUS, f"{split}.jsonl.xz"), max_docs=2)
        tokens, offsets = prepare.load_split(out, split)
        assert len(offsets) == 3 and offsets[-1] == meta["splits"][split]["n_tokens"]
        assert [d["id"] for d in meta["splits"][split]["docs"]] == [b["id"] for b in books]
        for i, b in enumerate(books):
            assert enc.decode(tokens[offsets[i] + 1:offsets[i + 1]].tolist()) == b["text"]


def test_tokenizer_checksum(tmp_path, syn_dir):
    """tokenizer.json carries the sha256 of the rest (= meta.json's tokenizer_sha256) and every load checks it; an
    older file without the field still loads, checked against the meta.json beside it; damage is one line."""
    out = tmp_path / "d"
    shutil.copytree(syn_dir, out)
    path = out / "tokenizer.json"
    t = json.loads(path.read_text())
    assert t["sha256"] == prepare.load_meta(str(out))["tokenizer_sha256"]
    old = {k: v for k, v in t.items() if k != "sha256"}
    path.write_text(json.dumps(old))  # as prepare.py wrote it before the field existed
    assert prepare.load_tokenizer(str(out)).n_vocab == 512
    a, b = list(old["ranks"])[300:302]
    for body in (old, t):  # two ranks swapped: still valid JSON and a working tokenizer, but another one
        damaged = {**body, "ranks": {**body["ranks"], a: body["ranks"][b], b: body["ranks"][a]}}
        path.write_text(json.dumps(damaged))
        with pytest.raises(ValueError, match=r"tokenizer.json is corrupt \(its checksum does not match\); rerun"):
            prepare.load_tokenizer(str(out))
    path.write_text(json.dumps(t)[:-20])
    with pytest.raises(ValueError, match=r"tokenizer.json is not a tokenizer written by prepare.py \(JSONDecodeErr"):
        prepare.load_tokenizer(str(out))
    with pytest.raises(ValueError, match="unreadable tokenizer .*delete it to train a new one"):
        prepare.prepare(None, str(out), splits=["val"], **{**SYN, "vocab_size": None}, seed=3)


@pytest.mark.parametrize("name, damage, expect", [
    ("train.idx.npy", lambda b: os.urandom(len(b)), "train.idx.npy is not a document index written by prepare.py"),
    ("train.idx.npy", lambda b: b[:-12], "train.idx.npy is not a document index written by prepare.py"),
    ("train.bin", lambda b: b"", "train.bin is not a token shard written by prepare.py (0 bytes)"),
    ("train.bin", lambda b: b[:-1], "train.bin is not a token shard written by prepare.py"),
    ("meta.json", lambda b: b[:-30], "meta.json is not valid JSON"),
    ("meta.json", lambda b: b"[1, 2]", "meta.json is not a meta.json written by prepare.py"),
], ids=["idx-random", "idx-truncated", "bin-empty", "bin-odd", "meta-truncated", "meta-not-object"])
def test_damaged_data_file_errors_name_the_file(tmp_path, syn_dir, name, damage, expect):
    out = tmp_path / "d"
    shutil.copytree(syn_dir, out)
    (out / name).write_bytes(damage((out / name).read_bytes()))
    with pytest.raises(ValueError) as e:
        prepare.load_split(str(out), "train")
    msg = str(e.value)
    assert expect in msg and "rerun prepare.py" in msg and "\n" not in msg, msg
    assert "pickle" not in msg and "numpy" not in msg and "mmap" not in msg


def test_vocab_the_corpus_cannot_fill_is_capped_without_holes(tmp_path, capsys):
    """--vocab-size 65536 on a small corpus: the BPE stops early, and the vocabulary is capped to its ranks plus the
    special tokens right after them, with a note (was: 2,138 ranks, specials at 65,528+, ids in between that
    sampling could produce and nothing could decode)."""
    out = str(tmp_path / "capped")
    meta = prepare.prepare(None, out, synthetic=True, vocab_size=65536, syn_docs=2, syn_chars=4000)
    enc, t = prepare.load_tokenizer(out), json.load(open(os.path.join(out, "tokenizer.json")))
    n = len(t["ranks"])
    assert n < 65536 - len(prepare.SPECIAL_TOKENS) and meta["vocab_size"] == enc.n_vocab == t["vocab_size"] == \
        n + len(prepare.SPECIAL_TOKENS)
    assert sorted(t["ranks"].values()) + sorted(t["special_tokens"].values()) == list(range(enc.n_vocab))
    for i in range(enc.n_vocab):  # every id decodes
        enc.decode_single_token_bytes(i)
    assert f"vocab capped at {enc.n_vocab:,} (asked 65,536)" in capsys.readouterr().out


PG1K = os.path.join(ROOT, "tokenizers", "pg1k.json")
PG1K_SHA256 = "4f50cac0f8c868c6d1bbb900ba88d859ef554519328c975023be4db8611cfe54"  # data/pg1k meta's tokenizer_sha256


def test_committed_tokenizer_loads_and_is_pinned():
    t = prepare.read_tokenizer_json(PG1K)  # its own checksum verified
    assert t["sha256"] == prepare.tokenizer_sha256(t) == PG1K_SHA256
    enc = prepare.load_tokenizer(PG1K)
    assert enc.n_vocab == t["vocab_size"] == 1024
    assert t["special_tokens"] == {s: 1016 + j for j, s in enumerate(prepare.SPECIAL_TOKENS)}
    text = "The pass key is 68231. Remember it."
    assert enc.decode(enc.encode_ordinary(text)) == text and len(enc.encode_ordinary(text)) < len(text)


@needs_corpus
def test_committed_tokenizer_is_the_corpus_bpe():
    """tokenizers/pg1k.json is what `prepare.py --vocab-size 1024` trains on the whole train split, byte for byte (so
    `--tokenizer tokenizers/pg1k.json` writes the shards a BPE run would: the CPU demo's data/pg1k)."""
    books = prepare.read_books(os.path.join(CORPUS, "train.jsonl.xz"))
    t = prepare.train_tokenizer([b["text"] for b in books], 1024, 200_000_000)
    t["sha256"] = prepare.tokenizer_sha256(t)
    assert json.dumps(t).encode() == open(PG1K, "rb").read()


def test_tokenizer_flag_without_rustbpe(tmp_path, monkeypatch):
    """--tokenizer FILE: no rustbpe needed; FILE is copied to <out> byte for byte and the shards use it. A separate
    process with `import rustbpe` failing, as on the GPU machine."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "rustbpe.py").write_text("raise ImportError('not on this machine')\n")
    out = tmp_path / "o"
    env = {**os.environ, "PYTHONPATH": str(hide)}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "prepare.py"), "--synthetic", "--syn-docs", "3",
                        "--syn-chars", "5000", "--tokenizer", PG1K, "--out", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (out / "tokenizer.json").read_bytes() == open(PG1K, "rb").read()
    meta, enc = prepare.load_meta(str(out)), prepare.load_tokenizer(str(out))
    assert meta["tokenizer_sha256"] == PG1K_SHA256 and "timing" in meta and "bpe_s" not in meta["timing"]
    docs, _ = prepare.make_synthetic(3, 5000, 4, seed=0)
    for i, d in enumerate(docs["val"]):
        assert enc.decode(prepare.doc_tokens(str(out), "val", i)[1:].tolist()) == d["text"]
    monkeypatch.setitem(sys.modules, "rustbpe", None)  # in process too: a rerun reuses the copy
    prepare.prepare(None, str(out), synthetic=True, syn_docs=3, syn_chars=5000, splits=["test"], tokenizer=PG1K)


@needs_corpus
def test_tokenizer_flag_on_the_corpus(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "rustbpe", None)
    out = str(tmp_path / "pg")
    meta = prepare.prepare(CORPUS, out, max_docs=2, splits=["val"], tokenizer=PG1K)
    enc, (tokens, offsets) = prepare.load_tokenizer(PG1K), prepare.load_split(out, "val")
    books = prepare.read_books(os.path.join(CORPUS, "val.jsonl.xz"), max_docs=2)
    assert meta["splits"]["val"]["n_docs"] == 2 and list(meta["splits"]) == ["val"]
    for i, b in enumerate(books):
        assert tokens[offsets[i] + 1:offsets[i + 1]].tolist() == enc.encode_ordinary(b["text"])


def test_tokenizer_flag_bad_input(tmp_path, syn_dir):
    small = ["--synthetic", "--syn-docs", 2, "--syn-chars", 2000]
    other = tmp_path / "other"
    shutil.copytree(syn_dir, other)  # holds a 512-id tokenizer
    for args, expect in [(["--tokenizer", tmp_path / "none.json", "--out", tmp_path / "o"],
                          "--tokenizer " + str(tmp_path / "none.json") + ": file not found"),
                         (["--tokenizer", PG1K, "--vocab-size", 512, "--out", tmp_path / "o"],
                          "--vocab-size 512: " + PG1K + " has vocab 1024"),
                         (["--tokenizer", PG1K, "--out", other], "holds another tokenizer; delete it (or pick")]:
        r = run_cli(*args, *small)
        assert r.returncode != 0 and expect in r.stderr and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
    assert not (tmp_path / "o").exists() or not os.listdir(tmp_path / "o")
    damaged = tmp_path / "damaged.json"
    t = json.loads(open(PG1K).read())
    a, b = list(t["ranks"])[300:302]
    damaged.write_text(json.dumps({**t, "ranks": {**t["ranks"], a: t["ranks"][b], b: t["ranks"][a]}}))
    r = run_cli("--tokenizer", damaged, "--out", tmp_path / "o", *small)
    assert r.returncode != 0 and "damaged.json: unreadable tokenizer (" in r.stderr and "checksum" in r.stderr
