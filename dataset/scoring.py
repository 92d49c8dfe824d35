"""Scoring generated answers against reference answers: the demo evaluation (scripts/eval_demo.py, the benches)
and the rule rewards of the RL stages (trainer/core/rl.py: answer_correct, format_reward, and minimind-3's
think_reward) all live here.

    python -c "from dataset.scoring import check_answer; print(check_answer('I am MiniMind, a tiny AI assistant.', 'MiniMind'))"
    # with a model: evaluate(model, tokenizer, 'dataset/demo/eval.jsonl') -> accuracy, per kind, every answer

The rules, written for what a reader accepts as the answer and no more:
  * case, whitespace and punctuation do not matter; R1-style output is scored on its <answer> part;
  * a numeric answer ("8", or a list "2, 5, 9") is compared by value with the LAST numbers of the generation:
    "3+5=8。" and "3 kilometers is 3,000 meters." are right, "3+5=8，不对，是9" is wrong;
  * any other answer must end a clause of the generation (a clause ends at , ; : . ! ? in either script, a
    line break, or the end), compared word by word for Latin text (articles a/an/the ignored) and character
    by character for Chinese: "The capital of France is Paris.", "I am MiniMind, a tiny AI assistant." and
    "A camel lives in a desert." (for "the desert") are right. The answer inside
    a clause is not enough: the demo's sentences state the entity asked about first, so "星期一的前一天是星期日"
    must not pass for "星期一", nor 'The opposite of "small" is "big"' for "small".
Reads nothing and writes nothing, except that evaluate reads the questions file.
"""
import re
from collections import defaultdict
from pathlib import Path

from dataset.lm_dataset import read_jsonl

_UNIT = re.compile(r"\d{1,3}(?:,\d{3})+(?!\d)|\d+(?:\.\d+)?|[a-z]+|[^\W\d_a-z]")   # a number, a Latin word, a CJK char
_NUMBER = re.compile(r"\d{1,3}(?:,\d{3})+(?!\d)|\d+(?:\.\d+)?")
_CLAUSE_END = re.compile(r"[,.](?!\d)|[;:!?，；：。！？\n]")   # not the comma or point inside a number
_ARTICLES = {"a", "an", "the"}


def _final_answer(text: str) -> str:
    """The part of a generation to score: inside the last <answer>...</answer>, else after </think>, else all."""
    if "<answer>" in text:
        text = text.rsplit("<answer>", 1)[1].split("</answer>", 1)[0]
    elif "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    return text


def _value(number: str) -> float:
    return float(number.replace(",", ""))


def _canon(unit: str) -> str:
    return str(_value(unit)) if _NUMBER.fullmatch(unit) else unit


def check_answer(pred: str, answer: str) -> bool:
    """Is generation `pred` right, given the reference `answer` (the "answer" field of eval.jsonl or rlaif.jsonl)?
    See the module docstring for the rules; an empty reference is never matched."""
    pred, ans = _final_answer(pred).lower(), answer.lower()
    ans_units = _UNIT.findall(ans)
    if not ans_units:
        return False
    if all(_NUMBER.fullmatch(u) for u in ans_units):
        nums = _NUMBER.findall(pred)
        n = len(ans_units)
        return len(nums) >= n and [_value(x) for x in nums[-n:]] == [_value(x) for x in ans_units]
    want = [_canon(u) for u in ans_units if u not in _ARTICLES] or ans_units
    n = len(want)
    units, ends = [], set()   # ends: how many units precede each clause end
    for clause in _CLAUSE_END.split(pred):
        units += [_canon(u) for u in _UNIT.findall(clause) if u not in _ARTICLES]
        ends.add(len(units))
    return any(end >= n and units[end - n:end] == want for end in ends)


# ---- the rule rewards of the RL stages ----
TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_FORMAT = [re.compile(r"^<think>\n.*?\n</think>\n<answer>\n.*?\n</answer>$", re.S),
           re.compile(r"^<think>\n.*?\n</think>\n\n<answer>\n.*?\n</answer>$", re.S)]
ANSWER_PART = re.compile(r"<answer>(.*?)</answer>", re.S)


