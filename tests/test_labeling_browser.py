"""The labeling page in a real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright).

A labeler opens their link, labels three pairs with the keyboard, undoes one and relabels it: the
export holds exactly those labels, with the strength of each (keys 1-5: A much / slightly better,
about the same, B slightly / much better). A completion holding ``<script>`` or an ``onerror``
handler is shown as text and runs nothing, long completions wrap on a phone-sized screen, and the
admin page shows the statistics, the per-labeler quality columns and their flags.

Guidelines are acknowledged before any task (again when they change), then stay in a collapsible
block; Markdown holding a script, an image with ``onerror`` or a ``javascript:`` link runs nothing.
A ranking of four completions given by keyboard (or by dragging) is exported as its six pairs
under one ranking id, and a gold pair reaches the page exactly like any other pair. No browser is
ever downloaded: without Chromium or Playwright these skip.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from uvicorn_thread import ServerThread

from rlhfkit.data import CandidateRecord, PreferenceRecord
from rlhfkit.labeling.server import create_app
from rlhfkit.labeling.store import _GOLD_DRAW, LabelStore, export_rows

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
        page.keyboard.press("1")  # A much better
        second = wait_for_pair(page, first["pair"])
        page.locator("#note").fill("B reads better")
        page.keyboard.press("5")  # typed in the note box: a "5" in the note, not a label
        assert page.locator("#note").input_value() == "B reads better5"
        page.locator("#note").fill("B reads better")
        page.keyboard.press("Escape")  # leaves the note box; the keys label again
        page.keyboard.press("5")  # B much better
        third = wait_for_pair(page, second["pair"])
        assert page.locator("#note").input_value() == ""
        page.keyboard.press("2")  # A slightly better
        fourth = wait_for_pair(page, third["pair"])
        assert "3 labelled" in page.locator("#progress").text_content()
        page.keyboard.press("u")  # undo the third label: that pair comes back, the old answer outlined
        back = wait_for_pair(page, fourth["pair"])
        assert back == third
        assert page.locator("button.previous").text_content().startswith("A slightly better")
        page.wait_for_function("() => document.getElementById('progress').textContent.startsWith('2 labelled')")
        page.keyboard.press("4")  # and this time B wins, slightly
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
    assert [(r["strength"], r["margin"]) for r in rows] == [("much", 1.0), ("much", 1.0), ("slightly", 1 / 3)]
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
        page.locator("[data-choice=a][data-strength=much]").tap()  # buttons work by touch too
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


# ----------------------------------------------------------------------------------------------
# Guidelines, strength, ranking, gold pairs, the admin page's quality columns


def visible(page: Any, selector: str) -> bool:
    """The element exists and neither it nor a parent is ``hidden``."""
    script = "s => { const e = document.querySelector(s); return !!e && !e.closest('[hidden]'); }"
    return bool(page.evaluate(script, selector))


def wait_idle(page: Any) -> None:
    page.wait_for_function("() => !document.body.dataset.busy", timeout=10_000)


def wait_done(page: Any) -> None:
    """Wait for "All done" and the progress fetched after it."""
    page.wait_for_function(
        "() => document.getElementById('message').textContent.startsWith('All done') && !document.body.dataset.busy",
        timeout=10_000,
    )


def wait_for_ack(page: Any, text: str) -> None:
    """Wait until the acknowledgement screen shows guidelines holding ``text``."""
    page.wait_for_function(
        """t => !document.getElementById('ack').hidden && !document.body.dataset.busy
               && document.getElementById('ack-text').textContent.includes(t)""",
        arg=text,
        timeout=10_000,
    )


GUIDELINES = """# How to judge

Prefer the **correct** answer; then the *clearer* one.

- Facts first
- Then tone

