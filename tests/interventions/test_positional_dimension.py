"""Single-dimension scaling (Yu et al. 2024): the search finds a hand-planted positional dimension first (and not
without the plant), the monotonicity / smoothness statistics on known curves, scaling is exactly the
ProjectionInputEdit of the definition, exit restores logits bit-for-bit, generation under scaling equals step-by-step
recomputation, task-loss validation and evaluate_positions integration, and the missing-structure errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from posprobe.access import ModelAccess, ProjectionInputEdit
from posprobe.adapters.hf import HFAccess
from posprobe.errors import InterventionError, UnknownNameError
from posprobe.interventions.positional_dimension import (
    PositionalDimension,
    PositionalDimensionSearchConfig,
    answer_loss,
    default_layers,
    find_positional_dimensions,
    monotonic_directions,
    positional_dimension,
    rank_dimensions,
    scale_dimension,
    smoothness,
    task_prompts,
)
from posprobe.interventions.spec import LayerRange, calibrations, layer_range_of
from posprobe.models import tiny_model
from posprobe.tasks import evaluate_positions

TEXT = "The old farmer carried a wooden chair near the harbour. A young teacher found the blue lantern."


def _planted_gpt2(dim: int | None, n_layers: int = 3) -> HFAccess:
    """A random-init GPT-2 in which residual dimension `dim` is 0.02 * position in every layer: the position
    embedding writes it, token embeddings and every attention / MLP output leave it alone (weights set by hand)."""
    model, tok = tiny_model("absolute", n_layers=n_layers, d_model=64, n_heads=4, seed=3)
    if dim is not None:
        with torch.no_grad():
            base = model.transformer
            base.wte.weight[:, dim] = 0.0
            base.wpe.weight[:, dim] = 0.02 * torch.arange(base.wpe.weight.shape[0], dtype=torch.float32)
            for block in base.h:
                for proj in (block.attn.c_proj, block.mlp.c_proj):
                    proj.weight[:, dim] = 0.0
                    proj.bias[dim] = 0.0
    return HFAccess(model, tok, name=f"tiny-gpt2-planted-{dim}")


@pytest.mark.parametrize("dim", [5, 41])
def test_search_finds_the_planted_dimension_first(dim):
    access = _planted_gpt2(dim)
    result = find_positional_dimensions(access, n_sequences=4, length=96, validate=False)
    assert result.best == dim
    top = result.candidates.iloc[0]
    assert top["direction"] == "increasing" and top["n_monotonic_layers"] == access.info.n_layers
    assert top["smoothness"] < 1e-8 < result.candidates["smoothness"].iloc[1]
    curves = result.curves([dim])
    assert set(curves["layer"]) == set(range(access.info.n_layers)) and curves["monotonic"].all()
    layer0 = curves[curves["layer"] == 0]
    assert np.allclose(layer0["value"].to_numpy(), 0.02 * layer0["position"].to_numpy(), atol=1e-5)
    frame = result.curve_frame([dim])
    assert set(frame["series"]) == {f"dim {dim}"} and (frame["curve"] == "positional_dimension").all()


def test_without_the_plant_the_search_does_not_invent_it():
    planted = find_positional_dimensions(_planted_gpt2(5), n_sequences=4, length=96, validate=False)
    control = find_positional_dimensions(_planted_gpt2(None), n_sequences=4, length=96, validate=False)
    assert planted.best == 5
    assert control.candidates.empty or control.best != 5
    assert control.candidates.empty or control.candidates["smoothness"].iloc[0] > 1e-8


def test_monotonicity_and_smoothness_on_known_curves():
    x = np.linspace(0, 1, 200)
    curves = np.stack([x, -x ** 2, np.sin(6 * x), np.ones_like(x), x ** 2], 1)
    assert monotonic_directions(curves).tolist() == [1, -1, 0, 0, 1]
    smooth = smoothness(curves)
    assert smooth[0] < 1e-20 and np.isinf(smooth[3])  # a line has no curvature; a constant is no curve at all
    assert smooth[0] < smooth[4] < smooth[2]


def test_rank_dimensions_threshold_and_order():
    n = 120
    x = np.arange(n, dtype=float)
    hidden = np.zeros((4, n, 3))
    hidden[:, :, 0] = x  # monotonic in all 4 layers, linear
    hidden[:, :, 1] = np.sqrt(x + 1)  # monotonic in all 4 layers, curved
    hidden[:2, :, 2] = x  # monotonic in only 2 layers...
    hidden[2:, :, 2] = np.sin(x / 5)
    config = PositionalDimensionSearchConfig(min_layer_share=0.5)  # ...which is not more than half of 4
    df, counts = rank_dimensions(hidden, config, layers=range(4))
    assert df["dim"].tolist() == [0, 1] and counts.tolist() == [4, 4, 2]
    assert df["monotonic_layers"].iloc[0] == "0,1,2,3"


def test_scaling_is_the_projection_input_edit_and_exit_restores(tiny_rope):
    ids = tiny_rope.encode(TEXT)
    before = tiny_rope.run(ids, logits="all").logits
    scaled = scale_dimension(tiny_rope, 7, -0.5, layers="0:2")
    with scaled as model:
        assert model is tiny_rope
        inside = model.run(ids, logits="all").logits
    after = tiny_rope.run(ids, logits="all").logits
    assert torch.equal(before, after)
    reference = tiny_rope.run(ids, logits="all", edits=[ProjectionInputEdit(layer, (7,), -0.5, keys=True,
                                                                            queries="last") for layer in (0, 1)]).logits
    assert torch.equal(inside, reference)
    assert (inside - before).abs().max() > 1e-5
    with scale_dimension(tiny_rope, 7, 1.0, layers=LayerRange(0, 2)):  # factor 1 is the identity
        assert torch.allclose(tiny_rope.run(ids, logits="all").logits, before, atol=1e-6)
    assert PositionalDimension(dims=3, factor=0, layers="0:").resolved(tiny_rope)["layers"] == "0:2"
    with pytest.raises(InterventionError, match="ambiguous"):  # (first, last) inclusive or [start, stop)?
        scale_dimension(tiny_rope, 3, 0.0, layers=(0, 1))


def _weight_edited_reference(access: HFAccess, ids: list[int], dim: int, factor: float,
                             layers: list[int]) -> torch.Tensor:
    """Last-token logits of the scaling definition computed with no hooks and no posprobe edit: two copies of the
    model with edited weights. Column `dim` of W_k (input side) is multiplied by `factor` in `layers` in both copies
    (keys of every position); W_q too, in the second copy only. The prefix runs through the first copy; its KV cache
    and the last token go through the second, so only the last position's query sees the scaled input."""
    import copy
    import inspect

    keys_only, keys_and_query = copy.deepcopy(access.model), copy.deepcopy(access.model)
    with torch.no_grad():
        for model, projections in ((keys_only, ("k_proj",)), (keys_and_query, ("k_proj", "q_proj"))):
            for layer in layers:
                attention = model.model.layers[layer].self_attn
                for name in projections:
                    getattr(attention, name).weight[:, dim] *= factor
        row = torch.tensor([ids])
        prefix = keys_only(input_ids=row[:, :-1], use_cache=True)
        cache = "cache" if "cache" in inspect.signature(keys_and_query.forward).parameters else "past_key_values"
        last = keys_and_query(input_ids=row[:, -1:], use_cache=True, **{cache: prefix.past_key_values})
    return last.logits[:, -1]


