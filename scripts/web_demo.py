"""A Streamlit chat page for MiniMind: local weights or an OpenAI-compatible server, streamed answers,
`<think>` reasoning in a collapsible section, a "Thinking" switch (the chat template's open_thinking).

    streamlit run scripts/web_demo.py                      # from any directory
    streamlit run scripts/web_demo.py -- --save_dir out --weight full_sft --device cpu
    streamlit run scripts/web_demo.py -- --load_from ../MiniMind2      # a transformers folder
    http://localhost:8501/?prompt=你好                      # asks this question when the page opens

The model list holds the weight named by --save_dir/--weight/--hidden_size, the other native
weights in --save_dir that have their .json config, the transformers folders (config.json with model_type minimind,
llama, or qwen3 / qwen3_moe: the original's published minimind-3) inside and next to the repo,
and --load_from; any other .pth file or folder can be typed in the sidebar. "API" mode talks to
scripts/serve_openai_api.py (default http://127.0.0.1:8998/v1). Flags after `--` are those of
eval_llm.py; --max_new_tokens and --temperature set the sliders' start values. Each model answers with its own
tokenizer and chat template (the folder's, else its family's: model/ or model/minimind3/). In local mode each
loaded model has one batching engine (model/engine.py) shared by all browser sessions: answers being written at
the same time are decoded together, and a page that stops reading frees its slot. Writes nothing.
"""
import argparse
import json
import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import streamlit as st  # noqa: E402

from model.chat_format import OutputParser, build_prompt, opens_think  # noqa: E402
from model.cli import add_model_args, typed_sizes  # noqa: E402
from model.engine import HF_TOP_K, Engine, SamplingParams  # noqa: E402
from model.loading import (QWEN3_TYPES, ROOT, find_weight, is_transformers_folder, load_model,  # noqa: E402
                           resolve_path)
from model.weights import LoadError  # noqa: E402

REASONING = "Reasoning (click to expand)"
THINKING_HELP = ("Adaptive thinking (the chat template's open_thinking switch; minimind-3 models); may be unstable "
                 "with multi-turn or Tool Call. MiniMind2's template has no such switch: its reasoning weights think "
                 "by themselves")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="MiniMind web demo", allow_abbrev=False)
    add_model_args(p)
    p.add_argument("--max_new_tokens", type=int, default=8192, help="start value of the max-new-tokens slider")
    p.add_argument("--temperature", type=float, default=0.85, help="start value of the temperature slider")
    p.add_argument("--api_url", type=str, default="http://127.0.0.1:8998/v1", help="server used in API mode")
    return p


def find_models(args) -> dict:
    """{label: path} of the models offered in the sidebar; --load_from / --weight first."""
    found = {}
    source = resolve_path(args.load_from)
    if source.is_file() or is_transformers_folder(source):
        found[source.stem if source.is_file() else source.name] = source
    save_dir = resolve_path(args.save_dir)
    try:  # the weight the flags name, even without a .json config
        sizes = typed_sizes(args)
        named = find_weight(save_dir, args.weight, sizes["hidden_size"], sizes["use_moe"], args.model_family)
        found[named.stem] = named
    except LoadError:
        pass
    weights = sorted(save_dir.glob("*.pth"), key=lambda p: (not p.stem.startswith(f"{args.weight}_"), p.name))
    for path in weights:
        if re.fullmatch(r".+_\d+(_moe)?", path.stem) and path.with_suffix(".json").exists():
            found[path.stem] = path
    for folder in sorted({*ROOT.iterdir(), *ROOT.parent.iterdir()}):
        try:
            if is_transformers_folder(folder) and json.loads((folder / "config.json").read_text()).get(
                    "model_type") in ("minimind", "llama", *QWEN3_TYPES):
                found[folder.name] = folder
        except (OSError, ValueError):
            continue
    return found


@st.cache_resource(show_spinner="Loading the model...")
def cached_model(argv: tuple):
    args = build_parser().parse_args(list(argv))
    return load_model(args) + (args.weight,)


@st.cache_resource
def cached_engine(argv: tuple) -> Engine:
    """The model's engine, shared by every browser session (one model forward per step for all of them)."""
    model, tokenizer, _, _ = cached_model(argv)
    return Engine(model, tokenizer)


def local_events(argv: tuple, messages: list, settings: dict):
    _, tokenizer, _, weight = cached_model(argv)
    prompt = build_prompt(tokenizer, messages, raw=weight == "pretrain", open_thinking=settings["open_thinking"])
    params = SamplingParams(max_tokens=settings["max_new_tokens"], temperature=settings["temperature"],
                            top_p=settings["top_p"], top_k=HF_TOP_K, repetition_penalty=settings["repetition_penalty"],
                            seed=random.randrange(2 ** 63))  # a new seed per answer, as the original
    req = cached_engine(argv).submit(tokenizer(prompt).input_ids, params)  # PromptTooLong, QueueFull: shown
    parser = OutputParser(thinking=opens_think(prompt))  # minimind-3 with thinking on: the answer starts reasoning
    try:
        for piece in req:
            yield from parser.feed(piece)
        yield from parser.finish()
    finally:
        req.cancel()  # the page stopped reading (a new question, a closed tab): free the slot


