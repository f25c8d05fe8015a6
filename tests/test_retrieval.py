"""retrieval.py (issue 9): needle formats, harness prompts and their controls, the training mix (copied spans, drills)
as train.py batches it, the drill-accuracy eval against an induction oracle, and Wilson intervals."""
import dataclasses

import numpy as np
import pytest
import torch

import prepare
import retrieval
import train


@pytest.fixture(scope="module")
def setup(data_dir):
    enc = prepare.load_tokenizer(data_dir)
    tokens, _ = prepare.load_split(data_dir, "train")
    return enc, retrieval.Needles(enc), np.asarray(tokens[:200_000], dtype=np.int64)


def solve(needles: "retrieval.Needles", ids, question):
    """An independent reference for every task's answer: read the needles in `ids` (a prompt or a drill row, in
    history order) the way each task's question asks: a pass key's digits; a key's values (every needle of the key,
    in order, each after the first introduced by the key again); two keys, the last asked first; a value's chain of
    variables."""
    ids = list(ids)
    kv = [(ids[i + 1], ids[i + 2:j]) for i in range(len(ids)) if ids[i] == needles.key
          for j in [ids.index(needles.value, i)]]  # (key, contents) of every <|key|> needle, in order
    q = question[1:]
    if question[1] == needles.passkey:
        i = ids.index(needles.passkey)
        return ids[i + 1:i + 6]
    if len(q) == 2:  # multiquery
        return [v for k, v in kv if k == q[1]][0] + [q[0]] + [v for k, v in kv if k == q[0]][0]
    values = [v for k, v in kv if k == q[0]]
    if len(values) == 1 and len(values[0]) == 1:  # a variable-tracking chain: follow V -> X1 -> X2 -> ...
        out, at = [], q[0]
        while any(k == at and len(v) == 1 for k, v in kv):
            at = next(v[0] for k, v in kv if k == at and len(v) == 1)
            out.append(at)
        return out
    return sum(([q[0]] + v for v in values[1:]), values[0])


def test_task_formats(setup):
    """Every task's needles, question and answer: the answer is what the question asks of the needles (solve), word
    tokens are distinct and avoid what they must, the needed needles come first and look-alikes look alike."""
    _, nd, _ = setup
    rng = np.random.default_rng(0)
    shapes = {"passkey": (1, 0, 5), "multikey": (1, 4, 4), "multivalue": (3, 4, 14), "multiquery": (2, 4, 9),
              "vartrack": (3, 3, 3)}
    for _ in range(20):
        for task in retrieval.TASKS:
            avoid = set(rng.choice(nd.words, 40, replace=False).tolist())
            t = nd.task(task, rng, avoid)
            assert (sum(t.needed), len(t.needed) - sum(t.needed), len(t.answer)) == shapes[task]
            assert t.needed == sorted(t.needed, reverse=True)  # needed first, then look-alikes
            assert t.question[0] == nd.query and solve(nd, [i for n in t.needles for i in n], t.question) == t.answer
            words = [i for n in t.needles for i in n if i in set(nd.words.tolist())]
            assert not set(words) & avoid
            if task != "passkey":
                assert all(n[0] == nd.key and n[-1] == nd.value for n in t.needles)
            if task in ("multikey", "multiquery"):  # one needle per key, every word once
                assert len(set(words)) == len(words)
    assert len(nd.task("multikey", rng, distractors=0).needles) == 1  # (drills bring their own look-alikes)
    assert len(nd.task("vartrack", rng, distractors=0).needles) == 3
    with pytest.raises(ValueError, match="task"):
        nd.task("bogus", rng)
    with pytest.raises(ValueError, match="no unused word tokens"):
        nd.task("multikey", rng, set(nd.words.tolist()))


