"""eval_llm.py and the shared inference helpers: loading by what a path is, piped stdin, LoRA,
transformers folders, clear errors, greedy determinism, Ctrl-C in a terminal (pty), the bilingual menu, the
one-shot answer cap, and the <think>/<tool_call> parser."""
import argparse
import dataclasses
import functools
import io
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import eval_llm
from model.chat_format import OutputParser, build_prompt, parse_output
from model.cli import add_model_args
from model.loading import load_model, load_native, load_tokenizer
from model.weights import LoadError, save_weights, weight_path
from tests.conftest import ROOT, tiny_config, tokenizer_dir

QUESTIONS = ["你好", "1+1等于几？"]


@functools.lru_cache
def talkative_seed() -> int:
    """A seed whose random tiny model answers the test questions with visible, different text (a random
    model often emits only whitespace, which is stripped, and would make equality checks vacuous)."""
    from model.model_minimind import MiniMindForCausalLM
    tokenizer = load_tokenizer(tokenizer_dir())
    for seed in range(100):
        torch.manual_seed(seed)
        model = MiniMindForCausalLM(tiny_config()).eval()
        model.half().float()  # what saving in fp16 does to the weights
        found = [greedy_answers(model, tokenizer, QUESTIONS, max_new_tokens=6, repetition_penalty=p)
                 for p in (1.0, 1.1)]
        if all(a and b and a != b for a, b in found):
            return seed
    raise AssertionError("no tiny model in 100 seeds says anything visible")


def shared_talkative_seed() -> int:
    # pytest imports this file as `test_inference` and the other test files import `tests.test_inference`:
    # always asking the latter runs the search once per session
    from tests.test_inference import talkative_seed as cached
    return cached()


def save_tiny(directory, name="full_sft", seed=None, **overrides):
    torch.manual_seed(shared_talkative_seed() if seed is None else seed)
    from model.model_minimind import MiniMindForCausalLM
    cfg = tiny_config(**overrides)
    return save_weights(MiniMindForCausalLM(cfg), weight_path(directory, name, cfg), cfg)


def greedy_answers(model, tokenizer, questions, max_new_tokens=8, repetition_penalty=1.1, history=0):
    """What eval_llm should print for `questions` (greedy), computed directly with generate()."""
    answers, conversation = [], []
    for q in questions:
        conversation = (conversation[-history:] if history else []) + [{"role": "user", "content": q}]
        ids = tokenizer(build_prompt(tokenizer, conversation), return_tensors="pt").input_ids
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, repetition_penalty=repetition_penalty,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        raw = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        conversation.append({"role": "assistant", "content": raw})
        answers.append(parse_output(raw)["content"].replace("\\", "\\\\").replace("\r", "\\r").replace("\n", "\\n"))
    return answers


def run_main(monkeypatch, capsys, argv, stdin="\n".join(QUESTIONS) + "\n"):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    eval_llm.main([*argv, "--tokenizer_path", str(tokenizer_dir()), "--device", "cpu"])
    return capsys.readouterr().out.splitlines()


def parse(argv):
    return add_model_args(argparse.ArgumentParser()).parse_args(argv)


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    """The talkative tiny model saved once per module (out/full_sft_64.pth + .json), and the tokenizer."""
    return save_tiny(tmp_path_factory.mktemp("native") / "out"), load_tokenizer(tokenizer_dir())


@pytest.fixture
def native(tmp_path, saved_tiny):
    """(weight path, model, tokenizer): a copy of the saved model in this test's own tmp_path/out (tests add
    files beside it), loaded afresh (tests change the model)."""
    saved, tokenizer = saved_tiny
    shutil.copytree(saved.parent, tmp_path / "out")
    path = tmp_path / "out" / saved.name
    return path, load_native(path).eval(), tokenizer


