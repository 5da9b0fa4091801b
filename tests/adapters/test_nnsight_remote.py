"""scan(nnsight_model, remote=...) runs each shared text pass as one nnsight trace whose saved values are the
streaming probes' per-head reductions only. Tested offline through nnsight's own request machinery: remote="local"
serialises the trace as an NDIF request (`RequestModel.serialize`), deserialises it with posprobe's modules hidden
(and, here, any import of posprobe refused, as on a server without it), and runs it; the numbers equal the HF
adapter's and what comes back is a few kB of reductions, not patterns.

The check runs in a fresh interpreter: the test session's jaxtyping import hook wraps posprobe's functions in
type-checking closures (weak references) that cloudpickle cannot ship by value; users' processes have no such hook.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

import posprobe
from posprobe.errors import InputError
from posprobe.models import tiny_model
from posprobe.probes.base import Budget

pytest.importorskip("nnsight")

CHECK = textwrap.dedent('''
    import copy, json, pickle, sys
    import numpy as np, torch
    from nnsight import TransformersModel
    from nnsight.intervention.backends.local import LocalSimulationBackend
    from nnsight.schema.request import RequestModel
    import posprobe
    from posprobe.models import tiny_model
    from posprobe.probes.base import Budget
    from posprobe.scan import Dispatch

    report = {"payloads": [], "returned": [], "largest_tensor": 0, "backend_calls": 0}
    serialize, deserialize = RequestModel.serialize, RequestModel.deserialize

    class NoPosprobe:  # the server has no posprobe: importing it while deserialising fails
        def find_spec(self, name, path=None, target=None):
            if name == "posprobe" or name.startswith("posprobe."):
                raise ModuleNotFoundError(f"No module named {name!r} (as on an NDIF server)")
            return None

    def spy_serialize(*args, **kwargs):
        blob = serialize(*args, **kwargs)
        report["payloads"].append(len(blob))
        return blob

    def strict_deserialize(*args, **kwargs):
        blocker = NoPosprobe()
        sys.meta_path.insert(0, blocker)
        try:
            return deserialize(*args, **kwargs)
        finally:
            sys.meta_path.remove(blocker)

    adopt = Dispatch.adopt

    def spy_adopt(self, state):
        report["returned"].append(len(pickle.dumps(state)))
        for values in state:
            for value in values.values():
                if isinstance(value, torch.Tensor):
                    report["largest_tensor"] = max(report["largest_tensor"], value.numel())
        return adopt(self, state)

    call = LocalSimulationBackend.__call__

    def spy_call(self, tracer):
        report["backend_calls"] += 1
        return call(self, tracer)

    RequestModel.serialize = staticmethod(spy_serialize)
    RequestModel.deserialize = staticmethod(strict_deserialize)
    Dispatch.adopt = spy_adopt
    LocalSimulationBackend.__call__ = spy_call

    budget = Budget("remote", context_lengths=(40, 64), n_texts=2, max_queries=16)
    probes = ["head_basics", "attention_entropy", "positional_heads", "rope_frequency"]
    model, tokenizer = tiny_model("rope")
    users = TransformersModel(copy.deepcopy(model), tokenizer=copy.deepcopy(tokenizer))
    reference = posprobe.scan(model, tokenizer=tokenizer, probes=probes, budget=budget, progress=False)
    remote = posprobe.scan(users, probes=probes, budget=budget, remote="local", progress=False)
    report["metrics"] = reference.metrics
    report["max_abs_diff"] = {m: float(np.nanmax(np.abs(remote.heads[m].to_numpy(float)
                                                         - reference.heads[m].to_numpy(float)) if len(remote.heads)
                                                  else np.inf)) for m in reference.metrics}
    report["nan_equal"] = {m: bool((np.isnan(remote.heads[m].to_numpy(float))
                                    == np.isnan(reference.heads[m].to_numpy(float))).all()) for m in reference.metrics}
    report["remote_metrics"] = remote.metrics
    report["hardware"] = remote.meta["hardware"]
    report["same_hash"] = remote.meta["weights_hash"] == reference.meta["weights_hash"]
    report["attn_implementation"] = users._module.config._attn_implementation
    info = reference.info
    report["pattern_bytes"] = info.n_layers * info.n_heads * 64 * 64 * 4
    print("REPORT" + json.dumps(report))
''')


def test_remote_scan_serialises_the_trace_and_matches_hf():
    done = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("REPORT")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    report = json.loads(lines[-1].removeprefix("REPORT"))
    assert report["backend_calls"] == 4 and len(report["payloads"]) == 4  # one serialised request per text pass
    assert len(report["returned"]) == 4
    # What comes back is the reducers' state: per-head sums plus this pass's Spearman pairs of head_basics
    # (pairs_per_sample per head and layer), never an [H, n, n] pattern; the pairs already adopted are not shipped
    # again, so every pass returns about the same amount whatever its length (40 or 64 tokens) or position.
    returned = report["returned"]
    assert max(returned) < 500_000 and max(returned) < 1.1 * min(returned), returned
    assert report["largest_tensor"] < 64 * 64, report["largest_tensor"]
    assert report["remote_metrics"] == report["metrics"]
    for metric, diff in report["max_abs_diff"].items():
        assert diff <= 1e-6 and report["nan_equal"][metric], (metric, diff)
    assert report["same_hash"] and report["hardware"]["remote"] == "local"
    assert report["attn_implementation"] == "sdpa"  # the model kept its own attention (no eager patterns)


def test_remote_needs_an_nnsight_model():
    model, tokenizer = tiny_model("rope")
    budget = Budget("remote", context_lengths=(40,), n_texts=1, max_queries=8)
    with pytest.raises(InputError, match="nnsight"):
        posprobe.scan(model, tokenizer=tokenizer, probes=["head_basics"], budget=budget, remote="local",
                      progress=False)
