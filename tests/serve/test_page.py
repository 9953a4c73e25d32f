"""The chat page in a real headless Chromium (Debian's `chromium`, driven by playwright): a
question typed on the page gets the streamed greedy reply; a model trained on documents
continues a Chinese text with the labels in Chinese, and Stop ends a reply mid-way and frees its
rows. Skipped, saying why, when the browser or playwright is missing (`make test-browser`
installs the browser)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import httpx
import pytest

from tinyllama.chat import ChatSession
from tinyllama.config import ChatConfig

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (dev extra)")

CHROMIUM = os.environ.get("TINYLLAMA_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip(
        "headless Chromium is not installed: `make test-browser` installs Debian's chromium and runs "
        "the page tests",
        allow_module_level=True,
    )

SCREENSHOTS = Path(os.environ.get("TINYLLAMA_SCREENSHOTS", "runs/screenshots"))


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"],
        )
        yield browser
        browser.close()


def open_page(browser, url: str, locale: str = "en-US"):
    page = browser.new_page(locale=locale, viewport={"width": 1000, "height": 640})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/")
    page.wait_for_function("document.getElementById('info').textContent.length > 0")
    return page, errors


def count_reply_changes(page) -> None:
    """From now on, window.changes counts the changes to the text of the replies."""
    page.evaluate(
        """() => {
        window.changes = 0;
        new MutationObserver((records) => {
          for (const r of records) {
            const node = r.target.nodeType === Node.TEXT_NODE ? r.target.parentElement : r.target;
            if (node.closest(".reply")) window.changes++;
          }
        }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
      }"""
    )


def send(page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def test_a_question_typed_on_the_page_gets_the_streamed_greedy_reply(
    browser, live, taught, taught_conversations
):
    conversation = taught_conversations[1]  # system prompt, question, "in a small town"
    model, tok = taught
    chat = ChatConfig(max_new_tokens=16, temperature=0.0, system=conversation[0]["content"])
    expected = ChatSession(model, tok, chat).reply(conversation[1]["content"])
    page, errors = open_page(browser, live.url)
    assert page.text_content("#model") == "taught"
    assert page.get_attribute("#input", "placeholder").startswith("Ask a question")
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "16")
    page.fill("#system", conversation[0]["content"])
    count_reply_changes(page)
    send(page, conversation[1]["content"])
    page.wait_for_selector(".msg.assistant .meta")
    assert page.text_content(".msg.user") == conversation[1]["content"]
    assert page.text_content(".msg.assistant .reply") == expected == conversation[2]["content"]
    # the reply arrived piece by piece (its tokens), not in one piece at the end
    assert page.evaluate("window.changes") >= len(tok.encode(expected))
    assert "tokens" in page.text_content(".msg.assistant .meta")
    assert page.is_enabled("#send") and not page.is_enabled("#stop")

    # the second turn goes to the server with the whole conversation, as the chat stage keeps it
    send(page, taught_conversations[0][0]["content"])
    page.wait_for_function("document.querySelectorAll('.msg.assistant .meta').length == 2")
    assert len(page.query_selector_all(".msg.assistant")) == 2
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "chat_page.png"))
    page.click("#reset")
    assert page.query_selector_all(".msg") == []
    assert errors == []
    page.close()


def test_stop_ends_a_reply_and_a_documents_model_continues_chinese_text(
    browser, chat_tokenizer, tiny_chat_model, start_server, slow_engine
):
    server = start_server(
        tiny_chat_model(chat_tokenizer.vocab_size).eval(),
        chat_tokenizer,
        "demo_zh",
        engine=slow_engine(0.05),  # Stop lands in the middle of the reply
        conversations=False,
    )
    try:
        page, errors = open_page(browser, server.url, locale="zh-CN")
        assert page.text_content("#send") == "发送" and page.text_content("#stop") == "停止"
        assert "基础模型" in page.text_content("#info")
        assert page.is_hidden("#system-label")  # no system prompt for a model that continues text
        page.fill("#max_tokens", "80")
        prompt = "从前，有一只小猫。"
        send(page, prompt)
        page.wait_for_function(
            "document.querySelector('.reply') && document.querySelector('.reply').textContent.length > 0"
        )
        page.click("#stop")
        page.wait_for_selector(".msg.assistant .meta")
        assert "已停止" in page.text_content(".msg.assistant .meta")
        assert page.text_content(".msg.assistant .prompt") == prompt
        stopped = page.text_content(".msg.assistant .reply")
        deadline = time.time() + 10
        while httpx.get(server.url + "/health").json()["active_rows"] and time.time() < deadline:
            time.sleep(0.05)
        assert httpx.get(server.url + "/health").json()["active_rows"] == 0
        steps = server.served.engine.steps
        assert steps < 80  # the reply ended before its length limit
        assert page.text_content(".msg.assistant .reply") == stopped
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / "chat_page_zh.png"))
        assert errors == []
        page.close()
    finally:
        server.close()
