"""The nnsight adapter: posprobe's access interface over an nnsight 0.8 `TransformersModel`, through `trace()`.

Owns the translation of `Tap`s and edit specs into reads and writes of the model's own module tree inside one trace
(posprobe's conventions: explicit position_ids, post-rotary q/k as the model computed them, the model's own attention
pattern), the restoration of the model's attention implementation after every trace, and the remote (NDIF) path.
Positional facts come from the HF config of the wrapped model (`architectures.model_info`), as in every adapter.

Where each tap is read, per decoder block (always in execution order; nnsight refuses anything else):
    RESID_PRE  block.input                     ATTN_IN  attn.input (the post-norm input of attention)
    Q_PRE/K_PRE  the inputs of `attn.source.apply_rotary_pos_emb_0` (after Gemma 3's q/k norms); layers without
                 RoPE report the post-rotary q/k
    Q/K        the query/key arguments of `attn.source.attention_interface_1` (post-rotary, KV heads not expanded)
    PATTERN    `attn.output[1]`, the model's own eager attention weights: the model runs with eager attention for
               passes that ask for it, and its previous implementation is restored afterwards
    SCORES     computed by `LayerCapture.scores` from Q/K        ATTN_OUT  attn.output[0]
    RESID_POST block.output (where `on_layer` is called)

Edits: ProjectionInputEdit rewrites `attn.q_proj.input` / `attn.k_proj.input`; RotaryEdit replaces the output of
`apply_rotary_pos_emb_0` by its inputs (the identity rotation); AttentionEdit replaces the output of
`attention_interface_1` by eager attention computed from its q/k/v with the edit applied (so PATTERN then shows the
edited probabilities, the ones the model used).

Streaming: locally, the trace body runs while the model runs, so `on_layer` is called inside the trace as each block
finishes and nothing is kept. With `streaming=False` (and always with `remote=...`) the requested taps of every
layer are saved inside the trace and `on_layer` is called layer by layer after it: this mode is NOT memory-streaming
(all requested taps of all layers are alive at once) and takes no edits; its trace body uses only envoys, builtins
and `nnsight.save`, so it can be shipped to a server. `remote=True` passes through to nnsight's NDIF execution and is
untested here (no network); `remote="local"` (nnsight's serialising dry run) is what the tests exercise.
"""

from __future__ import annotations

import contextlib
import copy
import gc
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from posprobe.access import (
    AttentionEdit,
    Edit,
    EditContext,
    LayerCallback,
    LayerCapture,
    ModelAccess,
    ProjectionInputEdit,
    RotaryEdit,
    Tap,
    attention_scores,
    causal_key_mask,
    expand_kv,
)
from posprobe.adapters._wrapping import private_copy, state_dict_hash
from posprobe.adapters.architectures import exception_for, model_info, module_paths
from posprobe.errors import InterventionError, MissingDependencyError, ModelLoadError, UnsupportedModelError

_INSTALL = 'pip install "nnsight>=0.8"  (or: pip install "posprobe[nnsight]")'
_QK_TAPS = frozenset({Tap.Q, Tap.K, Tap.SCORES})
_PRE_TAPS = frozenset({Tap.Q_PRE, Tap.K_PRE})
_ROTARY_OP = "apply_rotary_pos_emb_0"  # operation labels of nnsight 0.8 `.source` (they change between versions)
_ATTENTION_OP = "attention_interface_1"


def _nnsight() -> Any:
    try:
        import nnsight
        from nnsight.modeling.transformers import TransformersModel  # noqa: F401
    except ImportError:
        raise MissingDependencyError("The nnsight backend", _INSTALL) from None
    return nnsight


