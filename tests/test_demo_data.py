"""dataset/demo_data.py: deterministic files in the original jsonl formats, held-out eval questions that are
really held out, answers that dataset.scoring.check_answer accepts (and wrong ones it rejects), and a fast small
scale. The scorer's own rules are tested in test_scoring.py."""
import json
import re
import time
from pathlib import Path

import pytest

from dataset import demo_data as dd
from dataset.scoring import check_answer

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["pretrain", "sft", "dpo", "rlaif", "rlaif_units", "r1", "lora_identity", "lora_domain", "eval",
         "rlaif_units_eval", "agent_rl"]
R1_FORMAT = re.compile(r"<think>\n(.+)\n</think>\n<answer>\n(.+)\n</answer>", re.S)


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """The full-size corpus (under a second), as {name: records}."""
    paths = dd.write_demo_data(tmp_path_factory.mktemp("demo"))
    return {name: read(path) for name, path in paths.items()}


def training_text(data: dict) -> str:
    """Every string a training stage sees, joined (the eval files excluded)."""
    parts = []
    for name, rows in data.items():
        for row in rows:
            if not name.endswith("eval"):
                parts.append(json.dumps(row, ensure_ascii=False))
                parts += [m["content"] for k in ("conversations", "chosen", "rejected") for m in row.get(k, [])]
                parts.append(row.get("text", ""))
    return "\n".join(parts)


def test_deterministic_and_seeded(tmp_path):
    a = dd.write_demo_data(tmp_path / "a", seed=0, scale=0.05)
    b = dd.write_demo_data(tmp_path / "b", seed=0, scale=0.05)
    c = dd.write_demo_data(tmp_path / "c", seed=1, scale=0.05)
    assert sorted(a) == sorted(NAMES)
    assert all(a[n].read_bytes() == b[n].read_bytes() for n in NAMES)
    assert a["sft"].read_bytes() != c["sft"].read_bytes()


def test_small_scale_is_fast_and_small(tmp_path):
    t0 = time.perf_counter()
    paths = dd.write_demo_data(tmp_path, scale=0.05)
    assert time.perf_counter() - t0 < 2.0
    assert all(4 <= len(read(p)) <= 260 for p in paths.values())


def test_sizes_at_full_scale(full):
    for name, size in dd.SIZES.items():
        assert len(full[name]) == size
    assert 100 <= len(full["eval"]) <= 200


def test_cli_writes_out_dir(tmp_path):
    paths = dd.main(["--out_dir", str(tmp_path / "demo"), "--scale", "0.02"])
    assert {p.name for p in (tmp_path / "demo").iterdir()} == {f"{n}.jsonl" for n in NAMES}
    assert paths["eval"] == tmp_path / "demo" / "eval.jsonl"


def test_pretrain_format(full):
    for row in full["pretrain"]:
        assert list(row) == ["text"]
        segments = row["text"].split(" <|im_start|>")
        assert all(s.startswith("<|im_start|>") or i > 0 for i, s in enumerate(segments))
        assert re.fullmatch(r"(<\|im_start\|>[^<]*?<\|im_end\|>)( <\|im_start\|>[^<]*?<\|im_end\|>)*", row["text"])
        assert all(len(s) < 512 for s in segments)


def check_conversation(conv: list[dict]):
    """Roles in SFT order: optional leading system, then user/assistant turns, tool results after tool calls."""
    roles = [m["role"] for m in conv]
    assert "system" not in roles[1:]
    body = roles[1:] if roles[0] == "system" else roles
    assert body[0] == "user" and body[-1] == "assistant"
    for prev, cur in zip(body, body[1:]):
        assert (prev, cur) in {("user", "assistant"), ("assistant", "user"), ("assistant", "tool"),
                               ("tool", "assistant")}
    for m in conv:
        assert isinstance(m["content"], str)
        assert m["content"] or m.get("tool_calls")


