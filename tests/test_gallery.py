"""The clean gallery in a real browser: headless Chromium (Debian's) driven by Selenium."""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from pipeline.clean import main
from pipeline.ledger import read_ledger

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1400,1000")


@pytest.fixture(scope="module")
def gallery(sample_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gallery_run")
    assert main(["--dataset", "sample", "--root", str(sample_root), "--out", str(out), "--clap-model", "none",
                 "--workers", "2", "--gallery", "2"]) == 0
    return out


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail("chromium and chromium-driver are not installed (the Makefile and .ci/run install them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + (f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _wait(driver, script: str, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while True:
        value = driver.execute_script(script)
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


@pytest.mark.slow
def test_gallery_loads_and_every_preview_plays(gallery, browser):
    page = gallery / "gallery" / "index.html"
    browser.get(page.as_uri())
    assert _wait(browser, "return document.readyState === 'complete'")
    ledger, _ = read_ledger(gallery / "ledger.parquet")
    headings = browser.execute_script("return [...document.querySelectorAll('h2')].map(h => h.textContent)")
    for bucket in ("ok", "filtered: av_align<0.2", "filtered: silent", "filtered: static", "failed: decode_error",
                   "failed: bad_csv_row", "just above av_align = 0.2", "just below av_align = 0.2"):
        assert any(h.startswith(bucket + " (") for h in headings), (bucket, headings)
    # every video element has a source the browser can play: metadata loaded, no media error
    assert _wait(browser, "return [...document.querySelectorAll('video')].every(v => v.readyState >= 1 || v.error)")
    videos = browser.execute_script(
        "return [...document.querySelectorAll('video')].map(v => ({src: v.currentSrc, ready: v.readyState, "
        "error: v.error && v.error.code, duration: v.duration}))")
    assert len(videos) >= 6
    for v in videos:
        assert v["error"] is None and v["ready"] >= 1 and v["duration"] > 5, v
        assert Path(unquote(urlparse(v["src"]).path)).is_file()
    played = browser.execute_async_script(
        "const done = arguments[0]; const v = document.querySelector('video'); v.muted = true;"
        "v.play().then(() => setTimeout(() => done(v.currentTime), 1500), e => done('error: ' + e));")
    assert isinstance(played, float) and played > 0.2, played
    # nothing missing: every image decoded, every relative link points into the folder
    images = browser.execute_script("return [...document.images].map(i => [i.src, i.naturalWidth])")
    assert images and all(width > 0 for _, width in images), images
    for src, _ in images:
        assert Path(unquote(urlparse(src).path)).resolve().is_relative_to(page.parent.resolve())
    failed = ledger[ledger["status"] == "failed"]
    text = browser.find_element("tag name", "body").text
    assert "no preview: decode_error" in text and len(failed) > 0


@pytest.mark.slow
def test_gallery_folder_is_self_contained(gallery, tmp_path, browser):
    """Copied elsewhere (as a user would zip and share it), the page still finds everything."""
    moved = tmp_path / "shared-gallery"
    shutil.copytree(gallery / "gallery", moved)
    browser.get((moved / "index.html").as_uri())
    assert _wait(browser, "return [...document.querySelectorAll('video')].every(v => v.readyState >= 1)")
    assert browser.execute_script("return [...document.images].every(i => i.naturalWidth > 0)")
