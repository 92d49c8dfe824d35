"""Train MiniMind's tokenizer: byte-level BPE with 6400 tokens and a ChatML chat template (spec section 3).

    python trainer/train_tokenizer.py                                     # -> model_learn_tokenizer/, ~2 min on 2 cores
    python trainer/train_tokenizer.py --data_path my.jsonl --save_dir my_tokenizer    # your own {"text": ...} lines
    python trainer/train_tokenizer.py --data_path dataset/demo/pretrain.jsonl --vocab_size 512 \
        --save_dir /tmp/tok                                               # tiny CPU run, seconds

`--model_family minimind3` trains one with minimind-3's 36 added tokens (ids 0-20 special; 21-35 `<tool_call>`,
`<think>`, ... not special) and writes a copy of model/minimind3/tokenizer_config.json (read at run time: the same
added tokens and chat template). Its merges are its own, so its ids do not fit the published minimind-3 weights:
those need the shipped model/minimind3/.

The shipped model/tokenizer.json and model/tokenizer_config.json are made by exactly this one command:

    python trainer/train_tokenizer.py --save_dir model --overwrite_shipped

With no --data_path the training text is dataset/tokenizer_corpus.py (the demo corpus, Chinese word sequences
sampled from jieba's bundled dictionary, Python standard-library docs and code, digits and emoji), built in
memory; nothing is downloaded. Byte-identical output needs Python 3.11, jieba 0.42.1 and tokenizers 0.23.3.
Writes tokenizer.json and tokenizer_config.json (which carries the chat template) into --save_dir; load them
with transformers.AutoTokenizer.from_pretrained(save_dir). It refuses to overwrite the shipped ROOT/model
or ROOT/model/minimind3 files unless --overwrite_shipped is given.
"""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import argparse
import json
import time
from typing import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

ROOT = Path(__file__).resolve().parents[1]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0 (pad and unk), 1 (bos), 2 (eos)
MINIMIND3 = ROOT / "model" / "minimind3"  # the shipped minimind-3 tokenizer: its config is the template for ours

# Qwen-style ChatML, written for this project; its output is specified exactly by spec 3.2 (renders A-L).
# HF renders it in a sandbox with trim_blocks/lstrip_blocks and a `tojson` that keeps non-ASCII text,
# so every piece of output below is an explicit string expression and all tags strip whitespace.
CHAT_TEMPLATE = r"""
{#- System block: tools preamble (the first system message goes inside it), or the given/default system. -#}
{%- set first_is_system = messages[0].role == 'system' -%}
{%- if tools -%}
    {{- '<|im_start|>system\n' -}}
    {%- if first_is_system -%}
        {{- messages[0].content + '\n\n' -}}
    {%- endif -%}
    {{- '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n' -}}
    {{- 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>' -}}
    {%- for tool in tools -%}
        {{- '\n' + tool | tojson -}}
    {%- endfor -%}
    {{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments ' -}}
    {{- 'within <tool_call></tool_call> XML tags:\n<tool_call>\n' -}}
    {{- '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n' -}}
{%- elif first_is_system -%}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' -}}
{%- else -%}
    {{- '<|im_start|>system\nYou are a helpful assistant<|im_end|>\n' -}}
{%- endif -%}
{#- Turns. Non-string content counts as ''. Consecutive tool results share one user block. Other roles are dropped. -#}
{%- for message in messages -%}
    {%- set content = message.content if message.content is string else '' -%}
    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) -%}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>\n' -}}
    {%- elif message.role == 'assistant' -%}
        {{- '<|im_start|>assistant\n' + content -}}
        {%- for call in message.tool_calls or [] -%}
            {%- set fn = call.function if call.function else call -%}
            {%- if content or not loop.first -%}
                {{- '\n' -}}
            {%- endif -%}
            {%- set args = fn.arguments if fn.arguments is string else fn.arguments | tojson -%}
            {{- '<tool_call>\n{"name": "' ~ fn.name ~ '", "arguments": ' ~ args ~ '}\n</tool_call>' -}}
        {%- endfor -%}
        {{- '<|im_end|>\n' -}}
    {%- elif message.role == 'tool' -%}
        {%- if loop.first or loop.previtem.role != 'tool' -%}
            {{- '<|im_start|>user' -}}
        {%- endif -%}
        {{- '\n<tool_response>\n' + content + '\n</tool_response>' -}}
        {%- if loop.last or loop.nextitem.role != 'tool' -%}
            {{- '<|im_end|>\n' -}}
        {%- endif -%}
    {%- endif -%}
{%- endfor -%}
{#- Generation prompt; enable_thinking=False (exactly False) pre-fills an empty think block. -#}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
    {%- if enable_thinking is defined and enable_thinking is false -%}
        {{- '<think>\n\n</think>\n\n' -}}
    {%- endif -%}
{%- endif -%}
""".strip()


