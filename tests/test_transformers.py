"""Models of ``transformers`` (small random configs, float64): the hooks backend serves BERT- and GPT-style models
with every transformer unit scheme and equals the loop; the sequence tasks' losses; ``hf:DIR`` and ``timm:NAME``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from nets import profiled_by_auto, relative_error

import paramsal
from paramsal import Profiler, profile_batch, profile_dataset
from paramsal.engine.tasks import IGNORE_INDEX, first_labelled, next_token_cross_entropy, token_cross_entropy
from paramsal.errors import InputError, UnsupportedUseError
from paramsal.zoo.hf import TextModel, load_hf_model
from paramsal.zoo.specs import load_model

transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-9
VOCAB, PAD = 50, 0


def bert(task: str = "classification", labels: int = 3) -> TextModel:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=24, max_position_embeddings=16, num_labels=labels,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=PAD)
    head = {"classification": transformers.BertForSequenceClassification,
            "masked-lm": transformers.BertForMaskedLM,
            "token-classification": transformers.BertForTokenClassification}[task]
    return TextModel(head(config), PAD, task).double().eval()


def gpt() -> TextModel:
    """GPT-Neo with its LM head tied to the token embedding: one parameter, two served uses."""
    torch.manual_seed(0)
    config = transformers.GPTNeoConfig(vocab_size=VOCAB, max_position_embeddings=16, hidden_size=16, num_layers=2,
                                       num_heads=2, attention_types=[[["global", "local"], 1]], window_size=4,
                                       intermediate_size=24, embed_dropout=0.0, attention_dropout=0.0,
                                       resid_dropout=0.0, bos_token_id=1, eos_token_id=1)
    return TextModel(transformers.GPTNeoForCausalLM(config), None, "causal-lm").double().eval()


def sentences(n: int = 5, length: int = 8) -> torch.Tensor:
    ids = torch.randint(1, VOCAB, (n, length), generator=torch.Generator().manual_seed(n))
    ids[1, length // 2:] = PAD  # a padded sentence: its mask differs from the others'
    return ids


def auto_and_loop(model, ids, targets, **options):
    got, backend, notes = profiled_by_auto(model, ids, targets, **options)
    return got, profile_batch(model, ids, targets, backend="loop", **options), backend, notes


@pytest.mark.parametrize("units", ["linear-columns", "linear-rows", "heads", "embedding-rows", "norm"])
def test_bert_classifier_is_served_by_hooks_and_equals_the_loop(units: str):
    got, want, backend, notes = auto_and_loop(bert(), sentences(), torch.tensor([0, 2, 1, 1, 0]), units=units)
    assert backend == "hooks" and not notes
    assert relative_error(got, want) <= TOLERANCE


@pytest.mark.parametrize("units", ["linear-columns", "heads", "embedding-rows"])
def test_gpt_with_a_tied_lm_head_is_served_by_hooks_and_equals_the_loop(units: str):
    model = gpt()
    assert model.model.lm_head.weight is model.model.transformer.wte.weight
    ids = sentences(4)
    got, want, backend, notes = auto_and_loop(model, ids, ids, units=units, task="causal-lm")
    assert backend == "hooks" and not notes
    assert relative_error(got, want) <= TOLERANCE


def test_heads_are_one_unit_per_head_of_each_projection():
    from paramsal import units_of

    index = units_of(bert(), "heads")
    names = [g.param_name.removeprefix("model.bert.encoder.layer.0.attention.") for g in index][:4]
    assert names == ["self.query.weight", "self.key.weight", "self.value.weight", "output.dense.weight"]
    assert [g.num_units for g in index] == [2] * 8  # 2 layers x (Q, K, V, O) x 2 heads
    assert index.groups[3].partition == "custom" and (index.groups[3].assignment[:, :8] == 0).all()


def test_the_token_losses_are_the_mean_over_each_samples_labelled_positions():
    torch.manual_seed(1)
    logits = torch.randn(3, 5, 7, dtype=torch.float64)
    labels = torch.randint(0, 7, (3, 5))
    labels[0, 1:] = IGNORE_INDEX
    labels[2] = IGNORE_INDEX
    want = []
    for n in range(3):
        kept = [t for t in range(5) if labels[n, t] != IGNORE_INDEX]
        losses = [float(-F.log_softmax(logits[n, t], 0)[labels[n, t]]) for t in kept]
        want.append(sum(losses) / len(losses) if losses else 0.0)
    torch.testing.assert_close(token_cross_entropy(logits, labels), torch.tensor(want, dtype=torch.float64))
    shifted = next_token_cross_entropy(logits, labels)
    torch.testing.assert_close(shifted, token_cross_entropy(logits[:, :-1], labels[:, 1:]))


def test_masked_lm_run_profiles_the_masked_tokens_loss_and_records_the_masked_token(tmp_path):
    model = bert("masked-lm")
    ids = sentences(6)
    labels = torch.full_like(ids, IGNORE_INDEX)
    masked = torch.tensor([1, 0, 3, 2, 5, 4])
    rows = torch.arange(6)
    labels[rows, masked] = ids[rows, masked]
    ids[rows, masked] = VOCAB - 1  # the [MASK] id of this toy vocabulary
    data = torch.utils.data.TensorDataset(ids, labels)
    run = profile_dataset(model, data, tmp_path / "run", batch_size=4, units="linear-columns", task="masked-lm",
                          progress=False)
    table = run.table()
    assert table.column("target").to_pylist() == labels[rows, masked].tolist()
    want = profile_batch(model, ids, labels, backend="loop", units="linear-columns", task="masked-lm")
    np.testing.assert_allclose(run.profiles(standardized=False), want.float().numpy(), rtol=2e-5, atol=1e-12)
    logits = model(ids)[rows, masked]
    assert table.column("pred").to_pylist() == logits.argmax(1).tolist()
    from paramsal.analyses import Neighbors, Pruning

    with pytest.raises(InputError, match="profiled a 'masked-lm' model: this analysis evaluates the model again"):
        Pruning(model, ks=(1,)).evaluate(run, data)
    assert len(Neighbors(k=1, among="all", spaces=("saliency",)).evaluate(run, samples=[0, 1]).table) == 2


def test_token_classification_checks_its_labels():
    model = bert("token-classification", labels=4)
    ids = sentences(3)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, 0] = torch.tensor([0, 3, 4])
    with pytest.raises(InputError, match=r"label 4 of sample 2 at position 0 is outside the model's 4 classes"):
        Profiler(model, units="heads", task="token-classification")(ids, labels)
    labels[2, 0] = 1
    got, want, backend, _ = auto_and_loop(model, ids, labels, units="heads", task="token-classification")
    assert backend == "hooks" and relative_error(got, want) <= TOLERANCE


def test_first_labelled_describes_a_sample_without_labels_as_never_correct():
    logits = torch.randn(2, 3, 4)
    labels = torch.tensor([[IGNORE_INDEX, 2, 1], [IGNORE_INDEX] * 3])
    picked, targets = first_labelled(logits, labels, "masked-lm")
    assert targets.tolist() == [2, -1] and torch.equal(picked[0], logits[0, 1])


def test_hf_directory_loads_offline_with_its_own_head(tmp_path):
    model = bert()
    model.model.config.architectures = ["BertForSequenceClassification"]
    model.model.save_pretrained(tmp_path / "bert")
    loaded = load_model(f"hf:{tmp_path / 'bert'}")
    assert isinstance(loaded, TextModel) and loaded.task == "classification" and loaded.pad_token_id == PAD
    ids = sentences()
    torch.testing.assert_close(loaded.double()(ids), model(ids))
    with pytest.raises(InputError, match="holds no config.json"):
        load_hf_model(tmp_path)
    model.model.bert.save_pretrained(tmp_path / "encoder")  # an encoder without the classifier
    with pytest.raises(InputError, match=r"no weights for 2 parameter\(s\) of a classification model \(classifier"):
        load_model(f"hf:{tmp_path / 'encoder'}")
    torch.save(loaded.state_dict(), tmp_path / "whole.pt")
    again = load_model(f"hf:{tmp_path / 'encoder'}", str(tmp_path / "whole.pt"))
    torch.testing.assert_close(again.double()(ids), model(ids))


def test_timm_architecture_takes_its_weights_from_a_safetensors_file(tmp_path):
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    source = timm.create_model("resnet18", pretrained=False, num_classes=5)
    save_file(source.state_dict(), tmp_path / "w.safetensors")
    model = load_model("timm:resnet18", str(tmp_path / "w.safetensors"), num_classes=5)
    for name, tensor in source.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    with pytest.raises(InputError, match="needs --weights FILE"):
        load_model("timm:resnet18")
    with pytest.raises(InputError, match="timm has no model 'nosuchnet'"):
        load_model("timm:nosuchnet", str(tmp_path / "w.safetensors"))


def test_an_encoders_additive_mask_gives_the_same_logits_and_lets_vmap_run_it():
    model = bert()
    additive = TextModel(model.model, PAD, "classification", additive_mask=True)
    ids, labels = sentences(), torch.tensor([0, 2, 1, 1, 0])
    torch.testing.assert_close(additive(ids), model(ids))
    with pytest.raises(UnsupportedUseError, match="cannot run under torch.func.vmap"):
        profile_batch(model, ids, labels, backend="vmap", units="linear-columns")
    got = profile_batch(additive, ids, labels, backend="vmap", units="linear-columns")
    assert relative_error(got, profile_batch(model, ids, labels, backend="loop", units="linear-columns")) <= TOLERANCE


def test_the_command_line_profiles_an_hf_directory_with_its_heads_task(tmp_path, monkeypatch, capsys):
    from paramsal.cli import main

    model = bert("masked-lm")
    model.model.config.architectures = ["BertForMaskedLM"]
    model.model.save_pretrained(tmp_path / "bert")
    ids = sentences(4)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, 2] = ids[:, 2]
    torch.save({"ids": ids, "labels": labels}, tmp_path / "tokens.pt")
    (tmp_path / "text_data.py").write_text(
        "import torch\n"
        "def masked():\n"
        f"    saved = torch.load({str(tmp_path / 'tokens.pt')!r})\n"
        "    return torch.utils.data.TensorDataset(saved['ids'], saved['labels'])\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    assert main(["profile", "--model", f"hf:{tmp_path / 'bert'}", "--data", "text_data:masked", "--units", "heads",
                 "--out", str(out), "--quiet"]) == 0
    run = paramsal.open_run(out)
    assert run.manifest["config"]["task"] == "masked-lm" and run.manifest["source"]["model"].startswith("hf:/")
    want = profile_batch(load_model(f"hf:{tmp_path / 'bert'}"), ids, labels, backend="loop", units="heads",
                         task="masked-lm")
    np.testing.assert_allclose(run.profiles(standardized=False), want.numpy(), rtol=2e-4, atol=1e-7)
