"""Retrieval tasks (DESIGN §10, issue 9): needles planted in book text, the questions that ask for them, and the
training mix that teaches a tiny base model to answer them.

    passkey  needle  <|passkey|> d1 d2 d3 d4 d5 <|/passkey|>    question  <|query|> <|passkey|>   answer  d1 .. d5
    kv       needle  <|key|> k v1 v2 v3 v4 <|value|>            question  <|query|> k             answer  v1 .. v4

d's are 5 distinct digits (30,240 values); k and the v's are distinct word tokens of the BPE vocabulary that occur
nowhere else in the text the base model reads raw. Why this shape (measured; ../shared/notes/retrieval-curriculum.md):
a tiny base learns to answer by copying (an induction head: find the earlier occurrence of the current token, continue
after it) within minutes only when the token before each answer token occurs once in its context. The marker and the
key occur once, and distinct digits (rare in books) or unused words make every later copy step unambiguous too. A kv
question names its key and kv needles come with distractors, so a kv needle must be *found* by what the question asks:
that is what makes LensNet's choice depend on the question (a pass key is the one needle-shaped thing in the history).

Training mix (train.py): the first `copy_steps` steps copy random spans of the window to random later places
(`copy_spans`: content-addressed copying forms the induction head: ~500 steps on 2 CPU cores), then a share of
windows become drills (`plant_drills`: several needles, then questions with their answers; needle contents carry no
loss, answers a higher weight). Prompts for the harness and the lens stage (`make_prompt`): book text of exactly
`history` tokens, a needle at a relative depth, the question last; or the controls: `query_first` (the question opens
the prompt and the prompt ends with a bare <|query|>, a cue that does not name the key) and `no_needle`.
"""
import functools
import math

import numpy as np

import prepare

KINDS = ("passkey", "kv")
NEEDLE_LEN = 7  # tokens of either needle: marker, 5 contents, closing marker
CONTROLS = (None, "query_first", "no_needle")


@functools.lru_cache(maxsize=4)
def needles_for(data_dir: str) -> "Needles":
    """The Needles of a prepared-data directory's tokenizer, built once per directory (train.py, stages.py)."""
    return Needles(prepare.load_tokenizer(data_dir))


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

    def make(self, kind: str, rng: np.random.Generator, avoid=()):
        """(needle, question, answer) id lists of one fresh needle; kv words avoid the ids in `avoid`."""
        if kind == "passkey":
            answer = self.digits[rng.permutation(10)[:5]].tolist()
            return [self.passkey] + answer + [self.passkey_end], [self.query, self.passkey], answer
        if kind != "kv":
            raise ValueError(f"retrieval kind must be one of {', '.join(KINDS)}; got {kind!r}")
        free = np.setdiff1d(self.words, np.fromiter(avoid, dtype=np.int64, count=-1))
        if len(free) < 5:
            raise ValueError("no unused word tokens left for a kv needle: the text holds every word token")
        key, *answer = rng.choice(free, 5, replace=False).tolist()
        return [self.key, key] + answer + [self.value], [self.query, key], answer


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