| case | pick |
|---|---|
| both wrong | about the same |
"""


def test_guidelines_are_acknowledged_before_any_task_and_stay_collapsible(browser: Any, tmp_path: Path) -> None:
    records = [CandidateRecord(f"Question {i}?", [f"Answer {i} one", f"Answer {i} two"], "m") for i in range(3)]
    store, server = serve(tmp_path, records)
    original = store.set_guidelines(GUIDELINES)
    token = store.add_labeler("ann")
    with server:
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(f"{server.url}/#token={token}")
        wait_for_ack(page, "Prefer the correct answer")
        assert page.locator("#ack-text h1").text_content() == "How to judge"
        assert page.locator("#ack-text li").count() == 2 and page.locator("#ack-text table td").count() == 2
        assert page.locator("#ack-text strong").text_content() == "correct"
        assert not visible(page, "#task") and not visible(page, "#guidelines")
        page.keyboard.press("1")  # no task yet: the keys label nothing
        wait_idle(page)
        assert page.evaluate("() => document.body.dataset.pairId || ''") == ""
        page.keyboard.press("Enter")  # "I have read the guidelines"
        first = wait_for_pair(page)
        assert not visible(page, "#ack") and visible(page, "#guidelines")
        assert page.evaluate("() => document.getElementById('guidelines').open") is False  # closed by default
        assert page.locator("#guidelines-text h1").text_content() == "How to judge"
        page.locator("#guidelines summary").click()
        assert page.locator("#guidelines-text li").first.is_visible()
        page.keyboard.press("1")
        second = wait_for_pair(page, first["pair"])

        new = store.set_guidelines("# Changed\n\nLength does not matter.")  # the admin edits them mid-session
        page.keyboard.press("5")  # refused (428): the new guidelines come up, nothing is saved
        wait_for_ack(page, "Length does not matter.")
        assert "not saved" in page.locator("#message").text_content() and not visible(page, "#task")
        assert len(store.label_rows()) == 1
        newer = store.set_guidelines("# Changed again\n\nBrevity wins.")  # and again, while they read
        page.locator("#ack-button").click()  # 409: the newest ones are shown instead
        wait_for_ack(page, "Brevity wins.")
        page.locator("#ack-button").click()
        back = wait_for_pair(page)
        assert back == second  # the same pair is back
        assert "Brevity wins." in page.locator("#guidelines-text").text_content()
        page.keyboard.press("5")
        wait_for_pair(page, second["pair"])
        page.close()
    rows, _ = export_rows(store)
    assert [r["prompt"] for r in rows] == [first["prompt"], second["prompt"]]
    assert [r["guidelines_sha256"] for r in rows] == [original, newer] and new != newer


def test_guidelines_with_script_image_and_javascript_link_run_nothing(browser: Any, tmp_path: Path) -> None:
    markdown = (
        "# Rules <script>window.__pwned = 1</script>\n\n"
        '<img src=x onerror="window.__pwned = 2; alert(2)">\n\n'
        "[click me](javascript:window.__pwned=3) and [docs](https://example.org/guide)\n\n"
        '<a href="javascript:alert(4)">raw link</a> <svg onload="alert(5)"></svg>\n'
    )
    store, server = serve(tmp_path, [CandidateRecord("Q?", ["one", "two"], "m")])
    store.set_guidelines(markdown)
    token = store.add_labeler("eve")
    with server:
        page = browser.new_page()
        dialogs: list[str] = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.goto(f"{server.url}/#token={token}")
        wait_for_ack(page, "click me")
        text = page.locator("#ack-text").text_content()
        assert "<script>window.__pwned = 1</script>" in text  # shown as text
        assert '<img src=x onerror="window.__pwned = 2; alert(2)">' in text
        for box in ("#ack-text", "#guidelines-text"):
            assert page.evaluate(f"() => document.querySelectorAll('{box} script, {box} img, {box} svg').length") == 0
        links = page.evaluate("() => [...document.querySelectorAll('#ack-text a')].map(a => [a.href, a.target])")
        assert links == [["https://example.org/guide", "_blank"]]  # javascript: links stay text
        assert "[click me](javascript:window.__pwned=3)" in text and '<a href="javascript:alert(4)">' in text
        page.locator("#ack-text").get_by_text("click me").click(position={"x": 4, "y": 4})  # not on "docs"
        page.keyboard.press("Enter")
        wait_for_pair(page)
        page.locator("#guidelines summary").click()
        page.locator("#guidelines-text").get_by_text("raw link").click(position={"x": 4, "y": 4})
        assert page.evaluate("() => window.__pwned") is None
        assert dialogs == []
        page.close()


def test_strength_keys_and_buttons_export_strength_and_margin(browser: Any, tmp_path: Path) -> None:
    records = [CandidateRecord(f"Question {i}?", [f"Answer {i} one", f"Answer {i} two"], "m") for i in range(6)]
    store, server = serve(tmp_path, records)
    token = store.add_labeler("ann")
    presses = ["1", "2", "3", "4", "5", "s"]
    with server:
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(f"{server.url}/#token={token}")
        shown_pairs = []
        previous = None
        for key in presses:
            pair = wait_for_pair(page, previous)
            shown_pairs.append(pair)
            if key == "4":  # the button does what the key does
                page.locator("[data-choice=b][data-strength=slightly]").click()
            else:
                page.keyboard.press(key)
            previous = pair["pair"]
        wait_done(page)
        page.close()
    rows, dropped = export_rows(store, include_ties=True, include_skips=True)
    got = [(r["chosen"], r.get("strength"), r.get("margin", 0.0), "tie" in r, "skip" in r) for r in rows]
    a, b = [p["a"] for p in shown_pairs], [p["b"] for p in shown_pairs]
    assert got[0] == (a[0], "much", 1.0, False, False)
    assert got[1] == (a[1], "slightly", 1 / 3, False, False)
    assert got[2][1:] == (None, 0.0, True, False)
    assert got[3] == (b[3], "slightly", 1 / 3, False, False)
    assert got[4] == (b[4], "much", 1.0, False, False)
    assert got[5][1:] == (None, 0.0, False, True)
    assert dropped == {}


def serve_ranking(tmp_path: Path, texts: list[str], prompts: int = 1) -> tuple[LabelStore, ServerThread, str]:
    records = [CandidateRecord(f"Rank these {p}", [f"{t} ({p})" for t in texts], "m") for p in range(prompts)]
    store, server = serve(tmp_path, records)
    store.set_mode("rank")
    return store, server, store.add_labeler("ann")


def wait_for_prompt(page: Any, not_prompt: str | None = None) -> list[str]:
    """Wait for a prompt to rank (other than ``not_prompt``); its completions as shown, by number."""
    page.wait_for_function(
        "old => document.body.dataset.promptId && document.body.dataset.promptId !== old"
        " && !document.body.dataset.busy",
        arg=not_prompt or "",
        timeout=10_000,
    )
    return page.evaluate(
        """() => [...document.querySelectorAll('#ranklist li')]
                 .sort((x, y) => Number(x.dataset.key) - Number(y.dataset.key))
                 .map(li => li.querySelector('.text').textContent)"""
    )


def ranking_on_screen(page: Any) -> list[tuple[str, str]]:
    """(text, rank shown) of each card, top to bottom."""
    cards = page.evaluate(
        """() => [...document.querySelectorAll('#ranklist li')].map(li =>
                 [li.querySelector('.text').textContent, li.dataset.rank])"""
    )
    return [(text, rank) for text, rank in cards]


def exported_ranking(store: LabelStore) -> tuple[set[tuple[str, str]], set[Any]]:
    rows, dropped = export_rows(store)
    assert dropped == {}
    return {(r["chosen"], r["rejected"]) for r in rows}, {r["ranking_id"] for r in rows}


def better_than(order: list[str]) -> set[tuple[str, str]]:
    return {(order[i], order[j]) for i in range(len(order)) for j in range(i + 1, len(order))}


def test_ranking_four_completions_by_keyboard_exports_six_pairs(browser: Any, tmp_path: Path) -> None:
    store, server, token = serve_ranking(tmp_path, ["Alpha", "Beta", "Gamma", "Delta"])
    with server:
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(f"{server.url}/#token={token}")
        texts = wait_for_prompt(page)
        assert len(texts) == 4 and page.locator("#title").text_content().startswith("Rank")
        assert "0 ranked" in page.locator("#progress").text_content()
        assert all(rank == "" for _, rank in ranking_on_screen(page))  # nothing ranked yet
        page.keyboard.press("Enter")  # not whole yet: nothing is sent
        wait_idle(page)
        assert "more to pick" in page.locator("#message").text_content()
        for key in ("3", "1", "2"):
            page.keyboard.press(key)
        page.keyboard.press("Backspace")  # takes back "2"
        assert ranking_on_screen(page) == [(texts[2], "1"), (texts[0], "2"), (texts[1], ""), (texts[3], "")]
        page.keyboard.press("4")  # the last one goes to the bottom by itself
        order = [texts[2], texts[0], texts[3], texts[1]]
        assert ranking_on_screen(page) == [(t, str(i + 1)) for i, t in enumerate(order)]
        page.keyboard.press("Enter")
        wait_done(page)
        assert "1 ranked" in page.locator("#progress").text_content()
        pairs, ids = exported_ranking(store)
        assert pairs == better_than(order) and len(pairs) == 6 and len(ids) == 1 and None not in ids
        first_id = ids.pop()

        page.keyboard.press("u")  # the ranking comes back as it was given
        wait_for_prompt(page)
        page.wait_for_function("() => document.getElementById('message').textContent.startsWith('Undone')")
        assert ranking_on_screen(page) == [(t, str(i + 1)) for i, t in enumerate(order)]
        assert export_rows(store)[0] == []
        page.keyboard.press("Backspace")  # takes back the 3rd pick: 1st and 2nd stay, the last two are open
        assert [rank for _, rank in ranking_on_screen(page)] == ["1", "2", "", ""]
        page.keyboard.press("2")
        page.keyboard.press("Enter")
        wait_done(page)
        assert "1 ranked" in page.locator("#progress").text_content()
        page.close()
    pairs, ids = exported_ranking(store)
    assert pairs == better_than([texts[2], texts[0], texts[1], texts[3]]) and len(ids) == 1 and first_id not in ids


def drag(page: Any, source: Any, target: Any, below: bool) -> None:
    """Drag ``source`` (a handle) by mouse onto ``target``'s upper or lower part, in small steps."""
    s, t = source.bounding_box(), target.bounding_box()
    page.mouse.move(s["x"] + s["width"] / 2, s["y"] + s["height"] / 2)
    page.mouse.down()
    page.mouse.move(t["x"] + 20, t["y"] + t["height"] * (0.8 if below else 0.2), steps=8)
    page.mouse.up()