@pytest.mark.parametrize("dim, factor, layers", [(7, -0.5, [0, 1]), (30, 0.0, [1]), (2, 3.0, [0])])
def test_scaling_equals_the_weight_edited_reference(tiny_rope, dim, factor, layers):
    """Issue 16 item 4: the intervention against an independent truth (edited weight copies, no hooks)."""
    ids = tiny_rope.encode(TEXT)
    spec = PositionalDimension(dims=dim, factor=factor, layers=layer_range_of(layers))
    with spec.applied(tiny_rope):
        scaled = tiny_rope.run(ids, logits="last").logits[:, -1]
    reference = _weight_edited_reference(tiny_rope, ids, dim, factor, layers)
    plain = tiny_rope.run(ids, logits="last").logits[:, -1]
    assert (reference - plain).abs().max() > 1e-4  # the edit matters, so agreement is evidence
    torch.testing.assert_close(scaled, reference, atol=1e-5, rtol=0)


def test_generation_under_scaling_is_stepwise_recomputation(tiny_rope):
    ids = torch.tensor([tiny_rope.encode(TEXT)])
    with scale_dimension(tiny_rope, 11, 0.0, layers="1:2"):
        generated = tiny_rope.greedy(ids, 4)
        manual = ModelAccess.greedy(tiny_rope, ids, 4)
    assert torch.equal(generated, manual)


