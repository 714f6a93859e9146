"""The HTML report: every image it links exists, and a real headless browser renders it cleanly."""

import re
import shutil
from pathlib import Path

import pytest
from torch.utils.data import Subset

from paramsal import CascadingRandomization, FineTune, Masking, Pruning, profile_dataset, write_report
from paramsal.zoo import demo_dataset, demo_model

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    model, data = demo_model(), Subset(demo_dataset("test"), range(300))
    run = profile_dataset(model, data, tmp_path_factory.mktemp("report") / "run", batch_size=50, features=True,
                          progress=False)
    analyses = run.path / "analyses"
    Pruning(model, ks=[1, 5], batch_size=50, num_resamples=100).evaluate(run, data).save(analyses)
    for lr in (1e-3, 1e-2):  # two fine-tunings, shown side by side
        FineTune(model, ks=[1, 5], lr=lr, neighbors=3, num_resamples=50).evaluate(run, data).save(analyses)
    two = run.sample_ids("misclassified")[:2]
    Masking(model, percents=(5, 10), k=5).evaluate(run, data, samples=two).save(analyses)
    CascadingRandomization(model, stages=(1, 2), k=5).evaluate(run, data, samples=two).save(analyses)
    return write_report(run, model=model, data=data, queries=2, k=3, explain=2)


def test_every_linked_image_exists(report: Path):
    page = report.read_text()
    images = re.findall(r"<img src='([^']+)'", page)
    assert {"profiles.png", "neighbours-saliency.png", "neighbours-features.png", "pruning.png", "explain.png",
            "finetune-lr0.001.png", "finetune-lr0.01.png", "masking.png", "sanity.png"} <= set(images)
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


def test_every_saved_analysis_has_its_section_and_tables_fit(report: Path):
    page = report.read_text()
    for title in ("Pruning salient filters", "One-step fine-tuning", "Masking the salient pixels",
                  "Cascading randomization"):
        assert title in page
    assert page.count("<caption>finetune-lr") == 2  # the two learning rates, one table each
    for table in re.findall(r"<table class=.numbers.*?</table>", page, re.S):
        header = re.search(r"<thead>.*?</thead>", table, re.S).group(0)
        assert header.count("<th") <= 8, header


def test_galleries_show_the_most_frequent_confusions(report: Path):
    from paramsal import open_run

    run = open_run(report.parent.parent)
    table = run.table().to_pandas()
    wrong = table[~table["correct"]]
    top = wrong.groupby(["target", "pred"]).size().sort_values(ascending=False, kind="stable").index[:2]
    assert "the 2 most frequent confusions" in report.read_text()
    from paramsal.analyses.base import Prepared
    from paramsal.analyses.report import _confusion_queries

    queries = _confusion_queries(Prepared(run, None, None, None, run.sample_ids(), None, None), 2)
    pairs = [tuple(table.set_index("sample_id").loc[q, ["target", "pred"]]) for q in queries]
    assert pairs == list(top)