def eager_attention(
    query: Tensor, key: Tensor, value: Tensor, *, layer: int, scale: float, softcap: float | None,
    window: int | None, edits: Sequence[AttentionEdit], position_ids: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Eager attention with `edits` applied, in the (output [b, n, H, d], probs [b, H, n, nk]) form of HF's
    attention functions. Queries may be a suffix of the keys."""
    n_heads, n_keys = query.shape[1], key.shape[2]
    query_index = torch.arange(n_keys - query.shape[2], n_keys, device=query.device)
    k, v = expand_kv(key, n_heads), expand_kv(value, n_heads)
    ctx = EditContext(layer=layer, query_index=query_index, n_keys=n_keys, position_ids=position_ids)
    scores = attention_scores(query, k, scale, softcap)
    scores = scores.masked_fill(~causal_key_mask(query_index, n_keys, window), float("-inf"))
    for edit in edits:
        if edit.stage == "scores":
            scores = edit.fn(scores, ctx)
    probs = torch.softmax(scores, dim=-1)
    for edit in edits:
        if edit.stage == "probs":
            probs = edit.fn(probs, ctx)
    out = torch.matmul(probs.to(v.dtype), v)
    return out.transpose(1, 2).contiguous(), probs


def remote_model(repo_id: str) -> Any:
    """An nnsight `TransformersModel` of a hub id whose weights stay on the NDIF server: config and tokenizer are
    downloaded, the weights are meta tensors here (nnsight does not dispatch them), so a 70B model costs no memory.
    Run it with `scan(model, remote=True)` (NDIF key: the NDIF_API_KEY environment variable or `nnsight.login()`)."""
    _nnsight()
    from nnsight import TransformersModel

    return TransformersModel(repo_id)


def _envoy(root: Any, dotted: str) -> Any:
    """The nnsight envoy at a dotted module path (the HF module tree, seen through nnsight)."""
    for part in dotted.split("."):
        root = getattr(root, part)
    return root


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, tuple) else value


class NNsightAccess(ModelAccess):
    """ModelAccess over an nnsight `TransformersModel` (one `trace()` per pass).

    remote: passed to `trace(remote=...)` (True: NDIF; "local": nnsight's serialising dry run). Remote passes collect
    taps inside the trace and call `on_layer` afterwards, and accept no edits (their functions cannot be shipped).
    streaming: call `on_layer` inside the trace as the model runs (default, local only); False collects first.
    """

    backend = "nnsight"

    def __init__(
        self, model: Any, tokenizer: Any = None, name: str | None = None, *, remote: bool | str = False,
        streaming: bool = True,
    ) -> None:
        super().__init__()
        _nnsight()
        from nnsight.modeling.huggingface import HuggingFaceModel

        hf_model = getattr(model, "_module", None) if isinstance(model, HuggingFaceModel) else None
        get_head = getattr(hf_model, "get_output_embeddings", None)
        if hf_model is None or not hasattr(hf_model, "config") or get_head is None or get_head() is None:
            raise UnsupportedModelError(
                f"NNsightAccess expects an nnsight TransformersModel wrapping a transformers causal LM, got "
                f"{type(model).__module__}.{type(model).__name__}. Build one with "
                f"nnsight.TransformersModel(hf_model, tokenizer=tok), or use NNsightAccess.from_hf(hf_model, tok)."
            )
        self.lm = model
        self.hf_model: nn.Module = hf_model
        self.tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        if self.tokenizer is None:
            raise ModelLoadError(
                "The nnsight model has no tokenizer and none was given; posprobe needs it to build prompts. "
                "Pass NNsightAccess(model, tokenizer=AutoTokenizer.from_pretrained(path))."
            )
        self.paths = module_paths(hf_model.config)
        label = name or getattr(hf_model, "name_or_path", "") or type(hf_model).__name__
        self.info = model_info(hf_model, label, self.tokenizer)
        self.remote = remote
        self.streaming = streaming and not remote
        self._hash: str | None = None

    @classmethod
    def from_hf(
        cls, hf_model: nn.Module, tokenizer: Any, name: str | None = None, *, streaming: bool = True
    ) -> NNsightAccess:
        """Wrap a private copy of `hf_model` (shared weights) in a `TransformersModel`; the user's model is untouched.

        nnsight installs per-instance forwards on every module it wraps and sets the tokenizer's padding side;
        both get copies here.
        """
        _nnsight()
        from nnsight import TransformersModel
        from transformers import PreTrainedModel

        if not isinstance(hf_model, PreTrainedModel) or hf_model.get_output_embeddings() is None:
            raise UnsupportedModelError(
                f"NNsightAccess.from_hf needs a transformers causal LM (AutoModelForCausalLM), got "
                f"{type(hf_model).__module__}.{type(hf_model).__name__}."
            )
        if tokenizer is None:
            raise ModelLoadError(
                "NNsightAccess.from_hf needs the model's tokenizer. Pass tokenizer=AutoTokenizer.from_pretrained(path)."
            )
        module_paths(hf_model)  # unsupported architectures fail here, before the copy
        exc = exception_for(hf_model.config)
        if exc is not None and exc.outside_interface and hf_model.config._attn_implementation != "eager":
            raise UnsupportedModelError(
                f"The nnsight adapter reads patterns from the attention-interface call, or from the weights an "
                f"attention module returns under eager attention; {type(hf_model).__name__} has no interface call "
                f"({exc.reason}) and runs {hf_model.config._attn_implementation!r}, where it returns none. Load it "
                f"with attn_implementation='eager' or use backend='hf'."
            )
        model = TransformersModel(private_copy(hf_model).eval(), tokenizer=copy.deepcopy(tokenizer))
        label = name or getattr(hf_model, "name_or_path", "") or type(hf_model).__name__
        return cls(model, tokenizer=tokenizer, name=label, streaming=streaming)

    def weights_hash(self) -> str:
        """The same hash as the HF adapter (the wrapped module tree keeps HF's parameter names). A model whose
        weights live on an NDIF server (meta tensors here, `remote_model`) is named by its nnsight model key."""
        if self._hash is None:
            if any(p.device.type == "meta" for p in self.hf_model.parameters()):
                self._hash = "nnsight-model-key:" + self.lm.to_model_key()
            else:
                self._hash = state_dict_hash(self.hf_model.state_dict())
        return self._hash

    # --- one pass ----------------------------------------------------------------------------------------------
    def _check_edits(self, edits: Sequence[Edit]) -> None:
        if edits and not self.streaming:
            where = "remote nnsight passes" if self.remote else "collected (streaming=False) nnsight passes"
            raise InterventionError(
                f"Edits are not supported on {where}: their Python functions would have to run inside a trace body "
                f"that is shipped as is (to the NDIF server when remote). Run the intervention on a local streaming "
                f"access (NNsightAccess(model)) or through backend='hf'."
            )
        for edit in edits:
            if isinstance(edit, ProjectionInputEdit) and self.paths.q_proj is None:
                raise InterventionError(
                    f"{self.info.architecture} has a fused QKV projection; ProjectionInputEdit needs separate "
                    f"q_proj/k_proj modules (Llama, Gemma, Qwen, Mistral families)."
                )
            if isinstance(edit, RotaryEdit) and not self.info.layers[edit.layer].has_rope:
                raise InterventionError(f"Layer {edit.layer} of {self.info.name} has no RoPE to disable.")

    def _layer_body(
        self, layer: int, block: Any, taps: frozenset[Tap], edits: Sequence[Edit], position_ids: Tensor
    ) -> LayerCapture:
        """Everything read or written for one block, in the order the model executes it."""
        info = self.info
        layer_info = info.layers[layer]
        cap = LayerCapture(layer=layer, info=layer_info, model=info, position_ids=position_ids)
        cap.extras["attn_scale"] = info.attn_scale
        attn = getattr(block, self.paths.attention)
        edits = [e for e in edits if e.layer == layer]
        projection = [e for e in edits if isinstance(e, ProjectionInputEdit)]
        rotary = any(isinstance(e, RotaryEdit) for e in edits)
        attention = [e for e in edits if isinstance(e, AttentionEdit)]
        read_rotary = layer_info.has_rope and (bool(taps & _PRE_TAPS) or rotary)
        read_attention = (bool(taps & _QK_TAPS) or bool(attention)
                          or (bool(taps & _PRE_TAPS) and not layer_info.has_rope))
        # `.source` must be reached before the attention module starts running
        source = attn.source if (read_rotary or read_attention) else None

        if Tap.RESID_PRE in taps:
            cap.resid_pre = block.input
        if Tap.ATTN_IN in taps:
            cap.attn_in = attn.input
        if projection:
            self._scale_projection_inputs(attn, projection)
        if read_rotary:
            op = getattr(source, _ROTARY_OP)
            q_pre, k_pre = op.inputs[0][:2]
            if Tap.Q_PRE in taps:
                cap.q_pre = q_pre
            if Tap.K_PRE in taps:
                cap.k_pre = k_pre
            if rotary:
                op.output = (q_pre, k_pre)  # the identity rotation (a NoPE ablation of this layer)
        if read_attention:
            op = getattr(source, _ATTENTION_OP)
            args, _ = op.inputs
            query, key, value = args[1], args[2], args[3]
            if taps & _QK_TAPS:
                cap.q, cap.k = query, key
            if taps & _PRE_TAPS and not layer_info.has_rope:  # no rotation in this layer: pre == post
                cap.q_pre, cap.k_pre = query, key
            if attention:
                op.output = eager_attention(
                    query, key, value, layer=layer, scale=info.attn_scale, softcap=info.attn_softcap,
                    window=layer_info.sliding_window, edits=attention, position_ids=position_ids,
                )
        if Tap.PATTERN in taps or Tap.ATTN_OUT in taps:
            output = attn.output
            if Tap.ATTN_OUT in taps:
                cap.attn_out = output[0]
            if Tap.PATTERN in taps:
                cap.extras["pattern"] = output[1]
        cap.resid_post = _first(block.output) if Tap.RESID_POST in taps else None
        return cap

    @staticmethod
    def _scale_projection_inputs(attn: Any, edits: Sequence[ProjectionInputEdit]) -> None:
        """Queries first, then keys: the order both projections run in (Llama, Gemma, Qwen, Mistral)."""
        for which in ("q", "k"):
            chosen = [e for e in edits if (e.queries != "none" if which == "q" else e.keys)]
            if not chosen:
                continue
            module = getattr(attn, f"{which}_proj")
            x = module.input.clone()
            for edit in chosen:
                dims = torch.tensor(edit.dims, dtype=torch.long)
                if which == "q" and edit.queries == "last":
                    x[:, -1:, dims] *= edit.factor
                else:
                    x[..., dims] *= edit.factor
            module.input = x

    @staticmethod
    def _finish(cap: LayerCapture) -> LayerCapture:
        pattern = cap.extras.pop("pattern", None)
        if pattern is not None:
            cap.pattern_source = lambda query_index: pattern[:, :, query_index]
        return cap

    @contextlib.contextmanager
    def _attention_for(self, taps: frozenset[Tap]) -> Iterator[None]:
        """Eager attention while a pass reads patterns (sdpa returns none); the previous implementation after it."""
        original = self.hf_model.config._attn_implementation
        switch = Tap.PATTERN in taps and original != "eager"
        try:
            if switch:
                self.hf_model.set_attn_implementation("eager")
            yield
        finally:
            if switch:
                self.hf_model.set_attn_implementation(original)
            gc.collect(1)  # frees the trace's young reference cycles (BACKENDS.md: memory grows across traces)

    def _forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        taps: frozenset[Tap],
        on_layer: LayerCallback | None,
        logit_positions: Tensor | None,
        edits: Sequence[Edit],
    ) -> Tensor | None:
        self._check_edits(edits)
        kwargs: dict[str, Any] = {"position_ids": position_ids, "use_cache": False}
        kwargs["logits_to_keep"] = 1 if logit_positions is None else logit_positions
        if self.remote and getattr(on_layer, "ships_to_remote", False):
            return self._reducing_trace(input_ids, kwargs, taps, on_layer, logit_positions)
        with self._attention_for(taps):
            if self.streaming:
                return self._streaming_trace(input_ids, kwargs, taps, on_layer, logit_positions, edits)
            return self._collected_trace(input_ids, kwargs, taps, on_layer, logit_positions)

    def _streaming_trace(
        self, input_ids: Tensor, kwargs: dict[str, Any], taps: frozenset[Tap], on_layer: LayerCallback | None,
        logit_positions: Tensor | None, edits: Sequence[Edit],
    ) -> Tensor | None:
        """One local trace; `on_layer` runs inside it as each block finishes (memory-streaming)."""
        nnsight = _nnsight()
        blocks = _envoy(self.lm, self.paths.layers)
        position_ids = kwargs["position_ids"]
        layered = bool(taps) or on_layer is not None or bool(edits)
        logits = None
        with self.lm.trace(input_ids, **kwargs) as tracer:
            if layered:
                for layer in range(self.info.n_layers):
                    cap = self._layer_body(layer, blocks[layer], taps, edits, position_ids)
                    if on_layer is not None:
                        on_layer(self._finish(cap))
                    del cap
            if logit_positions is not None:
                logits = nnsight.save(self.lm.output.logits)
            else:
                tracer.stop()  # the final norm and LM head are not needed
        return logits

    def _collected_trace(
        self, input_ids: Tensor, kwargs: dict[str, Any], taps: frozenset[Tap], on_layer: LayerCallback | None,
        logit_positions: Tensor | None,
    ) -> Tensor | None:
        """One trace that saves the requested taps of every layer; `on_layer` runs after it (NOT memory-streaming).

        The body uses only envoys, builtins and `nnsight.save`, so it can be shipped to an NDIF server as is.
        """
        nnsight = _nnsight()
        if self.remote:
            kwargs = {**kwargs, "remote": self.remote}
        lm, attention_name = self.lm, self.paths.attention
        blocks = _envoy(lm, self.paths.layers)
        rotary_op, attention_op = _ROTARY_OP, _ATTENTION_OP
        # per layer: (read the rotary inputs, read the attention function's q/k): plain data for the shipped body
        plan = [
            (layer_info.has_rope and bool(taps & _PRE_TAPS),
             bool(taps & _QK_TAPS) or (bool(taps & _PRE_TAPS) and not layer_info.has_rope))
            for layer_info in self.info.layers
        ] if (taps or on_layer is not None) else []
        names = {tap.value for tap in taps}
        logits = None
        with lm.trace(input_ids, **kwargs):
            saved = nnsight.save([])
            for layer, (read_rotary, read_qk) in enumerate(plan):
                block = blocks[layer]
                attn = getattr(block, attention_name)
                source = attn.source if (read_rotary or read_qk) else None
                values = {}
                if "resid_pre" in names:
                    values["resid_pre"] = block.input
                if "attn_in" in names:
                    values["attn_in"] = attn.input
                if read_rotary:
                    rotary_inputs = getattr(source, rotary_op).inputs[0]
                    values["q_pre"], values["k_pre"] = rotary_inputs[0], rotary_inputs[1]
                if read_qk:
                    attention_args = getattr(source, attention_op).inputs[0]
                    values["q"], values["k"] = attention_args[1], attention_args[2]
                if "pattern" in names or "attn_out" in names:
                    attn_output = attn.output
                    if "attn_out" in names:
                        values["attn_out"] = attn_output[0]
                    if "pattern" in names:
                        values["pattern"] = attn_output[1]
                if "resid_post" in names:
                    block_output = block.output
                    values["resid_post"] = block_output[0] if isinstance(block_output, tuple) else block_output
                saved.append(values)
            if logit_positions is not None:
                logits = nnsight.save(lm.output.logits)
        for layer, values in enumerate(saved):
            if on_layer is not None:
                on_layer(self._capture_from(layer, values, taps, kwargs["position_ids"]))
            saved[layer] = None  # each layer's tensors go as soon as its probes are done
        return logits

    def remote_view(self, remote: bool | str) -> NNsightAccess:
        """This access with its passes run remotely: True = NDIF (needs an NDIF key, see docs/hardware.md), "local"
        = nnsight's serialising dry run here. Same model, info and hash; streaming off (nothing runs locally)."""
        view = copy.copy(self)
        view._edits = list(self._edits)
        view.remote, view.streaming = remote, False
        return view

    def _reducing_trace(
        self, input_ids: Tensor, kwargs: dict[str, Any], taps: frozenset[Tap], reducer: Any,
        logit_positions: Tensor | None,
    ) -> Tensor | None:
        """One remote trace that runs `reducer` (scan's shippable dispatch over the streaming probes) on the server
        as the model runs, and brings back only its state: per-head reductions, O(layers x heads x bins / pairs),
        never a pattern or an activation. Patterns are computed chunk-wise from the q/k the model hands its attention
        function (`LayerCapture` from Q/K), so the model keeps its own (SDPA) attention.

        The body uses envoys, plain data, `nnsight.save` and posprobe's reducers, which nnsight ships by value;
        `remote="local"` (nnsight's LocalSimulationBackend) serialises the request, deserialises it with posprobe's
        modules hidden as on a server, and runs it. `reducer` provides `shipped()` (a context in which it carries no
        local-only objects), `state()` and `adopt(state)`.
        """
        nnsight = _nnsight()
        nnsight.register("posprobe")  # the server has no posprobe: its reducers ship by value (source)
        read = {t for t in taps if t not in (Tap.PATTERN, Tap.SCORES)}
        if taps & {Tap.PATTERN, Tap.SCORES}:
            read |= {Tap.Q, Tap.K}
        names = {tap.value for tap in read}
        info, lm = self.info, self.lm
        blocks = _envoy(lm, self.paths.layers)
        attention_name, rotary_op, attention_op = self.paths.attention, _ROTARY_OP, _ATTENTION_OP
        plan = [(layer_info.has_rope and bool(read & _PRE_TAPS), bool(read & _QK_TAPS) or bool(read & _PRE_TAPS))
                for layer_info in info.layers]
        position_ids = kwargs["position_ids"]
        kwargs = {**kwargs, "remote": self.remote}
        logits = None
        with reducer.shipped():
            with lm.trace(input_ids, **kwargs):
                for layer, (read_rotary, read_qk) in enumerate(plan):
                    block = blocks[layer]
                    attn = getattr(block, attention_name)
                    source = attn.source if (read_rotary or read_qk) else None
                    cap = LayerCapture(layer=layer, info=info.layers[layer], model=info, position_ids=position_ids)
                    cap.extras["attn_scale"] = info.attn_scale
                    if "resid_pre" in names:
                        cap.resid_pre = block.input
                    if "attn_in" in names:
                        cap.attn_in = attn.input
                    if read_rotary:
                        rotary_inputs = getattr(source, rotary_op).inputs[0]
                        cap.q_pre, cap.k_pre = rotary_inputs[0], rotary_inputs[1]
                    if read_qk:
                        attention_args = getattr(source, attention_op).inputs[0]
                        cap.q, cap.k = attention_args[1], attention_args[2]
                        if not info.layers[layer].has_rope:
                            cap.q_pre, cap.k_pre = cap.q, cap.k
                    if "attn_out" in names:
                        cap.attn_out = attn.output[0]
                    if "resid_post" in names:
                        block_output = block.output
                        cap.resid_post = block_output[0] if isinstance(block_output, tuple) else block_output
                    reducer(cap)
                returned = nnsight.save(reducer.state())
                if logit_positions is not None:
                    logits = nnsight.save(lm.output.logits)
        reducer.adopt(returned)
        return logits

    def _capture_from(
        self, layer: int, values: dict[str, Tensor], taps: frozenset[Tap], position_ids: Tensor
    ) -> LayerCapture:
        layer_info = self.info.layers[layer]
        cap = LayerCapture(layer=layer, info=layer_info, model=self.info, position_ids=position_ids)
        cap.extras["attn_scale"] = self.info.attn_scale
        for name in ("resid_pre", "attn_in", "attn_out", "resid_post"):
            setattr(cap, name, values.get(name))
        if taps & _QK_TAPS:
            cap.q, cap.k = values["q"], values["k"]
        if taps & _PRE_TAPS:
            cap.q_pre, cap.k_pre = (values["q_pre"], values["k_pre"]) if layer_info.has_rope else (values["q"],
                                                                                                    values["k"])
        if "pattern" in values:
            cap.extras["pattern"] = values["pattern"]
        return self._finish(cap)

    def close(self) -> None:
        """Nothing persists between passes: the attention implementation is restored after every trace."""