def test_drag_reorders_a_ranking_on_a_phone_sized_screen(browser: Any, tmp_path: Path) -> None:
    texts_in = ["Alpha", "Beta", "Gamma " + "unbroken" * 20]
    store, server, token = serve_ranking(tmp_path, texts_in)
    with server:
        page = browser.new_page(viewport={"width": 375, "height": 812})
        page.goto(f"{server.url}/#token={token}")
        texts = wait_for_prompt(page)
        layout = page.evaluate("() => [document.documentElement.scrollWidth, window.innerWidth]")
        assert layout[0] <= layout[1], layout  # long completions wrap
        card = {t: page.locator("#ranklist li", has_text=t) for t in texts}
        page.locator("#ranklist").scroll_into_view_if_needed()
        drag(page, card[texts[2]].locator(".handle"), card[texts[0]], below=False)  # last to the top
        assert ranking_on_screen(page) == [(texts[2], "1"), (texts[0], ""), (texts[1], "")]
        # below the bottom card: it and everything above it count as ranked
        drag(page, card[texts[0]].locator(".handle"), card[texts[1]], below=True)
        order = [texts[2], texts[1], texts[0]]
        assert ranking_on_screen(page) == [(t, str(i + 1)) for i, t in enumerate(order)]
        drag(page, card[texts[0]].locator(".handle"), card[texts[2]], below=False)  # and back to the top
        order = [texts[0], texts[2], texts[1]]
        assert ranking_on_screen(page) == [(t, str(i + 1)) for i, t in enumerate(order)]
        page.locator("#rank-submit").click()
        wait_done(page)
        page.close()
    pairs, ids = exported_ranking(store)
    assert pairs == better_than(order) and len(ids) == 1


