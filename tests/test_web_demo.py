"""scripts/web_demo.py through streamlit's AppTest (a tiny model, a scripted reasoning model, API mode
against the real server), `streamlit run` with usage statistics off by the app's own config, and a slow
end-to-end check in headless Chromium (WEB_DEMO_SCREENSHOT=images/web_demo.png refreshes README's picture)."""
import base64
import functools
import html
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import torch

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from model import engine, loading  # noqa: E402
from model.chat_format import build_prompt, parse_output  # noqa: E402
from tests.conftest import ROOT, tiny_config, tokenizer_dir  # noqa: E402
from tests.test_inference import QUESTIONS, talkative_seed  # noqa: E402
from tests.test_serve import ScriptedModel, free_port, serving  # noqa: E402
from model.weights import save_weights, weight_path  # noqa: E402

APP = ROOT / "scripts" / "web_demo.py"


@pytest.fixture(scope="module")
def weight(tmp_path_factory):
    from model.model_minimind import MiniMindForCausalLM
    torch.manual_seed(talkative_seed())
    cfg = tiny_config()
    return save_weights(MiniMindForCausalLM(cfg), weight_path(tmp_path_factory.mktemp("out"), "full_sft", cfg), cfg)


def expected_answer(weight, prompt, max_new_tokens=8, history=()):
    """The greedy answer with the page's default repetition penalty, computed directly."""
    model, tokenizer = loading.load_native(weight), loading.load_tokenizer(tokenizer_dir())
    messages = [*history, {"role": "user", "content": prompt}]
    ids = tokenizer(build_prompt(tokenizer, messages), return_tensors="pt").input_ids
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         repetition_penalty=1.1, pad_token_id=0, eos_token_id=2)
    return parse_output(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))["content"]


def app(monkeypatch, *flags) -> AppTest:
    monkeypatch.setattr(sys, "argv", [str(APP), "--tokenizer_path", str(tokenizer_dir()), "--device", "cpu",
                                      "--max_new_tokens", "8", "--temperature", "0", *map(str, flags)])
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.run()
    assert not at.exception, at.exception
    return at


def answers(at):
    return [m.markdown[-1].value for m in at.chat_message if m.name == "assistant"]


def test_local_model_answers_and_user_text_stays_text(weight, monkeypatch):
    at = app(monkeypatch, "--load_from", weight)
    assert at.sidebar.selectbox[0].value == weight.stem and "native weights" in at.caption[1].value
    at.chat_input[0].set_value(QUESTIONS[0]).run()
    assert not at.exception and not at.error
    assert answers(at) == [expected_answer(weight, QUESTIONS[0])] and answers(at)[0]
    at.chat_input[0].set_value("<b>MiniMind</b> **x** :red[y]").run()
    user = at.chat_message[2]
    assert user.name == "user" and user.text[0].value == "<b>MiniMind</b> **x** :red[y]" and not user.markdown
    at.sidebar.button[0].click().run()  # clear chat
    assert not at.chat_message and not at.session_state.messages


def test_query_param_prompt_is_answered_on_load(weight, monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(APP), "--load_from", str(weight), "--tokenizer_path", str(tokenizer_dir()),
                                      "--max_new_tokens", "8", "--temperature", "0"])
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.query_params["prompt"] = QUESTIONS[1]
    at.run()
    assert answers(at) == [expected_answer(weight, QUESTIONS[1])]
    at.run()  # the query prompt is asked once, not on every rerun
    assert len(at.chat_message) == 2


def test_reasoning_is_collapsible_and_history_is_sent_not_cut(tmp_path, monkeypatch):
    tokenizer = loading.load_tokenizer(tokenizer_dir())
    model = ScriptedModel(tokenizer, "<think>\n先想一想。\n</think>\n<answer>\n是蓝色的。\n</answer>")
    monkeypatch.setattr(loading, "load_model", lambda args: (model, tokenizer, "scripted reasoning model"))
    monkeypatch.setattr(engine, "Engine", functools.partial(engine.Engine, prefix_cache=0))  # see ScriptedModel
    fake = tmp_path / "reason_64.pth"
    fake.write_bytes(b"")
    at = app(monkeypatch, "--load_from", fake, "--max_new_tokens", "64")
    at.sidebar.slider[0].set_value(2)  # keep one previous turn
    at.chat_input[0].set_value("天空是什么颜色？").run()
    at.chat_input[0].set_value("为什么？").run()
    assert not at.exception and answers(at) == ["是蓝色的。", "是蓝色的。"]
    assert [e.label for e in at.expander] == ["Reasoning (click to expand)", "Reasoning (click to expand)"]
    assert at.expander[0].markdown[0].value == "先想一想。"
    assert "天空是什么颜色？" in model.prompts[-1] and "<think>" not in model.prompts[-1]  # answer only, no reasoning
    assert len(at.session_state.messages) == 4


