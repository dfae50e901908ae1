"""End to end: the real page in headless Chromium (Playwright) against a live server on stories260k + its atlas.

It chats, checks the tooltip against the model's logits at the hovered position, clicks a token (attribution),
reloads and opens a second tab (the conversation, steerings and selected view come back), steers an active concept
with one click and sees the new answer beside the old one, toggles the steering, exports the session and imports it
again (the same greedy answer), reloads in the middle of an answer (it is not lost), and keeps an over-long message
in the box with the limit shown. Screenshots go under the test's tmp_path ($NEURONSCOPE_KEEP_SCREENSHOTS keeps them).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from neuronscope.server import Knowledge, Monitor, create_app
from tests.test_server_support import HAVE_DESCRIBE, LiveServer, _stories, stories_atlas_dir

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PROMPT = "Once upon a time there was a little dog"

pytestmark = pytest.mark.browser


def answer_text(page, sel=".msg.assistant:not(.pending) .body") -> str:
    return page.inner_text(sel).strip()


def test_monitor_page_end_to_end(tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run `bash scripts/setup_system.sh` (apt chromium) for the browser test.")
    from playwright.sync_api import sync_playwright
    subject = _stories()
    mon = Monitor(subject, Knowledge.load(subject, stories_atlas_dir(True)))
    errors: list[str] = []
    with LiveServer(create_app(mon)) as srv, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            ctx = browser.new_context(viewport={"width": 1440, "height": 900}, accept_downloads=True)
            page = ctx.new_page()
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(srv.url + "/")
            page.wait_for_selector("#model-info:has-text('stories260k')")
            if not HAVE_DESCRIBE:
                assert "descriptions" in page.inner_text("#notes")  # the missing part is said on the page

            # 1. chat: the answer streams in, then the conversation is re-rendered as tokens
            page.fill("#max-tokens", "48")
            page.fill("#message", PROMPT)
            page.click("#send")
            page.wait_for_selector(".msg.assistant:not(.pending) .tok", timeout=30000)
            answer = answer_text(page)
            assert len(answer) > 10 and page.input_value("#message") == ""
            page.wait_for_selector("#act-table tbody tr")
            assert "neurons" in page.inner_text("#act-summary")
            # the table has one line per row and fits the page width
            widths = page.evaluate("[document.querySelector('#act-table').scrollWidth, "
                                   "document.querySelector('#side-pane').clientWidth, document.body.scrollWidth]")
            assert widths[0] <= widths[1] and widths[2] <= 1440, widths
            heights = page.evaluate("[...document.querySelectorAll('#act-table tbody tr')].map(r => r.offsetHeight)")
            assert max(heights) < 2 * min(heights) + 2, heights  # no wrapped rows
            # interpretable neurons and message tokens by default; the toggles show all; the filter filters
            n_interp = int(page.inner_text("#act-summary").split()[0])
            assert "interpretable only" in page.inner_text("#act-summary")
            page.uncheck("#act-interp")
            page.wait_for_function("!document.querySelector('#act-summary').textContent.includes('interpretable')")
            n_all = int(page.inner_text("#act-summary").split()[0])
            assert n_all >= n_interp and n_all == mon.activations(
                next(iter(mon.sessions._sessions.values())), content_only=True).total
            first = page.locator("#act-table tbody tr").first.locator(".nid").inner_text()
            page.fill("#act-filter", first)
            page.wait_for_function(f"document.querySelector('#act-summary').textContent.includes('{first}')")
            assert page.locator("#act-table tbody tr").count() >= 1
            assert all(first == page.locator("#act-table tbody tr .nid").nth(k).inner_text()
                       for k in range(page.locator("#act-table tbody tr").count()))
            page.fill("#act-filter", "")
            page.wait_for_function("!document.querySelector('#act-summary').textContent.includes('matching')")

            # 2. tooltip: p and the top-5 AT the hovered position, as the model's logits say
            toks = mon.tokens(next(iter(mon.sessions._sessions.values()))).tokens
            ids = [t.id for t in toks]
            pos = next(t.position for t in toks if t.role == "assistant") + 2
            probs = torch.softmax(subject.logits(torch.tensor([ids]))[0].float(), -1)
            top = probs[pos - 1].topk(5)
            want = [json.dumps(s) for s in mon._next_strings(ids[pos - 1], top.indices.tolist())]
            page.hover(f'#conversation .tok[data-pos="{pos}"]')
            tip = page.locator("#tooltip")
            tip.wait_for(state="visible")
            assert f"p={float(probs[pos - 1, ids[pos]]) * 100:.1f}%" in tip.inner_text()
            rows = tip.locator("tr")
            assert rows.count() == 5
            assert [rows.nth(k).locator("code").inner_text() for k in range(5)] == want
            assert [rows.nth(k).locator("td").nth(1).inner_text() for k in range(5)] == \
                [f"{float(x) * 100:.1f}%" for x in top.values]
            assert "chosen" in (rows.nth(0).get_attribute("class") or "")  # greedy: the token is the top one
            page.screenshot(path=str(tmp_path / "monitor-hover.png"))

            # 3. click a token: the attribution table
            page.click(f'#conversation .tok[data-pos="{pos}"]')
            page.wait_for_selector("#attr-table tbody tr")
            assert page.locator("#attr-table tbody tr").count() == 50
            assert "top 1000" in page.inner_text("#attr-head")

            # 4. one click on an active concept steers it; the new answer shows beside the old one. Syntax, format
            # and unclear groups are hidden until asked for: show them (this tiny model has few topic clusters)
            page.wait_for_function("document.querySelector('#cl-note').textContent.includes('concepts among')",
                                   timeout=30000)
            hidden = page.locator("#clusters .cluster.form").count()
            assert hidden == 0
            page.check("#cl-form")
            page.wait_for_selector("#clusters .cluster", timeout=30000)
            n_clusters = page.locator("#clusters .cluster").count()
            changed = False
            for k in range(min(n_clusters, 6)):
                name = page.locator("#clusters .cluster .cl-name").nth(k).inner_text()
                page.locator("#clusters .cluster").nth(k).locator(".cl-steer[data-mode=strengthen]").click()
                page.wait_for_function(  # the new answer, made with this steering, is rendered
                    "(n) => { const w = document.querySelector('.msg.compare .who'); return w && "
                    "!document.querySelector('#send').disabled && !document.querySelector('.msg.pending') && "
                    "w.textContent.includes(n); }", arg=name, timeout=30000)
                assert name in page.inner_text("#steerbar")
                now, before = answer_text(page, ".msg.compare .body"), page.inner_text(".msg.compare .previous .text")
                assert before.strip() == answer.strip()
                assert name in page.inner_text(".msg.compare .who")  # the steering that made the new answer
                if now != answer:
                    changed = True
                    break
                page.click(".steer-remove")  # no effect: try the next concept
                page.wait_for_function("document.querySelectorAll('.steer-remove').length === 0")
            assert changed, "no active concept changed the answer"
            steered = now
            page.screenshot(path=str(tmp_path / "monitor-steered.png"))

            # 5. reload and a second tab: conversation, steering and selected view come back
            page.reload()
            page.wait_for_selector(".msg.compare .body .tok", timeout=30000)
            assert answer_text(page, ".msg.compare .body") == steered
            assert page.locator("#steerbar .chip").count() == 1
            # the tab that was open (restored right after the conversation renders)
            page.wait_for_function("document.querySelector('#tab-attribution')?.classList.contains('active')",
                                   timeout=10000)
            assert "active" in (page.get_attribute("#tab-attribution", "class") or "")
            tab2 = ctx.new_page()
            tab2.goto(srv.url + "/")
            tab2.wait_for_selector(".msg.compare .body .tok", timeout=30000)
            assert answer_text(tab2, ".msg.compare .body") == steered
            tab2.close()

            # 6. toggle the steering off and on without retyping
            page.uncheck(".steer-toggle")
            page.wait_for_selector("#steerbar .chip.off")
            page.check(".steer-toggle")
            page.wait_for_selector("#steerbar .chip:not(.off)")

            # 7. export, then import: the same greedy answer
            with page.expect_download() as dl:
                page.click("#export")
            path = tmp_path / "session.json"
            dl.value.save_as(path)
            data = json.loads(path.read_text())
            assert data["model"]["fingerprint"] == subject.fingerprint and len(data["steerings"]) == 1
            page.click("#new-chat")
            page.wait_for_selector("#conversation .hint")
            page.set_input_files("#import", str(path))
            page.wait_for_selector(".msg.compare .body .tok", timeout=30000)
            page.click("#regenerate")
            page.wait_for_function("!document.querySelector('#send').disabled && "
                                   "document.querySelector('.msg.compare .previous .text')", timeout=30000)
            page.wait_for_selector(".msg.assistant.compare:not(.pending)")
            assert answer_text(page, ".msg.compare .body") == steered  # regenerated from the import: same answer
            assert page.inner_text(".msg.compare .previous .text").strip() == steered.strip()

            # 8. reload in the middle of an answer: the answer is finished on the server and shown
            page.fill("#max-tokens", "200")
            page.fill("#message", "Lily had a big red ball")
            page.click("#send")
            page.wait_for_selector(".msg.pending .tok")
            page.reload()
            page.wait_for_function("document.querySelectorAll('.msg.user').length === 2 && "
                                   "document.querySelectorAll('.msg.assistant').length === 2 && "
                                   "!document.querySelector('.msg.pending')", timeout=60000)
            sid = page.evaluate("JSON.parse(localStorage.getItem('neuronscope.monitor')).sid")
            token = next(c["value"] for c in ctx.cookies() if c["name"] == "ns_client")
            kept = mon.sessions.get(sid, token).messages
            assert [m.role for m in kept][-2:] == ["user", "assistant"] and kept[-1].content
            assert page.locator(".msg.assistant").last.inner_text().strip().endswith(kept[-1].content.strip()[-20:])

            # 9. an over-long message: a 400 that says the limit, the text stays in the box, the counter shows it
            page.fill("#message", "x" * 4001)
            assert "4001 / 4000" in page.inner_text("#char-count")
            assert "over" in (page.get_attribute("#char-count", "class") or "")
            page.click("#send")
            page.wait_for_function("document.querySelector('#status').textContent.includes('limit is 4000')")
            assert len(page.input_value("#message")) == 4001
            page.screenshot(path=str(tmp_path / "monitor-final.png"))
        finally:
            browser.close()
    assert not errors, errors
    shots = sorted(x.name for x in tmp_path.glob("*.png"))
    assert shots == ["monitor-final.png", "monitor-hover.png", "monitor-steered.png"]
    if os.environ.get("NEURONSCOPE_KEEP_SCREENSHOTS"):
        import shutil
        shutil.copytree(tmp_path, os.environ["NEURONSCOPE_KEEP_SCREENSHOTS"], dirs_exist_ok=True)


ALICE = "Alice has 4 brothers and 2 sisters. How many sisters does Alice's brother have?"


@pytest.mark.slow
def test_monitor_page_on_smollm2_alice(smollm, tmp_path):
    """The seed article's question on the real instruct model (no atlas: raw activations): the greedy answer through
    the chat template, the tooltip against the model's logits, a clicked token's attribution, and a steering that
    regenerates the answer beside the old one."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run `bash scripts/setup_system.sh` (apt chromium) for the browser test.")
    from playwright.sync_api import sync_playwright
    mon = Monitor(smollm)
    errors: list[str] = []
    with LiveServer(create_app(mon)) as srv, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 900})
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(srv.url + "/")
            page.wait_for_selector("#model-info:has-text('layers')")
            assert "statistics" in page.inner_text("#notes")  # no atlas: said on the page
            page.fill("#max-tokens", "24")
            page.fill("#message", ALICE)
            page.click("#send")
            page.wait_for_selector(".msg.assistant:not(.pending) .tok", timeout=120000)
            page.wait_for_function("!document.querySelector('#send').disabled", timeout=120000)
            answer = answer_text(page)
            assert answer == smollm.generate(ALICE, chat=True, max_new_tokens=24).strip()
            page.wait_for_selector("#act-table tbody tr", timeout=60000)

            s = next(iter(mon.sessions._sessions.values()))
            toks = mon.tokens(s).tokens
            ids = [t.id for t in toks]
            pos = next(t.position for t in toks if t.role == "assistant") + 1
            probs = torch.softmax(smollm.logits(torch.tensor([ids]))[0].float(), -1)
            top = probs[pos - 1].topk(5)
            page.hover(f'#conversation .tok[data-pos="{pos}"]')
            tip = page.locator("#tooltip")
            tip.wait_for(state="visible")
            assert f"p={float(probs[pos - 1, ids[pos]]) * 100:.1f}%" in tip.inner_text()
            rows = tip.locator("tr")
            assert [rows.nth(k).locator("code").inner_text() for k in range(5)] == \
                [json.dumps(x) for x in mon._next_strings(ids[pos - 1], top.indices.tolist())]

            page.click(f'#conversation .tok[data-pos="{pos}"]')
            page.wait_for_selector("#attr-table tbody tr", timeout=60000)
            assert "top 1000" in page.inner_text("#attr-head")
            att = mon.attribution(s, pos, page_size=1)
            assert att.target_token == ids[pos]

            # suppress the 20 neurons that most caused that token, on the generated tokens: a new answer beside
            r = mon.attribution(s, pos, page_size=20).rows
            mon.add_steering(s, mode="suppress", neurons=[[x.layer, x.neuron] for x in r], label="top20",
                             ranges=[[0, pos]])
            page.reload()
            page.wait_for_selector("#steerbar .chip", timeout=30000)
            page.click("#regenerate")
            page.wait_for_function(
                "() => { const w = document.querySelector('.msg.compare .who'); return w && "
                "!document.querySelector('#send').disabled && !document.querySelector('.msg.pending') && "
                "w.textContent.includes('top20'); }", timeout=120000)
            assert page.inner_text(".msg.compare .previous .text").strip() == answer
            page.screenshot(path=str(tmp_path / "smollm2-alice.png"))
        finally:
            browser.close()
    assert not errors, errors
