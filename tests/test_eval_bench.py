"""scripts/eval_bench.py: C-Eval/CMMLU layouts, prompts, letter scoring proven on models whose answer is
known, the table, native and transformers-folder loading, and lm-evaluation-harness on an exported folder."""
import csv
import json
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer

from scripts.eval_bench import (LETTERS, find_subjects, format_table, letter_ids, main, question_prompt, read_questions,
                                score_choices)
from tests.conftest import tokenizer_dir
from tests.test_convert import convert, make_weight

COLUMNS = ["id", "question", "A", "B", "C", "D", "answer"]


def write_csv(path, rows, columns=COLUMNS):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        w.writerows(rows)


def question(i, answer):
    return [i, f"第{i}题：1+{i}等于几？", str(i + 1), str(i + 2), str(i + 3), str(i + 4), answer]


@pytest.fixture
def ceval(tmp_path):
    """C-Eval layout: two subjects, val and dev splits in subfolders."""
    root = tmp_path / "ceval"
    answers = {"computer_network": "ABCD", "high_school_physics": "BBAC"}
    for subject, letters in answers.items():
        write_csv(root / "val" / f"{subject}_val.csv", [question(i, a) for i, a in enumerate(letters)])
        write_csv(root / "dev" / f"{subject}_dev.csv", [question(10 + i, a) for i, a in enumerate("DCBAD")])
    return root


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(tokenizer_dir()), local_files_only=True)


class FavourLetter(torch.nn.Module):
    """A stand-in LM whose next-token logits always rank `letter` first among A/B/C/D (all else random)."""

    def __init__(self, tokenizer, letter):
        super().__init__()
        self.boost = letter_ids(tokenizer)[LETTERS.index(letter)]

    def forward(self, input_ids, logits_to_keep=0, **_):
        logits = torch.randn(input_ids.shape[0], 1, 6400)
        logits[..., self.boost] = 100.0
        return SimpleNamespace(logits=logits)


class Oracle(torch.nn.Module):
    """Reads the question number from the prompt and picks the letter it was told; proves the mapping
    from prompt to question to letter (and that the answer is not leaked into the prompt)."""

    def __init__(self, tokenizer, answers):
        super().__init__()
        self.tokenizer, self.answers, self.ids = tokenizer, answers, letter_ids(tokenizer)

    def forward(self, input_ids, logits_to_keep=0, **_):
        text = self.tokenizer.decode(input_ids[0])
        last = text.rsplit("第", 1)[1].split("题", 1)[0]
        logits = torch.zeros(1, 1, 6400)
        logits[..., self.ids[LETTERS.index(self.answers[int(last)])]] = 1.0
        return SimpleNamespace(logits=logits)


def test_find_subjects_both_layouts(ceval, tmp_path):
    assert list(find_subjects(ceval, "val")) == ["computer_network", "high_school_physics"]
    assert list(find_subjects(ceval, "dev")) == ["computer_network", "high_school_physics"]
    cmmlu = tmp_path / "cmmlu"
    write_csv(cmmlu / "test" / "agronomy.csv", [["0", "q", "1", "2", "3", "4", "C"]],
              ["", "Question", "A", "B", "C", "D", "Answer"])
    assert list(find_subjects(cmmlu, "test")) == ["agronomy"]
    assert read_questions(cmmlu / "test" / "agronomy.csv") == [
        {"question": "q", "A": "1", "B": "2", "C": "3", "D": "4", "answer": "C"}]


