"""Bulk profiling: a whole data set through the engine into a resumable run directory."""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from paramsal._io import atomic_path
from paramsal.engine.backends import BatchResult
from paramsal.engine.profile import Profiler
from paramsal.engine.rundir import (FORMAT, STATS, UNITS, Part, Run, check_same_run, clear_run, merge_part_stats,
                                    mismatches, profile_table, read_manifest, write_manifest, write_part)
from paramsal.engine.units import UnitsSpec
from paramsal.errors import InputError
from paramsal.kernels.reduce import Aggregation
from paramsal.kernels.stats import SaliencyStats

#: Rows per part aimed at when ``part_size`` is not given (rounded to whole batches).
DEFAULT_PART_ROWS = 2048


def profile_dataset(model: nn.Module, data: Dataset, out_dir: str | os.PathLike, *, batch_size: int = 64,
                    backend: str = "auto", units: UnitsSpec = "filters", aggregation: Aggregation = "mean_abs",
                    device: str | torch.device | None = None, num_workers: int = 0, features: bool | str = False,
                    resume: bool = True, overwrite: bool = False, progress: bool = True,
                    part_size: int | None = None, chunk_size: int | None = None,
                    model_name: str | None = None, data_name: str | None = None,
                    source: dict[str, Any] | None = None) -> Run:
    """Profiles every sample of a classification data set and writes a run directory.

    Each sample's raw profile (the gradient of its own cross-entropy loss,
    reduced to units; see :func:`paramsal.profile_batch`) is written with its
    prediction and confidences, and the per-unit statistics are streamed. A
    job that stops part-way can be started again with the same arguments: it
    continues after the last finished part, and the run ends with every
    sample exactly once.

    Args:
        model: a trained classifier; moved to ``device`` and profiled in eval mode.
        data: a map-style data set of ``(input, class index)``, read in order.
        out_dir: the run directory (created if needed).
        batch_size: samples per batch.
        backend: "auto", "hooks", "vmap" or "loop".
        units: see :func:`paramsal.units_of`.
        aggregation: "mean_abs" (the paper) or "abs_mean".
        device: where to compute; default CUDA when available, else CPU.
        num_workers: DataLoader worker processes.
        features: also record penultimate features (the input of the last
            ``nn.Linear``, or of the named module), for the feature-space baseline.
        resume: continue a run found in ``out_dir``; False starts over only
            with ``overwrite``.
        overwrite: replace a run in ``out_dir`` made with another model, data
            set or units (or any run, with ``resume=False``).
        progress: show a progress bar (samples/s, time left).
        part_size: rows per Parquet part, a multiple of ``batch_size``
            (default about 2,048).
        chunk_size: samples per chunk of per-sample work (memory bound).
        model_name, data_name: descriptions stored in the manifest.
        source: how to load the model and data again (the command line's
            specs: model, weights, num_classes, data, transform), stored in the
            manifest so that analyses can rebuild them from the run alone.

    Returns:
        The finished run, opened for reading.
    """
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    root = _writable_dir(out_dir)
    device = torch.device(device) if device is not None else _default_device()
    model = model.to(device)
    profiler = Profiler(model, units=units, backend=backend, aggregation=aggregation, chunk_size=chunk_size,
                        features=features or None)
    batches_per_part = max(1, (part_size or DEFAULT_PART_ROWS) // batch_size)
    wanted = _manifest(model, data, profiler, batch_size, batches_per_part, model_name, data_name)
    wanted["source"] = dict(source or {})

    existing = read_manifest(root)
    if existing is not None and overwrite and not (resume and not mismatches(existing, wanted)):
        clear_run(root)
        existing = None
    if existing is not None and not resume:
        raise InputError(f"{root} already holds a run; pass resume=True to continue it or overwrite=True "
                         "to start over")
    if existing is not None:
        check_same_run(root, existing, wanted)
        wanted["parts"] = existing["parts"]
        batches_per_part = existing["config"]["batches_per_part"]
        wanted["config"]["batches_per_part"] = batches_per_part
    else:
        _write_units(root, profiler)
        write_manifest(root, wanted)

    parts = [Part(p["index"], p["start"], p["stop"]) for p in wanted["parts"]]
    start = parts[-1].stop if parts else 0
    rows_per_part = batches_per_part * batch_size
    loader = DataLoader(Subset(data, range(start, len(data))), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, pin_memory=device.type == "cuda")
    bar = tqdm(total=len(data), initial=start, unit="samples", disable=not progress, desc="profiling",
               dynamic_ncols=True)
    buffer = _PartBuffer(start)
    try:
        for inputs, targets in loader:
            targets = torch.as_tensor(targets)
            buffer.add(targets, profiler(inputs, targets))
            bar.update(len(inputs))
            if buffer.rows >= rows_per_part or buffer.stop == len(data):
                parts.append(_flush(root, wanted, parts, buffer, len(profiler.index)))
                buffer = _PartBuffer(buffer.stop)
    finally:
        bar.close()

    _finish(root, wanted, parts, len(profiler.index))
    return Run(root)


class _PartBuffer:
    """The batches of the part being filled, moved off the device as they arrive."""

    def __init__(self, start: int):
        self.start = self.stop = start
        self.columns: dict[str, list[torch.Tensor]] = {k: [] for k in
                                                       ("targets", "profiles", "outputs", "losses", "features")}

    @property
    def rows(self) -> int:
        return self.stop - self.start

    def add(self, targets: torch.Tensor, result: BatchResult) -> None:
        for name, values in (("targets", targets), ("profiles", result.profiles), ("outputs", result.outputs),
                             ("losses", result.losses), ("features", result.features)):
            if values is not None:
                self.columns[name].append(values.detach().cpu())
        self.stop += len(targets)

    def cat(self, name: str) -> torch.Tensor | None:
        return torch.cat(self.columns[name]) if self.columns[name] else None


def _flush(root: Path, manifest: dict[str, Any], parts: list[Part], buffer: _PartBuffer, num_units: int) -> Part:
    """Writes the buffered rows as the next part, then lists it in the manifest."""
    profiles = buffer.cat("profiles")
    features = buffer.cat("features")
    part = Part(len(parts), buffer.start, buffer.stop)
    table = profile_table(np.arange(buffer.start, buffer.stop), buffer.cat("targets").numpy(),
                          buffer.cat("outputs").float().numpy(), buffer.cat("losses").float().numpy(),
                          profiles.float().numpy(), None if features is None else features.float().numpy())
    stats = SaliencyStats(num_units, manifest["aggregation"]).update(profiles)
    write_part(root, part, table, stats)
    manifest["parts"] = [p.to_json() for p in parts + [part]]
    manifest["updated"] = _now()
    write_manifest(root, manifest)
    return part


def _finish(root: Path, manifest: dict[str, Any], parts: list[Part], num_units: int) -> None:
    stats = merge_part_stats(root, parts, num_units)
    stats.aggregation = manifest["aggregation"]
    stats.save(root / STATS)
    manifest["complete"] = True
    manifest["updated"] = _now()
    write_manifest(root, manifest)


def _write_units(root: Path, profiler: Profiler) -> None:
    with atomic_path(root / UNITS) as tmp:
        pq.write_table(profiler.index.table, tmp)


def _manifest(model: nn.Module, data: Dataset, profiler: Profiler, batch_size: int, batches_per_part: int,
              model_name: str | None, data_name: str | None) -> dict[str, Any]:
    import paramsal

    return {
        "format": FORMAT,
        "created": _now(),
        "updated": _now(),
        "complete": False,
        "config": {"model": model_name or type(model).__name__, "data": data_name or type(data).__name__,
                   "units": profiler.index.scheme, "backend": profiler.backend, "batch_size": batch_size,
                   "batches_per_part": batches_per_part, "features_module": profiler.features},
        "aggregation": profiler.aggregation,
        "features": profiler.features is not None,
        "num_units": len(profiler.index),
        "num_samples": len(data),
        "model_fingerprint": model_fingerprint(model),
        "data_fingerprint": data_fingerprint(data),
        "units_fingerprint": profiler.index.fingerprint(),
        "versions": {"paramsal": paramsal.__version__, "torch": torch.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
        "parts": [],
    }


def model_fingerprint(model: nn.Module) -> str:
    """A hash of the state dict: names, shapes, dtypes and values."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                      if tensor.numel() else b"")
    return digest.hexdigest()[:16]


def data_fingerprint(data: Dataset, probes: int = 8) -> str:
    """A hash of the data set's size, order and a few samples.

    Uses the list of files and labels when the data set exposes it (as
    ImageFolder does) and otherwise reads ``probes`` evenly spaced samples, so
    that fingerprinting never reads the whole data set.
    """
    digest = hashlib.sha256(f"{type(data).__name__}:{len(data)}".encode())
    listing = getattr(data, "samples", None) or getattr(data, "targets", None)
    if listing is not None:
        digest.update(repr(list(listing)).encode())
    for i in np.linspace(0, len(data) - 1, num=min(probes, len(data)), dtype=int):
        x, y = data[int(i)]
        digest.update(torch.as_tensor(x).cpu().contiguous().numpy().tobytes())
        digest.update(repr(int(y)).encode())
    return digest.hexdigest()[:16]


def _writable_dir(out_dir: str | os.PathLike) -> Path:
    root = Path(out_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".paramsal-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise InputError(f"output directory {root} is not writable: {exc.strerror or exc}") from exc
    return root


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