def test_sft_format(full):
    n_system = n_multi = n_tools = 0
    for row in full["sft"]:
        conv = row["conversations"]
        check_conversation(conv)
        n_system += conv[0]["role"] == "system"
        n_multi += sum(m["role"] == "user" for m in conv) > 1
        if conv[0].get("functions"):
            n_tools += 1
            for m in conv:
                for call in m.get("tool_calls", []):
                    assert call["function"]["name"] in {t["function"]["name"] for t in conv[0]["functions"]}
                    json.loads(call["function"]["arguments"])
    assert n_system > 300 and n_multi > 200 and n_tools > 50


def test_sft_renders_with_shipped_template(full):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(ROOT / "model")
    for row in full["sft"][:300]:
        conv = row["conversations"]
        tools = conv[0]["functions"] if conv[0]["role"] == "system" and conv[0].get("functions") else None
        text = tok.apply_chat_template(conv, tokenize=False, tools=tools)
        assert text.count("<|im_start|>assistant\n") == sum(m["role"] == "assistant" for m in conv)
        if tools:
            assert "<tool_call>\n{\"name\": " in text and "<tool_response>" in text or "# Tools" in text


def test_dpo_format(full):
    for row in full["dpo"]:
        chosen, rejected = row["chosen"], row["rejected"]
        assert [m["role"] for m in chosen] == [m["role"] for m in rejected] == ["user", "assistant"]
        assert chosen[0]["content"] == rejected[0]["content"]
        assert chosen[1]["content"] != rejected[1]["content"]


def test_rlaif_format(full):
    for row in full["rlaif"]:
        conv = row["conversations"]
        assert [m["role"] for m in conv] == ["user", "assistant"] and conv[-1]["content"] == "无"
        assert isinstance(row["answer"], str) and row["answer"]


def test_rlaif_units_train_and_held_out_prompts(full):
    """rlaif_units.jsonl: unit conversions on training pairs in training phrasings; rlaif_units_eval.jsonl:
    every held-out pair in every phrasing, none of them in any training file, answers = number x factor."""
    asked = {}   # every unit question the generator can ask -> (unit, number, held-out phrasing); the first wins
    for i in range(len(dd.UNITS)):
        for v in range(1, 13):
            for lang in ("zh", "en"):
                for k, t in enumerate(dd.UNIT_QUESTIONS[lang]):
                    asked.setdefault(dd.unit_qa(i, v, lang, t)["q"], (i, v, k == len(dd.UNIT_QUESTIONS[lang]) - 1))

    def pair(q):
        if q not in asked:
            raise AssertionError(q)
        return asked[q]
    for row in full["rlaif_units"]:
        i, v, held_template = pair(row["conversations"][0]["content"])
        assert not dd.held_out(f"unit:{i}:{v}", 8) and not held_template
        assert row["answer"] == str(v * dd.UNITS[i][4])
    evals = full["rlaif_units_eval"]
    assert len(evals) == len({r["question"] for r in evals}) == 96
    train = training_text(full)

    def unseen(text):
        r"""No occurrence of text in training that does not follow a digit ("1千克" is not "11千克"): what
        re.search(r"(?<!\d)" + re.escape(text), train) finds, with str.find (the regex takes 0.1 s a search)."""
        at = train.find(text)
        while at != -1:
            if at == 0 or not train[at - 1].isdecimal():
                return False
            at = train.find(text, at + 1)
        return True
    for row in evals:
        i, v, _ = pair(row["question"])
        assert dd.held_out(f"unit:{i}:{v}", 8) and row["answer"] == str(v * dd.UNITS[i][4])
        assert list(row) == ["question", "answer", "kind"] and unseen(row["question"])
        # the pair's answer sentence never appears in training either ("6周等于42天。", "6 weeks is 42 days.")
        for lang in ("zh", "en"):
            assert unseen(dd.unit_qa(i, v, lang, dd.UNIT_QUESTIONS[lang][0])["a"])
    sft_questions = {without_opening(m["content"]) for r in full["sft"] for m in r["conversations"] if m["role"] == "user"}
    taught = sum(without_opening(r["conversations"][0]["content"]) in sft_questions for r in full["rlaif_units"])
    assert taught > 100  # SFT taught it


