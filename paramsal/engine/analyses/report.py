"""A static HTML report of a run: ``paramsal report RUN`` writes ``RUN/report/index.html``.

The page gathers what the analyses left in the run directory (pruning and
fine-tuning curves, their summary tables) and draws what is cheap to draw
from the run itself: Figures 1-2, neighbour galleries in saliency vs feature
space, and input-space saliency overlays of the most confident mistakes. It
uses no script and loads nothing from the network: one folder of PNGs and one
HTML file, to open in any browser or attach to a ticket.
"""

from __future__ import annotations

import argparse
import html
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import nn
from torch.utils.data import Dataset

from paramsal._io import atomic_path
from paramsal.engine.analyses.common import (add_source_arguments, load_source, open_analysis_run, output_folder,
                                             run_inputs, run_units)
from paramsal.engine.analyses.input_saliency import InputSaliency, displayable, plot_explanations, visual_map
from paramsal.engine.analyses.neighbors import Neighbors, pair_sharing
from paramsal.engine.analyses.plots import plot_correct_vs_incorrect, plot_mean_profile
from paramsal.engine.rundir import Run, open_run

#: Curves the analyses write under RUN/analyses, with the summary table beside each.
ANALYSIS_FIGURES = (
    ("Pruning salient filters (paper Fig. 3)", "pruning.png", "pruning-summary.parquet"),
    ("Perturbing salient filters with noise (paper A.5)", "perturbation.png", "perturbation-summary.parquet"),
    ("One-step fine-tuning of salient filters (paper Fig. 6)", "finetune.png", "finetune-summary.parquet"),
)


def build_report(run: Run | str, out: str | Path | None = None, *, model: nn.Module | None = None,
                 data: Dataset | None = None, queries: int = 4, k: int = 5, explain: int = 4,
                 check_model: bool = True) -> Path:
    """Writes the report of a run and returns the path of its ``index.html``.

    Args:
        run: the run (or its directory).
        out: the report folder; default ``RUN/report``.
        model, data: the run's model and data set; default rebuilt from the run's manifest.
        queries: misclassified samples shown in each neighbour gallery.
        k: neighbours per query in the galleries.
        explain: most confident mistakes shown with input-space saliency maps.
        check_model: refuse a model whose weights differ from the run's.

    Raises:
        InputError: when the folder is not writable, or the model is not the
            run's (its units, or its weights unless ``check_model=False``).
    """
    run = run if isinstance(run, Run) else open_run(run)
    folder = output_folder(out if out is not None else run.path / "report")
    if model is None or data is None:
        loaded_model, loaded_data, _ = load_source(run)
        model, data = model or loaded_model, data or loaded_data
    run_units(run, model, check_model=check_model)  # before any page is drawn, not at the last section
    sections = [_overview(run), _profiles_section(run, folder), _neighbours_section(run, data, folder, queries, k),
                *_analysis_sections(run, folder), _explain_section(run, model, data, folder, explain, check_model)]
    page = _page(f"paramsal report: {run.path.name}", [s for s in sections if s])
    with atomic_path(folder / "index.html") as tmp:
        tmp.write_text(page)
    return folder / "index.html"


def _overview(run: Run) -> str:
    table = run.table()
    correct = table.column("correct").to_numpy(zero_copy_only=False)[run.selected(table, None)]
    config = run.manifest.get("config", {})
    rows = [("run", str(run.path)), ("model", config.get("model")), ("data", config.get("data")),
            ("samples", f"{len(correct):,}"), ("accuracy", f"{correct.mean():.4f}"),
            ("misclassified", f"{int((~correct).sum()):,}"),
            ("units", f"{run.num_units:,} ({config.get('units')}, {run.manifest.get('aggregation')})")]
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<h2>Run</h2><table class='facts'>{body}</table>"


def _profiles_section(run: Run, folder: Path) -> str:
    plot_mean_profile(run, folder / "mean-profile.png")
    plot_correct_vs_incorrect(run, folder / "correct-vs-incorrect.png")
    return ("<h2>Saliency profiles (paper Figs. 1-2)</h2>"
            "<p>Mean raw profile per layer, filters sorted within each layer:</p>"
            + _img("mean-profile.png", "mean raw profile")
            + "<p>Mean standardized profile of correct vs misclassified samples:</p>"
            + _img("correct-vs-incorrect.png", "standardized profile, correct vs misclassified"))