@pytest.mark.parametrize("mode", ["Local model", "API"])
def test_thinking_switch_opens_the_think_block_and_shows_the_reasoning(tmp_path, monkeypatch, mode):
    """The "Thinking" checkbox is the template's open_thinking (local: build_prompt; API: chat_template_kwargs, as
    the original's chat_api.py): minimind-3's prompt then ends in an open think block and the answer, which starts
    inside it, is split at `</think>`; unchecked, the prompt closes an empty block and the text is all content."""
    from scripts.serve_openai_api import create_app
    tokenizer = loading.load_tokenizer(loading.FAMILY_TOKENIZER_DIR["minimind3"])
    model = ScriptedModel(tokenizer, "先想一想。\n</think>\n\n是蓝色的。")
    monkeypatch.setattr(loading, "load_model", lambda args: (model, tokenizer, "scripted minimind-3 model"))
    monkeypatch.setattr(engine, "Engine", functools.partial(engine.Engine, prefix_cache=0))  # see ScriptedModel
    fake = tmp_path / "full_sft_64.pth"
    fake.write_bytes(b"")
    with serving(create_app(model, tokenizer, prefix_cache=0)) as url:
        at = app(monkeypatch, "--load_from", fake, "--max_new_tokens", "64", "--api_url", url)
        at.sidebar.radio[0].set_value(mode).run()
        assert at.sidebar.checkbox[0].label == "Thinking" and at.sidebar.checkbox[0].value is False
        at.chat_input[0].set_value("天空是什么颜色？").run()
        assert model.prompts[-1].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        assert answers(at) == ["先想一想。\n</think>\n\n是蓝色的。"] and not at.expander
        at.sidebar.checkbox[0].check().run()
        at.chat_input[0].set_value("天空是什么颜色？").run()
        assert not at.exception and not at.error
        assert model.prompts[-1].endswith("<|im_start|>assistant\n<think>\n")
        assert answers(at)[-1] == "是蓝色的。" and at.expander[-1].markdown[0].value == "先想一想。"


def test_api_mode_talks_to_the_server(weight, monkeypatch):
    from scripts.serve_openai_api import create_app
    model, tokenizer = loading.load_native(weight), loading.load_tokenizer(tokenizer_dir())
    with serving(create_app(model, tokenizer)) as url:
        at = app(monkeypatch, "--api_url", url, "--load_from", weight)
        at.sidebar.radio[0].set_value("API").run()
        assert at.sidebar.text_input[0].value == url
        at.chat_input[0].set_value(QUESTIONS[0]).run()
        assert not at.exception and not at.error
        assert answers(at) == [expected_answer(weight, QUESTIONS[0])]


def test_save_dir_and_weight_flags_choose_the_model(weight, monkeypatch):
    at = app(monkeypatch, "--save_dir", weight.parent, "--weight", "full_sft")
    assert at.sidebar.selectbox[0].value == "full_sft_64"
    assert at.caption[1].value == f"Model: native weights {weight}"


def test_no_model_and_bad_path_are_messages_not_crashes(tmp_path, monkeypatch):
    # the app also offers model folders in the repository and beside it (where users put ../MiniMind2): a
    # repository of its own in tmp_path, so a model folder beside the real checkout cannot answer here (the app
    # imports ROOT from model.loading at every run, as AppTest runs it: patching the module attribute reaches it)
    (tmp_path / "repo").mkdir()
    monkeypatch.setattr(loading, "ROOT", tmp_path / "repo")
    at = app(monkeypatch, "--save_dir", tmp_path)
    assert "No model found" in at.info[0].value
    at.sidebar.text_input[0].set_value(str(tmp_path / "missing.pth")).run()
    assert not at.exception and "no such file or folder" in at.error[0].value
    at.sidebar.radio[0].set_value("API").run()
    assert at.sidebar.text_input[0].value == "http://127.0.0.1:8998/v1"  # the server's port (the original had 8000)


