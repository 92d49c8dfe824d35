"""Training text for MiniMind's tokenizer, made only from what this project writes or installs (no hub).

    python dataset/tokenizer_corpus.py --out /tmp/tokenizer_corpus.jsonl    # dump it as {"text"} lines to inspect
Used by `python trainer/train_tokenizer.py` when no --data_path is given (10.8M characters, 16 MB, built in ~8 s).

Sources, yielded in a fixed order; everything is seeded, so the text depends only on the installed versions
(Python 3.11's standard library and Unicode tables, jieba 0.42.1, pyspellchecker 0.9.1):
    demo      every file of dataset/demo_data.py, at scale 1 (in memory)
    chinese   2.5M characters of word sequences drawn by frequency from jieba's bundled dictionary dict.txt
    words     5M characters of English word sequences drawn by frequency from pyspellchecker's bundled
              English word counts (everyday vocabulary; swear words and slurs left out)
    english   docstrings and comments of a fixed list of standard-library modules, plus pydoc_data.topics
              (the text of the Python reference manual)
    code      300k characters of the source of those modules
    numbers   years, dates, counts, prices and percentages in short bilingual sentences
    symbols   emoji and other symbols with their Unicode names
The shares were tuned with bench/bench_tokenizer.py so that the 6400-token vocabulary compresses natural
text about as well as upstream's (about 1.2 characters per token on Chinese and 3.5 on English prose, within
4% of upstream on the same texts); it has ~3050 Chinese and ~2600 Latin-letter tokens (upstream 2448 / 3240).
Both jieba and pyspellchecker are needed only here (pip install jieba==0.42.1 pyspellchecker==0.9.1).
"""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import argparse
import ast
import gzip
import importlib.util
import io
import json
import random
import sysconfig
import tokenize
import unicodedata
from itertools import accumulate
from typing import Iterator

# Standard-library files (paths relative to the stdlib folder) whose docs, comments and code we use.
STDLIB_FILES = [
    "argparse.py", "ast.py", "base64.py", "bisect.py", "calendar.py", "cmd.py", "codecs.py", "configparser.py",
    "contextlib.py", "copy.py", "csv.py", "dataclasses.py", "datetime.py", "decimal.py", "_pydecimal.py",
    "difflib.py", "enum.py", "fractions.py", "ftplib.py", "functools.py", "getopt.py", "gettext.py", "glob.py",
    "gzip.py", "heapq.py", "hmac.py", "imaplib.py", "inspect.py", "ipaddress.py", "locale.py", "mailbox.py",
    "mimetypes.py", "nntplib.py", "numbers.py", "optparse.py", "pathlib.py", "pdb.py", "pickle.py", "platform.py",
    "poplib.py", "pprint.py", "pydoc.py", "queue.py", "random.py", "re/__init__.py", "sched.py", "secrets.py",
    "selectors.py", "shlex.py", "shutil.py", "smtplib.py", "socket.py", "socketserver.py", "statistics.py",
    "string.py", "subprocess.py", "tarfile.py", "tempfile.py", "textwrap.py", "threading.py", "timeit.py",
    "trace.py", "traceback.py", "turtle.py", "typing.py", "uuid.py", "warnings.py", "weakref.py", "webbrowser.py",
    "zipfile.py", "asyncio/base_events.py", "asyncio/events.py", "asyncio/futures.py", "asyncio/locks.py",
    "asyncio/queues.py", "asyncio/streams.py", "asyncio/tasks.py", "collections/__init__.py",
    "concurrent/futures/_base.py",
    "email/message.py", "email/utils.py", "email/_header_value_parser.py", "http/client.py", "http/cookiejar.py",
    "http/server.py", "json/__init__.py", "json/decoder.py", "json/encoder.py", "logging/__init__.py",
    "logging/handlers.py", "multiprocessing/pool.py", "multiprocessing/managers.py", "sqlite3/__init__.py",
    "unittest/case.py", "unittest/mock.py", "urllib/parse.py", "urllib/request.py", "xml/dom/minidom.py",
    "xml/etree/ElementTree.py", "importlib/_bootstrap_external.py", "tkinter/__init__.py",
]
# Sizes of the generated parts (characters, or sentences), tuned with bench/bench_tokenizer.py.
CHINESE_CHARS, ENGLISH_WORD_CHARS, CODE_CHARS, NUMBER_SENTENCES = 2_500_000, 5_000_000, 300_000, 2_000
# Subtitle word counts include slurs and swearing; keep them out of the vocabulary.
SKIP_STEMS = ("fuck", "shit", "bitch", "cunt", "dick", "pussy", "whore", "slut", "nigg", "fag", "bastard", "asshole")
# Unicode blocks for the symbol part: misc symbols, dingbats, arrows, emoji.
SYMBOL_RANGES = [(0x2190, 0x21FF), (0x2600, 0x27BF), (0x1F300, 0x1F64F), (0x1F680, 0x1F6FF), (0x1F900, 0x1F9FF)]
ZH_PUNCT_MID = ["，"] * 6 + ["、", "、", "：", "；"]
ZH_PUNCT_END = ["。"] * 8 + ["？", "！"]
EN_PUNCT_END = ["."] * 8 + ["?", "!"]


