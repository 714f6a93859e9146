"""The HTML report: every image it links exists, and a real headless browser renders it cleanly; an answer run's
report is text, escaped."""

import html
import json
import re
import shutil
from pathlib import Path

import pytest
from chat import answer_run, chat_model, trained, write_questions
from torch.utils.data import Subset

from paramsal import CascadingRandomization, FineTune, Masking, Neighbors, Pruning, profile_dataset, write_report
from paramsal.cli import main
from paramsal.zoo import demo_dataset, demo_model
from paramsal.zoo.qa import QADataset

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


@pytest.fixture(scope="module")
def answers(tmp_path_factory):
    """The tiny chat model's answer run (9 of 24 answers wrong) and its report; it rebuilds no model."""
    _, _, run = answer_run(tmp_path_factory.mktemp("answers"))
    return run, write_report(run, queries=2, k=3)


def test_answer_report_shows_the_wrong_answers_as_text(answers):
    run, report = answers
    page = report.read_text()
    table = run.table().to_pandas().set_index("sample_id")
    wrong = table.loc[run.sample_ids("misclassified")]
    assert 0 < len(wrong) < len(table)
    assert "<th>accuracy (share of right answers)</th><td>0.6250</td>" in page
    for row in wrong.itertuples():
        for text in (row.prompt, row.reference, row.answer, row.label):
            assert f"<td>{html.escape(text)}</td>" in page
    # the least likely references first, each of the first two wrong answers with its nearest wrong answers
    first = wrong.sort_values("answer_logprob", kind="stable").index[:2]
    assert re.findall(r"<h3>Wrong answer (\d+) and its 3 nearest", page) == [str(q) for q in first]
    near = Neighbors(k=3).evaluate(run, samples=first).neighbor_ids("saliency")
    for query, neighbours in zip(first, near):
        part = page.split(f"<h3>Wrong answer {query} ")[1].split("</table>")[0]
        assert [int(i) for i in re.findall(r"<tr><td>(?:query|\d)</td><td>(\d+)</td>", part)] == [query, *neighbours]
    assert "Nearest neighbours among wrong answers" in page and "label_sharing" in page
    # text, no images of inputs: no galleries, no input-space saliency
    images = re.findall(r"<img src='([^']+)'", page)
    assert set(images) == {"profiles.png", "neighbors.png"}
    assert "most frequent confusions" not in page and "Input-space saliency" not in page and "<script" not in page
    for name in images:
        assert (report.parent / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_answer_report_escapes_the_text(tmp_path):
    """A question with markup in its prompt, reference and label (its answer wrong: the model cannot say "<i>")."""
    path = write_questions(tmp_path / "questions.jsonl")
    with path.open("a", encoding="utf-8") as out:
        out.write(json.dumps({"prompt": "what is 2 plus 3 ? <b>bold</b> & co", "prefix": "the answer",
                              "answer": "= 5 . <i>", "label": "<em>odd</em>"}) + "\n")
    model = chat_model()
    data = QADataset(path, model.tokenizer)
    trained(model, data, steps=40)
    run = profile_dataset(model, data, tmp_path / "run", batch_size=8, units="neurons", task="answer", progress=False)
    assert 24 in run.sample_ids("misclassified")
    page = write_report(run, tmp_path / "report").read_text()
    assert "<td>what is 2 plus 3 ? &lt;b&gt;bold&lt;/b&gt; &amp; co</td>" in page
    assert "<td>= 5 . &lt;i&gt;</td>" in page and "<td>&lt;em&gt;odd&lt;/em&gt;</td>" in page
    assert "<b>" not in page and "<i>" not in page and "<em>" not in page


def test_report_command_on_an_answer_run(answers, tmp_path, capsys):
    """``paramsal report`` on an answer run: the run alone (the tiny test model could not be rebuilt from it)."""
    run, _ = answers
    assert main(["report", str(run.path), "--out", str(tmp_path / "report"), "--queries", "1", "--k", "2"]) == 0
    assert f"wrote {tmp_path / 'report' / 'index.html'}" in capsys.readouterr().out
    page = (tmp_path / "report" / "index.html").read_text()
    assert page.count("<h3>Wrong answer ") == 1 and "Wrong answers" in page
