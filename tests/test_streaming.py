"""Analyses that stream: blocks of a run equal the whole, neighbours equal a float64 brute force, memory stays flat."""

import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from runs import make_run

from paramsal import InputError, RunCorruptError
from paramsal.analyses import knn
from paramsal.analyses.knn import Search, block_rows, screening_margin
from paramsal.analyses.neighbors import Neighbors
from paramsal.rundir import writing


def random_run(root, n=700, units=30, part_rows=300, seed=0, features=True):
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, 3, n)
    preds = np.where(rng.random(n) < 0.4, rng.integers(0, 3, n), targets)
    profiles = rng.random((n, units)).astype(np.float32)
    feats = rng.normal(size=(n, 5)).astype(np.float32) if features else None
    return make_run(root, profiles, targets, preds, np.arange(units) // 6, feats, part_rows=part_rows)


def near_tie_run(root, n=240, units=300, seed=1):
    """Four tight clusters: within one, standardized profiles are nearly parallel (cosines differ from about the 8th
    digit on), far inside the float32 screening margin; no two rows are equal."""
    rng = np.random.default_rng(seed)
    cluster = rng.integers(0, 4, n)
    centres = rng.random((4, units)) + 1.0
    profiles = (centres[cluster] * (1 + 1e-4 * rng.normal(size=(n, units)))).astype(np.float32)
    targets = cluster % 3
    preds = np.where(rng.random(n) < 0.5, (targets + 1) % 3, targets)
    return make_run(root, profiles, targets, preds, np.arange(units) // 50, part_rows=50)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("streaming")
    return {"random": random_run(root / "random", n=300, units=200, part_rows=70),
            "near-ties": near_tie_run(root / "ties")}


# ------------------------------------------------------------------------------------------ reading in blocks


def concatenated(blocks):
    blocks = list(blocks)
    return np.concatenate([ids for ids, _ in blocks]), np.concatenate([values for _, values in blocks]), blocks


@pytest.fixture(scope="module")
def reading_run(tmp_path_factory):
    """700 samples in parts of 300 rows: row groups of 256, so blocks straddle row groups and parts."""
    return random_run(tmp_path_factory.mktemp("reading") / "run")


@pytest.mark.parametrize("rows", [1, 7, 64, 300, 5000])
@pytest.mark.parametrize("only, layers, standardized", [
    (None, None, True), (None, None, False), ("misclassified", slice(1, 3), True), ("correct", [0, 4], False),
    ([5, 3, 699, 301, 300, 5], None, True), (np.arange(250, 420), slice(2, None), True),
], ids=["all", "raw", "misclassified-layers", "correct-list", "ids", "id-range"])
def test_iter_profiles_blocks_concatenate_to_profiles(reading_run, rows, only, layers, standardized):
    run = reading_run
    ids, values, blocks = concatenated(run.iter_profiles(rows, layers=layers, only=only, standardized=standardized))
    expected = run.profiles(standardized=standardized, layers=layers, only=only)
    assert values.dtype == np.float32 and np.array_equal(values, expected)
    assert np.array_equal(ids, run.sample_ids(only)) and ids.dtype == np.int64
    assert all(len(block_ids) == rows for block_ids, _ in blocks[:-1]) and 1 <= len(blocks[-1][0]) <= rows


def test_parts_are_written_in_bounded_row_groups_and_old_single_group_parts_still_read(tmp_path, monkeypatch):
    run = random_run(tmp_path / "new", n=600, part_rows=600)
    assert pq.ParquetFile(run.path / run.parts[0].file).metadata.num_row_groups == 3  # 256 + 256 + 88
    monkeypatch.setattr(writing, "ROW_GROUP_ROWS", None)  # as parts were written before: one row group
    old = random_run(tmp_path / "old", n=600, part_rows=600)
    assert pq.ParquetFile(old.path / old.parts[0].file).metadata.num_row_groups == 1
    for each in (run, old):
        _, values, _ = concatenated(each.iter_profiles(100, stats=run))
        assert np.array_equal(values, each.profiles(stats=run))
    assert np.array_equal(np.concatenate([v for _, v in old.iter_features(33)]), old.features())


def test_iter_profiles_checks_what_it_reads(tmp_path):
    run = random_run(tmp_path / "run", n=100, part_rows=40, features=False)
    with pytest.raises(InputError, match="rows must be an integer >= 1"):
        run.iter_profiles(0)
    with pytest.raises(InputError, match="has no features"):
        run.iter_features(10)
    with open(run.path / run.parts[1].file, "ab") as file:
        file.write(b"x")
    blocks = run.iter_profiles(10)
    assert len(next(blocks)[0]) == 10  # the first part is sound; the second is refused when reached
    with pytest.raises(RunCorruptError, match="part-00001.*bytes where the manifest records"):
        list(blocks)


# ------------------------------------------------------------------------------------------ exact neighbours


def oracle(run, pool, queries, k, space="saliency"):
    """Float64 brute force: standardize with the run's statistics, unit rows, the full similarity matrix, ranks by
    (-similarity, id), each query's own row excluded."""
    if space == "saliency":
        vectors = (run.profiles(standardized=False).astype(np.float64) - run.stats.mean) / run.stats.std
    else:
        vectors = run.features().astype(np.float64)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)  # row i is sample i in these runs
    sim = unit[queries] @ unit[pool].T
    sim[queries[:, None] == pool[None, :]] = -np.inf
    order = np.lexsort((np.broadcast_to(pool, sim.shape), -sim), axis=1)[:, :k]
    return pool[order], np.take_along_axis(sim, order, 1)


def searched(run, queries, k, **options):
    result = Neighbors(k=k, spaces=(options.pop("space", "saliency"),), **options).evaluate(run, samples=queries)
    return (result.table["neighbor_id"].to_numpy().reshape(-1, k),
            result.table["similarity"].to_numpy().reshape(-1, k))


#: The float32 path's choices, forced: every passing pair alone ("pairs"), every query with a passing pair as a row of
#: float64 products ("rows"), or as the costs say (None).
PAIR_COSTS = {"measured": None, "pairs": 0.0, "rows": 1e12}


@pytest.fixture
def pair_products(monkeypatch):
    """Counts the (query, candidate) pairs given float64 products one at a time."""
    counted = {"pairs": 0}
    real = knn._pair_products

    def counting(queries, candidates, rows, passed, counts, start):
        counted["pairs"] += int(counts.sum())
        return real(queries, candidates, rows, passed, counts, start)

    monkeypatch.setattr(knn, "_pair_products", counting)
    return counted


@pytest.mark.parametrize("strategy", PAIR_COSTS)
@pytest.mark.parametrize("precision", ["float32", "float64"])
@pytest.mark.parametrize("k", [1, 7])
@pytest.mark.parametrize("data", ["random", "near-ties"])
def test_streamed_neighbours_equal_a_float64_brute_force(runs, monkeypatch, pair_products, data, k, precision,
                                                         strategy):
    if PAIR_COSTS[strategy] is not None:
        monkeypatch.setattr(knn, "_pair_cost", lambda width: PAIR_COSTS[strategy])
    run = runs[data]
    pool = np.sort(run.sample_ids())
    for options in ({"block_size": 16}, {"budget_mb": 1}):
        ids, sims = searched(run, pool, k, among="all", precision=precision, **options)
        expected_ids, expected_sims = oracle(run, pool, pool, k)
        np.testing.assert_array_equal(ids, expected_ids)
        np.testing.assert_allclose(sims, expected_sims, rtol=0, atol=1e-12)
    if precision == "float64" or strategy == "rows":
        assert pair_products["pairs"] == 0
    elif strategy == "pairs" and data == "random":
        # the screen let through a small share of the pairs: for those only, a float64 product
        assert 0 < pair_products["pairs"] < 0.25 * len(pool) ** 2


@pytest.mark.parametrize("strategy", PAIR_COSTS)
def test_queries_outside_the_pool_repeated_and_unordered(runs, monkeypatch, strategy):
    if PAIR_COSTS[strategy] is not None:
        monkeypatch.setattr(knn, "_pair_cost", lambda width: PAIR_COSTS[strategy])
    for run in runs.values():
        pool = np.sort(run.sample_ids("misclassified"))
        correct = run.sample_ids("correct")
        queries = np.array([correct[3], pool[5], pool[0], correct[3], *pool[::3], correct[0], pool[5]])
        ids, sims = searched(run, queries, 4, among="misclassified", block_size=5)
        expected_ids, expected_sims = oracle(run, pool, queries, 4)
        np.testing.assert_array_equal(ids, expected_ids)
        np.testing.assert_allclose(sims, expected_sims, rtol=0, atol=1e-12)


def test_feature_space_streams_too(runs, monkeypatch):
    monkeypatch.setattr(knn, "_pair_cost", lambda width: 0.0)
    run = random_run(runs["random"].path.parent / "features", n=260, part_rows=100)
    pool = np.sort(run.sample_ids())
    for precision in ("float32", "float64"):
        ids, sims = searched(run, pool, 6, among="all", space="features", precision=precision, block_size=32)
        expected_ids, expected_sims = oracle(run, pool, pool, 6, space="features")
        np.testing.assert_array_equal(ids, expected_ids)
        np.testing.assert_allclose(sims, expected_sims, rtol=0, atol=1e-12)


@pytest.mark.parametrize("width", [1, 3, 100, 4097])
def test_the_screening_margin_bounds_the_float32_error(width):
    """The worst case of float32 accumulation is all products of one sign: equal rows of equal entries, and random
    positive ones; the measured error stays under the bound, which is about width * 2**-24."""
    rng = np.random.default_rng(width)
    rows = np.vstack([np.full(width, 1.0), rng.random((200, width)), rng.normal(size=(200, width))])
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    error = np.abs(unit.astype(np.float32) @ unit.astype(np.float32).T - unit @ unit.T).max()
    margin = screening_margin(width)
    assert error <= margin < 1.01 * width * 2**-24 + 2.5 * 2**-24
    assert screening_margin(2**24) == float("inf")


def test_the_budget_sets_the_blocks(runs):
    budget = 256 << 20
    queries, pool = block_rows(budget, 26_560)
    assert pool <= 128 and queries >= 400
    assert queries * (16 * 26_560 + 32 * pool) + pool * 32 * 26_560 <= budget
    assert block_rows(1, 10) == (1, 1) and block_rows(1 << 40, 10) == (8192, 128)
    search = Search(runs["random"], "saliency", None, "all", budget_mb=1)
    assert (search.query_rows, search.pool_rows) == block_rows(1 << 20, 200)
    search = Search(runs["random"], "saliency", None, "all", block_size=9)
    assert (search.query_rows, search.pool_rows) == (9, 9)


# ------------------------------------------------------------------------------------------ memory

MEMORY_SCRIPT = """
import json, re, sys
import numpy as np
from paramsal import open_run
from paramsal.analyses.neighbors import Neighbors


def peak_kb():
    # This process's own peak RSS. getrusage's ru_maxrss would do, but Linux carries it over exec from the
    # process that forked this one (pytest, holding far more than the search does).
    with open("/proc/self/status") as status:
        return int(re.search(r"VmHWM:\\s+(\\d+) kB", status.read()).group(1))


run = open_run(sys.argv[1])
run.table(), run.stats  # what any analysis reads first: the per-sample columns and the statistics
for _ in run.iter_profiles(64, only=np.arange(run.parts[0].stop)):  # the reader's first use maps code, starts threads:
    pass                                                            # about 30 MB, once, whatever the run's size
for dtype in (np.float32, np.float64):  # BLAS allocates its buffers on first use
    np.ones((256, 512), dtype) @ np.ones((512, 256), dtype)
before = peak_kb()
result = Neighbors(k=5, among="all", spaces=("saliency",), budget_mb=8, precision=sys.argv[2]).evaluate(
    run, samples=np.arange(0, run.num_samples, 16))
after = peak_kb()
print(json.dumps({"before_kb": before, "after_kb": after, "rows": len(result.table)}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak RSS from /proc/self/status")
def test_neighbours_memory_is_set_by_the_budget_not_by_the_run(tmp_path):
    """4096 samples x 6144 units (100 MB of float32 profiles) searched with an 8 MB budget: the peak grows by a
    fraction of the profiles' size (the search used to hold them all, and more)."""
    n, units = 4096, 6144
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 10, n)
    preds = (targets + (rng.random(n) < 0.3)) % 10
    run = make_run(tmp_path / "run", rng.random((n, units), np.float32), targets, preds, np.arange(units) // 512,
                   part_rows=1024)
    size_mb = n * units * 4 / 2**20
    for precision in ("float32", "float64"):
        done = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(run.path), precision], capture_output=True,
                              text=True, check=True)
        measured = json.loads(done.stdout.strip().splitlines()[-1])
        assert measured["rows"] == 5 * len(range(0, n, 16))
        growth_mb = (measured["after_kb"] - measured["before_kb"]) / 1024
        assert growth_mb < 0.3 * size_mb, (precision, growth_mb, size_mb)
