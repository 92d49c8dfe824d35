"""A small streaming chat client for scripts/serve_openai_api.py (or any OpenAI-compatible server).

    python scripts/serve_openai_api.py &          # then:
    python scripts/chat_openai_api.py             # type questions; an empty line or Ctrl-D ends
    printf '你好\\n再说一遍\\n' | python scripts/chat_openai_api.py --history_messages 2
    python scripts/chat_openai_api.py --open_thinking 1     # ask a minimind-3 server to think first

Each question is sent with the last --history_messages messages before it, counted in whole
turns (the original sent history[-2:], i.e. the previous answer without its question, and all of
it for 0). On a terminal it prints `[Q]: ` / `[A]: `; piped, one line per answer (a newline inside
an answer is written as `\\n`, a backslash as `\\\\`). Reasoning (`reasoning_content`) is shown
dim on a terminal, between `[think]` and `[/think]` when piped. The key of a server started with one
comes from --api_key or the MINIMIND_API_KEY environment variable. Writes nothing; needs `openai`.
"""
import argparse
import os
import sys

DIM, RESET = "\033[2m", "\033[0m"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Streaming chat client for an OpenAI-compatible server",
                                allow_abbrev=False)
    p.add_argument("--base_url", type=str, default="http://127.0.0.1:8998/v1")
    p.add_argument("--api_key", type=str, default=os.environ.get("MINIMIND_API_KEY", "none"),
                   help="bearer key, checked by a server run with a key (default: the MINIMIND_API_KEY environment "
                        "variable, else none)")
    p.add_argument("--model", type=str, default="minimind")
    p.add_argument("--history_messages", type=int, default=2,
                   help="previous messages sent with each question, in whole user+assistant turns "
                        "(2 = the last turn; an odd number is rounded down; 0 = none)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top_p", type=float, default=0.9)
    p.add_argument("--max_tokens", type=int, default=2048, help="most tokens per answer")
    p.add_argument("--open_thinking", type=int, default=0, choices=[0, 1],
                   help="1 = ask for thinking (sends chat_template_kwargs {\"open_thinking\": true}, as the "
                        "original's chat_api.py; minimind-3 models then reason first); 0 = off (default)")
    return p


def typed_questions(interactive: bool):
    while True:
        try:
            line = input("[Q]: ") if interactive else sys.stdin.readline()
        except (EOFError, KeyboardInterrupt):
            return
        if not interactive and not line:
            return  # end of piped input
        if line.strip():
            yield line.strip()
        elif interactive:
            return


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        from openai import OpenAI, OpenAIError
    except ImportError:
        sys.exit("chat_openai_api.py needs the openai package: pip install openai")
    client = OpenAI(api_key=args.api_key, base_url=args.base_url, max_retries=0)  # a local server: fail fast
    interactive = sys.stdin.isatty()
    pretty = interactive and sys.stdout.isatty()
    color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    keep = max(args.history_messages, 0) // 2 * 2
    history = []  # only complete (user, assistant) pairs
    extra = {"chat_template_kwargs": {"open_thinking": True}} if args.open_thinking else None
    for question in typed_questions(interactive):
        messages = (history[-keep:] if keep else []) + [{"role": "user", "content": question}]
        if pretty:
            print("[A]: ", end="", flush=True)
        answer, thinking = [], False
        try:
            stream = client.chat.completions.create(model=args.model, messages=messages, stream=True,
                                                    temperature=args.temperature, top_p=args.top_p,
                                                    max_tokens=args.max_tokens, extra_body=extra)
            for chunk in stream:
                if not chunk.choices:
                    continue
                delta = chunk.choices[0].delta
                reasoning = (delta.model_extra or {}).get("reasoning_content")
                for text, is_reasoning in ((reasoning, True), (delta.content, False)):
                    if not text:
                        continue
                    if is_reasoning != thinking:
                        marker = (DIM if is_reasoning else RESET + "\n") if color else (
                            "[think] " if is_reasoning else " [/think] ")
                        sys.stdout.write(marker)
                        thinking = is_reasoning
                    if not is_reasoning:
                        answer.append(text)
                    if not pretty:
                        text = text.replace("\\", "\\\\").replace("\r", "\\r").replace("\n", "\\n")
                    sys.stdout.write(text)
                    sys.stdout.flush()
        except OpenAIError as err:
            sys.stdout.write("\n")
            sys.exit(f"chat_openai_api.py: {args.base_url}: {err}")
        if thinking:
            sys.stdout.write(RESET if color else " [/think]")
        sys.stdout.write("\n\n" if pretty else "\n")
        sys.stdout.flush()
        history += [messages[-1], {"role": "assistant", "content": "".join(answer)}]


if __name__ == "__main__":
    main()