def test_a_minimind3_folder_answers_with_its_own_tokenizer_and_template(tmp_path, monkeypatch):
    """A stock Qwen3 folder (the original's published minimind-3) is offered and answers through the minimind-3
    tokenizer and chat template (the empty think block), not the repo's MiniMind2 tokenizer."""
    from tests.test_minimind3_loading import qwen3_folder
    folder = qwen3_folder(tmp_path / "minimind-3")
    monkeypatch.setattr(sys, "argv", [str(APP), "--load_from", str(folder), "--device", "cpu",
                                      "--max_new_tokens", "8", "--temperature", "0"])
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.run()
    assert at.sidebar.selectbox[0].value == "minimind-3" and "transformers folder" in at.caption[1].value
    at.chat_input[0].set_value(QUESTIONS[0]).run()
    assert not at.exception and not at.error
    model, tokenizer = loading.load_transformers(folder), loading.load_tokenizer(folder)
    ids = tokenizer(build_prompt(tokenizer, [{"role": "user", "content": QUESTIONS[0]}]), return_tensors="pt").input_ids
    assert tokenizer.decode(ids[0, -6:]) == "<think>\n\n</think>\n\n"
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                         repetition_penalty=1.1, pad_token_id=0, eos_token_id=2)
    expected = parse_output(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))["content"]
    assert expected and answers(at) == [expected]


def test_streamlit_run_collects_no_usage_statistics(tmp_path):
    """Issue 21 item 7: the app's own .streamlit/config.toml (next to web_demo.py) turns usage statistics off, so
    `streamlit run scripts/web_demo.py` from any directory neither sends them nor announces them."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(APP), "--server.headless", "true",
                             "--server.port", str(port), "--server.address", "127.0.0.1"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: get(f"http://127.0.0.1:{port}/_stcore/health") == "ok", 90, "streamlit to be healthy")
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    # Streamlit announces the collection whenever the option is not set by a config file or flag
    assert "URL: http://127.0.0.1" in out and "usage statistics" not in out.lower(), out
    import tomllib
    config = tomllib.loads((APP.parent / ".streamlit" / "config.toml").read_text(encoding="utf-8"))
    assert config["browser"]["gatherUsageStats"] is False


class DevTools:
    """A minimal Chrome DevTools Protocol client over the websocket of one page."""

    def __init__(self, ws):
        self.ws, self.n = ws, 0

    def __call__(self, method, **params):
        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.n:
                assert "error" not in msg, msg
                return msg["result"]

    def text(self) -> str:
        result = self("Runtime.evaluate", expression="document.body ? document.body.innerText : ''", returnByValue=True)
        return result["result"].get("value") or ""  # empty while the page is still loading


def wait_for(check, seconds, what):
    deadline = time.time() + seconds
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def get(url):
    try:
        return urllib.request.urlopen(url, timeout=2).read().decode()
    except OSError:
        return ""


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_page_in_headless_chromium(weight, tmp_path):
    """`streamlit run` from another cwd, opened in headless Chromium with ?prompt=...: the page shows
    the question and the model's answer; the screenshot goes to $WEB_DEMO_SCREENSHOT (default: the temp dir)."""
    connect = pytest.importorskip("websockets.sync.client").connect
    port, devtools_port = free_port(), free_port()
    prompt = QUESTIONS[0]
    app_proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(APP), "--server.headless", "true", "--server.port", str(port),
         "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false", "--client.toolbarMode", "minimal",
         "--", "--load_from", str(weight), "--tokenizer_path", str(tokenizer_dir()), "--max_new_tokens", "8",
         "--temperature", "0"], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    browser = None
    try:
        wait_for(lambda: get(f"http://127.0.0.1:{port}/_stcore/health") == "ok", 90, "streamlit to be healthy")
        browser = subprocess.Popen(
            ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chromium'}", f"--remote-debugging-port={devtools_port}",
             "--remote-debugging-address=127.0.0.1", "--window-size=1100,800", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        targets = wait_for(lambda: get(f"http://127.0.0.1:{devtools_port}/json/list"), 60, "chromium devtools")
        ws_url = next(t for t in json.loads(targets) if t["type"] == "page")["webSocketDebuggerUrl"]
        with connect(ws_url, max_size=None) as ws:
            check_page_and_screenshot(DevTools(ws), f"http://127.0.0.1:{port}/?prompt={urllib.request.quote(prompt)}",
                                      expected_answer(weight, prompt), prompt)
    finally:
        for proc in (browser, app_proc):
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()


def check_page_and_screenshot(page: DevTools, url: str, answer: str, prompt: str):
    """Open `url`, wait until `answer` is fully shown, check the DOM, save the screenshot."""
    page("Page.enable")
    page("Page.navigate", url=url)
    assert answer
    wait_for(lambda: answer in (t := page.text()) and "▌" not in t, 120, f"the answer {answer!r}")
    assert prompt in page.text()
    dom = page("Runtime.evaluate", expression="document.documentElement.outerHTML", returnByValue=True)
    assert html.escape(answer, quote=False) in dom["result"]["value"]
    time.sleep(0.5)  # let the last repaint land
    png = base64.b64decode(page("Page.captureScreenshot", format="png")["data"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    target = Path(os.environ.get("WEB_DEMO_SCREENSHOT", Path(tempfile.gettempdir()) / "web_demo.png"))
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(png)