@pytest.mark.parametrize("task", retrieval.TASKS)
@pytest.mark.parametrize("control", retrieval.CONTROLS)
def test_make_prompt(setup, task, control):
    _, nd, hay = setup
    rng = np.random.default_rng(1)
    for depth in (0.0, 0.3, 0.9):
        p = retrieval.make_prompt(hay, nd, task, 700, depth, rng, control)
        ids, answer = p["ids"], p["answer"]
        assert len(ids) == 700 and ids.dtype == np.int64 and p["task"] == task
        question = list(ids[-len(p["answer"]) - 10:])  # (located below)
        if control == "query_first":
            assert ids[0] == nd.query and ids[-1] == nd.query and p["question_at"] == 699
            q_len = next(i for i in range(1, 5) if ids[i] in (nd.passkey,) or ids[i] not in nd.digits) and 0
            question = [nd.query] + [int(i) for i in ids[1:1 + {"multiquery": 2}.get(task, 1)]]
        else:
            q_len = {"multiquery": 3}.get(task, 2)
            assert ids[-q_len] == nd.query and p["question_at"] == 700 - q_len
            question = [int(i) for i in ids[-q_len:]]
        del q_len
        if control == "no_needle":
            assert p["needles"] == [] and p["needle_at"] == -1
            assert solve_or_none(nd, ids, question) != answer  # the answer is never planted
        else:
            spans = p["needles"]
            assert p["needle_at"] == spans[0][0] and len(spans) == {"multivalue": 3, "multiquery": 2,
                                                                    "vartrack": 3}.get(task, 1)
            assert solve(nd, ids[:p["question_at"]] if control is None else ids[len(question):], question) == answer
            deepest = max(a for a, _ in spans)
            text_before = deepest - sum(n for a, n in needle_runs(nd, ids) if a < deepest) - (
                len(question) if control == "query_first" else 0)
            n_text = 700 - len(question) - (control == "query_first") - sum(n for _, n in needle_runs(nd, ids))
            assert 0 <= round(depth * n_text) - text_before <= retrieval.JITTER  # at its depth, jittered
            for a, n in spans:  # each span is one whole needle
                assert ids[a] in (nd.passkey, nd.key) and ids[a + n - 1] in (nd.passkey_end, nd.value)
    starts = {retrieval.make_prompt(hay, nd, task, 700, 0.5, rng)["needle_at"] % 8 for _ in range(16)}
    assert len(starts) >= 4  # the needle's alignment to K = 8 blocks varies between prompts of one depth


def needle_runs(nd, ids):
    """(start, length) of every needle in ids."""
    ids, out = list(ids), []
    for i, t in enumerate(ids):
        if t in (nd.key, nd.passkey) and (i == 0 or ids[i - 1] != nd.query):
            end = ids.index(nd.value if t == nd.key else nd.passkey_end, i)
            out.append((i, end - i + 1))
    return out


def solve_or_none(nd, ids, question):
    try:
        return solve(nd, ids, question)
    except (ValueError, IndexError, StopIteration):
        return None


def test_needle_positions_keep_order_and_gaps(setup):
    _, nd, _ = setup
    rng = np.random.default_rng(3)
    for task in retrieval.TASKS:
        t = nd.task(task, rng)
        for depth in (0.0, 0.4, 0.99):
            pos = retrieval.needle_positions(5000, t, depth, rng)
            need = [p for p, n in zip(pos, t.needed) if n]
            room = sum(l for l, n in zip(t.lengths, t.needed) if n) - t.lengths[0]  # (the earlier ones' room)
            assert need == sorted(need) and need[-1] <= max(round(depth * 5000), room)  # the deepest at the depth
            order = np.argsort(pos)
            ends = np.array(pos)[order] + np.array(t.lengths)[order]
            assert (np.array(pos)[order][1:] >= ends[:-1]).all() and ends.max() <= 5000  # no overlap, inside
    with pytest.raises(ValueError, match="without overlap"):
        retrieval.needle_positions(20, nd.task("vartrack", rng), 0.5, rng)  # 24 tokens of needles


def test_make_prompt_errors(setup):
    _, nd, hay = setup
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="cannot hold"):
        retrieval.make_prompt(hay, nd, "multikey", 20, 0.5, rng)
    with pytest.raises(ValueError, match="longer than the text"):
        retrieval.make_prompt(hay[:100], nd, "passkey", 500, 0.5, rng)
    with pytest.raises(ValueError, match="control"):
        retrieval.make_prompt(hay, nd, "passkey", 500, 0.5, rng, control="bogus")


