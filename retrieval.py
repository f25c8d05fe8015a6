"""Retrieval tasks (DESIGN §10; issues 9 and 17): needles planted in book text, the questions that ask for them, and
the training mix that teaches a tiny base model to answer them. Five tasks in the style of RULER (Hsieh et al. 2024):

    passkey     needle <|passkey|> d1 .. d5 <|/passkey|>       question <|query|> <|passkey|>   answer d1 .. d5
    multikey    needle <|key|> k v1 v2 v3 v4 <|value|>, among `distractors` look-alike kv needles (other keys)
                question <|query|> k                         answer v1 .. v4
    multivalue  three needles <|key|> k v^j_1 .. v^j_4 <|value|> of one key k (j = 1, 2, 3 in history order), plus
                look-alikes                                    question <|query|> k   answer v^1 k v^2 k v^3
    multiquery  two asked kv needles (k1, k2) among look-alikes  question <|query|> k1 k2  answer v(k2) k1 v(k1)
    vartrack    a chain <|key|> V X1 <|value|>, <|key|> X1 X2 <|value|>, <|key|> X2 X3 <|value|> (X1 holds the value V,
                X2 = X1, X3 = X2: two hops, in history order), plus a look-alike chain of another value
                question <|query|> V                           answer X1 X2 X3

d's are distinct digits (30,240 values); keys, values and variables are distinct word tokens of the BPE vocabulary that
occur nowhere else in the text the base model reads raw. Why these shapes (measured; ../shared/notes/retrieval-
curriculum.md): a tiny base answers by copying (an induction head: find the earlier occurrence of the current token,
continue after it) and learns that within minutes only when the token before each answer token occurs once in its
context, or once after a <|key|>. Nearly every answer step is such a copy: a value after its key, the next variable
after the one just named; the rest re-name a key of the question (multiquery answers the last key asked first, whose
value continues the question by a copy, then names the first key; measured in-block with v(k1) first: 0.00). Every
needle the answer needs must be *found* by what the question asks: the look-alikes make the focus depend on it.

Training mix (train.py): the first `copy_steps` steps copy random spans of the window to random later places
(`copy_spans`: content-addressed copying forms the induction head: ~500 steps on 2 CPU cores), then a share of
windows become drills (`plant_drills`: the needles of a few task instances and look-alikes, then the questions with
their answers; needle contents carry no loss, answers a higher weight). Prompts for the harness and the lens stage
(`make_prompt`): book text of exactly `history` tokens, the needles the answer needs at or before a relative depth,
the question last; or the controls: `query_first` (the question opens the prompt and the prompt ends with a bare
<|query|>, a cue that names nothing) and `no_needle` (the needles the answer needs are left out).
"""
import functools
import math
from dataclasses import dataclass

import numpy as np

import prepare

TASKS = ("passkey", "multikey", "multivalue", "multiquery", "vartrack")
CONTROLS = (None, "query_first", "no_needle")
LOOKALIKES = 4  # default look-alike kv needles of the kv tasks (multikey: the asked key among 5 keys)
JITTER = 32  # a task's deepest needle starts up to this many tokens before its depth (make_prompt)


@functools.lru_cache(maxsize=4)
def needles_for(data_dir: str) -> "Needles":
    """The Needles of a prepared-data directory's tokenizer, built once per directory (train.py, stages.py)."""
    return Needles(prepare.load_tokenizer(data_dir))


@dataclass
class Task:
    """One instance of a task: the needles to plant, which of them the answer needs (`needed`; the others are
    look-alikes), the question and the answer. Needles that the answer needs keep their list order in the history
    (a chain's hops, multivalue's answer order); look-alikes keep theirs among themselves (a look-alike chain)."""
    name: str
    needles: list  # [[ids]]
    needed: list  # [bool] per needle
    question: list
    answer: list

    @property
    def lengths(self):
        return [len(n) for n in self.needles]


