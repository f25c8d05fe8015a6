"""Prepare the book corpus: train a byte-level BPE (rustbpe), tokenize every split into uint16 shards.

    python prepare.py                                  # ../shared/data/pg -> data/pg (BPE 16,384 incl. specials)
    python prepare.py --splits val,test                # re-tokenize splits, reusing data/pg/tokenizer.json
    python prepare.py --max-docs 2 --vocab-size 1024 --out data/pg_tiny   # a tiny real subset, seconds
    python prepare.py --synthetic                      # no corpus: pseudo-English with planted facts -> data/synthetic
    python prepare.py --tokenizer tokenizers/pg1k.json --out data/pg1k   # a committed tokenizer: tiktoken only

Input: <data>/{train,val,test}.jsonl.xz, one book per line {"id", "author", "title", "text"}. Output in <out>:
    tokenizer.json     {"name", "pattern", "vocab_size", "special_tokens": {tok: id}, "ranks": {base64(bytes): rank},
                       "sha256": checksum of the rest, checked by every load (older files: meta.json's sha)}
    <split>.bin        uint16 tokens; every document is <|bos|> + encode_ordinary(text), documents concatenated
    <split>.idx.npy    int64 offsets, length n_docs + 1; offsets[i] is where doc i's <|bos|> sits, offsets[-1] = len
    meta.json          vocab_size, tokenizer_sha256, per split n_docs/n_tokens/n_chars/docs, synthetic facts, timings
Special tokens sit at the top of the vocab (ids vocab_size - len(SPECIAL_TOKENS) ...). An existing tokenizer.json (or
--tokenizer FILE, copied to <out>) is reused, so a machine with only tiktoken can tokenize; rustbpe is imported only
to train one (tokenizers/pg1k.json is the demo's, what `--vocab-size 1024` trains on the whole corpus, byte for byte).
Every output is staged as a temp file in <out> and os.replace'd only once the whole run has succeeded: a failing run
overwrites nothing.
"""
import argparse
import base64
import errno
import hashlib
import json
import lzma
import os
import random
import sys
import time

import numpy as np
import tiktoken

import durable

REPO = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.normpath(os.path.join(REPO, "..", "shared", "data", "pg"))
SPLITS = ("train", "val", "test")
SPECIAL_TOKENS = {  # token -> role. Changing this dict changes every id: retrain the tokenizer (the sha in meta.json)
    "<|bos|>": "document boundary, prepended to every document in the shards (it also ends the previous one)",
    "<|eot|>": "end of an answer or generated turn in benchmark/task prompts; never in the shards",
    "<|pad|>": "batch padding, always loss-masked; never in the shards",
    "<|passkey|>": "opens a pass-key needle (retrieval.py); also the pass-key question's last token",
    "<|/passkey|>": "closes a pass-key needle",
    "<|key|>": "opens a key-value needle: <|key|> key value... <|value|>",
    "<|value|>": "closes a key-value needle",
    "<|query|>": "opens a retrieval question",
}
BOS = "<|bos|>"