def api_events(api: dict, messages: list, settings: dict):
    from openai import OpenAI
    client = OpenAI(base_url=api["url"], api_key=api["key"] or "none")
    stream = client.chat.completions.create(
        model=api["model"], messages=messages, stream=True, temperature=settings["temperature"],
        top_p=settings["top_p"], max_tokens=settings["max_new_tokens"],
        extra_body={"repetition_penalty": settings["repetition_penalty"],
                    **({"chat_template_kwargs": {"open_thinking": True}} if settings["open_thinking"] else {})})
    for chunk in stream:
        if chunk.choices:
            delta = chunk.choices[0].delta
            reasoning = (delta.model_extra or {}).get("reasoning_content")
            if reasoning:
                yield "reasoning", reasoning
            if delta.content:
                yield "content", delta.content


def show_message(msg: dict):
    with st.chat_message(msg["role"]):
        if msg["role"] == "user":
            st.text(msg["content"])  # never parsed as Markdown or HTML
            return
        if msg.get("reasoning"):
            with st.expander(REASONING, expanded=False):
                st.markdown(msg["reasoning"])
        st.markdown(msg["content"])


def stream_answer(events) -> dict:
    """Render the events of one answer as they come; returns the finished message."""
    reasoning, content = "", ""
    with st.chat_message("assistant"):
        think_slot, answer_box, think_box = st.empty(), st.empty(), None
        for kind, text in events:
            if kind == "reasoning":
                if think_box is None:
                    think_box = think_slot.expander("Thinking...", expanded=True).empty()
                reasoning += text
                think_box.markdown(reasoning)
            else:
                content += text
                answer_box.markdown(content + " ▌")
        if reasoning:  # finished: collapse it, as history shows it
            think_slot.expander(REASONING, expanded=False).markdown(reasoning)
        answer_box.markdown(content)
    return {"role": "assistant", "content": content, "reasoning": reasoning}


def main():
    args, _ = build_parser().parse_known_args(sys.argv[1:])
    st.set_page_config(page_title="MiniMind", initial_sidebar_state="collapsed")
    state = st.session_state
    state.setdefault("messages", [])

    with st.sidebar:
        st.header("Settings")
        source = st.radio("Model source", ["Local model", "API"], horizontal=True)
        api = None
        if source == "API":
            api = {"url": st.text_input("API URL", args.api_url), "model": st.text_input("Model ID", "minimind"),
                   "key": st.text_input("API Key", "none", type="password")}
        else:
            models = find_models(args)
            choice = st.selectbox("Model", list(models) or ["(none found)"])
            typed = st.text_input("or a path (.pth weight or transformers folder)", "")
            path = resolve_path(typed) if typed else models.get(choice)
        history = st.slider("Number of historical messages", 0, 6, 0, step=2)
        settings = {"max_new_tokens": st.slider("Max new tokens", 1, 8192, min(args.max_new_tokens, 8192)),
                    "temperature": st.slider("Temperature", 0.0, 1.2, min(args.temperature, 1.2), step=0.01,
                                             help="0 = greedy decoding"),
                    "top_p": st.slider("Top-p", 0.05, 1.0, 0.85, step=0.01),
                    "repetition_penalty": st.slider("Repetition penalty", 1.0, 1.5, 1.1, step=0.01),
                    "open_thinking": st.checkbox("Thinking", value=False, help=THINKING_HELP)}
        if st.button("Clear chat", width="stretch"):
            state.messages = []

    st.title("MiniMind")
    st.caption("内容完全由AI生成，请务必仔细甄别 / The content is AI-generated; check it carefully.")

    if api is None:
        if path is None:
            st.info(f"No model found: train one (out/*.pth) or give a path in the sidebar. Looked in "
                    f"{resolve_path(args.save_dir)} and next to {ROOT}.")
            return
        argv = ("--load_from", str(path), "--device", args.device,
                *(["--tokenizer_path", args.tokenizer_path] if args.tokenizer_path else []),
                *(["--model_family", args.model_family] if args.model_family else []),
                *(["--lora_weight", args.lora_weight, "--save_dir", args.save_dir] if args.lora_weight != "None" else []),
                *(["--inference_rope_scaling"] if args.inference_rope_scaling else []))
        try:
            description = cached_model(argv)[2]
        except LoadError as err:
            st.error(str(err))
            return
        st.caption(f"Model: {description}")

    for msg in state.messages:
        show_message(msg)

    prompt = st.chat_input("Send a message to MiniMind")
    if prompt is None and st.query_params.get("prompt") and not state.get("asked_query_prompt"):
        prompt, state.asked_query_prompt = st.query_params["prompt"], True
    if not prompt:
        return
    # the last `history` messages as context; the stored chat itself is never cut
    context = [{"role": m["role"], "content": m["content"]} for m in (state.messages[-history:] if history else [])]
    question = {"role": "user", "content": prompt}
    state.messages.append(question)
    show_message(question)
    context.append(question)
    try:
        events = api_events(api, context, settings) if api else local_events(argv, context, settings)
        state.messages.append(stream_answer(events))
    except Exception as err:  # a failed answer is shown, the page stays usable
        state.messages.pop()
        st.error(f"{type(err).__name__}: {err}")


main()