def format_reward(text: str) -> float:
    """The original's reasoning-format reward (spec 6.8): +0.5 for the full think/answer layout,
    +0.25 for each of the four tags that appears exactly once."""
    reward = 0.5 if any(p.match(text) for p in _FORMAT) else 0.0
    return reward + 0.25 * sum(text.count(tag) == 1 for tag in TAGS)


# ---- the minimind-3 shaping rewards: the original's newest calculate_rewards (d65ef2c, GRPO and PPO; spec 4.5) ----
def think_reward(text: str) -> tuple[float, str]:
    """The original's newest rule part of the reward of a minimind-3 response, in [-1.75, 1.75]:
    +0.5 if 20 <= len(stripped response) <= 800 else -0.5; when it holds '</think>': +1.0 if the thought
    before the first one is 20..300 characters (stripped) else -0.5, and +0.25 if '</think>' occurs once else
    -0.25; minus rep_penalty (below) of the answer. -> (reward, answer): the answer is the stripped text after
    the first '</think>', or the whole response (what the original's reward model scores)."""
    reward = 0.5 if 20 <= len(text.strip()) <= 800 else -0.5
    answer = text
    if "</think>" in text:
        thought, after = text.split("</think>", 1)
        reward += 1.0 if 20 <= len(thought.strip()) <= 300 else -0.5
        reward += 0.25 if text.count("</think>") == 1 else -0.25
        answer = after.strip()
    return reward - rep_penalty(answer), answer


def answer_correct(text: str, reference: str) -> bool:
    """The verifiable reward: check_answer against the row's reference; an empty reference is never matched."""
    return bool(reference) and check_answer(text, reference)


def answer_questions(model, tokenizer, questions: list, max_new_tokens: int = 48, batch_size: int = 32,
                     system: str = None) -> list:
    """Greedy answers to single-turn questions (chat template), in order, through the batching engine
    (model/engine.py): `batch_size` questions are decoded together, each getting exactly the answer
    model.generate() gives it alone."""
    from model.engine import Engine, SamplingParams
    prompts = [tokenizer.apply_chat_template(([{"role": "system", "content": system}] if system else [])
                                             + [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in questions]
    with Engine(model, max_batch=batch_size, eos_token_id=tokenizer.eos_token_id) as engine:
        outs = engine.generate([tokenizer(p).input_ids for p in prompts], SamplingParams(max_tokens=max_new_tokens))
    return [tokenizer.decode(o.token_ids, skip_special_tokens=True).strip() for o in outs]


def evaluate(model, tokenizer, eval_path, kinds=None, max_new_tokens: int = 48) -> dict:
    """Greedy answers to the questions of `eval_path` ({"question", "answer", "kind"} lines, e.g. the demo's
    eval.jsonl), scored with check_answer: {"accuracy", "right", "total", "by_kind": {kind: (right, total)},
    "rows": the lines with "prediction" and "correct" added}."""
    rows = list(read_jsonl(Path(eval_path), required=("question", "answer", "kind")))
    if kinds:
        rows = [r for r in rows if r["kind"] in kinds]
    preds = answer_questions(model, tokenizer, [r["question"] for r in rows], max_new_tokens)
    by_kind = defaultdict(lambda: [0, 0])
    for row, pred in zip(rows, preds):
        row["prediction"], row["correct"] = pred, check_answer(pred, row["answer"])
        by_kind[row["kind"]][0] += row["correct"]
        by_kind[row["kind"]][1] += 1
    right = sum(r["correct"] for r in rows)
    return {"accuracy": right / max(len(rows), 1), "right": right, "total": len(rows),
            "by_kind": {k: tuple(v) for k, v in sorted(by_kind.items())}, "rows": rows}


def rep_penalty(text: str, n: int = 3, cap: float = 0.5) -> float:
    """The original minimind-3 RL rewards' repetition penalty (train_grpo.py, train_agent.py): the share of repeated
    word/punctuation n-grams, times 2 * cap, at most cap; 0 for text with fewer than n tokens."""
    toks = re.findall(r"\w+|[^\w\s]", text.lower())
    grams = [tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)]
    return min(cap, (len(grams) - len(set(grams))) * cap * 2 / len(grams)) if grams else 0.0