def test_piped_stdin_from_another_cwd_prints_one_line_per_answer(native, tmp_path):
    path, model, tokenizer = native
    proc = subprocess.run(
        [sys.executable, str(ROOT / "eval_llm.py"), "--save_dir", str(path.parent), "--tokenizer_path",
         str(tokenizer_dir()), "--temperature", "0", "--max_new_tokens", "8", "--device", "cpu"],
        input="你好\n\n1+1等于几？\n", capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    expected = greedy_answers(model, tokenizer, QUESTIONS)
    assert proc.stdout.splitlines() == expected and all(expected)  # the empty input line is skipped
    assert "full_sft_64.pth" in proc.stderr  # the default 512 file is absent; the only full_sft weight is used


def test_piped_questions_are_answered_together_in_input_order(tmp_path, monkeypatch, capsys):
    """Piped questions (--historys 0) are in the engine together; each answer is the one it gets alone, printed
    in input order, one line each; a question too long for the context is an error line and an empty answer."""
    path = save_tiny(tmp_path / "out", max_position_embeddings=48)
    model, tokenizer = load_native(path).eval(), load_tokenizer(tokenizer_dir())
    running = []

    class Recording(eval_llm.Engine):   # at each submit: how many earlier answers are still running
        def submit(self, *args, **kwargs):
            running.append(sum(not r.done for r in self.submitted))
            self.submitted.append(super().submit(*args, **kwargs))
            return self.submitted[-1]

    Recording.submitted = []
    monkeypatch.setattr(eval_llm, "Engine", Recording)
    good = [*QUESTIONS, "为什么天空是蓝色的", "hello", "推荐一些中国的美食"]
    asked = good[:1] + ["很长的问题" * 20] + good[1:]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(asked) + "\n"))
    eval_llm.main(["--save_dir", str(path.parent), "--tokenizer_path", str(tokenizer_dir()), "--device", "cpu",
                   "--temperature", "0", "--max_new_tokens", "8"])
    out, err = capsys.readouterr()
    expected = greedy_answers(model, tokenizer, good)
    assert out.splitlines() == expected[:1] + [""] + expected[1:] and all(expected)
    assert "the prompt has" in err and "lower --historys" in err and max(running) >= 2


def test_transformers_folder_gives_the_same_answers(native, tmp_path, monkeypatch, capsys):
    path, model, tokenizer = native
    folder = tmp_path / "exported"  # no "model" in the name: the loader looks at config.json, not at the name
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = run_main(monkeypatch, capsys, ["--load_from", str(folder), "--temperature", "0", "--max_new_tokens", "8"])
    assert out == greedy_answers(model, tokenizer, QUESTIONS)


def test_lora_is_loaded_and_changes_the_answers(native, tmp_path, monkeypatch, capsys):
    from model.model_lora import apply_lora, merge_lora, save_lora
    path, model, tokenizer = native
    apply_lora(model, rank=4)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora.B" in name:
            p.data.normal_(0, 0.5)
    save_lora(model, path.parent / "lora" / "lora_identity_64.pth")
    merge_lora(model)
    out = run_main(monkeypatch, capsys, ["--save_dir", str(path.parent), "--lora_weight", "lora_identity",
                                         "--temperature", "0", "--max_new_tokens", "8"])
    assert out == greedy_answers(model, tokenizer, QUESTIONS)
    base = run_main(monkeypatch, capsys, ["--save_dir", str(path.parent), "--temperature", "0", "--max_new_tokens", "8"])
    assert base != out


@pytest.mark.parametrize("weight, stage", [("full_sft", "train_full_sft.py"), ("dpo", "train_dpo.py")])
def test_missing_weight_is_one_line_naming_file_and_stage(tmp_path, monkeypatch, capsys, weight, stage):
    with pytest.raises(LoadError) as exc:
        run_main(monkeypatch, capsys, ["--save_dir", str(tmp_path), "--weight", weight])
    message = str(exc.value)  # one line, printed by model.cli.cli with exit code 2 (test_loading checks that)
    assert "\n" not in message and str(tmp_path / f"{weight}_512.pth") in message and stage in message


