"""Units of decoder LLMs: an MLP's neurons and a grouped-query attention's heads (each spanning several
parameters), and RMSNorm weights, checked against the loop and the float64 one-unit-at-a-time reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nets import profiled_by_auto, relative_error
from torch import nn

from paramsal import profile_batch, profile_dataset, units_of
from paramsal.analyses.unit_editing import UnitEditor
from paramsal.engine.tasks import task_loss
from paramsal.errors import InputError
from paramsal.reference.profiles import reference_profiles
from paramsal.zoo.hf import TextModel

transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-9
VOCAB = 50


def llama() -> TextModel:
    """A tiny Llama: grouped-query attention (4 query heads over 2 key/value heads), RMSNorm, tied embeddings."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=4,
                                      max_position_embeddings=32, tie_word_embeddings=True, rms_norm_eps=1e-6,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = TextModel(transformers.LlamaForCausalLM(config), None, "causal-lm").double().eval()
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):  # away from ones, so a wrong x_hat shows
            nn.init.uniform_(module.weight, 0.5, 1.5)
    return model


def prompts(n: int = 4, length: int = 8) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(n))


@pytest.mark.parametrize("units", ["neurons", "heads", "norm", "linear-rows"])
def test_llama_units_are_served_by_hooks_and_equal_the_loop_and_the_reference(units: str):
    model, ids = llama(), prompts()
    got, backend, notes = profiled_by_auto(model, ids, ids, units=units, task="causal-lm")
    loop = profile_batch(model, ids, ids, units=units, task="causal-lm", backend="loop")
    reference = reference_profiles(model, ids, ids, units_of(model, units), loss=task_loss("causal-lm"))
    assert backend == "hooks" and not notes
    assert relative_error(got, loop) <= TOLERANCE and relative_error(got, reference) <= TOLERANCE


def test_a_neuron_is_its_gate_and_up_rows_and_its_down_column():
    model, ids = llama(), prompts(1)
    index = units_of(model, "neurons")
    mlp = model.model.model.layers[1].mlp
    group = index.groups[1]
    assert (group.param_name, group.module_name, group.num_units) == ("model.model.layers.1.mlp.neurons",
                                                                      "model.model.layers.1.mlp", 24)
    assert [part.param_name.rsplit(".", 2)[1] for part in group.parts] == ["gate_proj", "up_proj", "down_proj"]
    assert group.sizes.tolist() == [3 * 16] * 24
    # Neuron 5 of layer 1, by hand: mean |g| over its 48 weights.
    loss = task_loss("causal-lm")(model(ids), ids).sum()
    gate, up, down = torch.autograd.grad(loss, [mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight])
    by_hand = torch.cat([gate[5], up[5], down[:, 5]]).abs().mean()
    profile = profile_batch(model, ids, ids, units="neurons", task="causal-lm")
    assert torch.isclose(profile[0, group.offset + 5], by_hand, rtol=1e-12)


def test_grouped_query_heads_join_q_with_o_and_k_with_v():
    index = units_of(llama(), "heads")
    query, kv = index.groups[:2]
    assert [query.param_name, kv.param_name] == ["model.model.layers.0.self_attn.query_heads",
                                                 "model.model.layers.0.self_attn.kv_heads"]
    assert [p.param_name.rsplit(".", 2)[1] for p in query.parts] == ["q_proj", "o_proj"]
    assert [p.param_name.rsplit(".", 2)[1] for p in kv.parts] == ["k_proj", "v_proj"]
    # 4 query heads of 4 rows of q_proj and 4 columns of o_proj (16 wide); 2 key/value heads of 4 + 4 rows.
    assert query.num_units == 4 and query.sizes.tolist() == [2 * 4 * 16] * 4
    assert kv.num_units == 2 and kv.sizes.tolist() == [2 * 4 * 16] * 2
    assert len(index) == 2 * (4 + 2) and len(index.pieces) == 2 * (4 + 2 + 2 + 4)
    assert index.columns()["channel"][:6] == [0, 1, 2, 3, 0, 1]