def test_r1_format(full):
    for row in full["r1"]:
        conv = row["conversations"]
        assert [m["role"] for m in conv] == ["user", "assistant"]
        assert R1_FORMAT.fullmatch(conv[1]["content"])


def test_lora_files(full):
    for name in ("lora_identity", "lora_domain"):
        for row in full[name]:
            assert [m["role"] for m in row["conversations"]] == ["user", "assistant"]
    identity_answers = {a for lang in dd.IDENTITY for _, answers in dd.IDENTITY[lang] for a in answers}
    answers = [row["conversations"][1]["content"] for row in full["lora_identity"]]
    assert set(answers) <= identity_answers and sum("MiniMind" in a for a in answers) > len(answers) / 2
    questions = [row["conversations"][0]["content"] for row in full["lora_identity"]]
    assert {"zh" if re.search(r"[\u4e00-\u9fff]", q) else "en" for q in questions} == {"zh", "en"}
    dishes = [r["zh"]["d"] for r in dd.DISHES] + [r["en"]["d"] for r in dd.DISHES]
    pretrain_and_sft = training_text({"pretrain": full["pretrain"], "sft": full["sft"]})
    assert not any(d in pretrain_and_sft for d in dishes)  # the LoRA domain is new knowledge


def template_pattern(template: str) -> str:
    """A regex matching the template with any filling of its {fields}. A field at either end is a lookaround for
    one character (the same matches: a leading ".+?" made every search quadratic in the line length)."""
    pattern = re.sub(r"\\\{\w+\\\}", ".+?", re.escape(template)).replace("\\ ", " ")
    if pattern.startswith(".+?"):
        pattern = "(?<=.)" + pattern[3:]
    if pattern.endswith(".+?"):
        pattern = pattern[:-3] + "(?=.)"
    return pattern


def without_opening(q: str) -> str:
    """q without a leading dataset.demo_data.ask opening, first letter lower-cased."""
    for lang in ("zh", "en"):
        for p in dd.ASK_PREFIXES[lang]:
            if q.startswith(p):
                q = q[len(p):]
    return q[:1].lower() + q[1:]


def test_eval_format_and_mix(full):
    kinds = {row["kind"] for row in full["eval"]}
    for row in full["eval"]:
        assert list(row) == ["question", "answer", "kind"]
        assert row["question"] and row["answer"]
    assert {"add", "sub", "mul", "capital", "identity", "sort", "unit"} <= kinds
    assert len({row["question"] for row in full["eval"]}) == len(full["eval"])


def test_eval_questions_are_held_out(full):
    train = training_text(full)
    leaked = [row["question"] for row in full["eval"] if row["question"] in train]
    assert leaked == []


def test_held_out_phrasings_never_in_training(full):
    """The held-out question template of every fact kind matches no training text, whatever fills it and
    whatever opening (dataset.demo_data.ask) comes before it; the training templates do occur."""
    train = training_text(full)
    for kind, (_, _, questions, _) in dd.KINDS.items():
        for lang in ("zh", "en"):
            *taught, held = questions[lang]
            assert not re.search(template_pattern(held), train, flags=re.I), (kind, lang, held)
            assert all(re.search(template_pattern(t), train, flags=re.I) for t in taught), (kind, lang)


def test_more_questions_are_taught(full):
    """Every extra phrasing of a fact question (MORE_QUESTIONS) is asked in SFT; the held-out ones never are
    (test_held_out_phrasings_never_in_training)."""
    sft = training_text({"sft": full["sft"]})
    assert set(dd.MORE_QUESTIONS) == set(dd.KINDS)
    for kind, by_lang in dd.MORE_QUESTIONS.items():
        for lang, templates in by_lang.items():
            for t in templates:
                assert re.search(template_pattern(t), sft, flags=re.I), (kind, t)


