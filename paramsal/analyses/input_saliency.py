"""Input-space saliency from parameter saliency (the paper's section 2.2): the gradient, and its result.

Which pixels make a sample's salient units salient? Boost the chosen units'
entries of the sample's standardized profile ``ŝ`` (a target profile
``s'_F``, held constant) and ask which input pixels move ``ŝ`` toward it:

    M_F = |∇_x D_C(ŝ(x, y), s'_F)|,   D_C(a, b) = 1 - cos(a, b).

``ŝ`` depends on ``x`` through the per-sample parameter gradient, so ``M_F``
is a gradient of a gradient (double backward). :class:`InputSaliency` does it
for a whole batch with ``torch.func`` (``vmap`` over samples of ``grad`` with
respect to ``x`` of :meth:`paramsal.engine.functional.SampleLoss.gradient`),
or one sample at a time with ``autograd.grad(create_graph=True)``
(``backend="loop"``); both are checked against
:func:`paramsal.reference.input_saliency_loop`, the float64 oracle.

The picture lives in :mod:`.pictures`, the masking experiment in :mod:`.masking`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.func import grad, vmap

from paramsal._typing import MapDataset
from paramsal.analyses.base import Analysis, Result, result_config
from paramsal.analyses.distance import attribute_loop, boosted_profile, cosine_distance, top_share
from paramsal.analyses.pictures import channel_max, plot_explanations, visual_map
from paramsal.analyses.selection import run_tails, select_units
from paramsal.analyses.sources import Samples, data_class_names, open_for_analysis, run_units
from paramsal.engine.functional import LossFn, SampleLoss
from paramsal.engine.profile import Profiler, check_batch, eval_mode
from paramsal.engine.units import UnitIndex, UnitsSpec, check_single_parameter, units_of
from paramsal.errors import InputError, check_choice, check_integer
from paramsal.kernels.chunks import chunk_slices
from paramsal.kernels.reduce import Aggregation, reduce_grad
from paramsal.options import AGGREGATIONS, ATTRIBUTION_SELECTIONS, RANKINGS
from paramsal.ranking.stats import SaliencyStats
from paramsal.ranking.tails import Tails
from paramsal.rundir.run import Run
from paramsal.zoo.specs import label_text

#: How the double backward is computed: batched with torch.func, or the one-sample reference.
ATTRIBUTION_BACKENDS = ("vmap", "loop")


class AttributionResult(Result):
    """Input-space saliency maps of some samples, for the configured selection and the other one side by side.

    * ``table``: one row per sample: sample_id, target, pred (recomputed),
      units and other_units (the boosted unit ids, ``k`` each, of the
      configured and of the other selection), top10_share and
      other_top10_share (:func:`top_share` of the channel-max map, before any
      clipping: 0.1 for a map spread evenly, up to 1 for one concentrated in
      a tenth of the pixels);
    * ``summary``: per selection (the configured one first): n, and the
      mean and standard deviation over samples of top10_share;
    * ``arrays``: "inputs" ``[N, C, H, W]``, "maps" ``[N, H, W]`` the visual
      maps (:func:`~paramsal.analyses.pictures.visual_map`) of the configured
      selection, "other_maps" those of the other.
    """

    kind = "explain"
    title = "Input-space saliency (paper 2.2)"

    def plot(self, ax: Any = None) -> Any:
        """The explanations grid: per sample, image, map, overlay, other map, overlay.

        Args:
            ax: ``[N, 5]`` axes to draw into (any shape holding that many), or None for a new figure.

        Returns:
            The matplotlib ``Figure``.
        """
        select, other = self.config.get("select", "salient"), self.config.get("other_select", "random")
        rows = self.config.get("row_names") or [f"id {int(i)}" for i in self.table["sample_id"]]
        names = self.config.get("class_names")
        titles = [f"{name}: {label_text(int(t), names)} -> {label_text(int(p), names)}"
                  for name, t, p in zip(rows, self.table["target"], self.table["pred"])]
        return plot_explanations(self.arrays["inputs"], self.arrays["maps"], other_maps=self.arrays["other_maps"],
                                 titles=titles, names=(f"{select} units", f"{other} units"), axes=ax)


@dataclass(frozen=True)
class _Bound:
    """What tensors are explained with: the model, its units, the reference statistics, the aggregation."""

    model: nn.Module
    index: UnitIndex
    stats: SaliencyStats
    aggregation: Aggregation


class InputSaliency(Analysis):
    """Input-space saliency ``M_F = |∇_x D_C(ŝ(x, y), s'_F)|``: configure once, ``evaluate(run)`` or ``attribute``.

    ``ŝ(x, y)`` is the standardized profile of *that sample's own* loss
    (``loss``, cross-entropy with its label ``y`` by default): raw
    ``s = mean |∂L/∂θ|`` over each unit, then ``(s - μ) / σ`` with a
    reference set's statistics, kept fixed. ``s'_F`` is ``ŝ`` with the
    entries of the units F multiplied by ``boost``, held constant. The model
    is evaluated in eval mode (BatchNorm on running statistics) and its flags
    are restored; no hook is used and ``.grad`` is never touched.

    Args:
        model: the classifier (None: rebuilt from the run by :meth:`evaluate`).
        stats: statistics standardizing the profiles; needed by :meth:`attribute`
            (or use :meth:`for_run`); :meth:`evaluate` uses the run's unless given.
        k: size of F (paper: 10).
        boost: factor on the chosen entries (paper: 100).
        select: "salient" (F = the top k units of ``ŝ``) or "random" (k random
            units, the paper's comparison); :meth:`evaluate` draws both.
        ranking: how units are ranked: "zscore" (the standardized profile) or
            "pot" (the tail score of the raw profile, :meth:`Run.scores`).
        tails: the POT tails for ``ranking="pot"`` (:func:`~paramsal.analyses.selection.run_tails`);
            :meth:`for_run` and :meth:`evaluate` take the run's.
        seed: seeds the random units (sample i's draw by ``(seed, sample id)``).
        units: the partition, as for :func:`paramsal.units_of` (default the
            run's, or "filters"); must have ``stats.num_units`` units.
        aggregation: "mean_abs" (paper) or "abs_mean"; default the run's or the statistics'.
        loss: per-sample loss ``(outputs [n, ...], targets [n, ...]) -> [n]``; default cross-entropy.
        backend: "vmap" (batched, ``torch.func``) or "loop" (one sample at a
            time with ``autograd.grad(create_graph=True)``, the reference).
        batch_size: samples per batch (bounds memory: each sample holds a
            parameter-sized gradient and its graph).
        **common: :class:`~paramsal.analyses.base.Analysis`'s keywords
            (allow_partial, allow_other_weights, ...).

    Example:
        >>> result = InputSaliency(k=10).evaluate(run, samples=[12, 14])   # model and data rebuilt from the run
        >>> maps = InputSaliency.for_run(model, run).attribute(images, labels)   # [N, C, H, W], >= 0
    """

    purpose = "explain"

    def __init__(self, model: nn.Module | None = None, *, stats: SaliencyStats | None = None, k: int = 10,
                 boost: float = 100.0, select: str = "salient", ranking: str = "zscore", seed: int = 0,
                 units: UnitsSpec | UnitIndex | None = None, aggregation: str | None = None,
                 loss: LossFn | None = None, backend: str = "vmap", batch_size: int = 8, tails: Tails | None = None,
                 **common: Any):
        super().__init__(model, **common)
        check_choice("select", select, ATTRIBUTION_SELECTIONS)
        check_choice("ranking", ranking, RANKINGS)
        check_choice("backend", backend, ATTRIBUTION_BACKENDS)
        if aggregation is not None:
            check_choice("aggregation", aggregation, AGGREGATIONS)
        self.stats, self.tails = stats, tails
        self.k, self.boost, self.select, self.ranking, self.seed = (check_integer("k", k), float(boost), select,
                                                                    ranking, int(seed))
        self.units, self.loss, self.backend, self.batch_size = (units, loss, backend,
                                                                check_integer("batch_size", batch_size))
        self.aggregation = aggregation or (stats.aggregation if stats is not None else None)
        self._index: UnitIndex | None = None
        self._profiler: Profiler | None = None
        if model is not None and stats is not None:
            self._index = self._checked_index(model, stats, units)
            self.aggregation = self.aggregation or "mean_abs"

    @classmethod
    def for_run(cls, model: nn.Module, run: Run | str | os.PathLike, **options: Any) -> InputSaliency:
        """An explainer with a run's statistics, units and aggregation (``options``: k, boost, select, ...).

        Raises:
            InputError: when the run is unfinished (unless ``allow_partial``),
                the model's units are not the run's, or its weights are not the
                profiled ones (unless ``allow_other_weights``): the run's
                statistics would standardize another model's profiles.
        """
        run = open_for_analysis(run, options.get("allow_partial", False))
        index = run_units(run, model, options.pop("units", None), not options.get("allow_other_weights", False))
        options.setdefault("aggregation", run.manifest.aggregation)
        stats = options.pop("stats", None) or run.stats
        if options.get("ranking") == "pot":
            options.setdefault("tails", run_tails(run))
        return cls(model, stats=stats, units=index, **options)

    @property
    def index(self) -> UnitIndex:
        """The units of the model (known once a model and statistics are given)."""
        return self._bound().index

    def profiles(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Standardized profiles ``ŝ`` ``[N, F]`` of ``inputs [N, ...]`` with targets ``targets [N]``."""
        return self._bound().stats.standardize(self.raw_profiles(inputs, targets))

    def raw_profiles(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Raw profiles ``[N, F]``, from one :class:`~paramsal.Profiler` per model, so that its once-per-model
        checks (the backend's proofs against the loop) are not repeated on every batch."""
        bound = self._bound()
        if self._profiler is None or self._profiler.model is not bound.model:
            self._profiler = Profiler(bound.model, units=bound.index, aggregation=bound.aggregation, loss=self.loss)
        return self._profiler(inputs, targets).profiles

    def choose(self, inputs: torch.Tensor, targets: torch.Tensor,
               sample_ids: Sequence[int] | np.ndarray | None = None) -> torch.Tensor:
        """The units F ``[N, k]`` this explainer boosts for each sample (see :func:`select_units`)."""
        inputs, targets = self._checked(inputs, targets)
        return self._choose(self.profiles(inputs, targets), self.select, sample_ids)

    def attribute(self, inputs: torch.Tensor, targets: torch.Tensor, *,
                  unit_ids: torch.Tensor | np.ndarray | None = None,
                  sample_ids: Sequence[int] | np.ndarray | None = None) -> torch.Tensor:
        """Input-space saliency of a batch of tensors.

        Args:
            inputs: ``[N, ...]``, e.g. images ``[N, C, H, W]``, in the space the model takes
                (normalized images).
            targets: ``[N]`` class indices (or the custom loss's targets); each
                sample's loss uses its own (the true label).
            unit_ids: ``[N, k]`` the units F to boost; default chosen by ``select``.
            sample_ids: ``[N]`` ids seeding a random choice (default positions).

        Returns:
            ``[N, ...]`` like ``inputs``: ``|∂ D_C(ŝ(x), s'_F) / ∂x|`` (detached, the model's dtype).
        """
        inputs, targets = self._checked(inputs, targets)
        with eval_mode(self._bound().model):
            z = self.profiles(inputs, targets)
            if unit_ids is None:
                unit_ids = self._choose(z, self.select, sample_ids)
            unit_ids = torch.as_tensor(unit_ids, dtype=torch.long)
            if unit_ids.dim() != 2 or len(unit_ids) != len(inputs):
                raise InputError(f"unit_ids of shape {tuple(unit_ids.shape)} do not fit {len(inputs)} samples: "
                                 "expected [N, k]")
            return self._gradient(inputs, targets, boosted_profile(z, unit_ids, self.boost))

    def evaluate(self, run: Run | str | os.PathLike, data: MapDataset | None = None,
                 samples: Samples = None) -> AttributionResult:
        """Maps of the chosen samples (default: the run's misclassified ones), both selections side by side.

        The run gives the units, the aggregation and (unless ``stats`` was
        given) the statistics; the model and data are checked to be the run's.
        """
        prepared = self.prepare(run, data, samples, units=self.units)
        explainer = self._like(prepared.model, self.stats or prepared.run.stats, prepared.index,
                               self.aggregation or prepared.run.manifest.aggregation,
                               self.tails or (run_tails(prepared.run) if self.ranking == "pot" else None))
        batches = ((prepared.inputs(rows), torch.as_tensor(prepared.targets[rows]), prepared.ids[rows])
                   for rows in chunk_slices(len(prepared.ids), self.batch_size))
        if isinstance(samples, str) or samples is None:
            parts = [samples or "misclassified"]
        elif len(prepared.ids) <= 8:
            parts = [f"id{int(i)}" for i in prepared.ids]
        else:
            parts = [f"{len(prepared.ids)}samples", hashlib.sha1(prepared.ids.tobytes()).hexdigest()[:8]]
        return explainer._result(batches, prepared.run, parts, class_names=data_class_names(prepared.data))

    def explain(self, inputs: torch.Tensor, targets: torch.Tensor, *,
                sample_ids: Sequence[int] | np.ndarray | None = None, names: Sequence[str] | None = None,
                run: Run | None = None) -> AttributionResult:
        """The result :meth:`evaluate` gives, for images given as tensors (e.g. a file that is not a run sample).

        Args:
            inputs: ``[N, C, H, W]`` in the model's input space.
            targets: ``[N]`` true classes.
            sample_ids: ``[N]`` ids for the table and the random draws (default 0..N-1).
            names: one name per image for the figure's rows and the result's name (default "id<ID>").
            run: the run the statistics come from, recorded in the config.
        """
        self._bound()
        ids = np.arange(len(inputs)) if sample_ids is None else np.asarray(sample_ids, dtype=np.int64)
        if len(ids) != len(inputs):
            raise InputError(f"{len(ids)} sample_ids for {len(inputs)} inputs")
        batches = ((inputs[rows], targets[rows], ids[rows]) for rows in chunk_slices(len(ids), self.batch_size))
        return self._result(batches, run, list(names) if names else [f"id{int(i)}" for i in ids], names)

    # ---------------------------------------------------------------------------------------------- internals

    def _result(self, batches: Iterator[tuple[torch.Tensor, torch.Tensor, np.ndarray]], run: Run | None,
                name_parts: list[str], row_names: Sequence[str] | None = None,
                class_names: list[str] | None = None) -> AttributionResult:
        other = next(s for s in ATTRIBUTION_SELECTIONS if s != self.select)
        model = self._bound().model
        columns: dict[str, list] = {}
        arrays: dict[str, list[np.ndarray]] = {"inputs": [], "maps": [], "other_maps": []}
        for inputs, targets, ids in batches:
            inputs, targets = self._checked(inputs, targets)
            if inputs.dim() != 4:
                raise InputError(f"maps are drawn for images [N, C, H, W], got inputs {tuple(inputs.shape)}; "
                                 "use attribute() for other inputs")
            with eval_mode(model):
                with torch.no_grad():
                    preds = model(inputs).argmax(1).cpu().numpy()
                z = self.profiles(inputs, targets)
                found = {}
                for prefix, select in (("", self.select), ("other_", other)):
                    unit_ids = self._choose(z, select, ids)
                    gradient = self._gradient(inputs, targets, boosted_profile(z, unit_ids, self.boost))
                    found[f"{prefix}units"] = unit_ids.tolist()
                    found[f"{prefix}top10_share"] = top_share(channel_max(gradient)).tolist()
                    arrays[f"{prefix}maps"].append(visual_map(gradient).numpy())
            arrays["inputs"].append(inputs.detach().float().cpu().numpy())
            batch = {"sample_id": np.asarray(ids, dtype=np.int64).tolist(),
                     "target": targets.cpu().numpy().astype(np.int64).tolist(), "pred": preds.astype(np.int64).tolist()}
            for name in ("units", "other_units", "top10_share", "other_top10_share"):
                batch[name] = found[name]
            for name, values in batch.items():
                columns.setdefault(name, []).extend(values)
        table = pd.DataFrame(columns)
        summary = pd.DataFrame([{"selection": select, "n": len(table), "top10_share": table[f"{p}top10_share"].mean(),
                                 "top10_share_std": table[f"{p}top10_share"].std()}
                                for p, select in (("", self.select), ("other_", other))])
        facts = {"units": self._bound().index.scheme,
                 "loss": getattr(self.loss, "__name__", type(self.loss).__name__) if self.loss else "cross_entropy",
                 "other_select": other, "row_names": list(row_names) if row_names else None, "name_parts": name_parts,
                 "class_names": class_names}
        config = result_config(run, self, **facts)
        joined = {key: np.concatenate(values) for key, values in arrays.items()}
        return AttributionResult(table, summary, config, joined)

    def _like(self, model: nn.Module, stats: SaliencyStats, index: UnitIndex, aggregation: str | None,
              tails: Tails | None = None) -> InputSaliency:
        """This configuration, bound to a model, statistics and units."""
        common = {key: getattr(self, key) for key in ("allow_partial", "allow_other_weights", "allow_other_data",
                                                      "trust_run_specs", "device", "progress")}
        return InputSaliency(model, stats=stats, k=self.k, boost=self.boost, select=self.select,
                             ranking=self.ranking, seed=self.seed, units=index,
                             aggregation=aggregation or stats.aggregation, loss=self.loss, backend=self.backend,
                             batch_size=self.batch_size, tails=tails, **common)

    def _checked_index(self, model: nn.Module, stats: SaliencyStats, units: UnitsSpec | UnitIndex | None
                       ) -> UnitIndex:
        index = units if isinstance(units, UnitIndex) else units_of(model, units or "filters")
        if len(index) != stats.num_units:
            raise InputError(f"the statistics have {stats.num_units} units but units={index.scheme!r} gives "
                             f"{len(index)} for {type(model).__name__}: use the run's model and units")
        if self.k > len(index):
            raise InputError(f"k={self.k} is outside 1..{len(index)} (the model has {len(index)} units)")
        check_single_parameter(index, "input-space saliency")
        return index

    def _bound(self) -> _Bound:
        """The model, units, statistics and aggregation that tensors are explained with."""
        if self.model is None or self.stats is None or self._index is None:
            raise InputError("InputSaliency needs a model and statistics for tensors: InputSaliency(model, "
                             "stats=run.stats), or InputSaliency.for_run(model, run); evaluate(run) needs neither")
        aggregation = self.aggregation or "mean_abs"
        check_choice("aggregation", aggregation, AGGREGATIONS)
        return _Bound(self.model, self._index, self.stats, cast(Aggregation, aggregation))

    def _choose(self, z: torch.Tensor, select: str, sample_ids: Sequence[int] | np.ndarray | None) -> torch.Tensor:
        chosen = select_units(self._scores(z), self.k, select, self.seed, sample_ids)
        return torch.as_tensor(chosen, dtype=torch.long)

    def _scores(self, z: torch.Tensor) -> np.ndarray:
        """``[N, F]`` the ranking's scores of standardized profiles ``z``."""
        if self.ranking == "zscore":
            return z.detach().cpu().numpy()
        if self.tails is None:
            raise InputError("ranking='pot' scores raw profiles with a run's tails: InputSaliency.for_run(model, run, "
                             "ranking='pot'), or tails=paramsal.analyses.selection.run_tails(run)")
        stats = self._bound().stats  # the raw profile back, in float64 (to float32 rounding of z)
        return self.tails.score(z.detach().cpu().double().numpy() * stats.std + stats.mean)

    def _checked(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        model = self._bound().model
        check_batch(inputs, targets, class_indices=self.loss is None)
        if inputs.dim() < 2:  # a gradient w.r.t. each sample's input needs a sample dim and a feature dim
            raise InputError(f"inputs must be a batch [N, ...] of non-scalar samples, got shape {tuple(inputs.shape)}")
        param = next(iter(model.parameters()))
        return inputs.to(param.device, param.dtype), targets.to(param.device)

    def _gradient(self, inputs: torch.Tensor, targets: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``|∇_x D_C(ŝ(x), target)|`` ``[N, ...]`` (the model already in eval mode)."""
        bound = self._bound()
        index, aggregation, stats = bound.index, bound.aggregation, bound.stats
        if self.backend == "loop":
            return attribute_loop(bound.model, index, stats, aggregation, self.loss, inputs, targets, target)
        sample_loss = SampleLoss(bound.model, index.param_names, self.loss)  # other parameters enter as constants

        def distance(x: torch.Tensor, y: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
            grads = sample_loss.gradient(x, y)
            raw = torch.cat([reduce_grad(grads[group.param_name][None], group, aggregation)[0] for group in index])
            return cosine_distance(stats.standardize(raw), goal)

        return vmap(grad(distance), chunk_size=self.batch_size)(inputs, targets, target).abs().detach()


__all__ = ["AttributionResult", "InputSaliency", "boosted_profile", "cosine_distance", "top_share"]