def _jieba_words() -> tuple[list[str], list[int]]:
    """Chinese words and frequencies from jieba's dict.txt (found without importing jieba)."""
    spec = importlib.util.find_spec("jieba")
    if spec is None:
        raise SystemExit("the tokenizer corpus needs jieba's dictionary: pip install jieba==0.42.1")
    words, freqs = [], []
    with open(Path(spec.submodule_search_locations[0]) / "dict.txt", encoding="utf-8") as f:
        for line in f:
            word, freq = line.split()[:2]
            if all("\u4e00" <= ch <= "\u9fff" for ch in word):
                words.append(word)
                freqs.append(int(freq))
    return words, freqs


def chinese_text(rng: random.Random, n_chars: int) -> Iterator[str]:
    """Paragraphs of word sequences drawn by unigram frequency, with the common Chinese punctuation."""
    words, freqs = _jieba_words()
    cum = list(accumulate(freqs))
    produced = 0
    while produced < n_chars:
        sentences = []
        for _ in range(rng.randint(2, 6)):
            picks = rng.choices(words, cum_weights=cum, k=rng.randint(4, 18))
            parts = []
            for w in picks:
                r = rng.random()
                if r < 0.03:
                    w = rng.choice(["“{}”", "《{}》", "（{}）"]).format(w)
                parts.append(w + (rng.choice(ZH_PUNCT_MID) if r > 0.88 else ""))
            sentences.append("".join(parts).rstrip("".join(ZH_PUNCT_MID)) + rng.choice(ZH_PUNCT_END))
        text = "".join(sentences)
        produced += len(text)
        yield text


def _english_words() -> tuple[list[str], list[int]]:
    """English words and frequencies from pyspellchecker's bundled en.json.gz (a subtitle word count)."""
    spec = importlib.util.find_spec("spellchecker")
    if spec is None:
        raise SystemExit("the tokenizer corpus needs pyspellchecker's word list: pip install pyspellchecker==0.9.1")
    with gzip.open(Path(spec.submodule_search_locations[0]) / "resources" / "en.json.gz", "rt", encoding="utf-8") as f:
        counts = json.load(f)
    words = sorted(w for w in counts if w.replace("'", "").isalpha() and w.isascii()
                   and not any(stem in w for stem in SKIP_STEMS))
    return words, [counts[w] for w in words]


def english_word_text(rng: random.Random, n_chars: int) -> Iterator[str]:
    """Sentences of English words drawn by frequency. The GPT-2 split regex cuts English at word boundaries,
    so BPE only ever sees single words: word frequencies, capitals and punctuation are all it needs."""
    words, freqs = _english_words()
    cum = list(accumulate(freqs))
    produced = 0
    while produced < n_chars:
        sentences = []
        for _ in range(rng.randint(2, 6)):
            picks = ["I" if w == "i" else w for w in rng.choices(words, cum_weights=cum, k=rng.randint(4, 16))]
            picks[0] = picks[0][:1].upper() + picks[0][1:]
            parts = [w + ("," if rng.random() < 0.08 else "") for w in picks[:-1]] + [picks[-1]]
            sentences.append(" ".join(parts) + rng.choice(EN_PUNCT_END))
        text = " ".join(sentences)
        produced += len(text)
        yield text


