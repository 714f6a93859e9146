"""Nearest neighbours in saliency and feature space: exact against a float64 brute force."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from chat import chat_model, trained, write_questions
from runs import make_run
from torch.utils.data import Subset

from paramsal import InputError, profile_dataset
from paramsal.analyses import knn
from paramsal.analyses.base import load_result
from paramsal.analyses.knn import Search, cosine_top_k
from paramsal.analyses.neighbors import Neighbors, parse_layers
from paramsal.analyses.sharing import (
    chance_label_sharing_rate,
    chance_pair_sharing_rate,
    label_sharing_rate,
    pair_sharing_rate,
)
from paramsal.cli import main
from paramsal.zoo import demo_dataset, demo_model
from paramsal.zoo.qa import QADataset, normalized


def nn(run, k=10, space="saliency", layers=None, among="all", block_size=None, precision="float32", queries=None):
    """One space's neighbours table as these tests compare it (query_id, rank, neighbor_id, similarity); the
    queries default to the whole pool."""
    if queries is None:
        queries = np.sort(run.sample_ids(None if among == "all" else "misclassified"))
    result = Neighbors(k=k, layers=layers, among=among, spaces=(space,), block_size=block_size,
                       precision=precision).evaluate(run, samples=queries)
    return pa.Table.from_pandas(result.table.drop(columns="space"), preserve_index=False)


def pair_sharing(run, k=10, among="misclassified", block_size=None):
    """The pair-sharing rates of the misclassified queries, per space and chance, with queries, pool and k."""
    summary = Neighbors(k=k, among=among, block_size=block_size).evaluate(run).summary
    rates = dict(zip(summary["space"], summary["pair_sharing"]))
    return {**rates, "queries": int(summary["queries"].iloc[0]), "pool": int(summary["pool"].iloc[0]), "k": k}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """200 demo images spread over all classes, 4 parts, with features."""
    data = Subset(demo_dataset("test"), range(0, 3000, 15))
    return profile_dataset(demo_model(), data, tmp_path_factory.mktemp("demo") / "run", batch_size=50,
                           part_size=50, features=True, progress=False)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """150 samples, a third misclassified, profiles clustered by (true, predicted) pair; parts listed backwards."""
    rng = np.random.default_rng(0)
    n, num_units = 150, 24
    targets = rng.integers(0, 4, n)
    preds = np.where(rng.random(n) < 0.35, rng.integers(0, 4, n), targets)
    centres = rng.normal(size=(4, 4, num_units))
    profiles = np.abs(centres[targets, preds] + rng.normal(scale=0.3, size=(n, num_units))).astype(np.float32)
    features = rng.normal(size=(n, 6)).astype(np.float32)
    layer_of_unit = np.repeat(np.arange(6), 4)
    return make_run(tmp_path_factory.mktemp("syn") / "run", profiles, targets, preds, layer_of_unit, features,
                    reverse_parts=True)


def answers_run(folder, labelled=lambda n: n % 4 != 0):
    """The tiny chat model's answer run (``tests/chat.py``) on its 24 sums, the questions ``labelled`` keeps labelled
    ("large"/"small") and the others without one."""
    path = write_questions(folder / "questions.jsonl")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps({k: v for k, v in line.items() if k != "label" or labelled(n)}) + "\n"
                            for n, line in enumerate(lines)))
    model = chat_model()
    data = QADataset(path, model.tokenizer)
    trained(model, data, steps=40)
    return profile_dataset(model, data, folder / "run", batch_size=8, units="neurons", task="answer", progress=False)


@pytest.fixture(scope="module")
def answers(tmp_path_factory):
    """An answer run, 9 of its 24 answers wrong, every fourth question without a label."""
    return answers_run(tmp_path_factory.mktemp("answers"))


def standardized(run, layers=None):
    """Float64 standardized profiles ``[N, f]`` in sample-id order, from the raw values."""
    # Run.profiles keeps the manifest's part order; the synthetic run lists its parts backwards.
    raw = run.profiles(standardized=False).astype(np.float64)[np.argsort(run.sample_ids())]
    z = (raw - run.stats.mean) / run.stats.std
    if layers is not None:
        layer_of_unit = run.units.column("layer").to_numpy()
        chosen = np.unique(layer_of_unit)[layers] if isinstance(layers, slice) else layers
        z = z[:, np.isin(layer_of_unit, chosen)]
    return z


def brute_force(vectors, pool, queries, k):
    """Float64 top-k by cosine over the full similarity matrix of float64 unit rows; ``vectors`` row i = sample i."""
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    sim = unit[queries] @ unit[pool].T
    sim[queries[:, None] == pool[None, :]] = -np.inf
    order = np.lexsort((np.broadcast_to(pool, sim.shape), -sim), axis=1)[:, :k]
    return pool[order], np.take_along_axis(sim, order, 1), sim


def check_against(table, vectors, pool, queries, k):
    assert table.column_names == ["query_id", "rank", "neighbor_id", "similarity"]
    assert table.column("query_id").to_numpy().tolist() == np.repeat(queries, k).tolist()
    assert table.column("rank").to_numpy().tolist() == np.tile(np.arange(1, k + 1), len(queries)).tolist()
    got = table.column("neighbor_id").to_numpy().reshape(-1, k)
    similarity = table.column("similarity").to_numpy().reshape(-1, k)
    ids, sims, _ = brute_force(vectors, pool, queries, k)
    np.testing.assert_array_equal(got, ids)
    np.testing.assert_allclose(similarity, sims, rtol=0, atol=1e-12)


@pytest.mark.parametrize("layers, among, block_size, k", [
    (None, "all", None, 10),                 # blocks from the memory budget
    (None, "all", 7, 10),                    # 29 x 29 blocks: blocking and merging exercised
    (slice(0, 5), "all", 16, 5),             # shallow layers
    (slice(10, None), "misclassified", 2, 3),
    ([1, 7, 14], "misclassified", 3, 6),
], ids=["all", "blocked", "shallow", "deep-misclassified", "layer-list"])
def test_saliency_neighbors_equal_brute_force(demo_run, layers, among, block_size, k):
    pool = np.sort(demo_run.sample_ids(None if among == "all" else "misclassified"))
    check_against(nn(demo_run, k=k, layers=layers, among=among, block_size=block_size), standardized(demo_run, layers),
                  pool, pool, k)


@pytest.mark.parametrize("precision", ["float32", "float64"])
@pytest.mark.parametrize("among", ["all", "misclassified"])
def test_both_precisions_rank_exactly_as_float64(demo_run, among, precision):
    """Screened in float32 or not, even the near-duplicate correct samples rank as in a float64 computation."""
    pool = np.sort(demo_run.sample_ids(None if among == "all" else "misclassified"))
    table = nn(demo_run, k=6, among=among, block_size=64, precision=precision)
    ids, sims, _ = brute_force(standardized(demo_run), pool, pool, 6)
    np.testing.assert_array_equal(table.column("neighbor_id").to_numpy().reshape(-1, 6), ids)
    np.testing.assert_allclose(table.column("similarity").to_numpy().reshape(-1, 6), sims, rtol=0, atol=1e-12)


def test_feature_neighbors_equal_brute_force(demo_run):
    pool = np.sort(demo_run.sample_ids())
    check_against(nn(demo_run, k=8, space="features", block_size=33), demo_run.features().astype(np.float64), pool,
                  pool, 8)


def test_queries_outside_the_pool_and_in_given_order(demo_run):
    """Correct samples asked about among misclassified ones: no self to exclude, order kept, repeats kept."""
    pool = np.sort(demo_run.sample_ids("misclassified"))
    queries = np.array([150, 3, int(pool[0]), 3, 77])
    table = nn(demo_run, k=4, among="misclassified", block_size=3, queries=queries)
    check_against(table, standardized(demo_run), pool, queries, 4)


def test_synthetic_run_with_parts_listed_out_of_order(synthetic):
    for among, layers in (("all", None), ("misclassified", slice(2, 4))):
        pool = np.sort(synthetic.sample_ids(None if among == "all" else "misclassified"))
        table = nn(synthetic, k=9, among=among, layers=layers, block_size=11)
        check_against(table, standardized(synthetic, layers), pool, pool, 9)


def test_block_size_does_not_change_the_answer(demo_run):
    tables = [nn(demo_run, k=7, block_size=size) for size in (1, 5, 64, 4096)]
    for table in tables[1:]:
        assert table.column("neighbor_id").equals(tables[0].column("neighbor_id"))
        np.testing.assert_allclose(table.column("similarity").to_numpy(),
                                   tables[0].column("similarity").to_numpy(), atol=1e-12)


@pytest.mark.parametrize("block_size", [1, 2, 3, 5, 100])
def test_ties_go_to_the_smaller_id_whatever_the_blocks(block_size):
    # One-hot rows, each twice: the centre is 1/4 everywhere and every product is
    # exact in binary floating point, so the similarities 0 and 1 are real ties.
    eye = np.eye(4, dtype=np.float32)
    candidates = eye[[2, 0, 1, 0, 3, 1, 2, 3]]
    queries = eye[[0, 1, 3]]
    index, sim = cosine_top_k(candidates, queries, k=6, exclude=np.array([3, -1, 4]), block_size=block_size)
    # query 0 is row 3 (excluded): its copy first, then the zeros by row.
    assert index.tolist() == [[1, 0, 2, 4, 5, 6], [2, 5, 0, 1, 3, 4], [7, 0, 1, 2, 3, 5]]
    assert sim.tolist() == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]]


def test_a_query_is_never_its_own_neighbour_but_its_duplicate_is(tmp_path):
    rng = np.random.default_rng(1)
    profiles = rng.random((30, 8)).astype(np.float32)
    profiles[17] = profiles[4]
    run = make_run(tmp_path / "run", profiles, np.zeros(30, np.int64), np.zeros(30, np.int64), np.arange(8) // 4)
    table = nn(run, k=29, block_size=4).to_pandas()
    assert not (table.query_id == table.neighbor_id).any()
    assert table.groupby("query_id").size().eq(29).all()
    first = table[table["rank"] == 1].set_index("query_id").neighbor_id
    assert first[4] == 17 and first[17] == 4


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
#: Where the torch screen runs: the CPU always (the same code as on a GPU), a GPU where there is one.
SCREENS = [torch.device("cpu"), pytest.param(torch.device("cuda"), marks=cuda, id="cuda")]


def screened_search(run, screen_on, among, block_size, k, precision="float32"):
    """``(ids [Q, k], similarities [Q, k], blocks screened)`` of every pool member's neighbours."""
    search = Search(run, "saliency", None, among, precision, block_size, screen_on=screen_on)
    screened = []
    real = knn._Screen.passing

    def counting(screen, *args):
        screened.append(real(screen, *args))
        return screened[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(knn._Screen, "passing", counting)
        index, similarity = search.query(search.pool_ids, k)
    return search.pool_ids[index], similarity, len(screened)


@pytest.mark.parametrize("screen_on", SCREENS)
@pytest.mark.parametrize("among, block_size, k, pair_cost", [
    ("all", 4, 3, None), ("all", 16, 6, None), ("all", 8, 10, None),
    ("misclassified", 2, 3, 0.0),  # pairs for free: every block after the first is screened, pair by pair
], ids=["4", "16", "8", "misclassified-pairs"])
def test_the_torch_screen_answers_as_numpy_and_float64(demo_run, synthetic, monkeypatch, screen_on, among,
                                                         block_size, k, pair_cost):
    """Screened by torch or by numpy: the same neighbours, with the same float64 similarities; not screened at all
    (float64 throughout, each query's products as a row, not pair by pair): the same neighbours."""
    if pair_cost is not None:
        monkeypatch.setattr(knn, "_pair_cost", lambda width: pair_cost)
    for run in (demo_run, synthetic):
        ids, sims, screened = screened_search(run, screen_on, among, block_size, k)
        numpy_ids, numpy_sims, numpy_screened = screened_search(run, None, among, block_size, k)
        exact_ids, exact_sims, none = screened_search(run, None, among, block_size, k, "float64")
        assert screened == numpy_screened > 0 and none == 0  # the screens took part, in as many blocks
        np.testing.assert_array_equal(ids, numpy_ids)
        np.testing.assert_array_equal(sims, numpy_sims)
        np.testing.assert_array_equal(ids, exact_ids)
        np.testing.assert_allclose(sims, exact_sims, rtol=0, atol=1e-15)


@pytest.mark.parametrize("screen_on", SCREENS)
def test_screens_pass_the_same_pairs_given_the_same_products(screen_on):
    """Rows of multiples of 1/4: every float32 product is exact, in any order, so the numpy and torch screens see
    equal products and must keep equal top-k and pass equal pairs, ties with the threshold included."""
    rng = np.random.default_rng(3)
    queries = rng.integers(-2, 3, (40, 16)) / 4.0
    screens = knn._Screen(queries, 5, 0.25, 8), knn._DeviceScreen(queries, 5, 0.25, 8, screen_on)
    kth, ties, passes = np.full(40, -np.inf), 0, []
    for _ in range(6):
        candidates = rng.integers(-2, 3, (8, 16)) / 4.0
        own = rng.integers(-3, 11, 40)  # some queries' own rows are in this block, the others' not
        passed, device_passed = (screen.passing(candidates, own, kth) for screen in screens)
        np.testing.assert_array_equal(device_passed, passed)
        np.testing.assert_array_equal(screens[1].lowest, screens[0].lowest)
        products = queries @ candidates.T
        ties += np.count_nonzero(products == knn._threshold(kth, screens[0].lowest, 0.25)[:, None])
        passes.append(passed.mean())
        kth = np.maximum(kth, np.sort(products, axis=1)[:, -3])
    assert ties > 0 and 0 < min(passes[1:]) and max(passes[1:]) < 1  # the decisions were not all alike


@cuda
def test_the_gpu_screen_is_full_float32_whatever_the_tf32_setting():
    """Entries 1 + 2**-12: TF32 (10-bit significand) rounds them to 1, so its products would be 1024, not the
    float32 1024.5; the user's TF32 setting is theirs again after."""
    rows = np.full((256, 1024), 1 + 2.0**-12)
    saved = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        screen = knn._DeviceScreen(rows, 1, 0.25, 256, torch.device("cuda"))
        screen.passing(rows, np.full(256, -1), np.full(256, -np.inf))
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    finally:
        torch.backends.cuda.matmul.fp32_precision = saved
    np.testing.assert_allclose(screen.lowest, 1024.5, rtol=0, atol=1e-3)


@cuda
def test_neighbors_on_the_gpu_equal_the_cpu(demo_run):
    cpu, gpu = (Neighbors(k=5, among="all", block_size=16, device=device).evaluate(demo_run)
                for device in ("cpu", "cuda"))
    pd = pytest.importorskip("pandas")
    pd.testing.assert_frame_equal(gpu.table, cpu.table, check_exact=True)


def direct_pair_sharing(run, neighbors_of):
    """A plain loop: for each misclassified query, count neighbours with pair (t, p) or (p, t)."""
    rows = {r["sample_id"]: (r["target"], r["pred"]) for r in run.table().to_pylist()}
    shared = total = 0
    for query, neighbours in neighbors_of.items():
        t, p = rows[query]
        if t == p:
            continue
        for neighbour in neighbours:
            shared += rows[neighbour] in ((t, p), (p, t))
            total += 1
    return shared / total


@pytest.mark.parametrize("among", ["misclassified", "all"])
def test_pair_sharing_equals_a_direct_loop(synthetic, among):
    k = 5
    result = pair_sharing(synthetic, k=k, among=among, block_size=16)
    wrong = np.sort(synthetic.sample_ids("misclassified"))
    pool = np.sort(synthetic.sample_ids(None if among == "all" else "misclassified"))
    for space, vectors in (("saliency", standardized(synthetic)),
                           ("features", synthetic.features()[np.argsort(synthetic.sample_ids())].astype(np.float64))):
        ids, _, _ = brute_force(vectors, pool, wrong, k)
        assert result[space] == pytest.approx(direct_pair_sharing(synthetic, dict(zip(wrong, ids))), abs=1e-12)
    # chance: every other pool member counted as a neighbour
    everyone = {q: [c for c in pool if c != q] for q in wrong}
    assert result["chance"] == pytest.approx(np.mean([direct_pair_sharing(synthetic, {q: n})
                                                      for q, n in everyone.items()]), abs=1e-12)
    assert (result["queries"], result["pool"], result["k"]) == (len(wrong), len(pool), k)
    # the clusters follow the pair: saliency neighbours share it far more than chance
    assert result["saliency"] > 2 * result["chance"]


def test_pair_sharing_rate_ignores_correct_queries(demo_run):
    table = nn(demo_run, k=5)
    wrong = demo_run.sample_ids("misclassified")
    only_wrong = table.filter(pc.is_in(table.column("query_id"), pa.array(wrong)))
    assert pair_sharing_rate(demo_run, table) == pair_sharing_rate(demo_run, only_wrong)
    correct_only = table.filter(pc.invert(pc.is_in(table.column("query_id"), pa.array(wrong))))
    with pytest.raises(InputError, match="no misclassified query"):
        pair_sharing_rate(demo_run, correct_only)
    assert 0 <= chance_pair_sharing_rate(demo_run, wrong, demo_run.sample_ids()) <= 1


def answer_keys(run):
    """Each sample's (reference, answer) pair as normalized text, and its label (None where it has none)."""
    rows = run.table().to_pylist()
    return ({r["sample_id"]: (normalized(r["reference"]), normalized(r["answer"])) for r in rows},
            {r["sample_id"]: r["label"] for r in rows})


def direct_answer_sharing(run, neighbors_of):
    """A plain loop over the wrong answers' neighbours: the shares with the query's pair, in either order, and with
    its label (a missing label shares nothing)."""
    pairs, labels = answer_keys(run)
    wrong = set(run.sample_ids("misclassified").tolist())
    shared_pair = shared_label = total = 0
    for query, neighbours in neighbors_of.items():
        if query not in wrong:
            continue
        reference, answer = pairs[query]
        for neighbour in neighbours:
            shared_pair += pairs[neighbour] in ((reference, answer), (answer, reference))
            shared_label += labels[query] is not None and labels[neighbour] == labels[query]
            total += 1
    return shared_pair / total, shared_label / total


@pytest.mark.parametrize("among", ["misclassified", "all"])
def test_answer_runs_share_the_reference_answer_pair_and_the_label(answers, among):
    """On an answer run (whose first-token classes are all right) the pair is (reference, answer): both rates
    equal a loop over ``result.table``, and chance the loop over every other member of the pool."""
    wrong = np.sort(answers.sample_ids("misclassified"))
    _, labels = answer_keys(answers)
    assert 0 < len(wrong) < answers.num_samples and None in {labels[q] for q in wrong}  # nulls among the queries
    queries = np.sort(answers.sample_ids())  # the right answers asked about too: they are left out
    result = Neighbors(k=4, among=among).evaluate(answers, samples=queries)
    summary = result.summary.set_index("space")
    assert result.summary.columns.tolist() == ["space", "pair_sharing", "label_sharing", "queries", "pool", "k"]
    assert result.config["pair"] == "(reference, answer)"
    part = result.table[result.table["space"] == "saliency"]
    neighbours = dict(zip(queries.tolist(), part["neighbor_id"].to_numpy().reshape(-1, 4).tolist()))
    assert tuple(summary.loc["saliency", ["pair_sharing", "label_sharing"]]) == \
        pytest.approx(direct_answer_sharing(answers, neighbours), abs=1e-12)
    pool = np.sort(answers.sample_ids(None if among == "all" else "misclassified"))
    everyone = [direct_answer_sharing(answers, {q: [c for c in pool if c != q]}) for q in wrong]
    assert tuple(summary.loc["chance", ["pair_sharing", "label_sharing"]]) == \
        pytest.approx(tuple(np.mean(everyone, axis=0)), abs=1e-12)
    assert (summary["queries"].iloc[0], summary["pool"].iloc[0]) == (len(wrong), len(pool))
    # the public functions say the same
    table = pa.table({"query_id": part["query_id"].to_numpy(), "neighbor_id": part["neighbor_id"].to_numpy()})
    assert pair_sharing_rate(answers, table) == summary.loc["saliency", "pair_sharing"]
    assert label_sharing_rate(answers, table) == summary.loc["saliency", "label_sharing"]
    assert chance_pair_sharing_rate(answers, wrong, pool) == summary.loc["chance", "pair_sharing"]
    assert chance_label_sharing_rate(answers, wrong, pool) == summary.loc["chance", "label_sharing"]
    assert len(result.plot().axes[0].patches) == 2 * len(summary)  # a pair bar and a label bar per row


def test_label_sharing_only_where_some_question_has_a_label(answers, synthetic, tmp_path):
    assert Neighbors(k=3).evaluate(synthetic).summary.columns.tolist() == ["space", "pair_sharing", "queries", "pool",
                                                                           "k"]
    unlabelled = answers_run(tmp_path, labelled=lambda n: False)
    summary = Neighbors(k=3).evaluate(unlabelled).summary
    assert "label_sharing" not in summary and summary["pair_sharing"].notna().all()
    everyone = pa.table({"query_id": [0], "neighbor_id": [1]})
    for run in (synthetic, unlabelled):
        with pytest.raises(InputError, match="has no labels to share"):
            label_sharing_rate(run, everyone)
    right = np.setdiff1d(answers.sample_ids(), answers.sample_ids("misclassified"))[:2]
    with pytest.raises(InputError, match=r"no misclassified query, so no \(reference, answer\) pair"):
        pair_sharing_rate(answers, pa.table({"query_id": right, "neighbor_id": right[::-1]}))


def test_command_line_on_an_answer_run(answers, tmp_path, capsys):
    assert main(["neighbors", str(answers.path), "--k", "3", "--device", "cpu", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    summary = Neighbors(k=3).evaluate(answers).summary.set_index("space")
    wrong = len(answers.sample_ids("misclassified"))
    assert f"sharing the query's (reference, answer) pair | its label, {wrong} wrong answers:" in printed
    pair, label = summary.loc["saliency", ["pair_sharing", "label_sharing"]]
    assert f"saliency space   {100 * pair:5.1f}% | {100 * label:5.1f}%" in printed


def test_save_next_to_the_run_and_load_back(demo_run, tmp_path):
    result = Neighbors(k=3, among="misclassified", layers=slice(0, 5)).evaluate(demo_run)
    paths = result.save(demo_run.path / "analyses")
    assert paths["table"] == demo_run.path / "analyses" / "neighbors-layers0-5.parquet"
    back = load_result(demo_run.path / "analyses", result.name)
    pd = pytest.importorskip("pandas")
    pd.testing.assert_frame_equal(back.table, result.table)
    assert back.config["layers"] == "0:5"


def test_command_line(demo_run, tmp_path, capsys):
    out = tmp_path / "nn"
    assert main(["neighbors", str(demo_run.path), "--k", "3", "--layers", "5:", "--device", "cpu", "--out",
                 str(out)]) == 0
    printed = capsys.readouterr().out
    assert "saliency space" in printed and "feature space" in printed and "chance" in printed
    table = pq.read_table(out / "neighbors-layers5-.parquet").to_pandas()
    assert (table["space"] == "saliency").sum() == 3 * len(demo_run.sample_ids("misclassified"))
    assert parse_layers("0:10") == slice(0, 10) and parse_layers(":4") == slice(None, 4)
    assert parse_layers("3,5") == [3, 5] and parse_layers(None) is None
    with pytest.raises(InputError, match="--layers 'a:b'"):
        parse_layers("a:b")


def test_errors_name_the_problem(demo_run, tmp_path):
    no_features = make_run(tmp_path / "plain", np.ones((5, 4), np.float32), np.zeros(5, np.int64),
                           np.zeros(5, np.int64), np.zeros(4, np.int64))
    with pytest.raises(InputError, match="has no features.*features=True"):
        Neighbors(spaces=("features",)).evaluate(no_features)
    with pytest.raises(InputError, match="no misclassified"):
        Neighbors(k=1, among="misclassified").evaluate(no_features)
    wrong = len(demo_run.sample_ids("misclassified"))
    with pytest.raises(InputError, match=f"k={wrong} is too large.*has {wrong} samples"):
        Neighbors(k=wrong, among="misclassified").evaluate(demo_run)
    with pytest.raises(InputError, match="k=0"):
        Neighbors(k=0)
    with pytest.raises(InputError, match=r"query ids \[200, 5000\] are not samples"):
        Neighbors(k=3).evaluate(demo_run, samples=[1, 200, 5000])
    with pytest.raises(InputError, match="integer sample ids"):
        Neighbors(k=3).evaluate(demo_run, samples=[0.5])
    with pytest.raises(InputError, match="space='pixels'"):
        Neighbors(spaces=("pixels",))
    with pytest.raises(InputError, match="among='wrong'"):
        Neighbors(among="wrong")
    with pytest.raises(InputError, match="among='wrong'"):
        pair_sharing(demo_run, among="wrong")
    with pytest.raises(InputError, match="precision='float16'"):
        Neighbors(precision="float16")
    with pytest.raises(InputError, match=r"layers \[99\] are not in"):
        Neighbors(layers=[99]).evaluate(demo_run)
    with pytest.raises(InputError, match="selects no units"):
        Neighbors(layers=slice(20, 30)).evaluate(demo_run)
    with pytest.raises(InputError, match="space='saliency' only"):
        Neighbors(spaces=("features",), layers=slice(0, 3))
    with pytest.raises(InputError, match="unknown device 'tpu'"):
        Neighbors(k=3, device="tpu").evaluate(demo_run)
