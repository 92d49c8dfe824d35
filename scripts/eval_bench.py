"""C-Eval / CMMLU-style multiple-choice evaluation of a MiniMind model on local CSV files.

    python scripts/eval_bench.py --data_dir dataset/ceval-exam --weight full_sft        # native out/full_sft_*.pth
    python scripts/eval_bench.py --data_dir dataset/cmmlu --split test --load_from out/full_sft_512-minimind
    python scripts/eval_bench.py --data_dir /tmp/bench --weight pretrain --hidden_size 64 --num_fewshot 2  # tiny

Nothing is downloaded: put the CSV files there yourself. Layouts found under --data_dir (recursively):
    C-Eval  {subject}_{split}.csv, e.g. val/computer_network_val.csv, dev/computer_network_dev.csv
            columns id,question,A,B,C,D,answer[,explanation]
    CMMLU   {split}/{subject}.csv, e.g. test/agronomy.csv, dev/agronomy.csv  (columns ,Question,A,B,C,D,Answer)
Scoring is C-Eval's "answer-only" method: the prompt ends where the answer letter goes, and the prediction is
whichever of the tokens A/B/C/D gets the highest next-token logit. --num_fewshot examples come from the dev split.
--prompt chat wraps the question in the ChatML template (few-shot examples become earlier turns); plain is
raw text, the default for --weight pretrain. The model flags and loading are eval_llm.py's (model/loading.py).
Prints accuracy per subject and overall; writes nothing. Bad data or a weight that cannot be loaded is one
`error:` line, exit code 2.
"""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import argparse
import csv
import warnings

import torch

from model.cli import add_model_args, cli
from model.loading import load_model

LETTERS = ("A", "B", "C", "D")
HEADER = "以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n"   # C-Eval's official prompt


# ---- data ----
def find_subjects(data_dir, split: str) -> dict:
    """{subject: csv path} for one split, in either layout."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"--data_dir {data_dir} is not a directory (C-Eval/CMMLU CSVs are not downloaded "
                                "by this script)")
    found = {p.name[: -len(f"_{split}.csv")]: p for p in data_dir.rglob(f"*_{split}.csv")}
    if not found:
        found = {p.stem: p for p in data_dir.rglob("*.csv") if p.parent.name == split}
    return dict(sorted(found.items()))


def read_questions(path) -> list:
    """Rows as dicts with question, A, B, C, D, answer; a bad row is an error naming file:line."""
    path = Path(path)
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        columns = {name.strip().lower(): name for name in reader.fieldnames or [] if name}
        need = ["question", "a", "b", "c", "d", "answer"]
        if missing := [c for c in need if c not in columns]:
            raise ValueError(f"{path}: missing column(s) {missing}; expected id,question,A,B,C,D,answer")
        rows = []
        for lineno, row in enumerate(reader, start=2):
            item = {key.upper() if len(key) == 1 else key: (row[columns[key]] or "").strip() for key in need}
            if item["answer"] not in LETTERS:
                raise ValueError(f"{path}:{lineno}: answer {item['answer']!r} is not one of A/B/C/D")
            rows.append(item)
    return rows


# ---- prompts ----
def format_question(q: dict, with_answer: bool = False) -> str:
    text = q["question"] + "".join(f"\n{letter}. {q[letter]}" for letter in LETTERS) + "\n答案："
    return text + q["answer"] if with_answer else text


def question_prompt(tokenizer, subject: str, q: dict, shots: list, chat: bool) -> str:
    """C-Eval's prompt for question `q`, ending where the answer letter goes (few-shot examples first)."""
    header = HEADER.format(subject=subject.replace("_", " "))
    if not chat:
        return header + "".join(format_question(s, True) + "\n\n" for s in shots) + format_question(q)
    turns = []
    for s in shots:
        turns += [{"role": "user", "content": format_question(s)}, {"role": "assistant", "content": s["answer"]}]
    turns.append({"role": "user", "content": format_question(q)})
    turns[0]["content"] = header + turns[0]["content"]
    return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)


def letter_ids(tokenizer) -> list:
    ids = [tokenizer.encode(letter, add_special_tokens=False) for letter in LETTERS]
    if any(len(i) != 1 for i in ids):
        raise ValueError(f"the tokenizer splits the option letters into several tokens: {ids}")
    return [i[0] for i in ids]


