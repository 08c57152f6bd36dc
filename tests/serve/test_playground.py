"""The web playground in headless Chromium (Playwright) against a real `gptlab serve`.

Chromium is Debian's (/usr/bin/chromium, or $CHROMIUM): Playwright's own browser download is not
used. The tests are skipped, saying why, where Playwright or Chromium is missing.

The model is a small random one (fast to make); GPTLAB_PLAYGROUND_MODEL=PATH serves a trained model
instead, and GPTLAB_PLAYGROUND_SCREENSHOT=FILE keeps the screenshot (docs/playground.png is made so,
from the model `gptlab train` makes).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest
import torch

from gptlab.model import GPTModel
from gptlab.pretrained.native import save_model
from tests.helpers import tiny_config
from tests.serve.conftest import ServerProcess

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update"]
pytestmark = pytest.mark.skipif(shutil.which(CHROMIUM) is None,
                                reason=f"no Chromium at {CHROMIUM} (apt-get install chromium, or set CHROMIUM)")
expect = sync_api.expect


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A random model big enough (30M parameters, ~10 ms a token) to watch it stream and stop it, or the one given."""
    model = os.environ.get("GPTLAB_PLAYGROUND_MODEL")
    if not model:
        torch.manual_seed(0)
        net = GPTModel(tiny_config(context_length=256, emb_dim=384, n_heads=6, n_layers=6))
        with torch.no_grad():
            for p in net.parameters():
                p.mul_(4.0)  # a peaked, varied distribution, as a trained model's
        model = str(save_model(net, tmp_path_factory.mktemp("playground") / "random-30M"))
    srv = ServerProcess("--model", model, cwd=tmp_path_factory.mktemp("playground-run"))
    yield srv
    assert srv.stop() == 0, srv.log


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    """The playground, freshly loaded; `page.problems` collects console errors and warnings."""
    context = browser.new_context(viewport={"width": 1200, "height": 800})
    pg = context.new_page()
    problems: list[str] = []
    pg.on("console", lambda m: problems.append(f"{m.type}: {m.text}") if m.type in ("error", "warning") else None)
    pg.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))
    pg.problems = problems
    pg.goto(server.url + "/")
    expect(pg.locator("#model-name")).to_have_text(server.name)
    yield pg
    context.close()


def tokens(page):
    return page.get_by_label("Output").locator(".tok")


def chart(page):
    return page.get_by_label("Next-token probabilities")


def column(page, index: int) -> list[str]:
    """The percentages shown in one chart column: 1 = T = 1, 2 = the chosen T, 3 = final."""
    return chart(page).locator(f"tbody tr td:nth-child({index + 1}) .pct").all_inner_texts()


def percents(texts: list[str]) -> list[float]:
    return [float(t.strip().lstrip("<").rstrip("%")) for t in texts]


def fill(page, **values) -> None:
    for label, value in values.items():
        page.get_by_label(label).fill(str(value))


def test_generate_watch_it_stream_explore_the_chart(page, server, tmp_path):
    page.get_by_label("Prompt").fill("A function")
    fill(page, **{"Temperature": 0.8, "Top-k": 8, "Max new tokens": 32, "Seed": 3})
    # Every change to Output records its token count, however fast the tokens come.
    page.evaluate("""() => { window.seenCounts = [];
        new MutationObserver(() => window.seenCounts.push(document.querySelectorAll('#output .tok').length))
            .observe(document.getElementById('output'), {childList: true, subtree: true}); }""")
    page.get_by_role("button", name="Generate").click()
    status = page.get_by_role("status")
    expect(status).to_contain_text("Done", timeout=60_000)
    n = tokens(page).count()
    assert n == 32 or "end of text" in status.inner_text()
    seen = set(page.evaluate("window.seenCounts"))
    assert len({c for c in seen if 0 < c < n}) >= 3, f"Output did not grow step by step: {sorted(seen)}"
    assert re.search(r"\d+ tokens in [\d.]+ s \([\d.]+ tokens/s\)", status.inner_text())

    expect(chart(page)).to_contain_text(f"Step {n} of {n}")
    expect(chart(page)).to_contain_text("(all others)")
    expect(chart(page).locator("tr.drawn")).to_have_count(1)
    assert len(column(page, 1)) == 11  # 10 candidates and "(all others)"
    assert re.match(r"token id \d+", tokens(page).first.get_attribute("title"))

    tokens(page).nth(2).click()  # the distribution step 3 was drawn from
    expect(chart(page)).to_contain_text(f"Step 3 of {n}")
    expect(tokens(page).nth(2)).to_have_class(re.compile(r"\bshown\b"))
    as_drawn = column(page, 2)
    page.get_by_label("Temperature").fill("2.5")  # "what if": the server re-scores that step
    expect(chart(page)).to_contain_text("what if")
    expect(chart(page)).to_contain_text("T = 2.5")
    assert column(page, 2) != as_drawn
    flat = percents(column(page, 2)[:-1])
    page.get_by_label("Temperature").fill("0.3")
    expect(chart(page)).to_contain_text("T = 0.3")
    sharp = percents(column(page, 2)[:-1])
    assert max(sharp) > max(flat), (sharp, flat)
    page.get_by_label("Top-k").fill("2")
    expect(chart(page)).to_contain_text("top-k 2")
    expect(chart(page).locator("tbody tr.masked")).to_have_count(8)

    page.get_by_label("Temperature").fill("0.8")
    page.get_by_label("Top-k").fill("8")
    expect(chart(page)).to_contain_text("as drawn")
    page.evaluate("document.activeElement.blur()")
    page.mouse.move(0, 0)
    shot = Path(os.environ.get("GPTLAB_PLAYGROUND_SCREENSHOT") or tmp_path / "playground.png")
    page.screenshot(path=str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not page.problems, page.problems


@pytest.mark.skipif(bool(os.environ.get("GPTLAB_PLAYGROUND_MODEL")),
                    reason="a small trained model can finish before Stop is clicked; needs the test's own model")
def test_stop_cancels_the_generation_on_the_server(page, server):
    before = httpx.get(server.url + "/health").json()["cancelled"]
    longest = httpx.get(server.url + "/v1/models").json()["data"][0]["context_length"] - 6
    page.get_by_label("Prompt").fill("A long story")
    fill(page, **{"Temperature": 1, "Max new tokens": longest, "Seed": 11})
    page.get_by_role("button", name="Generate").click()
    expect(tokens(page).nth(3)).to_be_attached()  # (no wait_for_function: the page's CSP forbids eval)
    page.get_by_role("button", name="Stop").click()
    expect(page.get_by_role("status")).to_contain_text("Stopped")
    n = tokens(page).count()
    page.wait_for_timeout(300)
    assert tokens(page).count() == n < longest
    deadline = time.monotonic() + 10
    while httpx.get(server.url + "/health").json()["cancelled"] == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.get(server.url + "/health").json()["cancelled"] == before + 1
    assert not page.problems, page.problems


def test_a_server_error_is_shown_in_the_status_line(page):
    page.get_by_label("Temperature").fill("-1")
    page.get_by_role("button", name="Generate").click()
    expect(page.get_by_role("status")).to_contain_text("temperature must be >= 0")
    expect(page.get_by_role("button", name="Generate")).to_be_enabled()
    # Chromium itself logs every 4xx response ("Failed to load resource"); nothing else may appear
    assert not [p for p in page.problems if "status of 400" not in p], page.problems
    page.get_by_label("Temperature").fill("0")
    expect(chart(page)).to_contain_text("T = 0 (greedy)")
