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


def test_needle_formats(setup):
    _, nd, _ = setup
    rng = np.random.default_rng(0)
    for _ in range(50):
        needle, question, answer = nd.make("passkey", rng)
        assert needle == [nd.passkey] + answer + [nd.passkey_end] and question == [nd.query, nd.passkey]
        assert len(set(answer)) == 5 and set(answer) <= set(nd.digits.tolist())
        avoid = set(rng.choice(nd.words, 40, replace=False).tolist())
        needle, question, answer = nd.make("kv", rng, avoid)
        key = needle[1]
        assert needle == [nd.key, key] + answer + [nd.value] and question == [nd.query, key]
        assert len(set([key] + answer)) == 5 and not (set([key] + answer) & avoid)
    with pytest.raises(ValueError, match="kind"):
        nd.make("bogus", rng)
    with pytest.raises(ValueError, match="no unused word tokens"):
        nd.make("kv", rng, set(nd.words.tolist()))


@pytest.mark.parametrize("kind", retrieval.KINDS)
@pytest.mark.parametrize("control", retrieval.CONTROLS)
def test_make_prompt(setup, kind, control):
    _, nd, hay = setup
    rng = np.random.default_rng(1)
    for depth in (0.0, 0.3, 0.9):
        p = retrieval.make_prompt(hay, nd, kind, 700, depth, rng, control, distractors=3)
        ids, answer = p["ids"], p["answer"]
        assert len(ids) == 700 and ids.dtype == np.int64
        question = [nd.query, nd.passkey] if kind == "passkey" else [nd.query, None]
        if control == "query_first":
            assert ids[0] == nd.query and ids[-1] == nd.query and p["question_at"] == 699
            assert ids[1] == (nd.passkey if kind == "passkey" else ids[p["needle_at"] + 1])  # the question names it
        else:
            assert ids[-2] == nd.query and p["question_at"] == 698
            assert ids[-1] == (nd.passkey if kind == "passkey" else (ids[-1] if control == "no_needle" else
                                                                     ids[p["needle_at"] + 1]))
        opener = nd.passkey if kind == "passkey" else nd.key
        if control == "no_needle":
            assert p["needle_at"] == -1 and (ids == nd.passkey).sum() <= 1  # only in the question, if at all
            assert (ids == nd.key).sum() == (3 if kind == "kv" else 0)  # the distractors remain
        else:
            at = p["needle_at"]
            assert ids[at] == opener and list(ids[at + 1:at + 6] if kind == "passkey" else ids[at + 2:at + 6]) == answer
            text_before = at - (2 if control == "query_first" else 0) - 7 * sum(
                1 for j in np.flatnonzero(ids == nd.key) if j < at)
            n_text = 700 - 2 - (control == "query_first") - 7 * (1 + (3 if kind == "kv" else 0))
            assert 0 <= round(depth * n_text) - text_before <= retrieval.JITTER  # at its relative depth, jittered
        if kind == "kv":
            assert (ids == nd.key).sum() == 3 + (control != "no_needle") and len(set(answer)) == 4
            for t in answer:  # the answer words occur nowhere else in the prompt (each copy step is unambiguous)
                assert (ids == t).sum() == (0 if control == "no_needle" else 1)
    del question
    starts = {retrieval.make_prompt(hay, nd, kind, 700, 0.5, rng)["needle_at"] % 8 for _ in range(16)}
    assert len(starts) >= 4  # the needle's alignment to K = 8 blocks varies between prompts of one depth


def test_make_prompt_errors(setup):
    _, nd, hay = setup
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="cannot hold"):
        retrieval.make_prompt(hay, nd, "kv", 20, 0.5, rng)
    with pytest.raises(ValueError, match="longer than the text"):
        retrieval.make_prompt(hay[:100], nd, "passkey", 500, 0.5, rng)
    with pytest.raises(ValueError, match="control"):
        retrieval.make_prompt(hay, nd, "passkey", 500, 0.5, rng, control="bogus")


def test_plant_drills_and_copy_spans(setup):
    _, nd, hay = setup
    rng = np.random.default_rng(2)
    for _ in range(20):
        row = hay[:129].copy()
        w, q_start = retrieval.plant_drills(row, rng, nd, 3, 2, 5.0)
        assert row[q_start] == nd.query and not (w[:q_start] == 5.0).any()
        assert row.shape == (129,) and w.shape == (129,) and set(np.unique(w)) <= {0.0, 1.0, 5.0}
        answers = np.flatnonzero(w == 5.0)
        assert len(answers) in (8, 9, 10)  # two questions: 4 (kv) or 5 (pass key) answer tokens each
        for start in answers[np.diff(np.concatenate([[-2], answers])) > 1]:  # each answer copies a needle's contents
            asked = row[start - 1]
            opener = np.flatnonzero(row[:start - 2] == asked)[0] - (asked != nd.passkey)
            span = 5 if asked == nd.passkey else 4
            assert list(row[opener + 1 + (asked != nd.passkey):][:span]) == list(row[start:start + span])
            assert (w[opener + 2:opener + 7] == 0).all()  # needle contents carry no loss
        row = hay[:129].copy()
        w = retrieval.copy_spans(row, rng, 5.0)
        for run in np.split(np.flatnonzero(w == 5.0), np.flatnonzero(np.diff(np.flatnonzero(w == 5.0)) > 1) + 1):
            dst = run[0] - 1
            length = len(run) + 1
            src = [s for s in range(dst - length + 1) if (row[s:s + length] == row[dst:dst + length]).all()]
            assert src, "a weighted run must copy an earlier span"
    with pytest.raises(ValueError, match="cannot hold"):
        retrieval.plant_drills(hay[:30].copy(), rng, nd, 3, 2, 5.0)


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