def _stdlib_sources() -> Iterator[tuple[str, str]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for rel in STDLIB_FILES:
        path = stdlib / rel
        if path.exists():
            yield rel, path.read_text(encoding="utf-8")


def english_text() -> Iterator[str]:
    """Docstrings and comments (prose) of the stdlib files, then the Python reference manual's topics."""
    for _, src in _stdlib_sources():
        tree = ast.parse(src)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    yield doc
        comments = [tok.string.lstrip("#").strip() for tok in tokenize.generate_tokens(io.StringIO(src).readline)
                    if tok.type == tokenize.COMMENT]
        for i in range(0, len(comments), 20):
            yield " ".join(c for c in comments[i:i + 20] if c)
    from pydoc_data.topics import topics
    for name in sorted(topics):
        yield topics[name]


def code_text(max_chars: int) -> Iterator[str]:
    """Raw source of the stdlib files, cut into chunks, up to max_chars in all."""
    produced = 0
    for _, src in _stdlib_sources():
        for i in range(0, len(src), 4000):
            if produced >= max_chars:
                return
            produced += len(src[i:i + 4000])
            yield src[i:i + 4000]


def number_text(rng: random.Random, n: int) -> Iterator[str]:
    for _ in range(n):
        y, m, d = rng.randint(1900, 2030), rng.randint(1, 12), rng.randint(1, 28)
        k, p, price = rng.randint(2, 10 ** rng.randint(1, 6)), rng.randint(1, 99), rng.randint(1, 9999) / 100
        yield rng.choice([
            f"{y}年{m}月{d}日，共有{k}人参加，比去年增长了{p}%。", f"这件衣服的价格是{price}元，打折后便宜了{p}%。",
            f"On {y}-{m:02d}-{d:02d}, {k} people came, {p}% more than last year.",
            f"The price is ${price}, and {k} items were sold in {y}.", f"第{k}号房间在{p}楼。",
        ])


def symbol_text(rng: random.Random) -> Iterator[str]:
    """Each symbol with its Unicode name, and a few inside short Chinese or English sentences."""
    symbols = [chr(cp) for lo, hi in SYMBOL_RANGES for cp in range(lo, hi + 1) if unicodedata.name(chr(cp), "")]
    for i in range(0, len(symbols), 10):
        yield " ".join(f"{ch} {unicodedata.name(ch).lower()}" for ch in symbols[i:i + 10])
    for _ in range(len(symbols)):
        ch = rng.choice(symbols)
        yield rng.choice([f"今天真开心{ch}", f"我喜欢这个{ch}！", f"Have a nice day {ch}", f"{ch}{ch} so cool!"])


# the demo files the shipped tokenizer was trained on; files added later stay out. Later edits of these files moved
# a few merges (a rebuild shares 6308 of its 6400 tokens); the shipped files stay frozen: weights depend on their ids
TOKENIZER_DEMO_FILES = ("pretrain", "sft", "dpo", "rlaif", "r1", "lora_identity", "lora_domain", "eval")


def iter_corpus(seed: int = 0, scale: float = 1.0) -> Iterator[str]:
    """Every text of the tokenizer corpus, in a fixed order. scale<1 shrinks the generated parts (for tests)."""
    from dataset.demo_data import build_demo_data
    rng = random.Random(f"minimind-tokenizer-{seed}")
    for name, rows in build_demo_data(seed, max(scale, 0.01)).items():
        if name not in TOKENIZER_DEMO_FILES:
            continue
        for row in rows:
            msgs = row.get("conversations") or row.get("chosen", []) + row.get("rejected", [])
            if "text" in row:
                yield row["text"]
            elif msgs:
                yield "\n".join(str(m.get("content", "")) for m in msgs)
            else:  # eval.jsonl
                yield row["question"] + "\n" + row["answer"]
    yield from chinese_text(rng, int(CHINESE_CHARS * scale))
    yield from english_word_text(rng, int(ENGLISH_WORD_CHARS * scale))
    english = list(english_text())
    yield from english[:max(1, int(len(english) * min(scale, 1.0)))]
    yield from code_text(int(CODE_CHARS * scale))
    yield from number_text(rng, int(NUMBER_SENTENCES * scale))
    yield from symbol_text(rng)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Dump the tokenizer training corpus as jsonl", allow_abbrev=False)
    parser.add_argument("--out", type=Path, required=True, help="output jsonl ({\"text\": ...} per line)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0, help="shrink the generated parts (0.01 for a quick look)")
    args = parser.parse_args(argv)
    chars = 0
    with open(args.out, "w", encoding="utf-8") as f:
        for text in iter_corpus(args.seed, args.scale):
            chars += len(text)
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}: {chars / 1e6:.1f}M characters")


if __name__ == "__main__":
    main()
