"""The labeling page in a real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright).

A labeler opens their link, labels three pairs with the keyboard, undoes one and relabels it: the
export holds exactly those labels. A completion holding ``<script>`` or an ``onerror`` handler is
shown as text and runs nothing, long completions wrap on a phone-sized screen, and the admin page
shows the statistics. No browser is ever downloaded: without Chromium or Playwright these skip.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from uvicorn_thread import ServerThread

from rlhfkit.data import CandidateRecord
from rlhfkit.labeling.server import create_app
from rlhfkit.labeling.store import LabelStore, export_rows

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ADMIN = "admin-token-for-browser-tests-42"

sync_api = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK), reason=f"needs Chromium at {CHROMIUM}")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield browser
        browser.close()


def serve(tmp_path: Path, records: list[CandidateRecord]) -> tuple[LabelStore, ServerThread]:
    store = LabelStore(tmp_path / "labels.db")
    store.import_candidates(records)
    store.set_admin_token(ADMIN)
    return store, ServerThread(create_app(store.path))


def shown(page: Any) -> dict[str, str]:
    return page.evaluate(
        """() => ({pair: document.body.dataset.pairId, prompt: document.getElementById('prompt').textContent,
                  a: document.getElementById('a').textContent, b: document.getElementById('b').textContent})"""
    )


def wait_for_pair(page: Any, not_pair: str | None = None) -> dict[str, str]:
    """Wait until a pair other than ``not_pair`` is on screen and no request is in flight."""
    page.wait_for_function(
        "old => document.body.dataset.pairId && document.body.dataset.pairId !== old && !document.body.dataset.busy",
        arg=not_pair or "",
        timeout=10_000,
    )
    return shown(page)


def test_keyboard_labeling_with_undo_and_note_exports_exactly_the_labels_given(browser: Any, tmp_path: Path) -> None:
    records = [CandidateRecord(f"Question {i}?", [f"Answer {i} one", f"Answer {i} two"], "m") for i in range(4)]
    store, server = serve(tmp_path, records)
    token = store.add_labeler("ann")
    with server:
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(f"{server.url}/#token={token}")
        first = wait_for_pair(page)
        assert page.locator("#who").text_content() == "Labelling as ann"
        assert "0 labelled" in page.locator("#progress").text_content()
        page.keyboard.press("1")
        second = wait_for_pair(page, first["pair"])
        page.locator("#note").fill("B reads better")
        page.keyboard.press("2")  # typed in the note box: a "2" in the note, not a label
        assert page.locator("#note").input_value() == "B reads better2"
        page.locator("#note").fill("B reads better")
        page.keyboard.press("Escape")  # leaves the note box; the keys label again
        page.keyboard.press("2")
        third = wait_for_pair(page, second["pair"])
        assert page.locator("#note").input_value() == ""
        page.keyboard.press("1")
        fourth = wait_for_pair(page, third["pair"])
        assert "3 labelled" in page.locator("#progress").text_content()
        page.keyboard.press("u")  # undo the third label: that pair comes back
        back = wait_for_pair(page, fourth["pair"])
        assert back == third
        page.wait_for_function("() => document.getElementById('progress').textContent.startsWith('2 labelled')")
        page.keyboard.press("2")  # and this time B wins
        wait_for_pair(page, third["pair"])
        page.wait_for_function("() => document.getElementById('progress').textContent.startsWith('3 labelled')")
        page.close()
    rows, dropped = export_rows(store, "trl")
    expected = [
        (first["prompt"], first["a"], first["b"], None),
        (second["prompt"], second["b"], second["a"], "B reads better"),
        (third["prompt"], third["b"], third["a"], None),
    ]
    assert [(r["prompt"], r["chosen"], r["rejected"], r.get("note")) for r in rows] == expected
    assert all(r["labeler"] == "ann" and r["created_at"] for r in rows) and dropped == {}


def test_script_completion_is_text_runs_nothing_and_wraps_on_a_phone(browser: Any, tmp_path: Path) -> None:
    script = "<script>window.__pwned = 1</script>"
    image = '<img src=x onerror="window.__pwned = 2"> <b>bold?</b> ' + "unbroken" * 300
    store, server = serve(tmp_path, [CandidateRecord("<i>Which is safe?</i>", [script, image], "m")])
    token = store.add_labeler("<b>eve</b>")
    with server:
        page = browser.new_page(viewport={"width": 375, "height": 740}, is_mobile=True, has_touch=True)
        page.goto(f"{server.url}/#token={token}")
        pair = wait_for_pair(page)
        assert {pair["a"], pair["b"]} == {script, image}  # exactly the text, nothing parsed
        assert pair["prompt"] == "<i>Which is safe?</i>"
        assert page.evaluate("() => window.__pwned") is None
        assert page.evaluate("() => document.querySelectorAll('#task script, #task img, #task b, #task i').length") == 0
        assert page.locator("#who").text_content() == "Labelling as <b>eve</b>"
        layout = page.evaluate(
            """() => {
                const a = document.getElementById('a').getBoundingClientRect();
                const b = document.getElementById('b').getBoundingClientRect();
                return {scroll: document.documentElement.scrollWidth, width: window.innerWidth,
                        aRight: a.right, bRight: b.right, stacked: b.top >= a.bottom};
            }"""
        )
        assert layout["scroll"] <= layout["width"], layout  # long text wraps: no sideways scrolling
        assert max(layout["aRight"], layout["bRight"]) <= layout["width"] and layout["stacked"], layout
        page.locator("[data-choice=a]").tap()  # buttons work by touch too
        page.wait_for_function("() => document.getElementById('message').textContent.startsWith('All done')")
        assert page.evaluate("() => window.__pwned") is None

        admin = browser.new_page()
        admin.goto(f"{server.url}/admin#token={ADMIN}")
        admin.wait_for_selector("#labelers td")
        assert "<b>eve</b>" in admin.locator("#labelers").text_content()
        assert admin.locator("#labelers b").count() == 0
        refused = browser.new_page()
        refused.goto(f"{server.url}/admin#token={token}")  # a labeler's token on the admin page
        refused.wait_for_function("() => document.getElementById('message').textContent.includes('admin only')")
        for p in (page, admin, refused):
            p.close()
    assert len(store.label_rows()) == 1
