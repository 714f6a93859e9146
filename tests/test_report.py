"""The HTML report: every image it links exists, and a real headless browser renders it cleanly."""

import re
import shutil
from pathlib import Path

import pytest
from torch.utils.data import Subset

from paramsal import profile_dataset
from paramsal.engine.analyses.pruning import Pruning
from paramsal.engine.analyses.report import build_report
from paramsal.zoo import demo_dataset, demo_model

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    model, data = demo_model(), Subset(demo_dataset("test"), range(300))
    run = profile_dataset(model, data, tmp_path_factory.mktemp("report") / "run", batch_size=50, features=True,
                          progress=False)
    Pruning(model, ks=[1, 5], batch_size=50, num_resamples=100).evaluate(run, data).save(run.path / "analyses")
    return build_report(run, model=model, data=data, queries=2, k=3, explain=2)


def test_every_linked_image_exists(report: Path):
    page = report.read_text()
    images = re.findall(r"<img src='([^']+)'", page)
    assert {"mean-profile.png", "correct-vs-incorrect.png", "neighbours-saliency.png", "neighbours-features.png",
            "pruning.png", "explain.png"} <= set(images)
    for name in images:
        assert (report.parent / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert "<script" not in page and "http" not in page  # self-contained: nothing loaded from elsewhere


def test_page_renders_in_a_headless_browser(report: Path, tmp_path):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (Debian package 'chromium'); the browser check is skipped")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    errors: list[str] = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(report.as_uri(), wait_until="load")
            broken = page.evaluate("Array.from(document.images)"
                                   ".filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)")
            count = page.evaluate("document.images.length")
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        finally:
            browser.close()
    assert errors == []
    assert broken == [] and count >= 6
    assert (tmp_path / "report.png").stat().st_size > 10_000