# ----------------------------------------------------------------------------------------------------- data in
def read_books(path, max_docs=None):
    """List of {"id", "author", "title", "text"} from one xz JSON Lines file; ValueError names file and line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: data file not found")
    docs = []
    try:
        with lzma.open(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if max_docs is not None and len(docs) >= max_docs:
                    break
                if not line.strip():  # a trailing newline or blank separator line is not a book
                    continue
                try:
                    d = json.loads(line)
                    if not isinstance(d.get("text"), str):
                        raise ValueError('no string "text" field')
                except (ValueError, AttributeError) as e:  # JSONDecodeError is a ValueError; a non-dict has no .get
                    raise ValueError(f"{path}:{lineno}: bad JSON line ({e})") from None
                docs.append({k: d.get(k, "") for k in ("id", "author", "title")} | {"text": d["text"]})
    except (lzma.LZMAError, EOFError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: corrupt xz data file ({e})") from None
    return docs


def make_synthetic(n_docs, n_chars, n_kv, seed):
    """Pseudo-English documents (seeded Zipfian lexicon) with one passkey, n_kv key-value pairs and a final question.
    Returns ({split: docs}, {split: facts}); a fact's "char" is the index of its value in the doc text."""
    rng = random.Random(seed)
    onset = "b c d f g h l m n p r s t v w br cl dr gr pl st th sh ch tr".split() + [""]
    vowel, coda = "a e i o u ai ea ou ee oo".split(), "n r s t l nd st ng m ck th".split() + ["", ""]
    lexicon = set()
    while len(lexicon) < 3000:
        n_syl = rng.choice((1, 1, 2, 2, 2, 3))
        lexicon.add("".join(rng.choice(onset) + rng.choice(vowel) + rng.choice(coda) for _ in range(n_syl)))
    words = "the of and to a in that it was he for on is with his as had at by not be but her she from".split()
    words += sorted(lexicon - set(words))
    cum_w = np.cumsum(1.0 / (np.arange(len(words)) + 2.0)).tolist()  # Zipf: function words dominate, as in English
    docs, facts = {}, {}
    for split, n in zip(SPLITS, (n_docs, max(2, n_docs // 8), max(2, n_docs // 8))):  # held-out: same generator
        docs[split], facts[split] = [], []
        for i in range(n):
            paras, size = [], 0
            while size < n_chars or len(paras) <= n_kv:  # paragraphs of 3-8 sentences of 6-22 words
                sents = []
                for _ in range(rng.randint(3, 8)):
                    ws = rng.choices(words, cum_weights=cum_w, k=rng.randint(6, 22))
                    ws[rng.randrange(2, len(ws) - 2)] += ","
                    sents.append(" ".join(ws).capitalize() + rng.choice(".....?!"))
                paras.append(" ".join(sents))
                size += len(paras[-1]) + 2
            keys = rng.sample(sorted(lexicon), n_kv)
            planted = [("passkey", "pass key", str(rng.randint(10000, 99999)))]  # the passkey-retrieval phrasing
            planted += [("kv", f"{k}-{rng.randint(10, 99)}", str(rng.randint(1000, 9999))) for k in keys]
            at = sorted(rng.sample(range(len(paras)), len(planted)))  # each fact opens a distinct paragraph
            kind, key, value = rng.choice(planted)  # the closing question asks for one fact
            text, doc_facts, p = "", [], 0
            for j, para in enumerate(paras):
                if p < len(planted) and j == at[p]:
                    fk, fkey, fval = planted[p]
                    sent = f"The value of key {fkey} is {fval}. "
                    sent = f"The pass key is {fval}. Remember it. " if fk == "passkey" else sent
                    doc_facts.append(dict(doc=i, kind=fk, key=fkey, value=fval, char=len(text) + sent.index(fval)))
                    para, p = sent + para, p + 1
                text += para + "\n\n"
            what = "the pass key" if kind == "passkey" else f"the value of key {key}"
            qa = f"Question: what is {what}? Answer: {what} is "
            doc_facts.append(dict(doc=i, kind="answer", key=key, value=value, char=len(text) + len(qa),
                                  question_char=len(text)))
            docs[split].append(dict(id=f"syn-{split}-{i}", author="synthetic", title=f"synthetic {split} {i}",
                                    text=text + qa + value + "."))
            facts[split] += doc_facts
    return docs, facts


# ----------------------------------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts, vocab_size, max_chars):
    """Byte-level BPE on at most max_chars chars of texts -> tokenizer.json dict. Merges stop early on a corpus too
    small for vocab_size; the vocabulary is then capped to the ranks learned plus the special tokens, which follow
    them, so the id space has no holes (an unused id would be an output the model can sample and nothing decodes)."""
    import rustbpe  # lazily: only training needs it

    def budget():
        n = 0
        for t in texts:
            if n >= max_chars:
                return
            yield t[: max_chars - n]
            n += min(len(t), max_chars - n)

    tok = rustbpe.Tokenizer()
    # pattern=None: rustbpe's GPT-4 split (digits in groups of <= 3, so passkeys tokenize alike in any context).
    # The strings are whole books, so a 256-string buffer already gives rayon plenty of parallel work.
    tok.train_from_iterator(budget(), vocab_size - len(SPECIAL_TOKENS), buffer_size=256)
    ranks = sorted(tok.get_mergeable_ranks(), key=lambda br: br[1])
    assert [r for _, r in ranks] == list(range(len(ranks))), "rustbpe's ranks are not 0..n-1"
    first = len(ranks)  # = vocab_size - len(SPECIAL_TOKENS) unless the corpus ran out of merges (then capped)
    vocab_size = first + len(SPECIAL_TOKENS)
    return {"name": f"megacontext-bpe-{vocab_size}", "pattern": tok.get_pattern(), "vocab_size": vocab_size,
            "special_tokens": {s: first + j for j, s in enumerate(SPECIAL_TOKENS)},
            "ranks": {base64.b64encode(bytes(b)).decode("ascii"): r for b, r in ranks}}


def encoding_from_json(t):
    """tokenizer.json dict -> tiktoken.Encoding (tiktoken serves the ranks; rustbpe is never needed to encode)."""
    ranks = {base64.b64decode(b): r for b, r in t["ranks"].items()}
    return tiktoken.Encoding(t["name"], pat_str=t["pattern"], mergeable_ranks=ranks, special_tokens=t["special_tokens"])


def tokenizer_sha256(t):
    """The tokenizer's identity: sha256 of its JSON without the "sha256" field, as prepare.py writes it (so it equals
    meta.json's tokenizer_sha256, also for files written before the field existed)."""
    return hashlib.sha256(json.dumps({k: v for k, v in t.items() if k != "sha256"}).encode()).hexdigest()


def read_tokenizer_json(path):
    """tokenizer.json as a dict, its checksum verified: the file's own "sha256", or for an older file without one the
    tokenizer_sha256 of the meta.json beside it. ValueError (one line naming the file and the fix) when damaged."""
    fix = f"rerun prepare.py --out {os.path.dirname(path) or '.'} (after deleting the damaged file) or restore it"
    try:
        with open(path, encoding="utf-8") as f:
            t = json.load(f)
        want = t.get("sha256")
        sha = tokenizer_sha256(t)
    except (ValueError, AttributeError) as e:  # not JSON, not UTF-8, not an object
        raise ValueError(f"{path} is not a tokenizer written by prepare.py ({type(e).__name__}); {fix}") from None
    if want is None:
        try:
            want = load_meta(os.path.dirname(path)).get("tokenizer_sha256")
        except (OSError, ValueError):
            want = None  # a bare old tokenizer file: nothing to check it against
    if want is not None and want != sha:
        raise ValueError(f"{path} is corrupt (its checksum does not match); {fix}")
    return t


def load_tokenizer(data_dir):
    """tiktoken.Encoding from <data_dir>/tokenizer.json (or a path to the .json itself), checksum-verified. Plain text:
    encode_ordinary; markers: encode(s, allowed_special="all") or encode_single_token("<|bos|>")."""
    path = data_dir if data_dir.endswith(".json") else os.path.join(data_dir, "tokenizer.json")
    t = read_tokenizer_json(path)
    try:
        return encoding_from_json(t)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a tokenizer written by prepare.py ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------------------------------- shards out
def load_meta(data_dir):
    """meta.json as a dict: splits[split] = {n_docs, n_tokens, n_chars, chars_per_token, docs}, facts[split], ...
    ValueError naming the file when it is not one prepare.py wrote."""
    path = os.path.join(data_dir, "meta.json")
    with open(path, "rb") as f:
        try:
            meta = json.loads(f.read())
        except ValueError as e:
            raise ValueError(f"{path} is not valid JSON ({type(e).__name__}); rerun prepare.py") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("splits"), dict) or "vocab_size" not in meta:
        raise ValueError(f"{path} is not a meta.json written by prepare.py (no vocab_size or splits); rerun prepare.py")
    return meta


def load_split(data_dir, split):
    """(tokens: np.memmap uint16 (N,), offsets: int64 (n_docs + 1,)); doc i is tokens[offsets[i]:offsets[i+1]].
    FileNotFoundError for a missing file; ValueError naming the file (never numpy's internals) for a damaged one."""
    fix = f"rerun prepare.py --splits {split}"
    path = os.path.join(data_dir, f"{split}.bin")
    try:
        tokens = np.memmap(path, dtype=np.uint16, mode="r")
    except ValueError:  # empty, or an odd number of bytes
        raise ValueError(f"{path} is not a token shard written by prepare.py ({os.path.getsize(path)} bytes); "
                         f"{fix}") from None
    path = os.path.join(data_dir, f"{split}.idx.npy")
    try:
        offsets = np.load(path)  # tiny: n_docs + 1 int64
    except (ValueError, EOFError, OSError) as e:  # bad magic (numpy then suggests pickles), cut short, ...
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{path} is not a document index written by prepare.py (damaged or truncated); "
                         f"{fix}") from None
    if offsets.ndim != 1 or offsets.dtype != np.int64 or len(offsets) < 2:
        raise ValueError(f"{path} is not a document index written by prepare.py ({offsets.dtype} "
                         f"{offsets.shape}); {fix}")
    info = load_meta(data_dir)["splits"].get(split, {})  # a shard meta.json does not list is stale (other corpus)
    if not offsets[-1] == len(tokens) == info.get("n_tokens"):
        raise ValueError(f"{data_dir}/{split}.bin: shard, index and meta.json disagree; "
                         f"rerun prepare.py --splits {split}")
    return tokens, offsets


def doc_tokens(data_dir, split, i):
    """Tokens of document i of a split, from its <|bos|> to its end (a memmap view: stream a held-out book)."""
    tokens, offsets = load_split(data_dir, split)
    return tokens[offsets[i]:offsets[i + 1]]


def _stage(final, staged, write, *args):
    """write(f, *args) into a temp file beside final (fsync'd); returns (tmp, result). _commit os.replace's it later."""
    tmp = f"{final}.tmp-{os.getpid()}"
    staged.append((tmp, final))
    with open(tmp, "wb") as f:
        result = write(f, *args)
        f.flush()
        os.fsync(f.fileno())
    return tmp, result


def _commit(staged, out):
    for tmp, final in staged:  # meta.json is staged last, so it only ever describes shards already in place
        os.replace(tmp, final)
    staged.clear()
    fd = os.open(out, os.O_RDONLY)
    try:
        os.fsync(fd)  # persist the renames
    finally:
        os.close(fd)


def _write_tokens(f, enc, texts, threads, batch_chars=16_000_000):
    """<|bos|> + tokens for every text into f; returns int64 offsets (n + 1,). The free space is checked for each
    batch before it is written (durable.DiskFull names the sizes)."""
    bos, offsets, i = enc.encode_single_token(BOS), [0], 0
    while i < len(texts):  # batches of ~16M chars bound the memory of tiktoken's python int lists (~0.3 GB)
        j, n = i, 0
        while j < len(texts) and (n < batch_chars or j == i):
            n, j = n + len(texts[j]), j + 1
        batch, i = texts[i:j], j
        shards = [np.array([bos] + ids, dtype=np.uint16)  # ids < vocab_size <= 2**16, so uint16 is exact
                  for ids in enc.encode_ordinary_batch(batch, num_threads=threads)]
        durable.check_space(os.path.dirname(f.name), 2 * sum(map(len, shards)),
                            os.path.basename(f.name).split(".tmp")[0])  # (f is the shard's temp file)
        for a in shards:
            f.write(a.tobytes())
            offsets.append(offsets[-1] + len(a))
    return np.array(offsets, dtype=np.int64)


def _locate_facts(tok_json, tokens, offsets, docs, facts):
    """Fill each fact's "token" (index from the doc's <|bos|>) and "n_tokens" (tokens spanning the value)."""
    nbytes = np.zeros(tok_json["vocab_size"], dtype=np.int64)  # bytes per id; specials (the <|bos|>) count 0
    for b, r in tok_json["ranks"].items():
        nbytes[r] = len(base64.b64decode(b))
    for fact in facts:
        ids = tokens[offsets[fact["doc"]]:offsets[fact["doc"] + 1]]
        starts = np.cumsum(nbytes[ids]) - nbytes[ids]  # byte offset of each token in the doc text
        b = len(docs[fact["doc"]]["text"][: fact["char"]].encode())
        first = int(np.searchsorted(starts, b, side="right")) - 1
        end = int(np.searchsorted(starts, b + len(fact["value"].encode()), side="left"))
        fact["token"], fact["n_tokens"] = first, end - first


def reusable_tokenizer(path, fix):
    """A tokenizer.json to tokenize with (checksum-verified, tiktoken-loadable); one-line ValueError ending in fix."""
    try:
        t = read_tokenizer_json(path)
        encoding_from_json(t)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: unreadable tokenizer ({str(e) or repr(e)}); {fix}") from None
    return t


def prepare(data, out, vocab_size=None, bpe_chars=200_000_000, splits=SPLITS, synthetic=False, max_docs=None,
            seed=0, syn_docs=64, syn_chars=100_000, syn_kv=4, tokenizer=None):
    """Run the whole pipeline; returns meta. Raises ValueError / FileNotFoundError / OSError with a clear message.
    tokenizer: a tokenizer.json to use (copied to out) instead of training one."""
    t_start, log = time.time(), lambda s: print(s, flush=True)
    if vocab_size is not None and not 256 + len(SPECIAL_TOKENS) <= vocab_size <= 2 ** 16:
        raise ValueError(f"--vocab-size {vocab_size}: must be in [{256 + len(SPECIAL_TOKENS)}, 65536] "
                         f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens; ids must fit uint16)")
    if max_docs is not None and max_docs < 1:
        raise ValueError(f"--max-docs {max_docs}: must be at least 1")
    if not splits or any(s not in SPLITS for s in splits):
        raise ValueError(f"--splits {','.join(splits)!r}: choose one or more of {','.join(SPLITS)}")
    os.makedirs(out, exist_ok=True)
    if not os.access(out, os.W_OK | os.X_OK):
        raise PermissionError(f"--out {out}: directory is not writable")
    tok_path, threads = os.path.join(out, "tokenizer.json"), os.cpu_count() or 1
    tok_json = given = None
    if tokenizer is not None:
        if not os.path.isfile(tokenizer):
            raise FileNotFoundError(f"--tokenizer {tokenizer}: file not found")
        given = reusable_tokenizer(tokenizer, "restore it (git checkout) or pass another --tokenizer")
    if os.path.exists(tok_path):
        tok_json = reusable_tokenizer(tok_path, "delete it to train a new one")
        if given is not None and tokenizer_sha256(given) != tokenizer_sha256(tok_json):
            raise ValueError(f"--tokenizer {tokenizer}: {tok_path} holds another tokenizer; delete it (or pick another "
                             "--out) to use this one")
    tok_json = tok_json or given
    if tok_json is not None:
        where = tok_path if os.path.exists(tok_path) else tokenizer
        if vocab_size not in (None, tok_json["vocab_size"]):
            raise ValueError(f"--vocab-size {vocab_size}: {where} has vocab {tok_json['vocab_size']}; "
                             "delete it (or pick another --out) to train a new tokenizer")
        log(f"tokenizer: reusing {where} (vocab {tok_json['vocab_size']})")
    # The BPE sees the train split only. Everything is read before anything is staged, so bad input fails fast.
    need = list(splits) if tok_json else sorted(set(splits) | {"train"}, key=SPLITS.index)
    t0 = time.time()
    if synthetic:
        docs, facts = make_synthetic(syn_docs, syn_chars, syn_kv, seed)
        docs = {s: docs[s][:max_docs] for s in need}
        facts = {s: [f for f in facts[s] if f["doc"] < len(docs[s])] for s in splits}
    else:
        docs, facts = {s: read_books(os.path.join(data, f"{s}.jsonl.xz"), max_docs) for s in need}, {}
    n_chars = {s: sum(len(d["text"]) for d in docs[s]) for s in need}
    log(f"read {' '.join(f'{s}={len(docs[s])} docs/{n_chars[s]:,} chars' for s in need)} in {time.time() - t0:.1f}s")
    timing, staged = {}, []
    try:
        if tok_json is None:
            t0 = time.time()
            tok_json = train_tokenizer([d["text"] for d in docs["train"]], vocab_size or 16384, bpe_chars)
            timing["bpe_s"], timing["bpe_chars"] = round(time.time() - t0, 2), min(bpe_chars, n_chars["train"])
            if tok_json["vocab_size"] < (vocab_size or 16384):
                ranks = tok_json["vocab_size"] - len(SPECIAL_TOKENS)
                log(f"!!! note: the corpus fills only {ranks:,} BPE ranks: vocab capped at {tok_json['vocab_size']:,} "
                    f"(asked {vocab_size or 16384:,}), so no id goes unused")
            log(f"bpe: {len(tok_json['ranks'])} ranks + {len(SPECIAL_TOKENS)} special (vocab {tok_json['vocab_size']}) "
                f"trained on {timing['bpe_chars']:,} chars in {timing['bpe_s']:.1f}s")
            tok_json["sha256"] = tokenizer_sha256(tok_json)  # every load checks it
            _stage(tok_path, staged, lambda f: f.write(json.dumps(tok_json).encode()))
        elif not os.path.exists(tok_path):  # --tokenizer: its bytes, so the copy is the committed file exactly
            _stage(tok_path, staged, lambda f: f.write(open(tokenizer, "rb").read()))
        sha = tokenizer_sha256(tok_json)  # the tokenizer's identity, for consumers
        enc = encoding_from_json(tok_json)
        meta = dict(vocab_size=tok_json["vocab_size"], tokenizer_sha256=sha, special_tokens=tok_json["special_tokens"],
                    source="synthetic" if synthetic else os.path.abspath(data), synthetic=synthetic,
                    synthetic_config=dict(seed=seed, docs=syn_docs, chars=syn_chars, kv=syn_kv) if synthetic else None,
                    max_docs=max_docs, splits={}, facts={})
        try:
            old = load_meta(out)
        except (OSError, ValueError):  # none yet, or unreadable: it is rewritten below either way
            old = {}
        if all(old.get(k) == meta[k] for k in ("tokenizer_sha256", "source", "synthetic_config", "max_docs")):
            # same corpus + tokenizer: keep the other splits
            meta["splits"], meta["facts"] = old["splits"], old.get("facts", {})
            timing = old.get("timing", {}) | timing
        for s in splits:
            t0, texts = time.time(), [d["text"] for d in docs[s]]
            tmp, offsets = _stage(os.path.join(out, f"{s}.bin"), staged, _write_tokens, enc, texts, threads)
            dt = time.time() - t0
            _stage(os.path.join(out, f"{s}.idx.npy"), staged, np.save, offsets)
            if synthetic:
                _locate_facts(tok_json, np.memmap(tmp, dtype=np.uint16, mode="r"), offsets, docs[s], facts[s])
                meta["facts"][s] = facts[s]
            cpt = n_chars[s] / max(1, offsets[-1] - len(texts))  # chars per token, <|bos|> not counted
            meta["splits"][s] = dict(n_docs=len(texts), n_tokens=int(offsets[-1]), n_chars=n_chars[s],
                                     chars_per_token=round(cpt, 4), tokenize_s=round(dt, 2),
                                     docs=[{k: d[k] for k in ("id", "title", "author")} for d in docs[s]])
            log(f"{s}: {len(texts)} docs -> {offsets[-1]:,} tokens ({cpt:.3f} chars/token) in {dt:.1f}s "
                f"({n_chars[s] / max(dt, 1e-6) / 1e6:.1f} Mchar/s, {threads} threads)")
        meta["timing"] = timing | {"prepare_s": round(time.time() - t_start, 2)}
        _stage(os.path.join(out, "meta.json"), staged, lambda f: f.write(json.dumps(meta, indent=1).encode()))
        _commit(staged, out)
    finally:
        for tmp, _ in staged:  # only reached on failure: drop the temp files, leave the old outputs alone
            durable.remove_quietly(tmp)
    log(f"wrote {out} in {time.time() - t_start:.1f}s")
    return meta


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help=f"corpus dir with <split>.jsonl.xz (default {DEFAULT_DATA})")
    p.add_argument("--out", default=None, help="output dir (default data/pg, or data/synthetic)")
    p.add_argument("--vocab-size", type=int, default=None, help="total vocab incl. specials (default 16384, or reuse)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json to use instead of training one (no rustbpe "
                   "needed), e.g. tokenizers/pg1k.json")
    p.add_argument("--bpe-chars", type=int, default=200_000_000, help="BPE training budget in chars of train")
    p.add_argument("--splits", default=",".join(SPLITS), help="splits to tokenize")
    p.add_argument("--synthetic", action="store_true", help="generate pseudo-English with planted facts instead")
    p.add_argument("--max-docs", type=int, default=None, help="first N docs of each split only")
    p.add_argument("--seed", type=int, default=0, help="synthetic corpus seed")
    p.add_argument("--syn-docs", type=int, default=64, help="synthetic train docs (val/test get max(2, N//8))")
    p.add_argument("--syn-chars", type=int, default=100_000, help="synthetic chars per doc (at least)")
    p.add_argument("--syn-kv", type=int, default=4, help="key-value pairs planted per synthetic doc")
    a = p.parse_args(argv)
    # Only a missing *default* corpus falls back; a --data that does not exist is a typo and an error.
    if a.data is None and not a.synthetic and not os.path.isdir(DEFAULT_DATA):
        print(f"!!!\n!!! WARNING: no corpus at {DEFAULT_DATA} (and no --data given)\n!!! falling back to a SYNTHETIC "
              "corpus of pseudo-English with planted facts; models trained on it are not language models\n!!!",
              file=sys.stderr, flush=True)
        a.synthetic = True
    out = a.out or os.path.join(REPO, "data", "synthetic" if a.synthetic else "pg")
    try:
        prepare(a.data or DEFAULT_DATA, out, a.vocab_size, a.bpe_chars, [s for s in a.splits.split(",") if s],
                a.synthetic, a.max_docs, a.seed, a.syn_docs, a.syn_chars, a.syn_kv, a.tokenizer)
    except OSError as e:  # FileNotFoundError and PermissionError are OSErrors; a full disk too
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise SystemExit(f"prepare.py: error: {durable.reason(e)}; nothing in {out} was replaced (the temp files "
                             "are removed)")
        raise SystemExit(f"prepare.py: error: {e}")
    except ValueError as e:
        raise SystemExit(f"prepare.py: error: {e}")


if __name__ == "__main__":
    main()