def test_plant_drills_and_copy_spans(setup):
    _, nd, hay = setup
    rng = np.random.default_rng(2)
    for _ in range(20):
        row = hay[:513].copy()
        w, q_start = retrieval.plant_drills(row, rng, nd, list(retrieval.TASKS), 3, 3, 5.0)
        assert row[q_start] == nd.query and not (w[:q_start] == 5.0).any()
        assert row.shape == (513,) and w.shape == (513,) and set(np.unique(w)) <= {0.0, 1.0, 5.0}
        runs = needle_runs(nd, row[:q_start])
        assert len(runs) >= 3 + 3  # three tasks' needles and three look-alikes
        keys = [row[a + 1] for a, _ in runs if row[a] == nd.key]  # a key names one needle, but multivalue's three
        assert all(keys.count(k) in (1, 3) for k in keys)
        p, asked = q_start, 0
        while p < len(row) and row[p] == nd.query:  # each question, then its answer (weighted), is what solve reads
            q_end = p + 1 + next(i for i in range(len(row) - p - 1) if w[p + 1 + i] == 5.0)
            a_end = q_end + next((i for i in range(len(row) - q_end) if w[q_end + i] != 5.0), len(row) - q_end)
            assert solve(nd, row[:q_start], list(row[p:q_end])) == list(row[q_end:a_end])
            p, asked = a_end, asked + 1
        assert asked == 3 and p == len(row)
        for a, n in needle_runs(nd, row[:q_start]):
            assert (w[a + 2:a + n] == 0).all()  # needle contents carry no loss
        row = hay[:129].copy()
        w = retrieval.copy_spans(row, rng, 5.0)
        for run in np.split(np.flatnonzero(w == 5.0), np.flatnonzero(np.diff(np.flatnonzero(w == 5.0)) > 1) + 1):
            dst = run[0] - 1
            length = len(run) + 1
            src = [s for s in range(dst - length + 1) if (row[s:s + length] == row[dst:dst + length]).all()]
            assert src, "a weighted run must copy an earlier span"
    row = hay[:129].copy()  # a short window drops instances that do not fit, never all of them
    w, q_start = retrieval.plant_drills(row, rng, nd, ["multivalue"], 4, 3, 5.0)
    assert 1 <= (row[q_start:] == nd.query).sum() < 4
    with pytest.raises(ValueError, match="cannot hold"):
        retrieval.plant_drills(hay[:30].copy(), rng, nd, ["multivalue"], 1, 0, 5.0)
    words = nd.words.tolist()  # a window whose text holds all words but 20: one multivalue drill (13 words), not 3
    row = np.resize(np.array(words[20:]), 600)
    w, q_start = retrieval.plant_drills(row, rng, nd, ["multivalue"], 3, 3, 5.0)
    assert (row[q_start:] == nd.query).sum() == 1
    with pytest.raises(ValueError, match="no unused word tokens"):
        retrieval.plant_drills(np.resize(np.array(words[5:]), 600), rng, nd, ["multivalue"], 1, 0, 5.0)


def test_wilson():
    p, lo, hi = retrieval.wilson(15, 30)
    assert p == 0.5 and lo == pytest.approx(0.3315, abs=1e-3) and hi == pytest.approx(0.6685, abs=1e-3)
    assert retrieval.wilson(0, 30)[1:] == (0.0, pytest.approx(0.1135, abs=1e-3))
    assert retrieval.wilson(30, 30)[1] == pytest.approx(0.8865, abs=1e-3)


def test_get_batch_retrieval_mix(setup, data_dir):
    cfg = train.TrainConfig(data_dir=data_dir, block_size=256, batch_size=4, retrieval_mix=1.0, copy_steps=5,
                            short_block=128, short_steps=10)
    tokens = setup[2]
    x, y, mu, w = train.get_batch(tokens, cfg, train.batch_generator(1, 0, 0), "cpu", gaps=False, step=0)
    assert x.shape == (8, 128) and w.shape == (8, 128) and (y >= 0).all()  # copying: 8 x 128 = 4 x 256 tokens
    assert ((w == 1) | (w == 5)).all() and (w == 5).any()
    x, y, mu, w = train.get_batch(tokens, cfg, train.batch_generator(1, 7, 0), "cpu", gaps=False, step=7)
    assert x.shape == (8, 128) and ((w == 0) == (y == -1)).all() and (w == 0).any()  # drills: needles masked
    x2, y2, _, w2 = train.get_batch(tokens, cfg, train.batch_generator(1, 7, 0), "cpu", gaps=False, step=7)
    assert torch.equal(x, x2) and torch.equal(w, w2)  # a step's batch depends on (seed, step) only
    x, y, mu, w = train.get_batch(tokens, cfg, train.batch_generator(1, 20, 0), "cpu", gaps=True, step=20)
    assert x.shape == (4, 256)
    plain = dataclasses.replace(cfg, retrieval_mix=0.0, copy_steps=0)
    assert train.get_batch(tokens, plain, train.batch_generator(1, 20, 0), "cpu", gaps=False, step=20)[3] is None


class InductionOracle(torch.nn.Module):
    """Predicts, at each position, the token that followed the most recent earlier occurrence of the current token:
    a perfect induction head. `constant` predicts token 0 everywhere instead."""

    def __init__(self, vocab, constant=False):
        super().__init__()
        self.vocab, self.constant = vocab, constant

    def forward(self, x, mu=None):
        B, T = x.shape
        pred = torch.zeros(B, T, dtype=torch.long)
        if not self.constant:
            for b in range(B):
                last = {}
                for t in range(T):
                    tok = int(x[b, t])
                    if tok in last:
                        pred[b, t] = x[b, last[tok] + 1]
                    last[tok] = t
        return torch.nn.functional.one_hot(pred, self.vocab).float(), None


def test_drill_accuracy_measures_retrieval(setup, data_dir):
    enc, _, tokens = setup
    cfg = train.TrainConfig(data_dir=data_dir, block_size=256, batch_size=4, retrieval_mix=1.0, eval_iters=3)
    args = (tokens, cfg, "cpu", train.nullcontext(), 0, False)
    assert train.drill_accuracy(InductionOracle(enc.n_vocab), *args) >= 0.9
    assert train.drill_accuracy(InductionOracle(enc.n_vocab, constant=True), *args) == 0.0