def plant_drills(row, rng: np.random.Generator, needles: Needles, n_kv: int, n_questions: int, weight: float):
    """Turn one window `row` (n,) int64 into a retrieval drill, in place: `n_kv` kv needles (plus a pass key half the
    time) at random slots of its first part, then `n_questions` of them asked at the end, each with its answer.
    Returns (per-position loss weights (n,): 0 on needle contents (random, unpredictable), `weight` on answers, 1
    elsewhere; the index of the first question)."""
    n = len(row)
    w = np.ones(n, dtype=np.float32)
    items = [needles.make("passkey", rng)] if rng.random() < 0.5 else []
    used = set(row.tolist())
    for _ in range(n_kv):
        items.append(needles.make("kv", rng, used))
        used.update(items[-1][0])
    asked = rng.permutation(len(items))[:n_questions]
    q_len = max(len(items[i][1]) + len(items[i][2]) for i in asked) + 1
    q_start = n - len(asked) * q_len
    slot = max(len(it[0]) for it in items) + 1
    if q_start // slot < len(items):
        raise ValueError(f"a window of {n} tokens cannot hold {len(items)} needles and {len(asked)} questions")
    for s, i in zip(np.sort(rng.permutation(q_start // slot)[:len(items)]), rng.permutation(len(items))):
        needle, p = items[i][0], int(s) * slot
        row[p:p + len(needle)] = needle
        w[p + 2:p + len(needle)] = 0  # after the opening marker and the first content token nothing is predictable
    for j, i in enumerate(asked):
        _, question, answer = items[i]
        p = q_start + j * q_len
        row[p:p + len(question) + len(answer)] = question + answer
        w[p + len(question):p + len(question) + len(answer)] = weight
    return w, q_start


JITTER = 32  # a needle starts up to this many tokens before its depth (make_prompt)


def make_prompt(hay, needles: Needles, kind: str, history: int, depth: float, rng: np.random.Generator,
                control=None, distractors: int = 3, raw_window: int = 1024):
    """One retrieval prompt of exactly `history` tokens of book text `hay` (1-d int array; a random slice is used).

    The needle starts at relative depth `depth` of the text before the question, less a uniform 0..JITTER-1 tokens
    (so its alignment to the gist blocks varies between prompts: at a fixed offset every prompt of a depth would
    straddle a block boundary the same way); kv prompts add `distractors` other kv
    needles at uniform depths. kv words avoid the tokens of the last `raw_window` prompt tokens and of the needle's
    neighbourhood (what a base model reads raw). control: None (question last), 'query_first' (question first, a bare
    <|query|> last), 'no_needle' (question last, no needle: the answer is a value never planted).
    Returns dict(ids (history,) int64, answer [ids], needle_at (index of the needle's first token, -1 without one),
    question_at (index of the final cue's first token))."""
    if control not in CONTROLS:
        raise ValueError(f"control must be one of {', '.join(map(str, CONTROLS))}; got {control!r}")
    n_other = distractors if kind == "kv" else 0
    n_text = history - 2 - (control == "query_first") - NEEDLE_LEN * (n_other + (control != "no_needle"))
    if n_text < 1 or len(hay) < n_text:
        raise ValueError(f"a retrieval history of {history:,} tokens cannot hold the question and needles, or is longer "
                         f"than the text ({len(hay):,} tokens)")
    start = int(rng.integers(0, len(hay) - n_text + 1))
    text = np.asarray(hay[start:start + n_text], dtype=np.int64)
    at = max(0, round(depth * n_text) - int(rng.integers(0, JITTER)))
    avoid = set(text[max(0, at - raw_window // 2):at + raw_window // 2].tolist()) | set(text[-raw_window:].tolist())
    needle, question, answer = needles.make(kind, rng, avoid)
    inserts = [] if control == "no_needle" else [(at, needle)]
    for _ in range(n_other):
        avoid.update(inserts[-1][1] if inserts else needle)
        inserts.append((int(rng.integers(0, n_text + 1)), needles.make("kv", rng, avoid)[0]))
    parts, prev, needle_at = [question if control == "query_first" else []], 0, -1
    for pos, tokens in sorted(inserts, key=lambda t: t[0]):
        parts.append(text[prev:pos])
        prev = pos
        if tokens is needle:
            needle_at = sum(map(len, parts))
        parts.append(tokens)
    parts.append(text[prev:])
    question_at = sum(map(len, parts))
    parts.append([needles.query] if control == "query_first" else question)
    ids = np.concatenate([np.asarray(p, dtype=np.int64) for p in parts])
    assert len(ids) == history, (len(ids), history)
    return dict(ids=ids, answer=answer, needle_at=needle_at, question_at=question_at)


def wilson(hits: int, n: int, z: float = 1.96):
    """(accuracy, lo, hi): the Wilson score interval of hits/n (95% by default); (nan, 0, 1) for n = 0."""
    if n == 0:
        return float("nan"), 0.0, 1.0
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return p, max(0.0, centre - half), min(1.0, centre + half)
