"""A static HTML report of a run: ``paramsal report RUN`` writes ``RUN/report/index.html``.

The page gathers every result the analyses saved in ``RUN/analyses``
(pruning, perturbation, fine-tuning, several side by side; masking; the
sanity check; input-space explanations) and draws what is cheap to draw from
the run itself: Figures 1-2, the neighbours' pair sharing with galleries of
the most frequent confusions, and input-space saliency of the most confident
mistakes. It uses no script and loads nothing from the network: one folder
of PNGs and one HTML file, to open in any browser or attach to a ticket.

A run of task "answer" (questions to a chat LLM, :mod:`paramsal.zoo.qa`) has
no images and no classes: its report shows the share of right answers, the
wrong answers as text (prompt, reference, the model's answer, label, the
reference's log-probability), the neighbours' sharing of the (reference,
answer) pair and of the label, and, for a few wrong answers, their nearest
neighbours in saliency space as text; it reads the run alone (no model, no
data) and has no gallery and no input-space saliency. All text is escaped.
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from torch import nn

from paramsal._typing import MapDataset
from paramsal.analyses.base import Analysis, Prepared, Result, find_results
from paramsal.analyses.neighbors import Neighbors
from paramsal.analyses.pictures import displayable
from paramsal.analyses.profiles import SaliencyProfiles
from paramsal.analyses.sources import data_class_names, open_for_analysis
from paramsal.jobs.distributed import is_main_process
from paramsal.rundir.published import REPORT_FORMAT, Writer, owned_folder, publish
from paramsal.rundir.run import Run
from paramsal.zoo.specs import label_text

#: How saved results are titled, by kind, in the order the page shows them.
SECTIONS = {
    "pruning": "Pruning salient filters (paper Fig. 3)",
    "perturbation": "Perturbing salient filters with noise (paper A.5)",
    "finetune": "One-step fine-tuning of salient filters (paper Fig. 6)",
    "masking": "Masking the salient pixels (paper 3.4, A.8)",
    "sanity": "Cascading randomization sanity check (paper A.10)",
    "explain": "Input-space saliency of chosen samples (paper 2.2)",
    "depth-bias": "Depth bias of the z-score and POT rankings (Wang & Sato 2023)",
    "compare": "Units that moved from another run to this one (paramsal compare)",
    "neighbors": "Nearest neighbours as saved (other layers, pools or k)",
    "profiles": "Saliency profiles as saved",
}

#: The report's record: its files, their checksums and the run they show (written last).
RECORD = "report.json"
#: Summary columns shown at most per table: wider tables are hard to read in a 1,400 px window.
MAX_COLUMNS = 8
#: The width every figure is drawn at, in pixels, and the page's: one figure per row, its text readable.
FIGURE_PIXELS = 1400
#: An answer run's wrong answers listed at most (those whose reference the model finds least likely).
WRONG_ANSWERS = 50
#: Characters of a prompt or answer shown at most in a table cell (the rest elided with "…").
TEXT_CHARS = 400


class _Checked(Analysis):
    """The checks every analysis makes (run finished, model and data the run's), for the report's own drawing."""

    purpose: ClassVar[str] = "report on"


def write_report(run: Run | str | os.PathLike, out: str | os.PathLike | None = None, *,
                 model: nn.Module | None = None, data: MapDataset | None = None, queries: int = 4, k: int = 5,
                 explain: int = 4, **common: Any) -> Path:
    """Writes the report of a run and returns the path of its ``index.html``.

    Args:
        run: the run (or its directory).
        out: the report folder; default ``RUN/report``.
        model, data: the run's model and data set; default rebuilt from the run's manifest (an answer run's
            report uses neither: they are not rebuilt, and ignored when given).
        queries: the most frequent (true, predicted) confusions shown in the neighbour galleries, one query each;
            an answer run's wrong answers shown with their neighbours as text (those whose reference the
            model finds least likely).
        k: neighbours per query in the galleries; an answer run's neighbours per query in its tables and in
            its sharing rates.
        explain: most confident mistakes shown with input-space saliency maps (none for an answer run).
        **common: as for every analysis (allow_partial, allow_other_weights,
            allow_other_data, trust_run_specs, device): see
            :class:`~paramsal.analyses.base.Analysis`.

    Raises:
        InputError: when the folder is not writable, or the model or data is not the run's.
    """
    opened = run if isinstance(run, Run) else open_for_analysis(run, common.get("allow_partial", False))
    files: dict[str, Writer] = {}
    if opened.task == "answer":  # text, not images: the run alone has all of it
        run = opened
        folder = owned_folder(out if out is not None else run.path / "report", "out")
        table = run.table()  # read once for both sections
        wrong = _least_likely_wrong(run, table)
        labelled = table.column("label").null_count < len(table)
        sections = [_overview(run), _profiles_section(run, files, common), _wrong_answers_section(wrong, labelled),
                    _answer_neighbours_section(run, wrong, files, queries, k, common), *_saved_sections(run, files)]
    else:
        # Every sample: the checks need some, and an all-correct run still has a report.
        checked = _Checked(model, **common).prepare(opened, data, opened.sample_ids())
        run = checked.run
        folder = owned_folder(out if out is not None else run.path / "report", "out")
        sections = [_overview(run), _profiles_section(run, files, common),
                    _neighbours_section(checked, files, queries, k, common),
                    *_saved_sections(run, files),
                    _explain_section(checked, files, explain, common)]
    page = _page(f"paramsal report: {run.path.name}", [s for s in sections if s])
    files["index.html"] = partial(Path.write_text, data=page)
    if is_main_process():  # under torchrun every rank drew the page; rank 0 alone writes it
        publish(folder, RECORD, files, {"format": REPORT_FORMAT, "run": str(run.path), "run_id": run.identity})
    return folder / "index.html"


def _overview(run: Run) -> str:
    table = run.table()
    correct = table.column("correct").to_numpy(zero_copy_only=False)[run.selected(table, None)]
    config = run.manifest.config
    answers = run.task == "answer"
    rows = [("run", str(run.path)), ("model", config.model), ("data", config.data),
            ("questions" if answers else "samples", f"{len(correct):,}"),
            ("accuracy (share of right answers)" if answers else "accuracy", f"{correct.mean():.4f}"),
            ("wrong answers" if answers else "misclassified", f"{int((~correct).sum()):,}"),
            ("units", f"{run.num_units:,} ({config.units}, {run.manifest.aggregation})")]
    skipped = len(run.nonfinite_ids())
    if skipped:
        rows.append(("skipped (NaN/inf)", f"{skipped:,}"))
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<h2>Run</h2><table class='facts'>{body}</table>"


def _profiles_section(run: Run, files: dict[str, Writer], common: dict[str, Any]) -> str:
    result = SaliencyProfiles(allow_partial=common.get("allow_partial", False)).evaluate(run)
    files["profiles.png"] = _figure(result)
    groups = "right vs wrong answers (correct vs misclassified)" if run.task == "answer" else \
        "correct vs misclassified samples"
    return ("<h2>Saliency profiles (paper Figs. 1-2)</h2>"
            "<p>Mean raw profile per layer, filters sorted within each layer; below, the mean standardized "
            f"profile of {groups}:</p>" + _img("profiles.png", "saliency profiles"))


def _neighbours_section(checked: Prepared, files: dict[str, Writer], queries: int, k: int, common: dict[str, Any]) \
        -> str:
    run = checked.run
    if len(run.sample_ids("misclassified")) <= max(k, 10):
        return ""
    result = Neighbors(k=10, allow_partial=common.get("allow_partial", False)).evaluate(run)
    files["neighbors.png"] = _figure(result)
    parts = ["<h2>Nearest neighbours among misclassified samples (paper 3.2)</h2>"
             "<p>Share of the 10 nearest neighbours with the query's (true, predicted) class pair:</p>",
             _table(result.summary), _img("neighbors.png", "pair sharing per space")]
    shown = _confusion_queries(checked, queries)
    if len(shown):
        galleries = Neighbors(k=k, allow_partial=common.get("allow_partial", False)).evaluate(run, samples=shown)
        labels = _labels_by_id(run, data_class_names(checked.data))
        for space in galleries.table["space"].unique():
            name = f"neighbours-{space}.png"
            files[name] = _gallery(checked.data, shown, galleries.neighbor_ids(space), labels, f"{space} space")
            parts.append(f"<h3>In {space} space: the {len(shown)} most frequent confusions</h3>"
                         + _img(name, f"neighbour gallery, {space} space"))
    return "".join(parts)


def _wrong_answers_section(wrong: pd.DataFrame, labelled: bool) -> str:
    """An answer run's wrong answers as text (:func:`_least_likely_wrong`), with their labels where the run has
    some."""
    if not len(wrong):
        return "<h2>Wrong answers</h2><p>Every answer is right.</p>"
    shown = wrong.head(WRONG_ANSWERS)
    columns = ["sample_id", "prompt", "reference", "answer", *(["label"] if labelled else []),
               "answer_logprob"]
    return (f"<h2>Wrong answers</h2><p>The {len(shown):,} of {len(wrong):,} wrong answers whose reference the "
            "model finds least likely (the lowest log-probability of the reference, answer_logprob) first:</p>"
            + _text_table(shown.reset_index()[columns]))


def _answer_neighbours_section(run: Run, wrong: pd.DataFrame, files: dict[str, Writer], queries: int, k: int,
                               common: dict[str, Any]) -> str:
    """The neighbours' pair (and label) sharing among an answer run's wrong answers (:func:`_least_likely_wrong`),
    then a few wrong answers with their nearest neighbours in saliency space, as text."""
    if len(wrong) <= k:
        return ""
    result = Neighbors(k=k, allow_partial=common.get("allow_partial", False)).evaluate(run)
    files["neighbors.png"] = _figure(result)
    labels = "label_sharing" in result.summary
    parts = ["<h2>Nearest neighbours among wrong answers (paper 3.2)</h2>"
             f"<p>Share of the {k} nearest neighbours of a wrong answer with its (reference, answer) pair, in either "
             f"order{' (pair_sharing), and with its label (label_sharing)' if labels else ''}:</p>",
             _table(result.summary), _img("neighbors.png", "pair sharing per space")]
    saliency = result.table[result.table["space"] == "saliency"]
    columns = ["prompt", "reference", "answer", *(["label"] if labels else [])]
    for query in wrong.index[:queries]:
        near = saliency[saliency["query_id"] == query]
        rows = pd.concat([wrong.loc[[query], columns].assign(rank="query", similarity=np.nan),
                          wrong.loc[near["neighbor_id"], columns].assign(
                              rank=near["rank"].to_numpy(), similarity=near["similarity"].to_numpy())])
        rows = rows.rename_axis("sample_id").reset_index()
        parts.append(f"<h3>Wrong answer {int(query)} and its {k} nearest wrong answers in saliency space</h3>"
                     + _text_table(rows[["rank", "sample_id", "similarity", *columns]]))
    return "".join(parts)


def _least_likely_wrong(run: Run, table: pa.Table) -> pd.DataFrame:
    """An answer run's wrong answers (of its sample ``table``), by sample id, the lowest ``answer_logprob`` first
    (ties by sample id)."""
    wrong = table.to_pandas().set_index("sample_id").loc[np.sort(run.sample_ids("misclassified"))]
    return wrong.sort_values("answer_logprob", kind="stable")


def _confusion_queries(checked: Prepared, count: int) -> np.ndarray:
    """One mistake per (true, predicted) pair, for the ``count`` most frequent pairs: the most confident one."""
    table = checked.run.table().to_pandas()
    mistakes = table[table["sample_id"].isin(checked.run.sample_ids("misclassified"))]
    pairs = mistakes.groupby(["target", "pred"]).size().sort_values(ascending=False, kind="stable")
    chosen = []
    for target, pred in pairs.index[:count]:
        rows = mistakes[(mistakes["target"] == target) & (mistakes["pred"] == pred)]
        chosen.append(int(rows.sort_values("pred_prob", ascending=False, kind="stable")["sample_id"].iloc[0]))
    return np.asarray(chosen, np.int64)


def _saved_sections(run: Run, files: dict[str, Writer]) -> list[str]:
    """A section per kind of result saved in ``RUN/analyses`` from this run; results of one kind (e.g. several
    learning rates) side by side; a note for those left out (another run's, or a save that was stopped)."""
    analyses = run.path / "analyses"
    results, skipped = find_results(analyses, run)
    sections = []
    kinds = {**SECTIONS, **{r.kind: f"Saved results: {r.kind}" for r in results if r.kind not in SECTIONS}}
    for kind, title in kinds.items():
        same = [r for r in results if r.kind == kind]
        if not same:
            continue
        parts = [f"<h2>{html.escape(title)}</h2>"]
        for result in same:
            name = f"{result.name}.png"
            files[name] = _figure(result)  # drawn again at the page's width: a saved PNG has the size it was made
            parts.append(_img(name, result.name) + _table(result.summary,
                                                          caption=result.name if len(same) > 1 else None))
        sections.append("".join(parts))
    if skipped:
        items = "".join(f"<li>{html.escape(reason)}</li>" for reason in skipped)
        sections.append(f"<h2>Saved results left out</h2><ul>{items}</ul>")
    return sections


def _explain_section(checked: Prepared, files: dict[str, Writer], count: int, common: dict[str, Any]) -> str:
    from paramsal.analyses.input_saliency import InputSaliency

    wrong = checked.run.sample_ids("misclassified")
    if count < 1 or not len(wrong):
        return ""
    table = checked.run.table().to_pandas().set_index("sample_id").loc[wrong]
    shown = table.sort_values("pred_prob", ascending=False, kind="stable").index[:count].to_numpy()
    result = InputSaliency(checked.model, **common).evaluate(checked.run, checked.data, samples=shown)
    files["explain.png"] = _figure(result)
    return ("<h2>Input-space saliency of the most confident mistakes (paper 2.2)</h2>"
            "<p>Pixels that make the top 10 salient filters salient, next to 10 random filters "
            "(true -> predicted class):</p>" + _img("explain.png", "input-space saliency overlays"))


def _gallery(data: MapDataset, queries: np.ndarray, neighbours: np.ndarray, labels: dict[int, tuple[str, str]],
             space: str) -> Writer:
    """Query image, then its neighbours; each titled with its id and (true -> predicted) classes."""
    from matplotlib.figure import Figure

    rows, cols = neighbours.shape[0], neighbours.shape[1] + 1
    figure = Figure(figsize=(1.6 * cols, 1.8 * rows))
    for r, query in enumerate(queries):
        for c, sample in enumerate([query, *neighbours[r]]):
            ax = figure.add_subplot(rows, cols, r * cols + c + 1)
            ax.imshow(displayable(torch.as_tensor(data[int(sample)][0])), cmap="gray")
            true, pred = labels[int(sample)]
            ax.set_title(f"{'query ' if c == 0 else ''}{int(sample)}\n{true} -> {pred}", fontsize=7,
                         color="black" if c == 0 else "dimgray")
            ax.set_xticks([])
            ax.set_yticks([])
    figure.suptitle(f"neighbours in {space} (true -> predicted class)", fontsize=9)
    figure.tight_layout()
    return _png(figure)


def _figure(result: Result) -> Writer:
    return lambda tmp: _png(result.plot())(tmp)


def _png(figure: Any) -> Writer:
    """Writes ``figure`` as a PNG :data:`FIGURE_PIXELS` wide, whatever its size in inches."""
    return lambda tmp: figure.savefig(tmp, format="png", dpi=FIGURE_PIXELS / figure.get_figwidth())


def _labels_by_id(run: Run, names: list[str] | None) -> dict[int, tuple[str, str]]:
    """Each sample's (true, predicted) class as the figures write them: "3 (cow)" where the data set names them."""
    table = run.table()
    return dict(zip(table.column("sample_id").to_pylist(),
                    ((label_text(t, names), label_text(p, names))
                     for t, p in zip(table.column("target").to_pylist(), table.column("pred").to_pylist()))))


def compact(frame: pd.DataFrame) -> pd.DataFrame:
    """A summary with each ``m``, ``m_low``, ``m_high`` triple shown as one "m [low, high]" column."""
    out = pd.DataFrame(index=frame.index)
    for column in frame.columns:
        if column.endswith(("_low", "_high")) and column.rsplit("_", 1)[0] in frame.columns:
            continue
        if f"{column}_low" in frame.columns and f"{column}_high" in frame.columns:
            out[column] = [f"{m:.3g} [{lo:.3g}, {hi:.3g}]" for m, lo, hi in
                           zip(frame[column], frame[f"{column}_low"], frame[f"{column}_high"])]
        else:
            out[column] = frame[column]
    return out


def _table(frame: pd.DataFrame, caption: str | None = None) -> str:
    shown = compact(frame)
    shown = shown[shown.columns[:MAX_COLUMNS]]
    title = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    body = shown.to_html(index=False, float_format=lambda v: f"{v:.4g}", classes="numbers", border=0)
    return f"<div class='wide'>{body.replace('<thead>', title + '<thead>', 1)}</div>"


def _text_table(frame: pd.DataFrame) -> str:
    """A table of text, every cell escaped (a prompt may hold markup), long texts cut to :data:`TEXT_CHARS`."""
    def cell(value: Any) -> str:
        number = isinstance(value, (float, np.floating))
        if value is None or number and np.isnan(value):
            return ""
        text = f"{value:.4g}" if number else str(value)
        return html.escape(text if len(text) <= TEXT_CHARS else text[:TEXT_CHARS - 1] + "…")

    head = "".join(f"<th>{html.escape(str(column))}</th>" for column in frame.columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(value)}</td>" for value in row) + "</tr>"
                   for row in frame.itertuples(index=False))
    return f"<div class='wide'><table class='texts'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def _img(name: str, alt: str) -> str:
    return f"<img src='{html.escape(name)}' alt='{html.escape(alt)}'>"


def _page(title: str, sections: Sequence[str]) -> str:
    style = (f"body{{font-family:sans-serif;max-width:{FIGURE_PIXELS}px;margin:2em auto;padding:0 1em;color:#222}}"
             "img{max-width:100%;border:1px solid #ddd;margin:0.5em 0}"
             "div.wide{max-width:100%;overflow-x:auto}"
             "table{border-collapse:collapse;margin:0.5em 0 1.5em;font-size:0.9em}"
             "th,td{padding:2px 8px;text-align:left}caption{text-align:left;font-weight:bold}"
             "table.numbers td{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}"
             "table.numbers tr:nth-child(even){background:#f4f4f4}h2{border-bottom:1px solid #ccc}"
             "table.texts td{vertical-align:top;white-space:pre-wrap;border-top:1px solid #ddd}")
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<link rel='icon' href='data:,'><style>{style}</style></head><body><h1>{html.escape(title)}</h1>"
            + "\n".join(sections) + "</body></html>\n")