def test_missing_lora_names_file(native, monkeypatch, capsys):
    with pytest.raises(LoadError, match=r"lora/nope_64\.pth not found.*train_lora\.py"):
        run_main(monkeypatch, capsys, ["--save_dir", str(native[0].parent), "--lora_weight", "nope"])


def test_loading_is_decided_by_what_the_path_is(native, tmp_path):
    path, model, tokenizer = native
    tok_dir = tmp_path / "no_m0del_here"  # a tokenizer folder: native weights (the original needed 'model' in it)
    tokenizer.save_pretrained(tok_dir)
    m, _, desc = load_model(parse(["--load_from", str(tok_dir), "--save_dir", str(path.parent)]))
    assert desc.startswith("native weights") and m.config.hidden_size == 64
    hf = tmp_path / "model_like_name"  # has config.json: a transformers folder, whatever the name says
    model.save_pretrained(hf)
    tokenizer.save_pretrained(hf)
    assert load_model(parse(["--load_from", str(hf)]))[2].startswith("transformers folder")
    args = parse(["--load_from", str(path), "--tokenizer_path", str(tok_dir)])  # a .pth file itself
    assert load_model(args)[2] == f"native weights {path}" and args.weight == "full_sft"
    with pytest.raises(LoadError, match="no such file or folder"):
        load_model(parse(["--load_from", str(tmp_path / "missing")]))


def test_rope_scaling_flag_reaches_native_and_transformers_models(native, tmp_path):
    path, model, tokenizer = native
    model.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    yarn = [load_model(parse(["--load_from", str(src), "--inference_rope_scaling",
                              "--tokenizer_path", str(tokenizer_dir())]))[0] for src in (path, tmp_path / "hf")]
    assert all(m.config.rope_scaling["factor"] == 16 for m in yarn)
    assert torch.equal(yarn[0].model.freqs_cos, yarn[1].model.freqs_cos)
    assert not torch.equal(yarn[0].model.freqs_cos, model.model.freqs_cos)


def test_size_fallback_only_when_unambiguous_and_untyped(native, tmp_path):
    path = native[0]
    assert load_model(parse(["--save_dir", str(path.parent), "--tokenizer_path", str(tokenizer_dir())]))[0] \
        .config.num_attention_heads == 4  # config from the .json, not from the flags' defaults
    with pytest.raises(LoadError, match="full_sft_768.pth not found"):  # a typed size is never replaced
        load_model(parse(["--save_dir", str(path.parent), "--hidden_size", "768"]))
    save_tiny(path.parent, hidden_size=128)
    with pytest.raises(LoadError, match="several full_sft weights"):
        load_model(parse(["--save_dir", str(path.parent)]))


def test_relative_save_dir_is_resolved_against_cwd_first(native, tmp_path, monkeypatch):
    monkeypatch.chdir(native[0].parent.parent)
    desc = load_model(parse(["--save_dir", "out", "--tokenizer_path", str(tokenizer_dir())]))[2]
    assert str(native[0]) in desc


def test_greedy_is_deterministic_and_seed_fixes_sampling(native, monkeypatch, capsys):
    flags = ["--save_dir", str(native[0].parent), "--max_new_tokens", "8"]
    greedy = run_main(monkeypatch, capsys, flags + ["--temperature", "0"])
    assert greedy == run_main(monkeypatch, capsys, flags + ["--temperature", "0"])
    sampled = run_main(monkeypatch, capsys, flags + ["--seed", "7", "--temperature", "1.5"])
    assert sampled == run_main(monkeypatch, capsys, flags + ["--seed", "7", "--temperature", "1.5"])
    assert sampled != greedy


def test_history_sends_previous_turns(native, monkeypatch, capsys):
    path, model, tokenizer = native
    flags = ["--save_dir", str(path.parent), "--max_new_tokens", "6", "--temperature", "0"]
    out = run_main(monkeypatch, capsys, flags + ["--historys", "2"])
    assert out == greedy_answers(model, tokenizer, QUESTIONS, max_new_tokens=6, history=2)
    assert out[1] != run_main(monkeypatch, capsys, flags)[1]


