"""The playground in a real browser (headless Chromium driven by selenium): a prompt streams its
text with its numbers; concurrent requests show as several running sequences in the engine view,
and on step 07 as shared prefix blocks in the KV grid; step 00 says why it has no engine view.

Chromium and its driver come from Debian (``chromium``, ``chromium-driver``); where they are
missing the test installs them with apt-get if it can, and skips with the reason if it cannot.
``STEPSERVE_SCREENSHOTS=DIR`` saves the page's screenshots there (the root README's came so).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import apt_binary

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

POOL = ("--num-kv-blocks", "256", "--block-size", "4", "--max-seqs", "8")
SHARED = "A long shared system prompt that every request starts with, word for word."


@pytest.fixture(scope="module")
def browser():
    binary, driver = apt_binary("chromium", "chromium"), apt_binary("chromedriver", "chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(arg)
    b = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver), options=options)
    yield b
    b.quit()


def shoot(browser, name: str) -> None:
    if out := os.environ.get("STEPSERVE_SCREENSHOTS"):
        Path(out).mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(Path(out) / f"{name}.png"))


def text(browser, element_id: str) -> str:
    return browser.find_element(By.ID, element_id).text


def fill(browser, element_id: str, value: str) -> None:
    field = browser.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


def test_a_prompt_streams_and_concurrent_requests_fill_the_engine_view(servers, browser) -> None:
    url = servers("step07_paged_kv", "tiny-llama", *POOL).url
    browser.get(url + "/")
    wait = WebDriverWait(browser, 60, poll_frequency=0.05)
    wait.until(lambda b: "step" in text(b, "engine-note"))  # the engine view is live
    fill(browser, "prompt", "The capital of France is")
    browser.find_element(By.ID, "send").click()
    wait.until(lambda b: text(b, "output") and "tokens" in text(b, "stats") and "streaming" not in text(b, "stats"))
    assert text(browser, "output").strip() and "TTFT" in text(browser, "stats")
    shoot(browser, "playground-prompt")

    fill(browser, "prompt", SHARED)
    fill(browser, "max_tokens", "300")
    browser.find_element(By.ID, "ignore_eos").click()
    fill(browser, "concurrency", "6")
    browser.find_element(By.ID, "fire").click()
    wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#running .seq")) > 1)
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#kv-grid .cell.shared"))  # prefix blocks, shared
    shoot(browser, "playground-engine")
    wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#requests tbody tr")) == 6 and all(
        row.find_elements(By.TAG_NAME, "td")[3].text == "300"
        for row in b.find_elements(By.CSS_SELECTOR, "#requests tbody tr")))  # every request ran to the end


def test_a_step_without_an_engine_loop_says_why(servers, browser) -> None:
    browser.get(servers("step00_baseline", "tiny-llama").url + "/")
    WebDriverWait(browser, 30).until(lambda b: "no engine loop" in text(b, "engine-note"))