def test_kv_cached_last_query_greedy_equals_recomputation_under_strong_edits(tiny_rope):
    """The cached path keeps every token but the last as a non-last token; it must equal recomputing the whole
    sequence each step (ModelAccess.greedy) for a batch, strong factors and long generations, and the edit must
    actually change the generation (else the comparison proves nothing)."""
    ids = torch.tensor([tiny_rope.encode(TEXT)] * 2)
    ids[1, 3] = ids[0, 5]  # two different rows
    dims, layers = list(range(0, tiny_rope.info.d_model, 2)), LayerRange(0)
    plain = tiny_rope.greedy(ids, 12)
    with scale_dimension(tiny_rope, dims, -20.0, layers=layers):  # strong enough that a cache keeping each
        cached = tiny_rope.greedy(ids, 12)  # token's states from when it was last gives other tokens (checked)
        recomputed = ModelAccess.greedy(tiny_rope, ids, 12)
    assert torch.equal(cached, recomputed)
    assert not torch.equal(cached, plain)
    stop = [int(cached[0, 2])]
    with scale_dimension(tiny_rope, dims, -20.0, layers=layers):
        stopped = tiny_rope.greedy(ids[:1], 12, stop_ids=stop)
    assert torch.equal(stopped, cached[:1, :3])


def test_answer_loss_modes_agree_without_edits_and_validation_ranks_by_loss(tiny_rope):
    prompts = task_prompts(tiny_rope, "kv_words", 4, 2, 2, seed=1)
    forced = answer_loss(tiny_rope, prompts)
    stepwise = answer_loss(tiny_rope, prompts, stepwise=True)
    assert np.allclose(forced["loss"], stepwise["loss"], atol=1e-5)
    assert (forced["correct"] == stepwise["correct"]).all()
    result = find_positional_dimensions(tiny_rope, n_sequences=2, length=64, top_k=3, validation_items=4,
                                        validation_trials=1, validation_positions=2, min_layer_share=0.0)
    validated = result.candidates.dropna(subset=["validation_loss"])
    assert len(validated) == min(3, len(result.candidates)) and validated.index.tolist() == list(range(len(validated)))
    assert validated["validation_loss"].is_monotonic_increasing
    assert np.isfinite(result.baseline["loss"])


def test_evaluate_positions_accepts_scaling(tiny_rope):
    table = evaluate_positions(tiny_rope, "kv_words", n_items=4, gold_positions=[0, 3], n_trials=2,
                               intervention=scale_dimension(tiny_rope, 2, 0.0, layers="1:2"), progress=False)
    assert int(table["n_errors"].sum()) == 0 and int(table["n"].sum()) == 4
    spec = table.attrs["intervention"]
    assert spec["name"] == "positional_dimension" and spec["resolved"] == {"dims": [2], "factor": 0.0,
                                                                           "layers": "1:2", "source": "given"}