# ---- scoring ----
@torch.no_grad()
def score_choices(model, tokenizer, subjects: dict, shots: dict = None, chat: bool = True, max_seq_len: int = 2048,
                  device: str = "cpu") -> dict:
    """subjects: {name: [question dicts]}, shots: {name: [dev question dicts]} ->
    {name: {"n", "correct", "acc"}} plus "_overall" (micro) and "_average" (macro)."""
    choices = torch.tensor(letter_ids(tokenizer), device=device)
    results, checked = {}, False
    for subject, questions in subjects.items():
        correct = 0
        for q in questions:
            prompt = question_prompt(tokenizer, subject, q, (shots or {}).get(subject, []), chat)
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            if not checked:  # the letter must be the very next token, not merged with the prompt's last one
                if tokenizer(prompt + q["answer"], add_special_tokens=False)["input_ids"][:-1] != ids:
                    warnings.warn("prompt + answer letter does not tokenize as prompt tokens + one letter token")
                checked = True
            ids = torch.tensor([ids[-max_seq_len:]], device=device)   # keep the end: the question itself
            next_logits = model(ids, logits_to_keep=1).logits[0, -1]
            correct += int(LETTERS[int(next_logits[choices].argmax())] == q["answer"])
        results[subject] = {"n": len(questions), "correct": correct, "acc": correct / max(len(questions), 1)}
    n, right = sum(r["n"] for r in results.values()), sum(r["correct"] for r in results.values())
    results["_overall"] = {"n": n, "correct": right, "acc": right / max(n, 1)}
    results["_average"] = {"n": len(subjects), "acc": sum(r["acc"] for k, r in results.items()
                                                          if not k.startswith("_")) / max(len(subjects), 1)}
    return results


def format_table(results: dict) -> str:
    names = [k for k in results if not k.startswith("_")]
    width = max([len(k) for k in names] + [len("overall (micro)")])
    lines = [f"{'subject':<{width}}  {'n':>6}  {'correct':>7}  {'acc':>7}", "-" * (width + 26)]
    lines += [f"{k:<{width}}  {results[k]['n']:>6}  {results[k]['correct']:>7}  {results[k]['acc']:>7.2%}" for k in names]
    o, a = results["_overall"], results["_average"]
    lines += ["-" * (width + 26), f"{'overall (micro)':<{width}}  {o['n']:>6}  {o['correct']:>7}  {o['acc']:>7.2%}",
              f"{'average (macro)':<{width}}  {a['n']:>6}  {'':>7}  {a['acc']:>7.2%}"]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="MiniMind C-Eval/CMMLU-style multiple-choice evaluation (local CSVs)",
                                allow_abbrev=False)
    p.add_argument("--data_dir", required=True, help="folder with the C-Eval or CMMLU CSV files")
    p.add_argument("--split", default="val", help="split to score (C-Eval: val, CMMLU: test)")
    p.add_argument("--num_fewshot", default=0, type=int, help="examples from the dev split put before each question")
    p.add_argument("--prompt", default=None, choices=["chat", "plain"],
                   help="chat template or raw text (default: plain for --weight pretrain, else chat)")
    p.add_argument("--subjects", default=None, help="comma-separated subset of subjects (default: all)")
    p.add_argument("--limit", default=0, type=int, help="questions per subject, 0 = all")
    p.add_argument("--max_seq_len", default=2048, type=int, help="prompt tokens kept (from the end)")
    add_model_args(p)
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    subjects = find_subjects(args.data_dir, args.split)
    if args.subjects:
        wanted = args.subjects.split(",")
        if unknown := [s for s in wanted if s not in subjects]:
            raise ValueError(f"unknown subject(s) {unknown}; found {list(subjects)}")
        subjects = {s: subjects[s] for s in wanted}
    if not subjects:
        raise FileNotFoundError(f"no *_{args.split}.csv or {args.split}/*.csv files under {args.data_dir}")
    questions = {s: read_questions(p)[: args.limit or None] for s, p in subjects.items()}
    shots = {}
    if args.num_fewshot:
        dev = find_subjects(args.data_dir, "dev")
        if missing := [s for s in subjects if s not in dev]:
            raise FileNotFoundError(f"--num_fewshot {args.num_fewshot}: no dev split for {missing} in {args.data_dir}")
        shots = {s: read_questions(dev[s])[: args.num_fewshot] for s in subjects}
    model, tokenizer, _ = load_model(args)
    chat = (args.prompt or ("plain" if args.weight == "pretrain" else "chat")) == "chat"
    results = score_choices(model, tokenizer, questions, shots, chat, args.max_seq_len, args.device)
    print(f"{args.split} split, {args.num_fewshot}-shot, {'chat' if chat else 'plain'} prompt")
    print(format_table(results), flush=True)
    return results


if __name__ == "__main__":
    cli(main)