def test_bad_rows_are_errors_naming_file_and_line(tmp_path):
    write_csv(tmp_path / "x_val.csv", [question(0, "A"), question(1, "E")])
    with pytest.raises(ValueError, match=r"x_val.csv:3: answer 'E'"):
        read_questions(tmp_path / "x_val.csv")
    write_csv(tmp_path / "y_val.csv", [["0", "q", "1"]], ["id", "question", "A"])
    with pytest.raises(ValueError, match=r"y_val.csv: missing column"):
        read_questions(tmp_path / "y_val.csv")


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "plain"])
def test_scoring_with_known_answers(ceval, tok, chat):
    subjects = {s: read_questions(p) for s, p in find_subjects(ceval, "val").items()}
    only_b = {"all_b": [dict(q, answer="B") for q in subjects["computer_network"]]}
    assert score_choices(FavourLetter(tok, "B"), tok, only_b, chat=chat)["_overall"]["acc"] == 1.0
    assert score_choices(FavourLetter(tok, "A"), tok, only_b, chat=chat)["_overall"]["acc"] == 0.0
    res = score_choices(FavourLetter(tok, "B"), tok, subjects, chat=chat)        # answers ABCD and BBAC
    assert res["computer_network"]["correct"] == 1 and res["high_school_physics"]["correct"] == 2
    assert res["_overall"] == {"n": 8, "correct": 3, "acc": 3 / 8} and res["_average"]["acc"] == (0.25 + 0.5) / 2
    answers = {i: a for i, a in enumerate("ABCD")}
    assert score_choices(Oracle(tok, answers), tok, {"computer_network": subjects["computer_network"]},
                    chat=chat)["_overall"]["acc"] == 1.0


def test_prompts(ceval, tok):
    q = read_questions(ceval / "val" / "computer_network_val.csv")[1]
    shots = read_questions(ceval / "dev" / "computer_network_dev.csv")[:2]
    plain = question_prompt(tok, "computer_network", q, shots, chat=False)
    assert plain.startswith("以下是中国关于computer network考试的单项选择题，请选出其中的正确答案。\n\n第10题")
    assert plain.endswith("第1题：1+1等于几？\nA. 2\nB. 3\nC. 4\nD. 5\n答案：") and "答案：D\n\n第11题" in plain
    chat = question_prompt(tok, "computer_network", q, shots, chat=True)
    assert chat.endswith("D. 5\n答案：<|im_end|>\n<|im_start|>assistant\n")
    assert "<|im_start|>assistant\nD<|im_end|>" in chat and chat.count("<|im_start|>user") == 3
    ids = tok(chat, add_special_tokens=False)["input_ids"]
    assert tok(chat + "B", add_special_tokens=False)["input_ids"] == ids + [letter_ids(tok)[1]]


def test_main_native_and_transformers_folder(ceval, tmp_path, capsys):
    weight = make_weight(tmp_path / "out", name="full_sft")
    flags = ["--data_dir", ceval, "--save_dir", tmp_path / "out", "--weight", "full_sft", "--hidden_size", 64,
             "--load_from", tokenizer_dir(), "--device", "cpu", "--num_fewshot", 2]
    native = main(list(map(str, flags)))
    out = capsys.readouterr().out
    assert "computer_network" in out and "overall (micro)" in out and "2-shot, chat prompt" in out
    assert native["_overall"]["n"] == 8 and 0 <= native["_overall"]["acc"] <= 1
    folder = convert("--torch_path", weight, "--to", "minimind", "--dtype", "float32", "--out", tmp_path / "hf")
    hf = main(list(map(str, ["--data_dir", ceval, "--load_from", folder, "--device", "cpu", "--num_fewshot", 2])))
    assert hf == native                                     # same model, same predictions
    table = format_table(native)
    assert table.splitlines()[0].split() == ["subject", "n", "correct", "acc"]


def test_missing_data_and_weights_are_clear_errors(ceval, tmp_path):
    with pytest.raises(FileNotFoundError, match="no \\*_test.csv"):
        main(["--data_dir", str(ceval), "--split", "test"])
    with pytest.raises(FileNotFoundError, match="full_sft_512.pth"):
        main(["--data_dir", str(ceval), "--save_dir", str(tmp_path), "--load_from", str(tokenizer_dir())])


# ---- lm-evaluation-harness on an exported MiniMind folder ----
TASK = textwrap.dedent("""
    task: minimind_tiny_mc
    dataset_path: json
    dataset_kwargs:
      data_files:
        test: {data}
    test_split: test
    output_type: multiple_choice
    doc_to_text: "{{{{question}}}}\\n答案："
    doc_to_choice: "{{{{choices}}}}"
    doc_to_target: "{{{{label}}}}"
    metric_list:
      - metric: acc
        aggregation: mean
        higher_is_better: true
""")


