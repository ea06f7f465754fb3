"""The web page in a real browser: Debian's chromium, driven by Playwright (no browser
download), against the running app with the tiny models on the CPU."""

import concurrent.futures
import shutil
import time

import pytest

from tests.serve.conftest import denoiser_record, wait_for

pytestmark = pytest.mark.serve

# Flags for a sandboxed, offline machine: no background connections, no GPU.
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def record_of(service, request_id):
    """The Denoiser's cancel record, asked from another thread: Playwright's sync API
    runs an event loop in this one, where Ray's handles refuse to block."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(denoiser_record, service, request_id).result()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail(
            "`chromium` is not on PATH: `make test` installs Debian's chromium package "
            "(apt-get install chromium)"
        )
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, service):
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    page.goto(service.url)
    page.wait_for_function("document.querySelectorAll('#model option').length >= 2")
    yield page
    if not page.is_closed():
        page.close()


def fill(page, model="zimage", size="512x512", steps=12, seed="7", lora=""):
    page.select_option("#model", model)
    page.select_option("#size", size)
    page.fill("#steps", str(steps))
    page.fill("#seed", seed)
    page.select_option("#lora", lora)


def test_generate_shows_progress_preview_image_and_timings(page, service):
    fill(page, steps=16, lora="tiny-style")
    page.fill("#prompt", "a red circle on a blue background")
    page.click("#go")
    seen_values, previews = set(), set()
    deadline = time.monotonic() + 120
    while page.locator("#result").is_hidden():
        assert time.monotonic() < deadline, "no image in 120 s"
        seen_values.add(page.eval_on_selector("#bar", "b => b.value"))
        if page.locator("#preview").is_visible():
            previews.add(hash(page.get_attribute("#preview", "src")))
        time.sleep(0.02)
    assert len(seen_values - {0}) >= 3, seen_values  # the bar moved with the steps
    assert len(previews) == 2  # the live preview changed: both streamed previews shown
    assert page.inner_text("#stage") == "Done"
    assert page.get_attribute("#download", "href").startswith("data:image/png;base64,")
    assert page.get_attribute("#download", "download") == "t2i-zimage-7.png"
    table = page.inner_text("#timings")
    for stage in ("encode", "denoise", "decode", "e2e"):
        assert stage in table
    assert "tiny-style 0.85" in page.inner_text("#meta")
    assert page.locator("#history li").count() >= 1


def test_a_preset_fills_the_fields_it_sets(page):
    page.select_option("#model", "sdxl")
    assert page.input_value("#preset") == "niannian"
    assert page.input_value("#steps") == "25" and page.input_value("#guidance") == "7"
    assert page.input_value("#size") == "1024x1024"
    assert page.input_value("#lora") == "niannian"
    page.select_option("#model", "zimage")
    assert page.input_value("#steps") == "9" and page.input_value("#lora") == ""


def start_slow(page):
    fill(page, size="1024x1024", steps=60)
    page.click("#go")
    page.wait_for_function("document.getElementById('bar').value >= 2", timeout=120_000)
    return page.eval_on_selector("#form", "f => f.dataset.requestId")


def test_cancel_stops_the_request_on_the_server(page, service):
    request_id = start_slow(page)
    page.click("#stop")
    page.wait_for_function("document.getElementById('status').textContent === 'cancelled'")
    record = wait_for(lambda: record_of(service, request_id))
    assert record["stage"] == "denoise" and record["steps_done"] < 60
    assert page.is_enabled("#go")


def test_closing_the_tab_stops_the_request_on_the_server(browser, service):
    page = browser.new_page()
    page.goto(service.url)
    page.wait_for_function("document.querySelectorAll('#model option').length >= 2")
    request_id = start_slow(page)
    page.close(run_before_unload=True)
    record = wait_for(lambda: record_of(service, request_id))
    assert record["stage"] == "denoise" and record["steps_done"] < 60


def test_an_invalid_input_shows_the_apis_message(page):
    fill(page, model="sdxl", size="512x512", steps=2)
    page.fill("#prompt", "word " * 100)  # past the 77 tokens of SDXL's encoders
    page.click("#go")
    page.wait_for_function("document.getElementById('status').className === 'error'")
    message = page.inner_text("#status")
    assert "tokens long" in message and "at most 77" in message
    assert page.inner_text("#stage") == "Failed" and page.is_enabled("#go")


def test_the_layout_holds_at_phone_width(browser, service):
    page = browser.new_page(viewport={"width": 360, "height": 740})
    page.goto(service.url)
    page.wait_for_function("document.querySelectorAll('#model option').length >= 2")
    assert page.evaluate("document.documentElement.scrollWidth") <= 360
    for selector in ("#prompt", "#model", "#size", "#seed", "#dice", "#go", "#stop", "#bar"):
        box = page.locator(selector).bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 360, selector
    # Every control has a name a screen reader reads.
    unnamed = page.evaluate(
        """[...document.querySelectorAll('input, select, textarea, button')]
             .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')
                          && !e.textContent.trim()).map(e => e.id)"""
    )
    assert unnamed == []
    page.close()