def test_preset_mode_and_pretrain_prompt(native, monkeypatch, capsys):
    path, model, tokenizer = native
    out = run_main(monkeypatch, capsys, ["--save_dir", str(path.parent), "--mode", "0", "--max_new_tokens", "1"],
                   stdin="")
    assert len(out) == len(eval_llm.PRESET_QUESTIONS) == 8
    assert build_prompt(tokenizer, [{"role": "user", "content": "你好"}], raw=True) == "<|im_start|>你好"


class Pty:
    """A child process on a pseudo-terminal (stdin and stdout are ttys, as in a real chat)."""

    def __init__(self, argv, cwd):
        import pty
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, close_fds=True,
                                     env={**os.environ, "NO_COLOR": "1", "OMP_NUM_THREADS": "1"})
        os.close(slave)
        self.out = ""

    def read_until(self, text, start=0, timeout=120):
        """Read output until `text` appears after position `start`; returns the position after it."""
        import select
        deadline = time.time() + timeout
        while text not in self.out[start:]:
            assert time.time() < deadline and self.proc.poll() is None, f"waiting for {text!r}:\n{self.out[-2000:]}"
            if select.select([self.master], [], [], 0.05)[0]:
                try:
                    self.out += os.read(self.master, 65536).decode("utf-8", "replace")
                except OSError:   # the child closed the terminal
                    break
        return self.out.index(text, start) + len(text)

    def finish(self, timeout=60):
        """Wait for the exit (reading what is still written), then return the exit code."""
        import select
        deadline = time.time() + timeout
        while self.proc.poll() is None and time.time() < deadline:
            if select.select([self.master], [], [], 0.05)[0]:
                try:
                    self.out += os.read(self.master, 65536).decode("utf-8", "replace")
                except OSError:
                    break
        code = self.proc.wait(max(deadline - time.time(), 1))
        os.close(self.master)
        return code


def test_ctrl_c_stops_the_answer_and_a_second_one_quits_cleanly(native, tmp_path):
    """Issue 21 item 4: Ctrl-C while an answer streams ends that answer only (before: a KeyboardInterrupt
    traceback, then "terminate called without an active exception" / Aborted); Ctrl-C at the prompt quits."""
    path, model, tokenizer = native
    ids = tokenizer(build_prompt(tokenizer, [{"role": "user", "content": QUESTIONS[0]}]), return_tensors="pt").input_ids
    long = model.generate(ids, max_new_tokens=256, do_sample=False, pad_token_id=0, eos_token_id=None)[0, ids.shape[1]:]
    assert tokenizer.eos_token_id not in long.tolist()   # the greedy answer is still streaming when Ctrl-C comes
    chat = Pty([sys.executable, str(ROOT / "eval_llm.py"), "--save_dir", str(path.parent), "--tokenizer_path",
                str(tokenizer_dir()), "--device", "cpu", "--mode", "1", "--temperature", "0",
                "--repetition_penalty", "1.0"], cwd=tmp_path)
    at = chat.read_until("👶: ")
    os.write(chat.master, (QUESTIONS[0] + "\n").encode())
    at = chat.read_until("🤖️: ", at)
    chat.read_until(parse_output(tokenizer.decode(long, skip_special_tokens=True))["content"][:1], at)   # streaming
    os.kill(chat.proc.pid, signal.SIGINT)
    at = chat.read_until("stopped", at)
    at = chat.read_until("👶: ", at)                      # the chat goes on
    time.sleep(0.5)   # input() prints its prompt before it blocks: a signal in between waits for a key press
    os.kill(chat.proc.pid, signal.SIGINT)
    code = chat.finish()
    assert code in (0, 130), chat.out
    for bad in ("Traceback", "KeyboardInterrupt", "terminate called", "Aborted"):
        assert bad not in chat.out, chat.out