def _neighbours_section(run: Run, data: Dataset, folder: Path, queries: int, k: int) -> str:
    wrong = run.sample_ids(only="misclassified")
    if len(wrong) <= k:
        return ""
    spaces = ("saliency", "features") if run.manifest.get("features") else ("saliency",)
    summary = pair_sharing(run, k=10 if len(wrong) > 10 else k, spaces=spaces)
    rates = "".join(f"<tr><th>{space}</th><td>{summary[space]:.3f}</td></tr>" for space in spaces)
    rates += f"<tr><th>chance</th><td>{summary['chance']:.3f}</td></tr>"
    labels = _labels_by_id(run)
    shown = wrong[:queries]
    parts = [f"<h2>Nearest neighbours among misclassified samples (paper 3.2)</h2>"
             f"<p>Share of neighbours with the query's (true, predicted) class pair, k={summary['k']}:</p>"
             f"<table class='facts'>{rates}</table>"]
    for space in spaces:
        table = Neighbors(run, k=k, space=space, among="misclassified").nn(shown)
        ids = table.column("neighbor_id").to_numpy().reshape(len(shown), k)
        name = f"neighbours-{space}.png"
        _gallery(data, shown, ids, labels, folder / name, f"{space} space")
        parts.append(f"<h3>In {space} space</h3>" + _img(name, f"neighbour gallery, {space} space"))
    return "".join(parts)


def _analysis_sections(run: Run, folder: Path) -> list[str]:
    sections = []
    for title, figure, summary in ANALYSIS_FIGURES:
        source = run.path / "analyses" / figure
        if not source.is_file():
            continue
        shutil.copyfile(source, folder / figure)
        table = ""
        if (run.path / "analyses" / summary).is_file():
            frame = pq.read_table(run.path / "analyses" / summary).to_pandas()
            table = frame.to_html(index=False, float_format=lambda v: f"{v:.4f}", classes="numbers", border=0)
        sections.append(f"<h2>{html.escape(title)}</h2>" + _img(figure, title) + table)
    return sections


def _explain_section(run: Run, model: nn.Module, data: Dataset, folder: Path, count: int,
                     check_model: bool) -> str:
    table = run.table()
    wrong = run.selected(table, "misclassified")
    if count < 1 or not wrong.any():
        return ""
    confidence = table.column("pred_prob").to_numpy()
    shown = np.argsort(-confidence[wrong], kind="stable")[:count]
    ids = table.column("sample_id").to_numpy()[wrong][shown]
    targets = table.column("target").to_numpy()[wrong][shown]
    inputs = run_inputs(data, ids, targets)  # the data's labels must be the run's
    targets = torch.as_tensor(targets, dtype=torch.long)
    device = next(model.parameters()).device
    maps = {}
    for select in ("salient", "random"):
        explainer = InputSaliency.for_run(model, run, select=select, check_model=check_model)
        maps[select] = visual_map(explainer.attribute(inputs.to(device), targets.to(device), sample_ids=ids).cpu())
    labels = _labels_by_id(run)
    titles = [f"id {i}: {labels[i][0]} -> {labels[i][1]}" for i in ids]
    plot_explanations(inputs, maps["salient"], folder / "explain.png", random_maps=maps["random"], titles=titles)
    return ("<h2>Input-space saliency of the most confident mistakes (paper 2.2)</h2>"
            "<p>Pixels that make the top 10 salient filters salient, next to 10 random filters "
            "(true -> predicted class):</p>" + _img("explain.png", "input-space saliency overlays"))


def _gallery(data: Dataset, queries: np.ndarray, neighbours: np.ndarray, labels: dict[int, tuple[int, int]],
             path: Path, space: str) -> None:
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
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)


def _labels_by_id(run: Run) -> dict[int, tuple[int, int]]:
    table = run.table()
    return dict(zip(table.column("sample_id").to_pylist(),
                    zip(table.column("target").to_pylist(), table.column("pred").to_pylist())))


def _img(name: str, alt: str) -> str:
    return f"<img src='{html.escape(name)}' alt='{html.escape(alt)}'>"


def _page(title: str, sections: list[str]) -> str:
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
             "img{max-width:100%;border:1px solid #ddd;margin:0.5em 0}"
             "table{border-collapse:collapse;margin:0.5em 0 1.5em}th,td{padding:2px 10px;text-align:left}"
             "table.numbers td{text-align:right;font-variant-numeric:tabular-nums}"
             "table.numbers tr:nth-child(even){background:#f4f4f4}h2{border-bottom:1px solid #ccc}")
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<link rel='icon' href='data:,'><style>{style}</style></head><body><h1>{html.escape(title)}</h1>"
            + "\n".join(sections) + "</body></html>\n")


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``paramsal report RUN``."""
    parser.add_argument("run", help="run directory made by `paramsal profile`")
    parser.add_argument("--out", help="report folder (default RUN/report)")
    parser.add_argument("--queries", type=int, default=4, help="queries per neighbour gallery (default 4)")
    parser.add_argument("--k", type=int, default=5, help="neighbours per query in the galleries (default 5)")
    parser.add_argument("--explain", type=int, default=4, help="mistakes shown with input saliency (default 4)")
    add_source_arguments(parser)


def run_report_command(args: argparse.Namespace) -> int:
    """``paramsal report``: writes the page and prints its path."""
    run = open_analysis_run(args)
    output_folder(args.out or run.path / "report")  # before the model and data are loaded
    model, data, _ = load_source(run, args)
    path = build_report(run, args.out, model=model, data=data, queries=args.queries, k=args.k,
                        explain=args.explain, check_model=not args.allow_other_weights)
    print(f"wrote {path}")
    return 0
