"""A model dispatched by accelerate with layers offloaded to disk (CPU-only here: the same AlignDevicesHook machinery
multi-GPU dispatch uses) is probed through its hooks: scan values, logits and the weights hash equal those of the
same weights undispatched, and the device map lands in the scan's provenance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import posprobe
from posprobe.models import tiny_model
from posprobe.probes.base import Budget

pytest.importorskip("accelerate")

BUDGET = Budget("offload", context_lengths=(40, 64), n_texts=2, max_queries=16)
PROBES = ["head_basics", "attention_entropy", "positional_heads", "rope_frequency"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, tokenizer = tiny_model("rope", n_layers=4, d_model=64, n_heads=4, n_kv_heads=2)
    folder = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model, tokenizer


def test_offloaded_model_scans_like_the_undispatched_one(saved, tmp_path):
    from transformers import AutoModelForCausalLM

    folder, plain, tokenizer = saved
    dispatched = AutoModelForCausalLM.from_pretrained(
        folder, device_map="auto", max_memory={"cpu": "120KB"}, offload_folder=str(tmp_path / "offload"),
        dtype=torch.float32)
    where = set(dispatched.hf_device_map.values())
    assert "disk" in where, dispatched.hf_device_map  # layers really are offloaded
    assert any(p.device.type == "meta" for p in dispatched.parameters())

    a = posprobe.scan(plain, tokenizer=tokenizer, probes=PROBES, budget=BUDGET, progress=False)
    b = posprobe.scan(dispatched, tokenizer=tokenizer, probes=PROBES, budget=BUDGET, progress=False)
    assert a.metrics == b.metrics
    for metric in a.metrics:
        np.testing.assert_allclose(a.heads[metric].to_numpy(dtype=float), b.heads[metric].to_numpy(dtype=float),
                                   atol=1e-6, rtol=1e-5, equal_nan=True, err_msg=metric)
    assert a.meta["weights_hash"] == b.meta["weights_hash"]
    hardware = b.meta["hardware"]
    assert hardware["device_map"] and "disk" in hardware["device_map"].values()
    assert "meta" in hardware["devices"] and a.meta["hardware"]["device_map"] is None

    ids = torch.randint(4, 250, (2, 33))
    torch.testing.assert_close(posprobe.load_model(dispatched, tokenizer=tokenizer).run(ids, logits="all").logits,
                               posprobe.load_model(plain, tokenizer=tokenizer).run(ids, logits="all").logits,
                               atol=1e-5, rtol=1e-5)
    assert any(p.device.type == "meta" for p in dispatched.parameters())  # left dispatched as found


def test_device_auto_dispatches_a_model_loaded_by_path(saved, monkeypatch):
    from transformers import AutoModelForCausalLM

    folder, plain, tokenizer = saved
    seen = []
    original = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.append(kwargs)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    access = posprobe.load_model(str(folder), device="auto", dtype="float32")
    assert seen and seen[-1]["device_map"] == "auto" and seen[-1]["dtype"] == torch.float32
    # device_map="auto" reached from_pretrained: on this CPU-only machine everything fits on the CPU, so transformers
    # places the whole model there (no map is kept when it is one device)
    where = access.placement()
    assert where["devices"] == ["cpu"] and where["dtype"] == "float32"
    assert where["device_map"] in (None, {"": "cpu"})
    ids = torch.randint(4, 250, (1, 20))
    torch.testing.assert_close(access.run(ids, logits="all").logits,
                               posprobe.load_model(plain, tokenizer=tokenizer).run(ids, logits="all").logits)
