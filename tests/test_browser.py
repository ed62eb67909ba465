"""The scan page in a real browser: Debian's Chromium driven by Playwright, against a real
server's HTTP port.

Without Chromium (``apt-get install chromium``) these tests are skipped with one clear
message; ``.ci/run`` installs it so that CI never skips them.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from scanjobs.v1 import scanjobs_pb2 as pb
from tests.conftest import Running, ServeFactory
from tests.media import write_video

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PHONE = {"width": 390, "height": 844}
TOKEN = "page-token-for-tests"

pytestmark = [
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(),
        reason="Chromium is not installed (apt-get install chromium; .ci/run does it)",
    ),
    pytest.mark.timeout(120),
]


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        await browser.close()


async def _open(browser: Browser, running: Running) -> tuple[Page, list[str]]:
    """The page of ``running`` at phone width; the list collects every URL it requests."""
    page = await browser.new_page(viewport=PHONE)
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    await page.goto(f"http://127.0.0.1:{running.app.http_port}/")
    return page, requested


def _library(root: Path, copies: int) -> Path:
    """Real tiny videos in films/ (copies of one), and in held/ a file whose probe waits for
    ``open-gate``: the job stays RUNNING, short of 100 %, until the test lets it go."""
    (root / "films").mkdir(parents=True)
    (root / "held").mkdir()
    sample = write_video(root / "films" / "v00000.mp4")
    data = sample.read_bytes()
    for n in range(1, copies):
        (root / "films" / f"v{n:05}.mp4").write_bytes(data)
    (root / "held" / "gate.mp4").write_bytes(data)
    return root


# Every value the bar takes, as the page sets it (a <progress>'s value is an attribute).
_RECORD_BAR = """() => {
    const bar = document.getElementById('job-progress');
    window.barValues = [];
    new MutationObserver(() => window.barValues.push(bar.value))
        .observe(bar, {attributes: true, attributeFilter: ['value']});
}"""


async def _count_catalog(running: Running, job_id: str) -> int:
    total, token = 0, ""
    while True:
        reply = await running.stub.ListVideos(
            pb.ListVideosRequest(job_id=job_id, page_size=1000, page_token=token)
        )
        total += len(reply.videos)
        token = reply.next_page_token
        if not token:
            return total


def _number(text: str, word: str) -> int:
    match = re.search(rf"([\d,]+) {word}", text)
    assert match, f"no '{word}' count in {text!r}"
    return int(match[1].replace(",", ""))


async def test_a_scan_started_from_the_page_moves_the_bar_and_cancels_with_partial_counts(
    serve: ServeFactory, browser: Browser, tmp_path: Path
) -> None:
    root = _library(tmp_path / "lib", copies=3000)
    s = await serve(root, misbehaving=True, http_listen="127.0.0.1:0")
    page, requested = await _open(browser, s)
    await page.evaluate(_RECORD_BAR)

    path = page.get_by_label("Path", exact=True)  # the keyboard alone starts the scan
    await path.focus()
    await page.keyboard.type(str(root))
    await page.keyboard.press("Enter")

    bar = page.get_by_role("progressbar", name="Scan progress")
    cancel = page.get_by_role("button", name="Cancel", exact=True)
    await expect(cancel).to_be_enabled()
    await page.wait_for_function(
        "() => new Set(window.barValues.filter(v => v > 0 && v < 1)).size >= 2", timeout=30_000
    )
    moving = [v for v in await page.evaluate("window.barValues") if 0 < v < 1]
    assert moving == sorted(moving) and moving[0] < moving[-1] < 1
    await expect(bar).to_have_attribute("aria-valuetext", re.compile(r"^\d+%$"))
    await expect(page.locator("#job-rate")).to_have_text(re.compile(r"files/s$"))

    await cancel.focus()
    await page.keyboard.press("Enter")

    state = page.locator("#job-state")
    await expect(state).to_have_text("Cancelled", timeout=15_000)
    await expect(cancel).to_be_disabled()
    summary = await page.locator("#job-summary").inner_text()
    [job] = (await s.stub.ListJobs(pb.ListJobsRequest())).jobs
    assert job.state == pb.JOB_STATE_CANCELLED
    done, found = _number(summary, "of"), _number(summary, "files")
    assert (done, found) == (job.progress.files_done, job.progress.files_found)
    assert 0 < done < found == 3001
    assert _number(summary, "added") == job.result.added == await _count_catalog(s, job.id)
    await expect(page.locator("#jobs")).to_contain_text("Cancelled")
    (root / "open-gate").touch()

    # The catalog, refreshed when the job ended: 20 a page, with a path filter.
    rows = page.locator("#videos tr")
    await expect(rows).to_have_count(20)
    first_row = await rows.first.text_content() or ""
    await page.get_by_role("button", name="Next page").click()
    await expect(page.locator("#page")).to_have_text("Page 2")
    await expect(rows.first).not_to_have_text(first_row)
    await page.get_by_role("button", name="Previous page").click()
    await expect(rows.first).to_have_text(first_row)
    await page.get_by_label("Show videos under").fill(f"{root}/held")
    await page.keyboard.press("Enter")
    await expect(page.get_by_text("No videos.")).to_be_visible()

    await page.screenshot(path=tmp_path / "cancelled.png", full_page=True)
    assert (tmp_path / "cancelled.png").stat().st_size > 10_000
    assert all(url.startswith(f"http://127.0.0.1:{s.app.http_port}/") for url in requested)


async def test_an_invalid_path_shows_the_servers_message(
    serve: ServeFactory, browser: Browser, tmp_path: Path
) -> None:
    root = tmp_path / "lib"
    root.mkdir()
    s = await serve(root, http_listen="127.0.0.1:0")
    page, _ = await _open(browser, s)
    alert = page.get_by_role("alert")

    for typed, said in [
        ("relative/dir", "path must be absolute"),
        ("/etc", "/etc is outside the allowed roots"),
        (f"{root}/missing", f"{root}/missing does not exist"),
    ]:
        await page.get_by_label("Path", exact=True).fill(typed)
        await page.get_by_role("button", name="Scan").click()
        await expect(alert).to_have_text(said)
    assert not (await s.stub.ListJobs(pb.ListJobsRequest())).jobs


async def test_a_token_protected_server_asks_for_the_token_and_never_puts_it_in_a_url(
    serve: ServeFactory, browser: Browser, tmp_path: Path
) -> None:
    root = tmp_path / "lib"
    (root / "films").mkdir(parents=True)
    write_video(root / "films" / "a.mp4")
    s = await serve(root, http_listen="127.0.0.1:0", tokens=frozenset({TOKEN}))
    page, requested = await _open(browser, s)

    token = page.get_by_label("Access token")
    await expect(token).to_be_visible()
    await expect(page.get_by_role("alert")).to_have_text("This server needs an access token.")
    await page.get_by_label("Path", exact=True).fill(str(root / "films"))
    await page.get_by_role("button", name="Scan").click()  # refused: still no token
    await token.fill(TOKEN)
    await page.get_by_role("button", name="Use token").click()  # and the scan goes through

    await expect(page.locator("#job-state")).to_have_text("Completed", timeout=20_000)
    summary = page.locator("#job-summary")
    await expect(summary).to_have_text(re.compile(r"^Completed: 1 file, 1 added"))
    await expect(token).to_be_hidden()
    await expect(page.locator("#videos")).to_contain_text(str(root / "films" / "a.mp4"))
    assert not any(TOKEN in url for url in requested)


async def test_the_page_fits_a_phone_and_every_control_has_a_name(
    serve: ServeFactory, browser: Browser, tmp_path: Path
) -> None:
    root = tmp_path / "lib"
    root.mkdir()
    s = await serve(root, http_listen="127.0.0.1:0")
    page, _ = await _open(browser, s)
    await expect(page.get_by_text("No videos.")).to_be_visible()

    assert await page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    for role, name in [
        ("textbox", "Path"),
        ("button", "Scan"),
        ("searchbox", "Show videos under"),
        ("button", "Filter"),
        ("button", "Previous page"),
        ("button", "Next page"),
    ]:
        await expect(page.get_by_role(role, name=name, exact=True)).to_be_attached()  # type: ignore[arg-type]
    unnamed = await page.evaluate(
        """() => [...document.querySelectorAll('input, button, progress')]
              .filter(e => !e.labels?.length && !e.getAttribute('aria-label')
                           && !e.textContent.trim()).map(e => e.outerHTML)"""
    )
    assert unnamed == []
    await page.screenshot(path=tmp_path / "phone.png", full_page=True)
    assert (tmp_path / "phone.png").stat().st_size > 10_000
