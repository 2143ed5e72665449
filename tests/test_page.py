"""The page of pipe serve in a real browser: Debian's Chromium driven by Playwright (no browser
download; the executable is the OS package's). Saves a screenshot to artifacts/screenshots/."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import pipeline
from pipeline.data.images import encode_png
from benchmarks.drive import answered
from tests.conftest import ROOT, digits_images, start_server

SCREENSHOTS = ROOT / "artifacts" / "screenshots"


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; scripts/browser.sh installs it (apt-get install chromium)")
        pytest.skip("chromium is not installed (bash scripts/browser.sh installs it)")
    return exe


def test_the_page_shows_the_prediction_the_patches_and_the_neighbours(digits_run, tmp_path):
    exe = chromium()
    from playwright.sync_api import sync_playwright

    img = digits_images("test", 1)[0][0]
    path = tmp_path / "digit.png"
    path.write_bytes(encode_png(img))
    run = pipeline.load(digits_run)
    label, _ = run.predict(img[None])
    proc, base = start_server(digits_run)
    try:
        with sync_playwright() as p:
            browser, page = answered(p, exe, base, path, timeout_ms=30000)
            # every picture on the page (patterns, thumbnails, the class view) has loaded
            page.wait_for_function("() => [...document.images].every(i => i.naturalWidth > 0)", timeout=30000)
            assert page.text_content("[data-testid=prediction]") == run.class_names[int(label[0])]
            assert page.locator(".patch-row").count() == 5
            assert page.locator("[data-testid=patches] figure img").count() >= 5
            assert page.locator("[data-testid=neighbours] figure img").count() == 5
            assert page.locator("[data-testid=class-patterns] figure img").count() > 0
            names = page.text_content("[data-testid=neighbours]")
            assert "digits:train:" in names
            assert page.text_content("[data-testid=error]") == ""
            fam = float(run.familiarity(img[None])[0])
            assert page.text_content("[data-testid=familiarity]").startswith(f"familiarity {fam:.2f}: ")
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOTS / "serve-page.png"), full_page=True)
            # an image of another size: answered, with the note saying how it was fitted
            big = tmp_path / "big.png"
            big.write_bytes(encode_png(np.repeat(np.repeat(img, 3, 0), 2, 1)))
            page.set_input_files("[data-testid=file]", str(big))
            page.wait_for_function("() => document.getElementById('notes').textContent.includes('fitted')")
            assert "big.png is 24x16 (height x width): fitted to the run's 8x8" in page.text_content("[data-testid=notes]")
            # the controls: 3 decisive patterns with 2 nearest each; three files at once, each answer a click away
            page.fill("[data-testid=k]", "2")
            page.fill("[data-testid=top]", "3")
            others = []
            for i, x in enumerate(digits_images("test", 4)[0][1:]):
                others.append(tmp_path / f"other{i}.png")
                others[-1].write_bytes(encode_png(x))
            page.set_input_files("[data-testid=file]", [str(f) for f in others])
            page.wait_for_function("() => document.querySelectorAll('#strip figure').length === 3")
            page.wait_for_function("() => document.querySelectorAll('.patch-row').length === 3")
            assert page.locator(".patch-row").first.locator("figure").count() == 2
            labels, _ = run.predict(digits_images("test", 4)[0][1:])
            for i in (2, 0):
                page.locator("#strip figure").nth(i).click()
                assert page.text_content("[data-testid=prediction]") == run.class_names[int(labels[i])]
                page.wait_for_function("() => document.querySelectorAll('.patch-row').length === 3")
            with page.expect_download() as got:
                page.click("[data-testid=download]")
            answer = json.loads(Path(got.value.path()).read_text())
            assert [r["image"] for r in answer["results"]] == [f.name for f in others]
            assert all(len(r["patches"]) == 3 and all(len(p["nearest"]) == 2 for p in r["patches"]) for r in answer["results"])
            page.screenshot(path=str(SCREENSHOTS / "serve-page-several.png"), full_page=True)
            # a file that is no image: the page says why, hides the last answer, and the server stays up
            bad = tmp_path / "notes.png"
            bad.write_bytes(b"not an image")
            page.set_input_files("[data-testid=file]", str(bad))
            page.wait_for_function("() => document.getElementById('error').textContent.length > 0")
            assert "cannot read notes.png" in page.text_content("[data-testid=error]")
            assert not page.locator("[data-testid=answer]").is_visible() and page.text_content("[data-testid=notes]") == ""
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert (SCREENSHOTS / "serve-page.png").stat().st_size > 10_000


HOSTILE = ['<img src=x onerror="window.__pwned=1">', "<b onmouseover=alert(1)>bold</b>"]


@pytest.fixture(scope="session")
def hostile_run(tmp_path_factory):
    """A run whose class folders and file names are markup that runs script if inserted as HTML."""
    root = tmp_path_factory.mktemp("hostile")
    imgs, labs = digits_images("train", 120)
    for i, (img, lab) in enumerate(zip(imgs, labs)):
        d = root / "images" / HOSTILE[int(lab) % 2]
        d.mkdir(parents=True, exist_ok=True)
        (d / f"<img src=y onerror=window.__pwned=2>{i:03d}.png").write_bytes(encode_png(img))
    pipeline.extract(pipeline.open_source(root / "images"), root / "shards", pipeline.ExtractConfig(code_shapes="none"))
    pipeline.train(pipeline.Shards(root / "shards"), root / "run", pipeline.TrainConfig(epochs=1, dim=8))
    return root / "run"


def test_names_from_the_data_are_shown_as_text_never_run(hostile_run, tmp_path):
    exe = chromium()
    from playwright.sync_api import sync_playwright

    path = tmp_path / "digit.png"
    path.write_bytes(encode_png(digits_images("test", 1)[0][0]))
    proc, base = start_server(hostile_run)
    try:
        with sync_playwright() as p:
            browser, page = answered(p, exe, base, path, timeout_ms=30000)
            assert page.evaluate("() => window.__pwned") is None
            # no element came from the data: every <img> is one the page made, every <b> the view's name
            assert page.locator("img[src=x], img[src=y]").count() == 0
            assert page.evaluate("() => [...document.querySelectorAll('b')].every(b => !b.hasAttribute('onmouseover'))")
            text = page.text_content("body")
            assert HOSTILE[0] in text or HOSTILE[1] in text  # the names are there, as text
            assert "<img src=y onerror=window.__pwned=2>" in page.text_content("[data-testid=neighbours]")
            # and even script that got in would not run: the policy forbids inline script
            page.evaluate("""() => { const d = document.createElement('div'); d.innerHTML = '<img src=z onerror="window.__pwned=3">'; document.body.append(d); }""")
            page.wait_for_timeout(500)
            assert page.evaluate("() => window.__pwned") is None
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_wrong_answer_taught_on_the_page_is_answered_right_and_others_stay(digits_run, tmp_path):
    """The founding scenario in the browser: a wrong answer, the true class picked, the same image
    asked again answered right, other images' answers as before, what it learned saved as a run."""
    exe = chromium()
    from playwright.sync_api import sync_playwright

    run = pipeline.load(digits_run)
    images, labels = digits_images("test")
    pred, _ = run.predict(images)
    wrong = np.flatnonzero(pred != labels)
    i, truth = int(wrong[0]), run.class_names[int(labels[wrong[0]])]
    path = tmp_path / "wrong.png"
    path.write_bytes(encode_png(images[i]))
    others = [j for j in range(len(images)) if j != i][:24]
    paths = []
    for j in others:
        paths.append(tmp_path / f"other-{j:03d}.png")
        paths[-1].write_bytes(encode_png(images[j]))
    proc, base = start_server(digits_run, "--learn-into", str(tmp_path / "taught"))
    try:
        with sync_playwright() as p:
            browser, page = answered(p, exe, base, path, timeout_ms=30000)
            assert page.text_content("[data-testid=prediction]") == run.class_names[int(pred[i])] != truth
            assert page.locator("[data-testid=teach]").is_visible()
            page.select_option("[data-testid=teach-class]", truth)
            page.click("[data-testid=teach-go]")
            page.wait_for_function("() => document.getElementById('teach-status').textContent.startsWith('learned as')", timeout=30000)
            assert page.text_content("[data-testid=prediction]") == truth
            assert "of its patterns moved, nothing else. 1 taught, 1 not saved yet" in page.text_content("[data-testid=teach-status]")
            page.wait_for_function("() => [...document.images].every(i => i.complete)")
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOTS / "serve-page-taught.png"), full_page=True)
            # the same image asked again, among the others: it is answered as taught, they as before
            page.set_input_files("[data-testid=file]", [str(path)] + [str(q) for q in paths])
            page.wait_for_function(f"() => document.querySelectorAll('#strip figure').length === {len(paths) + 1}")
            answers = [c.split("\n")[1].split(" ")[0] for c in page.locator("#strip figcaption").all_inner_texts()]
            assert answers == [truth] + [run.class_names[int(pred[j])] for j in others]
            # a class the run does not know, typed in
            page.locator("#strip figure").nth(2).click()
            page.select_option("[data-testid=teach-class]", "")
            page.fill("[data-testid=teach-new]", "eleven")
            page.click("[data-testid=teach-go]")
            page.wait_for_function("() => document.getElementById('teach-status').textContent.startsWith('learned as eleven (a new class)')", timeout=30000)
            assert page.text_content("[data-testid=prediction]") == "eleven"
            assert "eleven" in page.locator("[data-testid=class] option").all_inner_texts()
            page.click("[data-testid=save]")
            page.wait_for_function("() => document.getElementById('teach-status').textContent.startsWith('saved 2 taught')", timeout=120000)
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    saved = pipeline.load(tmp_path / "taught")
    assert saved.class_names[-1] == "eleven" and saved.predict(images[i][None])[0][0] == labels[i]