def tokenizer_config(model_family: str = "minimind2") -> dict:
    """tokenizer_config.json as upstream has it (spec 3.1): no BOS/EOS added by tokenizer(text).
    minimind3: the shipped model/minimind3 config as is (added tokens, special flags, chat template)."""
    if model_family == "minimind3":
        with open(MINIMIND3 / "tokenizer_config.json", encoding="utf-8") as f:
            return json.load(f)
    added = {str(i): {"content": tok, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": True} for i, tok in enumerate(SPECIAL_TOKENS)}
    return {
        "add_bos_token": False, "add_eos_token": False, "add_prefix_space": False, "added_tokens_decoder": added,
        "additional_special_tokens": [], "bos_token": "<|im_start|>", "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>", "legacy": True, "model_max_length": 32768, "pad_token": "<|endoftext|>",
        "sp_model_kwargs": {}, "spaces_between_special_tokens": False, "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<|endoftext|>", "chat_template": CHAT_TEMPLATE,
    }


def added_tokens(model_family: str = "minimind2") -> list[tuple[str, bool]]:
    """(token, special) of the added tokens, in id order from 0. minimind3: read from the shipped config's
    added_tokens_decoder (upstream: 21 specials, then 6 tool/think tags and 9 buffers that are not special)."""
    if model_family == "minimind2":
        return [(tok, True) for tok in SPECIAL_TOKENS]
    decoder = tokenizer_config(model_family)["added_tokens_decoder"]
    assert sorted(map(int, decoder)) == list(range(len(decoder))), "added tokens must have ids 0..n-1"
    return [(decoder[str(i)]["content"], decoder[str(i)]["special"]) for i in range(len(decoder))]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 6400, model_family: str = "minimind2") -> Tokenizer:
    """Byte-level BPE (no unk, no dropout), GPT-2 split regex, the added tokens at ids 0, 1, 2, ..."""
    added = added_tokens(model_family)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[tok for tok, _ in added], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.decoder = decoders.ByteLevel()
    if not all(special for _, special in added):  # the trainer adds them all as special; upstream flips these
        state = json.loads(tokenizer.to_str())
        for entry, (_, special) in zip(state["added_tokens"], added):
            entry["special"] = special
        tokenizer = Tokenizer.from_str(json.dumps(state, ensure_ascii=False))
    for i, (tok, _) in enumerate(added):
        assert tokenizer.token_to_id(tok) == i, f"{tok} got id {tokenizer.token_to_id(tok)}, expected {i}"
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, save_dir: Path, model_family: str = "minimind2") -> None:
    config = tokenizer_config(model_family)  # read before writing: save_dir may be model/minimind3 itself
    save_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(save_dir / "tokenizer.json"))
    with open(save_dir / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=2)
        f.write("\n")
    stale = save_dir / "chat_template.jinja"  # transformers prefers this file over the config's template
    if stale.exists():
        print(f"warning: {stale} overrides the chat template in tokenizer_config.json; delete it")


def read_texts(path: Path) -> Iterator[str]:
    """Stream the "text" field of a jsonl file (upstream's pretrain_hq format), one line at a time."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield str(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError) as e:
                    raise ValueError(f"{path}:{lineno}: {e!r}") from e


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description="MiniMind tokenizer training (byte-level BPE)", allow_abbrev=False)
    parser.add_argument("--data_path", type=Path, default=None,
                        help='jsonl with a "text" field; default: the generated corpus of dataset/tokenizer_corpus.py')
    parser.add_argument("--save_dir", type=Path, default=ROOT / "model_learn_tokenizer", help="output folder")
    parser.add_argument("--vocab_size", type=int, default=6400, help="tokens in the vocabulary, specials included")
    parser.add_argument("--model_family", default="minimind2", choices=["minimind2", "minimind3"],
                        help="added tokens and chat template: MiniMind2's 3 specials, or minimind-3's 36 tokens")
    parser.add_argument("--overwrite_shipped", action="store_true",
                        help=f"allow writing into {ROOT / 'model'} or {MINIMIND3}")
    args = parser.parse_args(argv)
    if args.save_dir.resolve() in ((ROOT / "model").resolve(), MINIMIND3.resolve()) and not args.overwrite_shipped:
        parser.error(f"{args.save_dir} holds a shipped tokenizer; add --overwrite_shipped to replace it")

    if args.data_path is None:
        from dataset.tokenizer_corpus import iter_corpus
        texts = iter_corpus()
    else:
        texts = read_texts(args.data_path)
    t0 = time.time()
    tokenizer = train_tokenizer(texts, args.vocab_size, args.model_family)
    save_tokenizer(tokenizer, args.save_dir, args.model_family)

    # Upstream's eval_tokenizer: render a chat, check the round trip and report the size.
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(args.save_dir)
    chat = [{"role": "system", "content": "你是一个优秀的聊天机器人。"}, {"role": "user", "content": "你来自哪里？"},
            {"role": "assistant", "content": "我来自地球。"}]
    text = hf.apply_chat_template(chat, tokenize=False)
    ids = hf(text).input_ids
    assert hf.decode(ids) == text, "decode(encode(x)) != x"
    print(f"vocab {len(hf)}, chat of {len(text)} chars -> {len(ids)} tokens, {time.time() - t0:.0f}s; "
          f"wrote {args.save_dir / 'tokenizer.json'} and tokenizer_config.json")
    return args.save_dir


if __name__ == "__main__":
    main()