def test_chat_menu_is_bilingual_and_says_how_to_quit(monkeypatch, capsys):
    prompts = []
    monkeypatch.setattr("builtins.input", lambda text="": prompts.append(text) or "")
    args = eval_llm.build_parser().parse_args([])
    assert list(eval_llm.questions(args, interactive=True)) == []   # menu: chat; then an empty line quits
    menu = prompts[0]
    assert "自动测试" in menu and "preset questions" in menu and "手动输入" in menu and "empty line quits" in menu
    assert "empty line" in capsys.readouterr().out and prompts[1] == "👶: "


def test_one_shot_prompt_caps_the_answer_unless_typed(native, monkeypatch, capsys):
    seen = []

    class Recording(eval_llm.Engine):   # record the cap, generate 2 tokens
        def submit(self, ids, params, **kwargs):
            seen.append(params.max_tokens)
            return super().submit(ids, dataclasses.replace(params, max_tokens=2), **kwargs)

    monkeypatch.setattr(eval_llm, "Engine", Recording)
    base = ["--save_dir", str(native[0].parent), "--temperature", "0"]
    run_main(monkeypatch, capsys, base + ["--prompt", "你好"], stdin="")
    run_main(monkeypatch, capsys, base + ["--prompt", "你好", "--max_new_tokens", "3"], stdin="")
    run_main(monkeypatch, capsys, base, stdin="你好\n")
    assert seen == [eval_llm.ONE_SHOT_TOKENS, 3, 8192] and eval_llm.ONE_SHOT_TOKENS == 512


def test_cli_flags_keep_original_defaults():
    args = eval_llm.build_parser().parse_args([])
    assert (args.load_from, args.save_dir, args.weight, args.lora_weight, args.hidden_size, args.num_hidden_layers,
            args.use_moe, args.inference_rope_scaling, args.max_new_tokens, args.temperature, args.top_p,
            args.historys) == ("model", "out", "full_sft", "None", 512, 8, 0, False, 8192, 0.85, 0.85, 0)
    help_text = eval_llm.build_parser().format_help()
    assert "16x" in help_text and "4x" not in help_text


def test_printer_marks_reasoning_when_piped(capsys):
    printer = eval_llm.Printer(pretty=False, color=False)
    for kind, text in [("reasoning", "想\n一想"), ("content", "答案"), ("content", "\\n")]:
        printer.write(kind, text)
    printer.end()
    assert capsys.readouterr().out == "[think] 想\\n一想 [/think] 答案\\\\n\n"


R1 = "<think>\n先想一想。\n</think>\n<answer>\n天空是蓝色的。\n</answer>"
TOOL = 'ok\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>'


@pytest.mark.parametrize("text, tools, expected", [
    (R1, False, {"reasoning": "先想一想。", "content": "天空是蓝色的。", "tool_calls": []}),
    ("plain answer \n", False, {"reasoning": "", "content": "plain answer", "tool_calls": []}),
    ("<think>\nunfinished", False, {"reasoning": "unfinished", "content": "", "tool_calls": []}),
    ("a <thi b </answer>", False, {"reasoning": "", "content": "a <thi b </answer>", "tool_calls": []}),
    (TOOL, True, {"reasoning": "", "content": "ok",
                  "tool_calls": [{"name": "get_weather", "arguments": {"city": "北京"}}]}),
    (TOOL, False, {"reasoning": "", "content": TOOL, "tool_calls": []}),
    ("<tool_call>\nnot json\n</tool_call>", True,
     {"reasoning": "", "content": "<tool_call>\nnot json\n</tool_call>", "tool_calls": []}),
])
def test_output_parser_any_split_gives_the_same_events(text, tools, expected):
    assert parse_output(text, tools) == expected
    for size in (1, 2, 3, 5):
        parser, events = OutputParser(tools), []
        for i in range(0, len(text), size):
            events += parser.feed(text[i:i + size])
        events += parser.finish()
        assert "".join(t for k, t in events if k == "reasoning") == expected["reasoning"]
        assert "".join(t for k, t in events if k == "content") == expected["content"]
        assert [t for k, t in events if k == "tool_call"] == expected["tool_calls"]