class Needles:
    """Token ids of the retrieval markers, the digits and the key/value words of one tokenizer (tiktoken Encoding)."""

    def __init__(self, enc):
        sp = enc._special_tokens
        self.passkey, self.passkey_end, self.key, self.value, self.query = (
            sp[t] for t in ("<|passkey|>", "<|/passkey|>", "<|key|>", "<|value|>", "<|query|>"))
        self.digits = np.array([enc.encode_single_token(str(d)) for d in range(10)])
        specials = set(sp.values())
        self.words = np.array([i for i in range(enc.n_vocab) if i not in specials and _is_word(enc.decode([i]))])
        if len(self.words) < 64:
            raise ValueError(f"the tokenizer has {len(self.words)} word tokens (3+ ASCII letters); kv needles need 64")

    def _fresh(self, rng, avoid, n: int) -> list:
        """n distinct word tokens not in `avoid` (which grows by them)."""
        free = np.setdiff1d(self.words, np.fromiter(avoid, dtype=np.int64, count=-1))
        if len(free) < n:
            raise ValueError("no unused word tokens left for a kv needle: the text holds every word token")
        words = rng.choice(free, n, replace=False).tolist()
        avoid.update(words)
        return words

    def _kv(self, key, values):
        return [self.key, key] + values + [self.value]

    def task(self, name: str, rng: np.random.Generator, avoid=(), distractors: int | None = None) -> Task:
        """A fresh instance of task `name`; word tokens avoid the ids in `avoid`. distractors: look-alike kv needles
        (kv tasks, default LOOKALIKES) or look-alike chains (vartrack, default 1)."""
        avoid = set(avoid)
        if name == "passkey":
            answer = self.digits[rng.permutation(10)[:5]].tolist()
            return Task(name, [[self.passkey] + answer + [self.passkey_end]], [True], [self.query, self.passkey],
                        answer)
        if name not in TASKS:
            raise ValueError(f"retrieval task must be one of {', '.join(TASKS)}; got {name!r}")
        if name == "vartrack":
            chains = []
            for _ in range(1 + (1 if distractors is None else distractors)):
                value, *names = self._fresh(rng, avoid, 4)
                chains.append(([value] + names, [self._kv(a, [b]) for a, b in zip([value] + names, names)]))
            (words, chain), *others = chains
            looks = [n for _, c in others for n in c]
            return Task(name, chain + looks, [True] * len(chain) + [False] * len(looks), [self.query, words[0]],
                        words[1:])
        n_asked = {"multikey": 1, "multivalue": 3, "multiquery": 2}[name]
        keys = self._fresh(rng, avoid, 1 if name == "multivalue" else n_asked)
        values = [self._fresh(rng, avoid, 4) for _ in range(n_asked)]
        asked = [self._kv(keys[min(j, len(keys) - 1)], values[j]) for j in range(n_asked)]
        looks = [self._kv(self._fresh(rng, avoid, 1)[0], self._fresh(rng, avoid, 4))
                 for _ in range(LOOKALIKES if distractors is None else distractors)]
        if name == "multiquery":
            question, answer = [self.query] + keys, values[1] + [keys[0]] + values[0]
        else:  # multikey, multivalue: each value after the first is introduced by its key again
            question, answer = [self.query, keys[0]], sum(([keys[0]] + v for v in values[1:]), values[0])
        return Task(name, asked + looks, [True] * n_asked + [False] * len(looks), question, answer)


def _is_word(s: str) -> bool:
    s = s.strip()
    return len(s) >= 3 and s.isascii() and s.isalpha()


