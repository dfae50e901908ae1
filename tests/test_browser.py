"""End to end: the real page in headless Chromium (Playwright) against a live server on stories260k + its atlas.

It chats, hovers a token (top-5), clicks a token (attribution table), applies a steering and sees the answer
change, and saves screenshots under the test's tmp_path.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from neuronscope.server import Knowledge, Monitor, create_app
from tests.test_server_support import HAVE_DESCRIBE, LiveServer, _stories, stories_atlas_dir

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.browser


def test_monitor_page_end_to_end(tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run `bash scripts/setup_system.sh` (apt chromium) for the browser test.")
    from playwright.sync_api import sync_playwright
    subject = _stories()
    app = create_app(Monitor(subject, Knowledge.load(subject, stories_atlas_dir(True))))
    errors: list[str] = []
    with LiveServer(app) as srv, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(srv.url + "/")
            page.wait_for_selector("#model-info:has-text('stories260k')")
            if not HAVE_DESCRIBE:
                assert "descriptions" in page.inner_text("#notes")  # the missing part is said on the page

            # 1. chat: the answer streams in, then the conversation is re-rendered as tokens
            page.fill("#max-tokens", "24")
            page.fill("#message", "Once upon a time there was a little dog")
            page.click("#send")
            page.wait_for_selector(".msg.assistant:not(.pending) .tok", timeout=30000)
            answer = page.inner_text(".msg.assistant").replace("ASSISTANT", "").strip()
            assert len(answer) > 10
            n_tokens = page.locator("#conversation .tok").count()
            assert n_tokens > 20
            page.wait_for_selector("#act-table tbody tr")  # activation view of the conversation
            assert "neurons firing" in page.inner_text("#act-summary")

            # 2. hover a token: its top-5 next tokens
            page.hover('#conversation .tok[data-pos="4"]')
            tip = page.locator("#tooltip")
            tip.wait_for(state="visible")
            assert "top-5" in tip.inner_text() and tip.locator("tr").count() == 5
            page.screenshot(path=str(tmp_path / "monitor-hover.png"))

            # 3. click a token: the attribution table
            page.click('#conversation .tok[data-pos="12"]')
            page.wait_for_selector("#attr-table tbody tr")
            assert page.locator("#attr-table tbody tr").count() == 50
            assert "top 1000" in page.inner_text("#attr-head")
            page.screenshot(path=str(tmp_path / "monitor-attribution.png"))

            # 4. steering: clamp three neurons on generated tokens, regenerate, the answer changes and is marked
            page.click("#tab-steering")
            page.fill("#steer-neurons", "1:2, 3:4, 4:16")
            page.select_option("#steer-mode", "clamp")
            page.fill("#steer-value", "8")
            page.click("#steer-apply-regen")
            page.wait_for_function("document.querySelectorAll('.msg.assistant:not(.pending) .tok.steered').length > 0",
                                   timeout=30000)
            steered = page.inner_text(".msg.assistant").replace("ASSISTANT", "").strip()
            assert steered != answer
            assert page.locator("#steer-list li").count() == 1
            page.screenshot(path=str(tmp_path / "monitor-steered.png"))

            # 5. remove the steering: the list empties
            page.click(".steer-remove")
            page.wait_for_function("document.querySelectorAll('.steer-remove').length === 0")
        finally:
            browser.close()
    assert not errors, errors
    shots = sorted(x.name for x in tmp_path.glob("*.png"))
    assert shots == ["monitor-attribution.png", "monitor-hover.png", "monitor-steered.png"]
    if os.environ.get("NEURONSCOPE_KEEP_SCREENSHOTS"):
        import shutil
        shutil.copytree(tmp_path, os.environ["NEURONSCOPE_KEEP_SCREENSHOTS"], dirs_exist_ok=True)
