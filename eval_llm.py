"""Chat with a MiniMind model in the terminal: preset questions, a typed chat, or questions piped on stdin.

    python eval_llm.py                                    # out/full_sft_512.pth, asks [0] preset / [1] chat
    python eval_llm.py --weight reason --historys 2       # a reasoning model, keeping the last turn as context
    python eval_llm.py --load_from ../MiniMind2           # a transformers folder (scripts/convert_model.py)
    python eval_llm.py --model_family minimind3           # the original's minimind-3 out/full_sft_768.pth
    python eval_llm.py --model_family minimind3 --open_thinking 1   # ... thinking on (the template opens <think>)
    printf '你好\\n1+1等于几？\\n' | python eval_llm.py --temperature 0   # one answer line per question, greedy
    python eval_llm.py --save_dir out --weight full_sft --device cpu --prompt '你好'   # one-shot, at most 512 tokens

Native weights are `{save_dir}/{weight}_{hidden}[_moe].pth`; their `.json` config (written by every
training stage) makes the size flags unnecessary, and when no size flag is typed the one `{weight}_*.pth`
in --save_dir is used (model/loading.py, which also tells the family from the weight and picks the model's own
tokenizer and chat template). Ctrl-C during an answer stops that answer; at the prompt (or an empty line) it
ends the chat. `--weight pretrain` feeds `<|im_start|>` + the raw
text, without the chat template. `<think>` reasoning is shown dim on a terminal, and between
`[think]` and `[/think]` when the output is piped. --open_thinking 1 (the original's flag, default 0) renders the
prompt with the template's `open_thinking` switch: minimind-3's then ends in an open `<think>` block, so the
answer starts with reasoning; MiniMind2's template has no such switch (its reasoning weights open `<think>`).

When stdin or stdout is not a terminal the output is scriptable: exactly one line per answer (no
prefixes; a newline inside an answer is written as `\\n` and a backslash as `\\\\`), and the script
exits 0 at the end of the input. Answers come from the batching engine (model/engine.py): piped questions
and --prompt questions (with --historys 0) are answered up to 16 at a time, each exactly as it would be
alone, and printed in input order. --seed seeds every answer, so an answer is reproducible on its own.
Writes nothing.
"""
import argparse
import collections
import os
import queue
import random
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model.chat_format import OutputParser, build_prompt, opens_think  # noqa: E402
from model.engine import HF_TOP_K, Engine, PromptTooLong, SamplingParams  # noqa: E402
from model.cli import Typed, add_model_args, cli, was_typed  # noqa: E402
from model.loading import load_model  # noqa: E402

PRESET_QUESTIONS = ["你有什么特长？", "为什么天空是蓝色的", "请用Python写一个计算斐波那契数列的函数", '解释一下"光合作用"的基本过程',
                    "如果明天下雨，我应该如何出门", "比较一下猫和狗作为宠物的优缺点", "解释什么是机器学习", "推荐一些中国的美食"]
DIM, RESET = "\033[2m", "\033[0m"
MENU = "[0] 自动测试 / preset questions\n[1] 手动输入 / type your own (空行退出 / an empty line quits)\n"
CHAT_HINT = ("空行或 Ctrl-C 退出，回答中 Ctrl-C 只停止该回答 / "
             "An empty line or Ctrl-C quits; Ctrl-C during an answer stops it.")
ONE_SHOT_TOKENS = 512   # --prompt answers stop here unless --max_new_tokens is typed
PIPED_BATCH = 16        # piped questions answered together (a typed chat answers one at a time)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Chat with MiniMind", allow_abbrev=False)
    add_model_args(p)
    p.add_argument("--max_new_tokens", type=int, default=8192, action=Typed,
                   help=f"most tokens generated per answer (default 8192; {ONE_SHOT_TOKENS} for --prompt)")
    p.add_argument("--temperature", type=float, default=0.85, help="sampling temperature; 0 = greedy decoding")
    p.add_argument("--top_p", type=float, default=0.85, help="nucleus sampling probability mass")
    p.add_argument("--historys", type=int, default=0,
                   help="previous messages sent with each question (even: 2 = the last question and answer); 0 = none")
    p.add_argument("--open_thinking", type=int, default=0, choices=[0, 1],
                   help="1 = the chat template opens a <think> block for the model to reason in (minimind-3; "
                        "MiniMind2's template has no such switch, its reasoning weights think by themselves); "
                        "0 = thinking off (default)")
    # added flags
    p.add_argument("--repetition_penalty", type=float, default=1.1,
                   help="penalty on repeated tokens (1.0 = off, the original; 1.1 keeps tiny models from looping)")
    p.add_argument("--seed", type=int, default=None,
                   help="sampling seed, reset before every answer (default: random per run; the original used 2026)")
    p.add_argument("--mode", type=int, default=None, choices=[0, 1],
                   help="0 = the 8 preset questions, 1 = chat (default: ask on a terminal, else read stdin)")
    p.add_argument("--prompt", type=str, action="append", default=None,
                   help="answer this question and exit (repeatable)")
    return p