@pytest.mark.slow
def test_lm_eval_harness_offline_on_exported_folder(tmp_path):
    """`lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True` on a local task, fully offline;
    its per-choice log-likelihoods equal ours and so does its accuracy."""
    pytest.importorskip("lm_eval")
    weight = make_weight(tmp_path / "out")
    folder = convert("--torch_path", weight, "--to", "minimind", "--dtype", "float32", "--out", tmp_path / "hf")
    docs = [{"question": f"{a}+{b}等于几？", "choices": [str(a + b), str(a + b + 1), str(a - b), "不知道"], "label": i % 4}
            for i, (a, b) in enumerate([(1, 2), (3, 4), (5, 1), (2, 2), (7, 3), (6, 6)])]
    data = tmp_path / "tasks" / "tiny.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    (tmp_path / "tasks" / "tiny.yaml").write_text(TASK.format(data=data), encoding="utf-8")
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf_home"), HF_MODULES_CACHE=str(tmp_path / "hf_modules"))
    env.pop("PYTHONPATH", None)
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
           f"pretrained={folder},trust_remote_code=True,dtype=float32", "--tasks", "minimind_tiny_mc",
           "--include_path", str(tmp_path / "tasks"), "--device", "cpu", "--batch_size", "1",
           "--output_path", str(tmp_path / "results"), "--log_samples"]
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    results = json.loads(next((tmp_path / "results").rglob("results_*.json")).read_text())
    theirs_acc = results["results"]["minimind_tiny_mc"]["acc,none"]
    samples = [json.loads(line) for line in next((tmp_path / "results").rglob("samples_*.jsonl")).open()]

    from model.loading import load_native
    model = load_native(weight)
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    correct = 0
    for doc in docs:
        context = tok(doc["question"] + "\n答案：", add_special_tokens=False)["input_ids"]
        scores = []
        for choice in doc["choices"]:
            cont = tok(doc["question"] + "\n答案： " + choice, add_special_tokens=False)["input_ids"][len(context):]
            ids = torch.tensor([context + cont])
            with torch.no_grad():
                logp = model(ids).logits[0, :-1].float().log_softmax(-1)
            scores.append(sum(logp[len(context) - 1 + j, t].item() for j, t in enumerate(cont)))
        sample = next(s for s in samples if s["doc"]["question"] == doc["question"])
        theirs = [r[0] for r in sample["filtered_resps"]]
        assert max(abs(a - float(b)) for a, b in zip(scores, theirs)) <= 1e-4
        correct += int(max(range(4), key=scores.__getitem__) == doc["label"])
    assert theirs_acc == pytest.approx(correct / len(docs))


# ---- scripts/eval_rope.py ----
def test_eval_rope_table_plot_and_perplexity_definition(tmp_path, capsys):
    from scripts.eval_rope import main as rope_main, perplexity, read_text
    from tests.conftest import write_tiny_corpus
    corpus = write_tiny_corpus(tmp_path / "data", n=200)["pretrain"]
    out = tmp_path / "rope.png"
    rows = rope_main(list(map(str, ["--weight", "none", "--hidden_size", 64, "--num_hidden_layers", 2,
                                    "--text_path", corpus, "--lengths", "64,32", "--num_windows", 2,
                                    "--tokenizer_path", tokenizer_dir(), "--out", out, "--device", "cpu"])))
    assert [r["length"] for r in rows] == [32, 64] and out.read_bytes()[:4] == b"\x89PNG"
    assert all(r["rope"] > 1 and r["yarn"] > 1 and r["rope"] != r["yarn"] for r in rows)   # YaRN changes the tables
    assert "ppl RoPE" in capsys.readouterr().out
    # perplexity = exp(the model's own shifted next-token loss) for a single window
    from model.model_minimind import MiniMindForCausalLM
    from tests.conftest import tiny_config
    torch.manual_seed(0)
    model = MiniMindForCausalLM(tiny_config()).eval()
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir()), local_files_only=True)
    tokens = torch.tensor(tok(read_text(corpus), add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        loss = model(tokens[None, :48], labels=tokens[None, :48]).loss
    assert perplexity(model, tokens, 48, 1) == pytest.approx(torch.exp(loss).item(), rel=1e-5)
