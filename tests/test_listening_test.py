"""The listening test: a blind study folder, rated in a real headless Chromium, analysed back."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from train.listening_test import QUESTIONS, analyze, build, main

VIDEOS = sorted((Path(__file__).parent / "data" / "vggsound" / "video").glob("*.mp4"))


def _system(folder: Path, tone_hz: float) -> Path:
    folder.mkdir(parents=True)
    for i, video in enumerate(VIDEOS[:2]):
        t = np.arange(16000 * 2) / 16000
        sf.write(folder / f"clip{i}.wav", (0.3 * np.sin(2 * np.pi * tone_hz * t)).astype(np.float32), 16000)
        (folder / f"clip{i}.json").write_text(json.dumps({"video": str(video), "start_s": 0.0}))
    return folder


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("listening")
    systems = {"ours": _system(base / "ours", 440.0), "baseline": _system(base / "baseline", 880.0)}
    summary = build(systems, base / "study")
    assert summary["clips"] == 2 and summary["videos"] == 4
    return base / "study"


def test_study_folder_is_self_contained_and_blind(study):
    page = (study / "index.html").read_text()
    key = json.loads((study / "key.json").read_text())
    assert len(key["key"]) == 4 and sorted({v["system"] for v in key["key"].values()}) == ["baseline", "ours"]
    assert "ours" not in page and "baseline" not in page and "clip0" not in page  # blind
    assert "http://" not in page and "https://" not in page  # nothing from the network
    for token in key["key"]:
        assert (study / "media" / f"{token}.mp4").is_file() and f"media/{token}.mp4" in page


def _rate_in_chromium(study: Path, rater: str, downloads: Path) -> dict:
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--autoplay-policy=no-user-gesture-required",
                "--allow-file-access-from-files"):
        options.add_argument(arg)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        driver.get((study / "index.html").as_uri())
        driver.find_element(By.ID, "rater").send_keys(rater)
        driver.find_element(By.ID, "start").click()
        trials = driver.find_elements(By.CSS_SELECTOR, ".trial")
        assert len(trials) == 4
        video = trials[0].find_element(By.TAG_NAME, "video")
        driver.execute_script("arguments[0].muted = true; return arguments[0].play();", video)
        deadline = time.time() + 60
        while driver.execute_script("return arguments[0].currentTime;", video) <= 0 and time.time() < deadline:
            time.sleep(0.2)
        assert driver.execute_script("return arguments[0].currentTime;", video) > 0, "the video did not play"
        assert driver.find_element(By.ID, "save").get_attribute("disabled")
        for n, trial in enumerate(trials):
            for k, slider in enumerate(trial.find_elements(By.CSS_SELECTOR, "input[type=range]")):
                slider.send_keys(Keys.HOME)  # 1
                for _ in range(n * 4 + k):
                    slider.send_keys(Keys.ARROW_RIGHT)
        driver.find_element(By.ID, "save").click()
        target = downloads / f"answers-{rater}.json"
        deadline = time.time() + 30
        while not target.is_file() and time.time() < deadline:
            time.sleep(0.2)
        order = [t.get_attribute("data-trial") for t in trials]
    finally:
        driver.quit()
    answers = json.loads(target.read_text())
    assert [t["id"] for t in answers["trials"]] == order
    return answers


@pytest.mark.slow  # starts a real Chromium
def test_raters_rate_in_a_real_browser_and_the_answers_are_analysed(study, tmp_path):
    a = _rate_in_chromium(study, "alice", tmp_path)
    b = _rate_in_chromium(study, "bob", tmp_path)
    assert a["trials"][0]["played"] is True
    for answers in (a, b):
        for n, trial in enumerate(answers["trials"]):
            assert trial["position"] == n
            assert [trial["ratings"][q] for q in QUESTIONS] == [1 + n * 4 + k for k in range(len(QUESTIONS))]
    assert [t["id"] for t in a["trials"]] != [t["id"] for t in b["trials"]]  # shuffled per rater (4! orders)
    rows = analyze(study, [tmp_path / "answers-alice.json", tmp_path / "answers-bob.json"])
    key = json.loads((study / "key.json").read_text())["key"]
    for row in rows:  # recompute every mean from the raw answers and the key
        vals = [t["ratings"][row["question"]] for ans in (a, b) for t in ans["trials"]
                if key[t["id"]]["system"] == row["system"]]
        assert row["n"] == 4 and row["mean"] == pytest.approx(np.mean(vals))
        assert row["ci95"] == pytest.approx(3.182446305 * np.std(vals, ddof=1) / 2, rel=1e-6)  # t(0.975, 3)
    assert main(["analyze", "--study", str(study), str(tmp_path / "answers-alice.json"),
                 str(tmp_path / "answers-bob.json")]) == 0
    assert (study / "results.csv").is_file() and (study / "results.png").stat().st_size > 1000


def test_analyze_refuses_answers_of_another_study(study, tmp_path):
    bad = {"rater": "x", "trials": [{"id": "feedfacefeedface", "position": 0, "ratings": {"overall": 50}}]}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="not in this study"):
        analyze(study, [tmp_path / "bad.json"])