def copy_spans(row, rng: np.random.Generator, weight: float, n_spans: int = 3):
    """Copy `n_spans` random spans of 8..16 tokens of `row` (n,) to random later places, in place (one span per
    segment of n // n_spans tokens). Returns per-position loss weights (n,): `weight` on each copied token after the
    first (the predictable ones), 1 elsewhere. Random offsets leave content matching as the only way to predict."""
    n = len(row)
    w = np.ones(n, dtype=np.float32)
    seg = n // n_spans
    if seg < 40:
        raise ValueError(f"a window of {n} tokens is too short for {n_spans} copied spans")
    for j in range(n_spans):
        length, a = int(rng.integers(8, 17)), j * seg
        src = a + int(rng.integers(0, seg // 2 - length))
        dst = a + seg // 2 + int(rng.integers(0, seg - seg // 2 - length))
        row[dst:dst + length] = row[src:src + length]
        w[dst + 1:dst + length] = weight
    return w


def plant_drills(row, rng: np.random.Generator, needles: Needles, tasks, n_questions: int, n_lookalikes: int,
                 weight: float):
    """Turn one window `row` (n,) int64 into a retrieval drill, in place: `n_questions` instances of tasks drawn from
    `tasks` (their own needles only) and `n_lookalikes` look-alike kv needles at random slots of its first part, then
    every instance's question with its answer at the end. An instance that does not fit, or for which the window's
    text leaves no unused words, is dropped (at least one is kept). Returns (per-position loss weights (n,): 0 on
    needle contents (random, unpredictable), `weight` on answers, 1 elsewhere; the index of the first question)."""
    n, used, insts, looks = len(row), set(row.tolist()), [], []
    names = [tasks[int(rng.integers(len(tasks)))] for _ in range(n_questions)]
    others = [t for t in tasks if t != "passkey"] or ["multikey"]
    names = [t if t != "passkey" or j == names.index("passkey") else others[int(rng.integers(len(others)))]
             for j, t in enumerate(names)]  # one pass key per window: a second one would be the same question
    for name in names + ["multikey"] * n_lookalikes:
        try:
            t = needles.task(name, rng, used, distractors=0)  # every word once in the window
        except ValueError:  # the window's text holds (nearly) every word: fewer instances, not none
            if insts:
                break
            raise
        used.update(i for needle in t.needles for i in needle)
        insts.append(t) if len(insts) < n_questions else looks.append(t.needles[0])
    slot = 8  # the longest needle (7 tokens) and a token of text
    while True:
        q_len = sum(len(t.question) + len(t.answer) for t in insts)
        q_start, n_needles = n - q_len, sum(len(t.needles) for t in insts) + len(looks)
        if q_start // slot >= n_needles:
            break
        if len(insts) > 1:
            insts.pop()
        elif looks:
            looks.pop()
        else:
            raise ValueError(f"a window of {n} tokens cannot hold a {insts[0].name} drill ({n_needles} needles and "
                             f"{q_len} tokens of question and answer)")
    w = np.ones(n, dtype=np.float32)
    slots = np.sort(rng.permutation(q_start // slot)[:n_needles])
    owner = rng.permutation(np.repeat(np.arange(len(insts) + 1), [len(t.needles) for t in insts] + [len(looks)]))
    groups = [t.needles for t in insts] + [looks]
    for g, group in enumerate(groups):  # each group's needles take its slots in order (chains stay in order)
        for s, needle in zip(slots[owner == g], group):
            p = int(s) * slot
            row[p:p + len(needle)] = needle
            w[p + 2:p + len(needle)] = 0  # after the opening marker and the first content token nothing is predictable
    p = q_start
    for t in rng.permutation(len(insts)):
        question, answer = insts[t].question, insts[t].answer
        row[p:p + len(question) + len(answer)] = question + answer
        w[p + len(question):p + len(question) + len(answer)] = weight
        p += len(question) + len(answer)
    return w, q_start


def needle_positions(n: int, task: Task, depth: float, rng: np.random.Generator, gaps: bool = True) -> list:
    """Start offsets (into n tokens of text) of each of the task's needles: the deepest needed needle at `depth` (less
    0..JITTER-1 tokens), the other needed ones uniform before it, look-alikes uniform anywhere; each group in its
    list order. gaps: the needles must not overlap once written over the text (long histories: the needed ones are
    spaced by their lengths, pushing the deepest later only when the depth is too shallow to hold them, and
    look-alikes are drawn until they fit); else they are inserted at these offsets and may share one."""
    need, lengths = np.array(task.needed), np.array(task.lengths)
    deep = max(0, min(round(depth * n), n - int(lengths.max())) - int(rng.integers(0, JITTER)))
    pos = np.zeros(len(need), dtype=np.int64)
    before = lengths[need][:-1] if gaps else np.zeros(need.sum() - 1, np.int64)  # room each earlier needle takes
    room = max(0, deep - int(before.sum()))
    pos[need] = np.append(np.sort(rng.integers(0, room + 1, len(before))) + np.cumsum(np.append(0, before))[:-1],
                          max(deep, int(before.sum())))
    free = n - int(lengths.max()) + 1
    for _ in range(1000):
        pos[~need] = np.sort(rng.integers(0, free, (~need).sum()))
        order = np.argsort(pos, kind="stable")
        if not gaps or (np.diff(pos[order]) >= lengths[order][:-1]).all():
            return pos.tolist()
    raise ValueError(f"cannot place {len(need)} needles without overlap in {n:,} tokens")


def make_prompt(hay, needles: Needles, task: str, history: int, depth: float, rng: np.random.Generator,
                control=None, distractors: int | None = None, raw_window: int = 1024):
    """One retrieval prompt of exactly `history` tokens of book text `hay` (1-d int array; a random slice is used).

    The needles the answer needs sit at or before relative depth `depth` of the text before the question
    (needle_positions: jittered, so their alignment to the gist blocks varies between prompts), look-alikes anywhere.
    Word tokens avoid those of the text near each needle and of the last `raw_window` prompt tokens (what a base model
    reads raw). control: None (question last), 'query_first' (question first, a bare <|query|> last), 'no_needle'
    (question last, the needed needles left out: the answer is never planted).
    Returns dict(ids (history,) int64, answer [ids], task, needles [(start, length)] of the needed needles in the
    prompt, needle_at (the first one's start, -1 without), question_at (index of the final cue's first token))."""
    if control not in CONTROLS:
        raise ValueError(f"control must be one of {', '.join(map(str, CONTROLS))}; got {control!r}")
    shape = needles.task(task, np.random.default_rng(0), distractors=distractors)  # lengths only
    keep = [not (control == "no_needle" and need) for need in shape.needed]
    question_len = len(shape.question) if control != "query_first" else len(shape.question) + 1
    n_text = history - question_len - sum(l for l, k in zip(shape.lengths, keep) if k)
    if n_text < 1 or len(hay) < n_text:
        raise ValueError(f"a retrieval history of {history:,} tokens cannot hold the question and needles, or is "
                         f"longer than the text ({len(hay):,} tokens)")
    start = int(rng.integers(0, len(hay) - n_text + 1))
    text = np.asarray(hay[start:start + n_text], dtype=np.int64)
    pos = needle_positions(n_text, shape, depth, rng, gaps=False)
    avoid = set(text[-raw_window:].tolist())
    for p, need in zip(pos, shape.needed):
        if need:
            avoid.update(text[max(0, p - raw_window // 2):p + raw_window // 2].tolist())
    t = needles.task(task, rng, avoid, distractors)
    inserts = sorted((p, j) for j, p in enumerate(pos) if keep[j])  # stable: a group keeps its order at one offset
    parts, prev, spans = [t.question if control == "query_first" else []], 0, []
    for p, j in inserts:
        parts.append(text[prev:p])
        prev = p
        if t.needed[j]:
            spans.append((sum(map(len, parts)), len(t.needles[j])))
        parts.append(t.needles[j])
    parts.append(text[prev:])
    question_at = sum(map(len, parts))
    parts.append([needles.query] if control == "query_first" else t.question)
    ids = np.concatenate([np.asarray(p, dtype=np.int64) for p in parts])
    assert len(ids) == history, (len(ids), history)
    return dict(ids=ids, answer=t.answer, task=task, needles=spans, needle_at=spans[0][0] if spans else -1,
                question_at=question_at)


def wilson(hits: int, n: int, z: float = 1.96):
    """(accuracy, lo, hi): the Wilson score interval of hits/n (95% by default); (nan, 0, 1) for n = 0."""
    if n == 0:
        return float("nan"), 0.0, 1.0
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return p, max(0.0, centre - half), min(1.0, centre + half)