def questions(args, interactive: bool):
    """The questions to answer, lazily (a typed chat interleaves with the answers)."""
    if args.prompt:
        yield from args.prompt
        return
    mode = args.mode
    if mode is None:
        mode = (0 if input(MENU).strip() == "0" else 1) if interactive else 1
    if mode == 0:
        for q in PRESET_QUESTIONS:
            if interactive:
                print(f"👶: {q}")
            yield q
    elif interactive:
        print(CHAT_HINT, flush=True)
        while True:
            try:
                q = input("👶: ").strip()
            except (EOFError, KeyboardInterrupt):
                print(flush=True)   # end the prompt's line
                return
            if not q:
                return
            yield q
    else:
        for line in sys.stdin:
            if line.strip():
                yield line.strip()


class Printer:
    """Writes one streamed answer; reasoning is dim on a colour terminal, else between [think] markers.
    Plain mode (piped) keeps the whole answer on one line."""

    def __init__(self, pretty: bool, color: bool):
        self.pretty, self.kind = pretty, None
        gap = "\n" if pretty else " "
        if color:
            self.open, self.close, self.close_at_end = DIM, RESET + gap, RESET
        else:
            self.open, self.close, self.close_at_end = f"[think]{gap}", f"{gap}[/think]{gap}", f"{gap}[/think]"

    def write(self, kind: str, text: str):
        if not self.pretty:
            text = text.replace("\\", "\\\\").replace("\r", "\\r").replace("\n", "\\n")
        if kind != self.kind:
            sys.stdout.write(self.open if kind == "reasoning" else self.close if self.kind == "reasoning" else "")
            self.kind = kind
        sys.stdout.write(text)
        sys.stdout.flush()

    def end(self):
        if self.kind == "reasoning":
            sys.stdout.write(self.close_at_end)
        sys.stdout.write("\n\n" if self.pretty else "\n")
        sys.stdout.flush()


def submit(engine: Engine, tokenizer, conversation: list, args, seed: int):
    """Start the answer to `conversation`: (the Request, whether the prompt opened a think block); ValueError when
    the prompt leaves no room in the context."""
    prompt = build_prompt(tokenizer, conversation, raw=args.weight == "pretrain", open_thinking=args.open_thinking)
    params = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=HF_TOP_K, repetition_penalty=args.repetition_penalty, seed=seed)
    try:
        return engine.submit(tokenizer(prompt).input_ids, params, bounded=False), opens_think(prompt)
    except PromptTooLong as err:
        raise ValueError(f"{err}; lower --historys") from None


def show(req, printer: Printer, thinking: bool = False) -> str:
    """Stream one answer through `printer` (thinking: the prompt opened a think block, so the answer starts with
    reasoning); returns the raw text shown. Ctrl-C stops this answer only: its slot is freed at the engine's
    next step and the chat goes on."""
    parser, pieces, stopped = OutputParser(thinking=thinking), [], False
    try:
        for piece in req:
            pieces.append(piece)
            for kind, text in parser.feed(piece):
                printer.write(kind, text)
    except KeyboardInterrupt:
        req.cancel()
        ignoring_ctrl_c(req.wait)
        stopped = True
    for kind, text in parser.finish():
        printer.write(kind, text)
    if stopped:
        printer.write("content", " [已停止 / stopped]")
    printer.end()
    if req.finish_reason == "error":
        print(f"eval_llm.py: generation failed: {req.error}", file=sys.stderr)
    return "".join(pieces)


