"""The qa: data spec's file format and the answer judge (no model needed)."""

from __future__ import annotations

import json

import pytest

from paramsal.errors import InputError
from paramsal.zoo.qa import Question, matches, read_questions


def test_a_qa_file_reads_its_fields_and_joins_prefix_and_answer_with_one_space(tmp_path):
    path = tmp_path / "q.jsonl"
    lines = [{"prompt": "Capital of France?", "answer": "Paris.", "prefix": "The capital of France is",
              "label": "geo"}, {"prompt": "7 + 5?", "answer": "12"}]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    first, second = read_questions(path)
    assert first == Question("Capital of France?", "Paris.", "The capital of France is", "geo")
    assert first.scored == " Paris." and second.scored == "12" and second.label is None
    assert Question("q", " x", "a ").scored == " x" and Question("q", "x", "a ").scored == "x"


@pytest.mark.parametrize("line, problem", [
    ("{not json", "line 1 is not JSON"),
    ('["a list"]', "line 1 is a list, not a JSON object"),
    ('{"prompt": "p"}', "line 1 needs a non-empty string 'answer'"),
    ('{"prompt": "p", "answer": "a", "extra": 1}', r"unknown field\(s\) \['extra'\]"),
    ('{"prompt": "p", "answer": "a", "label": 3}', "'label' must be a string, got int"),
])
def test_a_bad_qa_line_is_named_in_one_line(tmp_path, line: str, problem: str):
    path = tmp_path / "q.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(InputError, match=problem) as caught:
        read_questions(path)
    assert "\n" not in str(caught.value)


def test_a_missing_or_empty_qa_file_is_refused(tmp_path):
    with pytest.raises(InputError, match="is not a file"):
        read_questions(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(InputError, match="holds no question"):
        read_questions(tmp_path / "empty.jsonl")


@pytest.mark.parametrize("answer, reference, same", [
    (" 12.", "12", True), (" 12.0 is the sum", "12", True), (" 1,234", "1234", True), (" 120", "12", False),
    (" The answer is 12", "12", True), (" thirteen", "12", False),
    (" Paris. It is", "Paris", True), (" paris", "Paris.", True), (" Parisian", "Paris", False),
    ("  A   fruit!", "a fruit", True), (" vegetable", "fruit", False),
])
def test_an_answer_matches_a_reference_that_it_begins_with(answer: str, reference: str, same: bool):
    assert matches(answer, reference) is same


def test_qa_data_needs_a_model_with_a_tokenizer(tmp_path):
    from torch import nn

    from paramsal.zoo.specs import load_data

    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"prompt": "p", "answer": "a"}) + "\n")
    for model in (None, nn.Linear(2, 2)):
        with pytest.raises(InputError, match=r"^data spec 'qa:.*' is tokenized by the model's tokenizer"):
            load_data(f"qa:{path}", model=model)


def test_hf_dir_with_gguf_is_the_gguf_spec_and_other_models_refuse_it_in_one_line(tmp_path, capsys):
    from paramsal.cli import main
    from paramsal.cli.profiling import gguf_spec

    assert gguf_spec("hf:models/smol", "m.gguf") == "gguf:models/smol/m.gguf"
    assert gguf_spec("demo", None) == "demo"
    code = main(["profile", "--model", "demo", "--gguf", "m.gguf", "--data", "demo", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--gguf m.gguf names a GGUF file in an hf:DIR folder" in err
    assert not (tmp_path / "r").exists()


def test_a_run_records_its_qa_and_gguf_paths_absolute(tmp_path, monkeypatch):
    import argparse

    from paramsal.cli.profiling import _source

    monkeypatch.chdir(tmp_path)
    args = argparse.Namespace(model="gguf:m/x.gguf", data="qa:q.jsonl", weights=None, num_classes=None,
                              transform="imagenet", decode="torchvision", limit=None)
    source = _source(args)
    assert source["model"] == f"gguf:{tmp_path / 'm' / 'x.gguf'}" and source["data"] == f"qa:{tmp_path / 'q.jsonl'}"
