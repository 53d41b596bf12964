"""examples/app.py (the Gradio demo): its chat logic without a browser, and (marked `browser`) the page itself in
headless Chromium driven by Playwright."""

import importlib.util
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import torch
from astrea_testing import REPO, save_random_tiny
from PIL import Image, ImageDraw

from modeling_astrea import EXPERT_NAMES

sys.path.insert(0, str(REPO / "examples"))
spec = importlib.util.spec_from_file_location("astrea_app", REPO / "examples" / "app.py")
app = importlib.util.module_from_spec(spec)
spec.loader.exec_module(app)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    save_random_tiny(folder)
    return folder


@pytest.fixture(scope="module")
def chat(model_folder):
    model, processor = app.load(model_folder)
    return app.AstreaChat(model, processor, max_new_tokens=6)


def picture() -> Image.Image:
    image = Image.new("RGB", (64, 64), (230, 230, 230))
    ImageDraw.Draw(image).ellipse((16, 16, 48, 48), fill=(220, 40, 40))
    return image


def test_answers_stream_in_and_end_as_the_greedy_answer(chat):
    steps = list(chat.stream(picture(), [], "What colour is the circle?"))
    assert len(steps) >= 2  # partial answers, then the whole one
    answer, shares = steps[-1]
    assert all(answer.startswith(partial) for partial, _ in steps[:-1])
    messages = chat.messages([], "What colour is the circle?")
    prompt = chat.processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = chat.processor(images=[picture()], text=[prompt], return_tensors="pt")
    with torch.no_grad():
        output = chat.model.generate(**inputs, max_new_tokens=6, do_sample=False)
    expected = chat.processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert answer == expected.strip()
    assert list(shares) == list(EXPERT_NAMES) and sum(shares.values()) == pytest.approx(1.0, abs=1e-4)


def test_follow_up_questions_keep_the_image_in_the_first_turn_only(chat):
    history = [{"role": "user", "content": "What is it?"}, {"role": "assistant", "content": "a circle"}]
    messages = chat.messages(history, "What colour?")
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[0]["content"][0] == {"type": "image"}
    assert all({"type": "image"} not in m["content"] for m in messages[1:])
    prompt = chat.processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt.count(chat.processor.image_token) == 1 and "a circle" in prompt


def test_missing_image_or_question_is_a_clear_error(chat):
    with pytest.raises(ValueError, match="Upload an image first"):
        next(chat.stream(None, [], "What colour?"))
    with pytest.raises(ValueError, match="Type a question"):
        next(chat.stream(picture(), [], "   "))


class FailingStreamer:
    """Hands `generate`'s streamer the prompt and then `tokens` new tokens, then raises `error` inside `generate`,
    in its thread: what out of memory halfway through an answer looks like to the streaming loop."""

    def __init__(self, streamer, tokens: int, error: Exception):
        self.streamer, self.puts_left, self.error = streamer, tokens + 1, error  # the prompt is the first put

    def put(self, value):
        if self.puts_left == 0:
            raise self.error
        self.puts_left -= 1
        self.streamer.put(value)

    def end(self):
        self.streamer.end()


def fail_generate(monkeypatch, model, tokens: int) -> Exception:
    """Makes `model.generate` fail after streaming `tokens` tokens; returns the error it raises."""
    error = RuntimeError("out of memory (simulated)")
    generate = type(model).generate

    def failing_generate(self, *args, streamer, **kwargs):
        return generate(self, *args, streamer=FailingStreamer(streamer, tokens, error), **kwargs)

    monkeypatch.setattr(type(model), "generate", failing_generate)
    return error


@pytest.mark.timeout(60)  # the old loop waited forever for the end of the stream
@pytest.mark.parametrize("tokens", [0, 3], ids=["before-the-first-token", "after-three-tokens"])
def test_a_failure_inside_generate_ends_the_stream_with_the_error(chat, monkeypatch, tokens):
    full_answer, _ = list(chat.stream(picture(), [], "What colour is the circle?"))[-1]
    error = fail_generate(monkeypatch, chat.model, tokens)
    steps = []
    expected = r"generation failed: RuntimeError: out of memory \(simulated\)"
    with pytest.raises(app.GenerationError, match=expected) as info:
        for step in chat.stream(picture(), [], "What colour is the circle?"):
            steps.append(step)
    assert info.value.__cause__ is error
    assert len(steps) == tokens  # a step per token streamed before the error (a token's text may still be empty)
    assert all(full_answer.startswith(answer) for answer, _ in steps)


@pytest.mark.timeout(60)
def test_the_page_shows_a_failed_generation_and_gives_the_question_back(chat, monkeypatch):
    import gradio as gr

    blocks = app.build_app(chat, "Astrea (test)")
    respond = next(f.fn for f in blocks.fns.values() if getattr(f.fn, "__name__", "") == "respond")
    fail_generate(monkeypatch, chat.model, tokens=3)
    history = [{"role": "user", "content": "What is it?"}, {"role": "assistant", "content": "a circle"}]
    outputs = []
    with pytest.raises(gr.Error, match="out of memory"):
        for output in respond(picture(), history, "What colour?"):
            outputs.append(output)
    chat_shown, _, question_box = outputs[-1]
    assert chat_shown == history and question_box == "What colour?"  # no half answer; the question to try again