class _Block(nn.Module):
    """torch's own RMSNorm (served through F.rms_norm) before an MLP with fc1/fc2."""

    def __init__(self):
        super().__init__()
        self.norm = nn.RMSNorm(6)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(6, 10), nn.Linear(10, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mlp.fc2(torch.tanh(self.mlp.fc1(self.norm(x)))) + x)


@pytest.mark.parametrize("units", ["neurons", "norm"])
def test_torch_rmsnorm_and_an_fc1_fc2_mlp_equal_every_backend(units: str):
    torch.manual_seed(0)
    model = _Block().double().eval()
    nn.init.uniform_(model.norm.weight, 0.5, 1.5)
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    got, backend, notes = profiled_by_auto(model, x, y, units=units)
    assert backend == "hooks" and not notes
    for other in ("vmap", "loop"):
        assert relative_error(got, profile_batch(model, x, y, units=units, backend=other)) <= TOLERANCE
    assert relative_error(got, reference_profiles(model, x, y, units_of(model, units))) <= TOLERANCE


def test_units_spanning_parameters_refuse_abs_mean_and_a_model_without_an_mlp_has_no_neurons():
    model = llama()
    with pytest.raises(InputError, match="span several parameters.*mean_abs"):
        profile_batch(model, prompts(), prompts(), units="neurons", task="causal-lm", aggregation="abs_mean")
    with pytest.raises(InputError, match="selects no parameter"):
        units_of(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), "neurons")


def test_one_parameter_units_are_their_own_pieces():
    """Schemes whose units stay within a parameter build the index they built before units could span
    parameters: no parts, pieces the index itself, combine the identity."""
    model = llama()
    for units in ("linear-rows", "norm", "embedding-rows"):
        index = units_of(model, units)
        assert not index.compound and index.pieces is index and all(not g.parts for g in index)
        profiles = torch.randn(3, len(index), dtype=torch.float64)
        assert index.combine(profiles) is profiles


def test_a_run_of_neurons_names_them_and_the_weight_editing_analyses_refuse_them(tmp_path):
    model, ids = llama(), prompts(6)
    run = profile_dataset(model, torch.utils.data.TensorDataset(ids, ids), tmp_path / "run", batch_size=4,
                          units="neurons", task="causal-lm", progress=False)
    units = run.units
    assert units.column("param").to_pylist()[:1] == ["model.model.layers.0.mlp.neurons"]
    assert units.column("size").to_pylist() == [48] * 48 and len(units) == run.manifest.num_units
    want = profile_batch(model, ids, ids, units="neurons", task="causal-lm", backend="loop")
    np.testing.assert_allclose(run.profiles(standardized=False), want.float().numpy(), rtol=2e-5, atol=1e-12)
    with pytest.raises(InputError, match="cannot turn off the units of 'model.model.layers.0.mlp.neurons'"):
        UnitEditor.locate(model, ids[:1], "neurons")