def test_gold_pair_looks_like_any_other_pair(browser: Any, tmp_path: Path) -> None:
    store, server = serve(tmp_path, [CandidateRecord("Capital of Italy?", ["Rome", "Milan"], "m")])
    store.import_gold([PreferenceRecord("Capital of France?", "Paris", "Lyon")])
    store.set_gold_rate(0.999)
    token = store.add_labeler("ann")
    payloads: list[str] = []

    def record(response: Any) -> None:
        if response.url.endswith("/api/next") and response.status == 200:
            payloads.append(response.text())

    _GOLD_DRAW.seed(1)  # the first new pair is the gold one
    try:
        with server:
            page = browser.new_page()
            page.on("response", record)
            page.goto(f"{server.url}/#token={token}")
            first = wait_for_pair(page)
            assert first["prompt"] == "Capital of France?"  # the gold pair, served like any other
            dom = page.evaluate(
                "() => document.querySelector('header').outerHTML + document.querySelector('main').outerHTML"
                " + JSON.stringify(document.body.dataset)"
            )
            page.keyboard.press("1")
            second = wait_for_pair(page, first["pair"])
            assert second["prompt"] == "Capital of Italy?"
            assert "1 labelled" in page.locator("#progress").text_content()  # the gold answer counts
            page.keyboard.press("1")
            page.wait_for_function("() => document.getElementById('progress').textContent.startsWith('2 labelled')")
            page.close()
    finally:
        _GOLD_DRAW.seed()
    gold_payload, real_payload = (json.loads(p) for p in payloads)
    assert set(gold_payload) == set(real_payload) == {"kind", "pair_id", "prompt", "a", "b", "progress"}
    assert set(gold_payload["progress"]) == set(real_payload["progress"])
    assert "gold" not in payloads[0].lower() and "gold" not in dom.lower()
    assert len(store.label_rows(gold=True)) == 1 and len(store.label_rows()) == 1
    assert [r["prompt"] for r in export_rows(store)[0]] == ["Capital of Italy?"]  # gold is never exported