@pytest.mark.timeout(60)
def test_a_failure_of_the_experts_is_shown_as_well(chat, monkeypatch):
    """The experts run before generation, outside its thread; at real scale that is where memory runs out first."""

    def fail(*args, **kwargs):
        raise RuntimeError("out of memory (simulated, experts)")

    monkeypatch.setattr(chat.model.model, "get_image_features", fail)
    with pytest.raises(app.GenerationError, match=r"the experts failed on the image: RuntimeError: out of memory"):
        next(chat.stream(picture(), [], "What colour is the circle?"))


@pytest.mark.timeout(60)
def test_generation_stops_when_the_reader_stops_reading(chat):
    """A closed page or cancelled request closes the stream: its thread must stop generating, not run on to
    max_new_tokens beside the next request."""
    from transformers import StoppingCriteria

    steps = []

    class Count(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            steps.append(input_ids.shape[1])
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    inputs = chat.processor(images=[picture()], text=[chat.processor.apply_chat_template(
        chat.messages([], "What colour?"), add_generation_prompt=True)], return_tensors="pt")  # fmt: skip
    pieces = app.stream_generate(
        chat.model,
        chat.processor.tokenizer,
        **inputs,
        max_new_tokens=2000,
        min_new_tokens=2000,  # no end of sequence: only the reader's leaving can stop it early
        do_sample=False,
        stopping_criteria=[Count()],
    )
    running = set(threading.enumerate())
    next(pieces)  # starts generate's thread
    pieces.close()
    for thread in set(threading.enumerate()) - running:
        thread.join(timeout=30)
    assert steps and len(steps) < 200, len(steps)  # it stopped within a few steps of the close, not at 2000


def test_the_app_builds_with_its_components(chat):
    import gradio as gr

    blocks = app.build_app(chat, "Astrea (test)")
    assert isinstance(blocks, gr.Blocks)
    ids = {getattr(block, "elem_id", None) for block in blocks.blocks.values()}
    assert {"image", "chat", "question", "send", "router-chart"} <= ids


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


#: the router chart's bars: Vega draws it as SVG, and labels each bar, for screen readers, with its data
BARS = "#router-chart svg [aria-roledescription='bar']"


def drawn_bars(page) -> list[dict]:
    """Each bar of the router chart, left to right: its label ("expert: caption; share: 0.25") and drawn height."""
    return page.evaluate(
        f"() => [...document.querySelectorAll({BARS!r})]"
        ".map(b => ({label: b.getAttribute('aria-label'), height: b.getBBox().height}))"
    )


def bar_shares(bars: list[dict]) -> dict[str, float]:
    """{expert: share} as the bars' labels print them."""
    labels = [re.fullmatch(r"expert: (\w+); share: (\S+)", bar["label"]) for bar in bars]
    assert all(labels), [bar["label"] for bar in bars]
    return {label[1]: float(label[2]) for label in labels}


@pytest.mark.browser
def test_the_page_in_a_real_browser_answers_and_draws_the_router_chart(model_folder, chat, tmp_path):
    from playwright.sync_api import sync_playwright

    question = "What colour is the circle?"
    *_, (_, expected) = chat.stream(picture(), [], question)  # the same model folder, in this process
    assert any(expected.values())

    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(REPO / "examples" / "app.py"), "--model", str(model_folder), "--port", str(port)]
    server = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 300  # importing gradio and torch on a busy 2-core machine takes a while
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                assert server.poll() is None, server.stdout.read()
                assert time.monotonic() < deadline, "the app did not start in 300 s"
                time.sleep(0.5)
        image_file = tmp_path / "circle.png"
        picture().save(image_file)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_FLAGS)
            page = browser.new_page()
            page.goto(url)
            page.wait_for_function(f"() => document.querySelectorAll({BARS!r}).length === {len(EXPERT_NAMES)}")
            before = drawn_bars(page)
            page.locator("#image input[type=file]").set_input_files(str(image_file))
            page.locator("#image img").first.wait_for(timeout=30_000)  # the upload is shown
            page.locator("#question textarea").fill(question)
            page.locator("#send").click()
            bot = page.locator("#chat .bot, #chat [data-testid='bot']").last
            bot.wait_for(timeout=60_000)
            page.wait_for_function(
                "() => { const b = [...document.querySelectorAll('#chat .bot, #chat [data-testid=\"bot\"]')];"
                " return b.length && b[b.length - 1].innerText.trim().length > 0; }",
                timeout=60_000,
            )
            answer = bot.inner_text().strip()
            page.wait_for_function(  # the chart is redrawn with the answer's shares
                f"before => [...document.querySelectorAll({BARS!r})].map(b => b.getAttribute('aria-label')).join()"
                " !== before",
                arg=",".join(bar["label"] for bar in before),
                timeout=60_000,
            )
            after = drawn_bars(page)
            page.screenshot(path=str(os.environ.get("ASTREA_APP_SCREENSHOT", tmp_path / "app.png")))
            browser.close()
        assert answer, "no answer in the chat"
        assert bar_shares(before) == dict.fromkeys(EXPERT_NAMES, 0.0), "the page should load with an empty chart"
        # the bars' labels print the shares to 10 decimals; the server computed them in another process
        assert bar_shares(after) == pytest.approx(expected, abs=1e-6)
        # and the bars are drawn that tall: on the 0..1 axis, their heights add up to the total of the shares, 1
        total = sum(bar["height"] for bar in after)
        for bar, expert in zip(after, bar_shares(after), strict=True):
            assert bar["height"] == pytest.approx(expected[expert] * total, abs=0.5), bar  # to half a pixel
    finally:
        server.terminate()
        server.wait(timeout=30)