def ignoring_ctrl_c(fn) -> None:
    """Run fn() to its end even if Ctrl-C is pressed again meanwhile."""
    while True:
        try:
            fn()
            return
        except KeyboardInterrupt:
            continue


class ReadAhead:
    """The questions, read by a thread: the ones already piped can be answered together, and a question
    that has not come yet never holds back the answers to earlier ones."""

    def __init__(self, items):
        self.queue, self.ended = queue.Queue(), False
        threading.Thread(target=self._read, args=(items,), daemon=True).start()

    def _read(self, items):
        try:
            for item in items:
                self.queue.put(("item", item))
            self.queue.put(("end", None))
        except BaseException as err:  # re-raised in the main thread
            self.queue.put(("error", err))

    def take(self, wait: bool):
        """The next question; None at the end, or when none is there yet and `wait` is False."""
        if self.ended:
            return None
        try:
            kind, item = self.queue.get(wait)
        except queue.Empty:
            return None
        if kind == "error":
            raise item
        self.ended = kind == "end"
        return item


def answer_piped(engine: Engine, tokenizer, args, seed: int, source: ReadAhead, pretty: bool, color: bool):
    """Single-turn answers to every question of `source`, up to engine.max_batch at once, in input order."""
    pending = collections.deque()   # (Request, thinking), or the error line of a question that does not fit
    while True:
        while len(pending) < engine.max_batch:
            question = source.take(wait=not pending)
            if question is None:
                break
            try:
                pending.append(submit(engine, tokenizer, [{"role": "user", "content": question}], args, seed))
            except ValueError as err:
                pending.append(str(err))
        if not pending:
            return
        head = pending.popleft()
        if pretty:
            print("🤖️: ", end="", flush=True)
        if isinstance(head, str):
            skip(head, pretty)
        else:
            show(head[0], Printer(pretty, color), head[1])


def skip(error: str, pretty: bool) -> None:
    """A question that cannot be answered: one line on stderr, and its (empty) answer line when piped."""
    print(f"eval_llm.py: {error}", file=sys.stderr)
    if not pretty:
        print(flush=True)


def converse(engine: Engine, tokenizer, args, seed: int, items, pretty: bool, color: bool):
    """One answer at a time, each question sent with the last --historys messages."""
    conversation = []
    for question in items:
        conversation = conversation[-args.historys:] if args.historys else []
        conversation.append({"role": "user", "content": question})
        if pretty:
            print("🤖️: ", end="", flush=True)
        try:
            req, thinking = submit(engine, tokenizer, conversation, args, seed)
        except ValueError as err:
            skip(str(err), pretty)
            conversation.pop()
            continue
        # the raw text: minimind-3's template takes the reasoning before `</think>` back out of it
        conversation.append({"role": "assistant", "content": show(req, Printer(pretty, color), thinking)})


def main(argv=None):
    """Ctrl-C outside an answer (loading, the menu) ends the program with one line and exit code 130."""
    try:
        chat(argv)
    except KeyboardInterrupt:
        print("\neval_llm.py: interrupted", file=sys.stderr)
        raise SystemExit(130) from None


def chat(argv=None):
    args = build_parser().parse_args(argv)
    if args.prompt and not was_typed(args, "max_new_tokens"):
        args.max_new_tokens = ONE_SHOT_TOKENS
    model, tokenizer, _ = load_model(args)  # a LoadError is one line from cli()
    interactive = sys.stdin.isatty()
    pretty = interactive and sys.stdout.isatty()
    color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    seed = args.seed if args.seed is not None else random.randrange(2 ** 31)
    print(f"seed {seed}", file=sys.stderr, flush=True)
    piped = args.historys == 0 and bool(args.prompt or not interactive)
    engine = Engine(model, tokenizer, max_batch=PIPED_BATCH if piped else 1)
    try:
        if piped:
            answer_piped(engine, tokenizer, args, seed, ReadAhead(questions(args, interactive)), pretty, color)
        else:
            converse(engine, tokenizer, args, seed, questions(args, interactive), pretty, color)
    finally:
        ignoring_ctrl_c(engine.close)  # a thread still inside a forward when the interpreter exits aborts it


if __name__ == "__main__":
    cli(main)