def test_unrecorded_model_searches_once_on_the_access_it_is_applied_to(tiny_rope):
    spec = PositionalDimension(search_sequences=2)
    first = spec.edits(tiny_rope)
    again = PositionalDimension(search_sequences=2, factor=0.5).edits(tiny_rope)  # same search: reused
    records = [r for r in calibrations(tiny_rope, "positional_dimension") if r.get("search_config", {}).get(
        "n_sequences") == 2]
    assert len(records) == 1 and first[0].dims == again[0].dims == (records[0]["best"],)
    assert [e.layer for e in first] == default_layers(tiny_rope.info) and again[0].factor == 0.5
    found = spec.describe(tiny_rope)
    assert found["resolved"]["source"] == "find_positional_dimensions on this model" and found["calibrations"]


def test_missing_structure_raises_clear_errors(tiny_rope):
    gpt2 = _planted_gpt2(None, n_layers=2)
    with pytest.raises(InterventionError, match="fused QKV"):
        with scale_dimension(gpt2, 3, 0.0, layers="0:1"):
            pass
    with pytest.raises(InterventionError, match="d_model"):
        with scale_dimension(tiny_rope, 64, 0.0):
            pass
    with pytest.raises(InterventionError, match="does not fit"):
        with scale_dimension(tiny_rope, 3, 0.0, layers="5:6"):
            pass
    with pytest.raises(InterventionError, match="finite"):
        scale_dimension(tiny_rope, 3, float("nan"))
    with pytest.raises(InterventionError, match="never loads a model"):
        positional_dimension("tiny-rope")
    assert tiny_rope._edits == []
    with pytest.raises(UnknownNameError):
        find_positional_dimensions(tiny_rope, n_sequence=3)
    assert default_layers(tiny_rope.info) == [1]


@pytest.mark.real_model
def test_gemma_cached_greedy_under_the_recorded_dimension_equals_recomputation(gemma):
    prompt = task_prompts(gemma, "kv_words", 20, [10], 1, seed=5)[0]
    ids = torch.tensor([prompt.input_ids])
    with positional_dimension(gemma):
        cached = gemma.greedy(ids, 6)
        recomputed = ModelAccess.greedy(gemma, ids, 6)
    assert torch.equal(cached, recomputed)


@pytest.mark.real_model
def test_gemma_recorded_dimension_scales_and_restores_bit_for_bit(gemma):
    scaled = positional_dimension(gemma)
    assert scaled.spec.resolved(gemma) == {"dims": [558], "factor": -1.0, "layers": "9:18",
                                           "source": "recorded (KNOWN_DIMENSIONS)"}
    ids = gemma.encode(TEXT)
    before = gemma.run(ids, logits="last").logits
    with scaled:
        inside = gemma.run(ids, logits="last").logits
    assert (inside - before).abs().max() > 1e-3
    assert torch.equal(gemma.run(ids, logits="last").logits, before)


@pytest.mark.real_model
def test_gemma_recorded_scaling_equals_the_weight_edited_reference(gemma):
    ids = gemma.encode(TEXT)
    with positional_dimension(gemma):
        scaled = gemma.run(ids, logits="last").logits[:, -1]
    reference = _weight_edited_reference(gemma, ids, 558, -1.0, list(range(9, 18)))
    effect = (reference - gemma.run(ids, logits="last").logits[:, -1]).abs().max()
    assert effect > 1e-1  # the edit moves the logits a lot, so agreement is evidence
    # float32 over 18 layers and 262k logits: (W * f) x and W (x * f) round differently (seen: 1.7e-5 at most, 0.8%
    # of the logits above 1e-5), so Gemma gets 5e-5; the tiny models above meet 1e-5
    torch.testing.assert_close(scaled, reference, atol=5e-5, rtol=0)
    print(f"effect {float(effect):.3g}, largest difference {float((scaled - reference).abs().max()):.3g}")
