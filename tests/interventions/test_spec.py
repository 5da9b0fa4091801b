"""The intervention protocol (issue 16): LayerRange's one convention, the registry's text form round-trips every
built-in spec, specs bound to another access are refused, edits are validated wherever they enter (run, greedy,
editing; out-of-range layer / head / dimension raise instead of silently matching nothing), PlantedAccess refuses
edits it cannot honour, and `applied` restores the model exactly even when the block raises."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from posprobe.access import AttentionEdit, ProjectionInputEdit, RotaryEdit
from posprobe.errors import InterventionError, UnknownNameError
from posprobe.interventions import (
    Bound,
    DisableRope,
    FoundInTheMiddle,
    Intervention,
    LayerRange,
    MaskHeads,
    PositionalDimension,
    get_class,
    list_interventions,
    mask_heads,
    parameters,
    parse,
)
from posprobe.interventions.mask_heads import UniformHeads
from posprobe.interventions.spec import calibrated, calibrations, layer_range_of, resolve
from posprobe.testing import PlantedAccess, planted_info, uniform

TEXT = "The old farmer carried a wooden chair near the harbour."


def test_layer_range_is_half_open_and_prints_as_a_slice():
    assert LayerRange(9, 18).indices(18) == list(range(9, 18)) and str(LayerRange(9, 18)) == "9:18"
    assert LayerRange.parse("9:18") == LayerRange(9, 18) and LayerRange.parse(" 9 : ") == LayerRange(9)
    assert LayerRange.parse("5") == LayerRange(5, 6) and str(LayerRange(9)) == "9:"
    assert LayerRange(9).indices(12) == [9, 10, 11] and LayerRange.coerce(range(2, 4)) == LayerRange(2, 4)
    assert layer_range_of([9, 10, 11]) == "9:12" and layer_range_of([5, 11, 17]) == "5,11,17"
    for bad, match in [((9, 17), "ambiguous"), ([9, 10], "ambiguous"), ("9-17", "not a layer range")]:
        with pytest.raises(InterventionError, match=match):
            LayerRange.coerce(bad)
    with pytest.raises(InterventionError, match="empty"):
        LayerRange(5, 5)
    with pytest.raises(InterventionError, match=r"does not fit .* layers 0\.\.17"):
        LayerRange(9, 19).indices(18, "gemma")


@pytest.mark.parametrize("name", ["disable_rope", "found_in_the_middle", "mask_heads", "positional_dimension"])
def test_every_builtin_round_trips_through_dict_and_text(name):
    assert name in list_interventions()
    cls = get_class(name)
    spec = cls()
    assert Intervention.from_dict(spec.to_dict()) == spec and parse(name) == spec and parse(str(spec)) == spec
    changed = {"disable_rope": {"layers": LayerRange(1)}, "found_in_the_middle": {"temperature": 1.5, "layers": "0:1"},
               "mask_heads": {"heads": [(1, 2), (0, 3)]},
               "positional_dimension": {"dims": [3, 7], "factor": -1, "layers": "0:2"}}[name]
    other = spec.replace(**changed)
    assert parse(str(other)) == other == Intervention.from_dict(other.to_dict()) != spec
    assert dataclasses.is_dataclass(other) and hash(other) == hash(parse(str(other)))  # frozen, comparable
    listed = parameters(name)
    assert [p["name"] for p in listed] == [f.name for f in dataclasses.fields(cls)]
    assert all(p["default"] for p in listed)


def test_text_form_reads_lists_and_refuses_unknowns():
    assert parse("mask_heads:heads=L5H1,L11H2").heads == ((5, 1), (11, 2))
    spec = parse("positional_dimension:dims=558,factor=-1,layers=9:18")
    assert spec == PositionalDimension(dims=(558,), factor=-1.0, layers=LayerRange(9, 18))
    assert parse("disable_rope:layers=5,11,17") == DisableRope(layers=[5, 11, 17])
    with pytest.raises(UnknownNameError, match="Did you mean 'mask_heads'"):
        parse("mask_head:heads=L1H1")
    with pytest.raises(UnknownNameError, match="temperature"):
        parse("found_in_the_middle:temprature=1")
    with pytest.raises(InterventionError, match="key=value"):
        parse("mask_heads:L5H1")


def test_bound_specs_are_refused_by_another_access(tiny_rope, tiny_nope):
    bound = mask_heads(tiny_rope, [(0, 1)])
    assert isinstance(bound, Bound) and resolve(bound, tiny_rope) == MaskHeads(heads=[(0, 1)])
    with pytest.raises(InterventionError, match="bound to another model access"):
        resolve(bound, tiny_nope)
    with pytest.raises(InterventionError, match="which the runner would load as a new model"):
        resolve(bound, "tiny-rope")
    with pytest.raises(InterventionError, match="never loads a model of its own"):
        with MaskHeads(heads=[(0, 1)]).applied("tiny-rope"):
            pass


def test_applied_restores_exactly_even_when_the_block_raises(tiny_rope):
    ids = tiny_rope.encode(TEXT)
    before = tiny_rope.run(ids, logits="all").logits
    with pytest.raises(RuntimeError, match="inside"):
        with MaskHeads(heads="L0H1,L1H2").applied(tiny_rope) as access:
            assert access is tiny_rope and len(tiny_rope._edits) == 2
            raise RuntimeError("inside")
    assert tiny_rope._edits == [] and torch.equal(tiny_rope.run(ids, logits="all").logits, before)
    with pytest.raises(InterventionError, match="by its document spans"):
        with FoundInTheMiddle().applied(tiny_rope):
            pass


@pytest.mark.parametrize("edit, match", [
    (AttentionEdit(2, lambda p, ctx: p), r"layer 2.*layers 0\.\.1"),
    (AttentionEdit(0, UniformHeads(0, (4,), None)), r"heads \[4\].*heads 0\.\.3"),
    (ProjectionInputEdit(0, (64,), 0.0), r"dimensions \[64\].*0\.\.63"),
    (ProjectionInputEdit(0, (), 0.0), "at least one"),
    (ProjectionInputEdit(1, (3,), float("inf")), "finite"),
    (RotaryEdit(-1), "layer -1"),
])
def test_out_of_range_edits_raise_wherever_they_enter(tiny_rope, edit, match):
    """Before issue 16, run(edits=...) skipped validation: an AttentionEdit on head 4 of a 4-head model matched
    nothing and silently changed nothing."""
    ids = tiny_rope.encode(TEXT)
    with pytest.raises(InterventionError, match=match):
        tiny_rope.run(ids, logits="last", edits=[edit])
    with pytest.raises(InterventionError, match=match):
        tiny_rope.greedy(ids, 2, edits=[edit])
    with pytest.raises(InterventionError, match=match):
        with tiny_rope.editing([edit]):
            pass
    assert tiny_rope._edits == []


def test_rotary_edit_on_a_layer_without_rope_raises(tiny_nope):
    with pytest.raises(InterventionError, match="no RoPE"):
        tiny_nope.run(tiny_nope.encode(TEXT), edits=[RotaryEdit(0)])


def test_planted_access_refuses_edits_it_cannot_honour():
    info = planted_info()
    access = PlantedAccess(info, patterns=lambda layer, ids: uniform(ids.shape[1])[None, None].expand(
        ids.shape[0], info.n_heads, -1, -1))
    ids = access.encode("abc")
    access.run(ids)  # no edit: fine
    with pytest.raises(InterventionError, match="PlantedAccess cannot apply AttentionEdit"):
        access.run(ids, edits=[AttentionEdit(0, lambda p, ctx: p)])
    with pytest.raises(InterventionError, match="PlantedAccess cannot apply"):
        with MaskHeads(heads="L0H1").applied(access):
            access.run(ids)


def test_calibration_is_cached_per_access_and_key(tiny_rope, tiny_nope):
    calls = []

    def compute():
        calls.append(1)
        return len(calls)

    key = ("test_spec", "cache")
    assert calibrated(tiny_rope, key, compute, record=lambda v: {"value": v}) == 1
    assert calibrated(tiny_rope, key, compute) == 1 and calibrated(tiny_nope, key, compute) == 2
    assert calibrations(tiny_rope, "test_spec") == [{"key": ["test_spec", "cache"], "value": 1}]


def test_scan_applies_the_spec_to_the_access_it_scans(tiny_rope, monkeypatch):
    import posprobe
    import posprobe.models

    base = posprobe.scan(tiny_rope, probes=["head_basics"], budget="quick", progress=False)
    masked = posprobe.scan(tiny_rope, probes=["head_basics"], budget="quick", progress=False,
                           intervention="mask_heads:heads=L0H1")
    assert tiny_rope._edits == [] and "intervention" not in base.meta
    assert masked.meta["intervention"]["name"] == "mask_heads"
    assert masked.meta["intervention"]["resolved"] == {"heads": ["L0H1"]}
    metric = "previous_token_score"
    before, after = (s.heads.set_index(["layer", "head"])[metric] for s in (base, masked))
    # the random tiny model's heads are close to uniform already, so the masked head moves little, but 10x more
    # than the eager-vs-SDPA noise of the other heads of layer 0, which see the same inputs
    assert abs(after[(0, 1)] - before[(0, 1)]) > 1e-5
    for head in (0, 2, 3):
        assert after[(0, head)] == pytest.approx(before[(0, head)], abs=1e-6)
    loads = []
    monkeypatch.setattr(posprobe.models, "load_model", lambda *a, **k: loads.append(a) or tiny_rope)
    with pytest.raises(InterventionError, match="bound to another model access"):
        posprobe.scan("tiny-rope", probes=["head_basics"], budget="quick",
                      intervention=mask_heads(tiny_rope, [(0, 1)]))
    with pytest.raises(InterventionError, match="runs no structured prompts"):
        posprobe.scan(tiny_rope, probes=["head_basics"], budget="quick", intervention=FoundInTheMiddle())
    assert loads == [] and tiny_rope._edits == []