@pytest.mark.parametrize("units", ["neurons", "heads"])
def test_units_switched_off_per_sample_equal_a_copy_with_their_weights_zeroed(units: str):
    from paramsal.analyses.compound_editing import CompoundEditor
    from paramsal.reference import zeroed_copy

    model, ids = llama(), prompts(3)
    index = units_of(model, units)
    off = torch.zeros(3, len(index), dtype=torch.bool)
    off[0, [2, len(index) - 1]] = True  # the first layer's and the last layer's
    off[2, [1, 3, len(index) // 2]] = True  # sample 1: none
    with torch.no_grad(), CompoundEditor(model, index).switched_off(off):
        edited = model(ids)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())  # the hooks are gone
    for n in range(3):
        with torch.no_grad():
            want = zeroed_copy(model, index, off[n].nonzero().flatten().numpy())(ids[n:n + 1])
        assert torch.allclose(edited[n:n + 1], want, rtol=0, atol=1e-12)
    with torch.no_grad():
        assert not torch.allclose(edited[0], model(ids)[0])  # something was switched off
        assert torch.equal(edited[1], model(ids)[1])


def test_switching_off_units_of_a_weight_shared_by_two_layers_is_refused_in_one_line():
    from paramsal.analyses.compound_editing import CompoundEditor

    model = llama()
    layers = model.model.model.layers
    layers[1].mlp.down_proj.weight = layers[0].mlp.down_proj.weight  # one weight, two layers
    with pytest.raises(InputError, match=r"down_proj.weight is shared with another module, so switching its units "
                                         r"off at one layer would not equal zeroing them"):
        CompoundEditor(model, units_of(model, "neurons"))


def test_zeroed_copy_zeroes_exactly_the_weights_of_a_neuron_and_of_a_key_value_head():
    from paramsal.reference import zeroed_copy

    model = llama()
    neuron = zeroed_copy(model, units_of(model, "neurons"), [5])
    mlp, before = neuron.model.model.layers[0].mlp, model.model.model.layers[0].mlp
    assert not (mlp.gate_proj.weight[5].any() or mlp.up_proj.weight[5].any() or mlp.down_proj.weight[:, 5].any())
    changed = sum(int((a != b).sum()) for a, b in zip(neuron.parameters(), model.parameters()))
    assert changed == 3 * 16 and before.gate_proj.weight[5].all()  # 3 x hidden weights, the model untouched
    heads = units_of(model, "heads")
    kv = next(g for g in heads if g.attr == "kv_heads")
    attention = zeroed_copy(model, heads, [kv.offset + 1]).model.model.layers[0].self_attn
    assert not attention.k_proj.weight[4:8].any() and not attention.v_proj.weight[4:8].any()  # head_dim 4
    assert attention.k_proj.weight[:4].all() and attention.q_proj.weight.all()


def test_what_works_on_one_parameters_units_refuses_neurons_in_one_line():
    from paramsal.reference.input_saliency import attribution_loop

    model, ids = llama(), prompts(1)
    index = units_of(model, "neurons")
    with pytest.raises(InputError, match="attribution_loop works on units of one parameter each"):
        attribution_loop(model, ids, ids, torch.zeros(1, len(index)), stats=None, units=index)


class _Judged(torch.utils.data.TensorDataset):
    """Prompts whose "greedy answers" a stand-in judge marks right at even sample ids."""

    def sample_columns(self, model, rows, losses, said=None):
        rows = np.asarray(rows)
        return {"correct": rows % 2 == 0, "prompt": [f"question {r}" for r in rows],
                "answer": [f"said {r}" for r in rows], "reference": ["ref"] * len(rows),
                "answer_logprob": -np.asarray(losses), "label": [None if r == 1 else "odd" * (r % 2) for r in rows]}


def test_an_answer_run_records_the_data_sets_judgement_of_each_row_as_correct(tmp_path):
    from torch.utils.data import Subset

    from paramsal.jobs.bulk import answer_judge

    model, ids = llama(), prompts(6)
    labels = ids.clone()
    labels[:, :5] = -100  # the "answer": the last 3 tokens
    data = _Judged(ids, labels)
    run = profile_dataset(model, data, tmp_path / "run", batch_size=4, units="neurons", task="answer",
                          progress=False)
    table = run.table()
    assert table.column("correct").to_pylist() == [True, False] * 3
    assert table.column("answer").to_pylist() == [f"said {r}" for r in range(6)]
    assert table.column("label").to_pylist() == ["", None, "", "odd", "", "odd"]
    np.testing.assert_allclose(table.column("answer_logprob").to_numpy(), -table.column("loss").to_numpy())
    want = profile_batch(model, ids, labels, units="neurons", task="causal-lm", backend="loop")
    np.testing.assert_allclose(run.profiles(standardized=False), want.float().numpy(), rtol=2e-5, atol=1e-12)
    # a subset's ids are positions in it: the judge sees the data set's own
    judged = answer_judge(model, Subset(data, [3, 4, 1]))(np.array([0, 1, 2]), np.zeros(3))
    assert judged["correct"].tolist() == [False, True, False] and judged["answer"] == ["said 3", "said 4", "said 1"]
    with pytest.raises(InputError, match="task 'answer' judges each sample's greedy answer.*TensorDataset"):
        profile_dataset(model, torch.utils.data.TensorDataset(ids, labels), tmp_path / "other", task="answer",
                        units="neurons", progress=False)
    assert not (tmp_path / "other").exists()  # refused before anything is written