def test_admin_page_shows_quality_columns_and_flags(browser: Any, tmp_path: Path) -> None:
    records = [CandidateRecord(f"Question {i}?", [f"Answer {i} one", f"Answer {i} two"], "m") for i in range(12)]
    store, server = serve(tmp_path, records)
    store.import_gold([PreferenceRecord("Capital of France?", "Paris", "Lyon")])
    store.add_labeler("<b>fast</b>")
    store.add_labeler("bob")
    fast, bob = (store.labeler_for_token(store.reissue_token(n)) for n in ("<b>fast</b>", "bob"))
    for i in range(11):  # always A, instantly: both flags
        pair = store.next_pair(fast)
        store.add_label(fast, pair.pair_id, "a", strength="much" if i % 2 else "slightly")
    store.set_gold_rate(0.5)
    _GOLD_DRAW.seed(3)
    try:
        for _ in range(6):
            pair = store.next_pair(bob)
            if pair is None:
                break
            store.add_label(bob, pair.pair_id, "b")
    finally:
        _GOLD_DRAW.seed()
    assert store.label_rows(gold=True), "no gold pair was drawn for bob; change the seed"
    with server:
        admin = browser.new_page(viewport={"width": 1280, "height": 800})
        admin.goto(f"{server.url}/admin#token={ADMIN}")
        admin.wait_for_selector("#labelers td")
        head = admin.locator("#labelers th").all_text_contents()
        for column in ("gold", "agree w/ others", "kappa w/ others", "words/min", "left share", "flags"):
            assert column in head
        assert "agree w/ judge" not in head  # no judge set
        rows = {
            r[0]: dict(zip(head, r, strict=True))
            for r in admin.evaluate(
                "() => [...document.querySelectorAll('#labelers tr')].slice(1)"
                ".map(tr => [...tr.children].map(td => td.textContent))"
            )
        }
        assert rows["<b>fast</b>"]["left share"] == "100 %"
        assert "faster than reading" in rows["<b>fast</b>"]["flags"] and "picks A" in rows["<b>fast</b>"]["flags"]
        assert rows["bob"]["flags"] == "-" and rows["bob"]["gold"].endswith("/1)")
        assert admin.locator("#labelers tr.flagged").count() == 1 and admin.locator("#labelers b").count() == 0
        assert visible(admin, "#flags") and "<b>fast</b>: faster than reading" in admin.locator("#flags").text_content()
        summary = admin.locator("#summary").text_content()
        assert "much / slightly better5 / 6" in summary and "gold answers1" in summary
        admin.close()
