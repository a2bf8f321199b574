"""The page of `prologue serve` in a real headless browser (Debian's chromium + chromedriver,
driven by Selenium; .ci/run installs them): load it, pick a class, generate, click an image for
variations, and check that the images appear and are the API's. Skips, saying why, where the
browser, its driver or Selenium cannot be found.

`PROLOGUE_SERVE_SCREENSHOT=FILE` also saves a screenshot of the page there (docs/images/serve_page.png
was made this way, with a trained bundle: docs/serve.md).
"""

from __future__ import annotations

import base64
import os
import shutil
import time
import warnings

import pytest

from tests.test_serve import TIMEOUT, running_server

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
DRIVERS = ("chromedriver",)


def _skip(reason: str):
    """Skip, with the reason also in pytest's warnings summary (shown without -rs)."""
    warnings.warn(f"browser test skipped: {reason}", pytest.PytestWarning, stacklevel=2)
    pytest.skip(reason)


def _browser():
    """(selenium webdriver module, browser path, driver path), or a skip saying what is missing."""
    try:
        from selenium import webdriver
    except ImportError:
        _skip("selenium is not installed (it comes with the dev extra: pip install -e '.[dev]')")
    browser = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    driver = next((shutil.which(d) for d in DRIVERS if shutil.which(d)), None)
    if browser is None or driver is None:
        missing = " and ".join(n for n, p in (("chromium", browser), ("chromedriver", driver)) if p is None)
        _skip(f"{missing} not found (apt-get install chromium chromium-driver; .ci/run tries to)")
    return webdriver, browser, driver


@pytest.fixture
def browser():
    webdriver, binary, driver_path = _browser()
    from selenium.webdriver.chrome.service import Service as DriverService

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1100,900", "--no-first-run", "--disable-extensions"):
        options.add_argument(flag)
    try:
        driver = webdriver.Chrome(service=DriverService(executable_path=driver_path), options=options)
    except Exception as exc:  # a browser that cannot start here (no display libraries, sandbox, ...)
        _skip(f"chromium did not start: {' '.join(str(exc).split())[:200]}")
    driver.set_page_load_timeout(TIMEOUT)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver, condition, what: str):
    deadline = time.monotonic() + TIMEOUT
    while True:
        value = condition(driver)
        if value:
            return value
        if time.monotonic() > deadline:
            status = driver.find_element("id", "status").text
            raise AssertionError(f"timed out waiting for {what}; the page says: {status!r}")
        time.sleep(0.05)


def _images(driver, grid: str):
    """The grid's images once every one is decoded (naturalWidth > 0)."""
    images = driver.find_elements("css selector", f"#{grid} img")
    ok = images and all(driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", im)
                        for im in images)
    return images if ok else None


def _set(driver, element_id: str, value) -> None:
    field = driver.find_element("id", element_id)
    field.clear()
    field.send_keys(str(value))


HOLD_NEXT_VARIATIONS = """
const original = window.fetch;
window.heldRelease = null;
window.fetch = function (path, init) {
  const answer = original(path, init);
  if (String(path).endsWith("/v1/variations") && window.heldRelease === null) {
    return new Promise((resolve, reject) => { window.heldRelease = () => answer.then(resolve, reject); });
  }
  return answer;
};
"""


def _sources(images):
    return [base64.b64decode(im.get_attribute("src").split(",", 1)[1]) for im in images]


def _shown(driver, grid: str):
    """The PNG bytes a grid shows once all are decoded, read in one script (the page may replace
    the grid at any moment: elements found earlier can be stale)."""
    sources = driver.execute_script(
        "const ims = Array.from(document.querySelectorAll(arguments[0]));"
        "return ims.length && ims.every((im) => im.complete && im.naturalWidth) ? ims.map((im) => im.src) : null;",
        f"#{grid} img")
    return None if sources is None else [base64.b64decode(src.split(",", 1)[1]) for src in sources]


def test_page_generates_and_varies_in_a_browser(browser, runtime_fixture_root, tmp_path):
    """Generate, vary; then two quick clicks whose answers arrive out of order (the first one's held
    back in the page's fetch): the later click wins and the stale answer is dropped (issue 24 item
    5); finally, with the server gone, the page says so."""
    import httpx
    from selenium.webdriver.support.ui import Select

    from prologue_export.runtime import Generator
    from prologue_export.serve.app import ServeOptions, png_bytes

    gen = Generator.from_bundle(runtime_fixture_root / "bundle", backend="cpu")
    with running_server(gen, ServeOptions(batch_window_ms=5)) as (url, _, _):
        browser.get(url + "/")
        _wait(browser, lambda d: d.execute_script("return document.body.dataset.ready"), "the page to load /v1/info")
        Select(browser.find_element("id", "class")).select_by_value("3")
        _set(browser, "n", 4)
        _set(browser, "seed", 7)
        _set(browser, "nvar", 3)
        browser.find_element("id", "generate").click()
        samples = _wait(browser, lambda d: _images(d, "samples"), "the samples")
        assert len(samples) == 4
        expected = [png_bytes(im) for im in gen.generate([3] * 4, seed=7)]  # the page sends the bundle's defaults
        assert _sources(samples) == expected
        samples[2].click()
        variations = _wait(browser, lambda d: _images(d, "variations"), "the variations")
        assert len(variations) == 3 and "source" in samples[2].get_attribute("class")
        log = browser.find_elements("css selector", "#log li")
        assert len(log) == 2 and " ms " in log[0].text and "/v1/variations" in log[0].text
        assert "error" not in browser.find_element("id", "status").get_attribute("class")
        errors = [e for e in browser.get_log("browser") if e.get("level") == "SEVERE"] if hasattr(browser, "get_log") else []
        assert errors == [], errors
        shot = os.environ.get("PROLOGUE_SERVE_SCREENSHOT") or str(tmp_path / "serve_page.png")
        assert browser.save_screenshot(shot) and os.path.getsize(shot) > 1000

        # sequencing: the answer to the first of two clicks arrives last and is dropped
        second = {"result_id": samples[1].get_attribute("data-result"), "index": 1, "n": 3, "seed": 7, "class_id": 3}
        wanted = [base64.b64decode(b) for b in httpx.post(url + "/v1/variations", json=second, timeout=TIMEOUT).json()["images"]]
        browser.execute_script(HOLD_NEXT_VARIATIONS)
        samples[0].click()
        _wait(browser, lambda d: d.execute_script("return window.heldRelease !== null"), "the first click's request")
        samples[1].click()
        _wait(browser, lambda d: _shown(d, "variations") == wanted, "the second click's variations")
        browser.execute_script("window.heldRelease()")
        _wait(browser, lambda d: "dropped" in d.find_element("css selector", "#log li").text, "the stale answer")
        assert _shown(browser, "variations") == wanted
        outlined = browser.find_elements("css selector", "#samples img.source")
        assert outlined == [samples[1]]
        assert browser.execute_script("return document.body.dataset.pending") == "0"

    # the server is gone: the page names the problem instead of "Failed to fetch"
    browser.find_element("id", "generate").click()
    status = _wait(browser, lambda d: d.find_element("id", "status").get_attribute("class") == "error"
                   and d.find_element("id", "status").text, "the page to notice the server is gone")
    assert "does not answer" in status and "prologue serve" in status, status
