"""dataset/scoring.py: check_answer accepts what a reader accepts (the answer stated anywhere a clause ends, numbers
by value with thousands separators, articles ignored) and stays strict where it must (the last numbers decide,
an answer in a sentence's subject position is not stated as the answer); evaluate on a tiny model agrees with
check_answer on its own greedy answers."""
import json

import pytest
import torch

from dataset.scoring import answer_questions, check_answer, evaluate
from tests.conftest import tiny_config, tokenizer_dir

RIGHT = [
    # issue 21 item 9: the name ends the first clause, not the sentence
    ("I am MiniMind, a tiny AI assistant.", "MiniMind"), ("我是MiniMind，一个很小的AI助手。", "MiniMind"),
    ("You can call me MiniMind.", "MiniMind"), ("My name is MiniMind! Nice to meet you.", "MiniMind"),
    ("我的名字是MiniMind。", "MiniMind"),
    ("3+5=8。", "8"), ("3 + 5 = 8.", "8"), ("8", "8"), ("答案是 8.0", "8"),
    ("3 kilometers is 3,000 meters.", "3000"), ("12 kilograms is 12,000 grams.", "12000"), ("3千米等于3000米。", "3000"),
    ("法国的首都是巴黎。", "巴黎"), ("巴黎", "巴黎"), ("The capital of France is Paris.", "Paris"),
    ("the capital of france is PARIS !", "Paris"), ("The capital of France is Paris, a city on the Seine.", "Paris"),
    ("法国的首都是巴黎，一座美丽的城市。", "巴黎"),
    ("A camel lives in the desert.", "the desert"), ("A camel lives in a desert.", "the desert"),
    ("From smallest to largest: 2, 5, 9.", "2, 5, 9"), ("从小到大排序后是：2、5、9。", "2, 5, 9"),
    ("The chemical symbol for oxygen is O.", "O"),
    ("<think>\n3加5等于8。\n</think>\n<answer>\n3+5=8。\n</answer>", "8"),
    ("<think>\n想一想\n</think>\n巴黎", "巴黎"),
]
WRONG = [
    ("3+5=9。", "8"), ("18", "8"), ("没有数字", "8"), ("3+5=8，不对，是9", "8"), ("The larger of 5 and 9 is 5.", "9"),
    ("3 kilometers is 300 meters.", "3000"), ("3,000", "300"),
    ("法国的首都是柏林。", "巴黎"), ("The capital of France is Berlin.", "Paris"),
    # the asked entity restated in the subject position is not an answer
    ("巴黎是法国的首都。", "巴黎"), ("星期一的前一天是星期日。", "星期一"), ('The opposite of "small" is "big".', "small"),
    ("The day before Monday is Sunday.", "Monday"), ("我是一个名叫MiniMind的语言模型", "MiniMind"),
    ("From smallest to largest: 2, 5, 19.", "2, 5, 9"), ("12, 5, 9", "2, 5, 9"), ("2, 5, 9, 12", "2, 5, 9"),
    ("The chemical symbol for oxygen is Os.", "O"), ("1月", "11月"), ("11月", "1月"),
    ("<think>\n答案是8\n</think>\n<answer>\n3+5=9。\n</answer>", "8"), ("", "8"), ("anything", ""),
]


@pytest.mark.parametrize("pred, answer", RIGHT)
def test_right_answers_are_accepted(pred, answer):
    assert check_answer(pred, answer) is True


@pytest.mark.parametrize("pred, answer", WRONG)
def test_wrong_answers_are_rejected(pred, answer):
    assert check_answer(pred, answer) is False


def generate_alone(model, tokenizer, question, max_new_tokens):
    """The greedy answer model.generate gives `question` on its own."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True).input_ids
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_answer_questions_equals_generate_alone():
    """The engine's batched greedy answers are model.generate's, question by question, for more questions than
    slots (they join as others finish)."""
    from transformers import AutoTokenizer
    from model.model_minimind import MiniMindForCausalLM
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir()), local_files_only=True)
    questions = ["1+1等于几？", "What is the capital of France?", "你好", "Sort 9, 2, 5 from smallest to largest.", "hi"]
    torch.manual_seed(1)
    model = MiniMindForCausalLM(tiny_config()).eval()
    answers = answer_questions(model, tokenizer, questions, max_new_tokens=8, batch_size=2)
    assert answers == [generate_alone(model, tokenizer, q, 8) for q in questions] and all(answers)


def test_evaluate_scores_greedy_answers_by_kind(tmp_path):
    from transformers import AutoTokenizer
    from model.model_minimind import MiniMindForCausalLM
    torch.manual_seed(0)
    model = MiniMindForCausalLM(tiny_config()).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir()), local_files_only=True)
    rows = [{"question": "1+1等于几？", "answer": "2", "kind": "add"},
            {"question": "What is the capital of France?", "answer": "Paris", "kind": "capital"},
            {"question": "2+2等于几？", "answer": "4", "kind": "add"}]
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    preds = answer_questions(model, tokenizer, [r["question"] for r in rows], max_new_tokens=6, batch_size=2)
    assert preds == [generate_alone(model, tokenizer, r["question"], 6) for r in rows]
    result = evaluate(model, tokenizer, path, max_new_tokens=6)
    assert [r["prediction"] for r in result["rows"]] == preds
    assert [r["correct"] for r in result["rows"]] == [check_answer(p, r["answer"]) for p, r in zip(preds, rows)]
    assert result["total"] == 3 and set(result["by_kind"]) == {"add", "capital"} and result["by_kind"]["add"][1] == 2
    only = evaluate(model, tokenizer, path, kinds=["capital"], max_new_tokens=6)
    assert only["total"] == 1 and only["rows"][0]["question"] == rows[1]["question"]


def test_evaluate_names_file_and_line_of_a_bad_row(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text('{"question": "q", "answer": "a", "kind": "k"}\n{"question": "q"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"eval\.jsonl:2"):
        evaluate(None, None, path)


def test_bench_answers_at_toy_size(tmp_path, capsys):
    """bench/bench_answers.py: the engine and the left-padded generate() batches it replaced give the same answers."""
    from bench import bench_answers
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps({"question": q, "answer": "x", "kind": "k"}, ensure_ascii=False) + "\n"
                            for q in ["你好", "1+1等于几？", "What is the capital of France?", "hi", "猫和狗"]),
                    encoding="utf-8")
    _, answers = bench_answers.main(["--eval_path", str(path), "--hidden_size", "64", "--num_hidden_layers", "2",
                                     "--max_new_tokens", "4", "--batch_sizes", "2,3", "--repeats", "1"])
    first, *others = answers.values()
    assert len(answers) == 3 and len(first) == 5 and all(a == first for a in others)
    assert "| engine, max_batch 3 |" in capsys.readouterr().out