def test_no_training_question_is_part_of_a_held_out_one(full):
    """No SFT question (without its opening) lies inside a held-out fact question: "Capital of Spain?" in
    training would make "Do you know the name of the capital of Spain?" partly seen (it once did)."""
    asked = {without_opening(m["content"]).lower() for row in full["sft"] for m in row["conversations"]
             if m["role"] == "user"}
    for row in full["eval"]:
        if row["kind"] in dd.KINDS:
            q = row["question"].lower()
            assert not [t for t in asked if len(t) >= 6 and t in q], row["question"]


def test_sft_questions_vary_their_opening(full):
    """About a third of SFT questions start with one of the openings people use ("请问", "Quick question: ")."""
    firsts = [m["content"] for row in full["sft"] for m in row["conversations"] if m["role"] == "user"][:2000]
    opened = [q for q in firsts if any(q.startswith(p) for lang in ("zh", "en") for p in dd.ASK_PREFIXES[lang])]
    assert 0.2 < len(opened) / len(firsts) < 0.45


def test_held_out_arithmetic_never_in_training(full):
    train = training_text(full)
    # every "a op b" in the training text not inside a longer expression, overlapping ones too, in one pass
    found = set(re.findall(r"(?=(?<![\d+\-×*])(\d+)\s*([+\-×*])\s*(\d+)(?![\d+\-×*]))", train))
    sym = {"add": "+", "sub": "-", "mul": "×*"}
    for row in full["eval"]:
        if row["kind"] in sym:
            a, b = re.findall(r"\d+", row["question"])[:2]
            assert dd.held_out(f"{row['kind']}:{a}:{b}")
            assert not [op for op in sym[row["kind"]] if (a, op, b) in found], row["question"]


def test_eval_facts_are_taught(full):
    """Every held-out fact answer is in pretrain, and its question kind is trained with other phrasings."""
    pretrain = "\n".join(r["text"] for r in full["pretrain"])
    sft = training_text({"sft": full["sft"]})
    for row in full["eval"]:
        if row["kind"] in dd.KINDS and not row["answer"].isdigit():
            assert row["answer"] in pretrain, row
            assert row["answer"] in sft, row


def test_eval_answers_checkable_against_reference_sentences():
    """The answer sentence our data teaches passes check_answer for every kind; a wrong one fails."""
    import random
    rng = random.Random(0)
    makers = [dd.qa_arith, dd.qa_multi, dd.qa_compare, dd.qa_sort, dd.qa_unit, dd.qa_identity, dd.qa_fact]
    for _ in range(400):
        for lang in ("zh", "en"):
            for make in makers:
                for heldout in (False, True) if make is not dd.qa_identity else (True,):  # eval asks the name only
                    qa = make(rng, lang, heldout=heldout)
                    assert check_answer(qa["a"], qa["key"]), qa
                    if make is not dd.qa_identity:
                        assert not check_answer(dd.wrong_answer(rng, qa, lang), qa["key"]), qa


def test_no_answer_passes_for_another():
    """Within a kind, no answer is accepted for another ("1月" must not pass as a right "11月")."""
    for kinds in (dd.KINDS, dd.DOMAIN_KINDS):
        for kind, (table, field, _, _) in kinds.items():
            for lang in ("zh", "en"):
                keys = sorted({str(r[lang][field]) for r in dd.TABLES[table]})
                clashes = [(a, b) for a in keys for b in keys if a != b and check_answer(b, a)]
                assert clashes == [], (kind, lang)


def test_rlaif_answers_match_their_questions(full):
    sft_answers = {}
    for row in full["sft"]:
        conv = row["conversations"]
        for q, a in zip(conv, conv[1:]):
            if q["role"] == "user" and a["role"] == "assistant":
                sft_answers[q["content"]] = a["content"]
    matched = 0
    for row in full["rlaif"]:
        q = row["conversations"][0]["content"]
        if q in sft_answers:
            matched += 1
            assert check_answer(sft_answers[q], row["answer"]), (q, sft_answers[q], row["answer"])
    assert matched > 50   # SFT rewords many questions (MORE_QUESTIONS), so only some are asked word for word
