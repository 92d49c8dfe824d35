"""Characters per token of our shipped tokenizer against the original MiniMind tokenizer (higher = better compression).

    python bench/bench_tokenizer.py                          # ours (model/) vs upstream, if ../shared/reference has it
    python bench/bench_tokenizer.py --tokenizer_dir model_learn_tokenizer --upstream_dir /path/to/minimind/model

Texts: hand-written Chinese and English paragraphs below (never part of the tokenizer's training corpus),
the Chinese-only lines of the original README and the plain-English lines of our UPSTREAM_SPEC.md (when the
shared reference folder is present), and the demo SFT answers (in-domain for ours; run dataset/demo_data.py
first). The original README says its tokenizer gives about 1.5-1.7 characters per token on Chinese and 4-5 on
English (on its own data). Prints two markdown tables: compression, and what the vocabulary's tokens decode to.
"""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import argparse
import re

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "reference"

ZH = """
春天来了，公园里的花都开了。孩子们在草地上放风筝，老人们坐在长椅上聊天，小狗在湖边跑来跑去。
妈妈说，周末我们可以去郊外爬山，带上面包、水果和一壶热茶。爬到山顶的时候，可以看到整座城市。
学习一门新的语言需要耐心。每天坚持读一点、写一点、听一点，几个月以后就会发现自己进步了很多。
不要害怕犯错误，因为错误也是学习的一部分。老师常常告诉我们，多问为什么，才能真正理解知识。
这家小饭馆的生意一直很好。老板每天早上五点就起床去市场买菜，中午做出来的饭菜又新鲜又便宜。
很多上班的人都喜欢来这里吃午饭，有时候门口还会排起长队。老板笑着说，做饭最重要的是用心。
城市的交通越来越方便了。地铁连接了各个区，公交车也换成了电动的，既安静又干净。
如果你想去火车站，可以先坐三号线，然后在人民广场换乘一号线，大约需要四十分钟。
科学家发现，适当的运动可以让人心情变好，也有助于睡眠。每天散步半小时，是一个简单的好习惯。
晚上睡觉前少看手机，多读几页书，第二天醒来会觉得精神更好。健康的生活需要从小事做起。
"""
EN = """
Spring has arrived and the flowers in the park are in full bloom. Children fly kites on the grass, old
friends chat on the benches, and a small dog runs back and forth along the edge of the lake.
Learning a new language takes patience. If you read, write and listen a little every day, you will be
surprised by how much you have improved after a few months. Do not be afraid of making mistakes, because
mistakes are part of learning. Our teacher often tells us to keep asking why, since that is the only way
to really understand something.
The small restaurant on the corner has always been busy. Every morning the owner gets up at five to buy
vegetables at the market, and the lunch he cooks is both fresh and cheap. Many office workers like to
eat there, and sometimes there is a long line outside the door. The owner smiles and says that the most
important thing about cooking is to care about the people you cook for.
Scientists have found that regular exercise improves our mood and helps us sleep better. Walking for
half an hour every day is a simple habit that anyone can start. Reading a few pages of a book instead of
looking at a phone before bed can also make the next morning feel brighter.
"""


def samples() -> dict[str, str]:
    out = {"zh (hand-written)": ZH.strip(), "en (hand-written)": EN.strip()}
    readme = REFERENCE / "minimind_README_zh_2025.md"
    if readme.exists():  # natural Chinese prose from the original project: keep lines that are mostly Chinese
        pieces = re.split(r"[\n ]+", readme.read_text(encoding="utf-8"))
        zh = [p for p in pieces if len(p) >= 8 and sum("\u4e00" <= c <= "\u9fff" for c in p) / len(p) > 0.7]
        out["zh (upstream README)"] = "\n".join(zh)
    spec = REFERENCE / "UPSTREAM_SPEC.md"
    if spec.exists():  # technical English prose: lines that are plain sentences, not code or tables
        lines = [line.strip("* ") for line in spec.read_text(encoding="utf-8").splitlines()]
        out["en (spec prose)"] = "\n".join(
            line for line in lines if len(line) > 60 and line.isascii() and line[:1].isalpha()
            and sum(c.isalpha() or c == " " for c in line) / len(line) > 0.85)
    sft = ROOT / "dataset" / "demo" / "sft.jsonl"
    if sft.exists():
        import json
        convs = [json.loads(line)["conversations"] for line in open(sft, encoding="utf-8")]
        for lang, test in (("zh", lambda s: any("\u4e00" <= c <= "\u9fff" for c in s)), ("en", lambda s: s.isascii())):
            answers = [m["content"] for c in convs for m in c if m["role"] == "assistant" and test(m["content"])]
            out[f"{lang} (demo SFT answers)"] = "\n".join(answers[:2000])
    return out


def chars_per_token(tokenizer, text: str) -> tuple[int, float]:
    n = len(tokenizer(text, add_special_tokens=False).input_ids)
    return n, len(text) / n


def vocab_composition(tokenizer) -> dict[str, int]:
    """Count the vocabulary's tokens by what they decode to."""
    counts = dict.fromkeys(["Chinese", "Latin letters", "digits", "other ASCII", "other Unicode", "partial UTF-8"], 0)
    for i in range(len(tokenizer)):
        if i in tokenizer.all_special_ids:
            continue
        s = tokenizer.decode([i])
        if "\ufffd" in s:
            counts["partial UTF-8"] += 1
        elif all("\u4e00" <= c <= "\u9fff" for c in s):
            counts["Chinese"] += 1
        elif s.isascii():
            t = s.strip()
            counts["Latin letters" if t.isalpha() else "digits" if t.isdigit() else "other ASCII"] += 1
        else:
            counts["other Unicode"] += 1
    return counts


def main(argv=None):
    parser = argparse.ArgumentParser(description="Tokenizer compression table (characters per token)", allow_abbrev=False)
    parser.add_argument("--tokenizer_dir", type=Path, default=ROOT / "model", help="our tokenizer folder")
    parser.add_argument("--upstream_dir", type=Path, default=REFERENCE / "upstream_tokenizer",
                        help="the original MiniMind tokenizer folder; skipped when absent")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer
    tokenizers = {"ours": AutoTokenizer.from_pretrained(args.tokenizer_dir)}
    if (args.upstream_dir / "tokenizer.json").exists():
        tokenizers["upstream"] = AutoTokenizer.from_pretrained(args.upstream_dir)
    names = list(tokenizers)
    print("| text | chars | " + " | ".join(f"{n} tokens | {n} chars/token" for n in names) + " |")
    print("|---|---:|" + "---:|---:|" * len(names))
    for label, text in samples().items():
        cells = []
        for n in names:
            count, ratio = chars_per_token(tokenizers[n], text)
            cells += [f"{count:,}", f"{ratio:.2f}"]
        print(f"| {label} | {len(text):,} | " + " | ".join(cells) + " |")
    print()
    comps = {n: vocab_composition(t) for n, t in tokenizers.items()}
    print("| vocabulary tokens that decode to | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for kind in comps[names[0]]:
        print(f"| {kind} | " + " | ".join(str(comps[n][kind]) for n in names) + " |")


if __name__ == "__main__":
    main()
