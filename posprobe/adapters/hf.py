"""The default adapter: plain HF causal LMs, streamed through transformers' AttentionInterface.

Owns the translation of `Tap`s and edits into forward hooks and a registered attention function ("posprobe").
The function records the rotated q/k the model computed and, where a probe only reads, still returns SDPA's
output, so the model's logits are unchanged (METRICS.md conventions: explicit position_ids, causal + window masks
applied by posprobe itself because SDPA's causal path passes no mask). Layers with an `AttentionEdit` are computed
in eager form from the edited probabilities. Everything is installed per pass and removed in `finally`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
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
    attention_probs,
    attention_scores,
    causal_key_mask,
    expand_kv,
)
from posprobe.adapters._wrapping import state_dict_hash
from posprobe.adapters.architectures import get_path, model_info, module_paths
from posprobe.errors import InterventionError, UnsupportedModelError

ATTN_NAME = "posprobe"
_ACTIVE: contextvars.ContextVar[_PassState | None] = contextvars.ContextVar("posprobe_pass", default=None)
_ATTENTION_TAPS = frozenset({Tap.Q, Tap.K, Tap.PATTERN, Tap.SCORES, Tap.Q_PRE, Tap.K_PRE})
_registered = False


def _register_attention() -> None:
    """Register posprobe's attention function with transformers (once per process, on first use)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, _posprobe_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    _registered = True


@dataclass
class _PassState:
    access: HFAccess
    taps: frozenset[Tap]
    on_layer: LayerCallback | None
    position_ids: Tensor
    attention_edits: dict[int, list[AttentionEdit]]
    captures: dict[int, LayerCapture] = field(default_factory=dict)

    def capture(self, layer: int) -> LayerCapture:
        if layer not in self.captures:
            info = self.access.info
            self.captures[layer] = LayerCapture(
                layer=layer, info=info.layers[layer], model=info, position_ids=self.position_ids
            )
        return self.captures[layer]


def _sdpa(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, mask: Any, **kwargs: Any) -> tuple[Tensor, Any]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, mask, **kwargs)


def _posprobe_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Any]:
    state = _ACTIVE.get()
    layer = getattr(module, "layer_idx", None)
    if state is None or layer is None:
        return _sdpa(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                     sliding_window=sliding_window, softcap=softcap, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if state.taps & _ATTENTION_TAPS:
        cap = state.capture(layer)
        cap.q, cap.k = query, key
        cap.extras["attn_scale"] = scale
        if not state.access.info.layers[layer].has_rope:
            cap.q_pre, cap.k_pre = query, key  # no rotation in this layer: pre == post
    edits = state.attention_edits.get(layer)
    if not edits:
        return _sdpa(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                     sliding_window=sliding_window, softcap=softcap, **kwargs)
    return _edited_attention(query, key, value, layer, scale, softcap, sliding_window, edits, state)


def _edited_attention(
    query: Tensor, key: Tensor, value: Tensor, layer: int, scale: float, softcap: float | None,
    window: int | None, edits: list[AttentionEdit], state: _PassState,
) -> tuple[Tensor, None]:
    """Eager attention with edits applied; queries may be a suffix of the keys (KV-cached generation)."""
    n_heads = query.shape[1]
    n_keys = key.shape[2]
    query_index = torch.arange(n_keys - query.shape[2], n_keys)
    k = expand_kv(key, n_heads)
    v = expand_kv(value, n_heads)
    ctx = EditContext(layer=layer, query_index=query_index, n_keys=n_keys, position_ids=state.position_ids)
    scores = attention_scores(query, k, scale, softcap)
    allowed = causal_key_mask(query_index, n_keys, window)
    scores = scores.masked_fill(~allowed, float("-inf"))
    for edit in edits:
        if edit.stage == "scores":
            scores = edit.fn(scores, ctx)
    probs = torch.softmax(scores, dim=-1)
    for edit in edits:
        if edit.stage == "probs":
            probs = edit.fn(probs, ctx)
    out = torch.matmul(probs.to(v.dtype), v)
    return out.transpose(1, 2).contiguous(), None


class HFAccess(ModelAccess):
    """ModelAccess over an HF `PreTrainedModel` causal LM (the default backend)."""

    backend = "hf"

    def __init__(self, model: nn.Module, tokenizer: Any, name: str | None = None) -> None:
        super().__init__()
        if not hasattr(model, "config") or not hasattr(model, "base_model_prefix"):
            raise UnsupportedModelError(
                f"Expected a transformers causal LM (PreTrainedModel), got {type(model).__name__}. Load one with "
                f"AutoModelForCausalLM.from_pretrained(...) or pass a name/path to posprobe.load_model."
            )
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.paths = module_paths(model.config)
        self.info = model_info(model, name or getattr(model, "name_or_path", "") or type(model).__name__, tokenizer)
        self._hash: str | None = None

    # --- structure ----------------------------------------------------------------------------------------------
    @property
    def blocks(self) -> nn.ModuleList:
        return get_path(self.model, self.paths.layers)

    def attention_module(self, layer: int) -> nn.Module:
        return getattr(self.blocks[layer], self.paths.attention)

    @property
    def base(self) -> nn.Module:
        return getattr(self.model, self.model.base_model_prefix)

    def weights_hash(self) -> str:
        """`_wrapping.state_dict_hash` of the state dict (zero-copy per tensor); memoised.

        Memory: reading every weight pages in any mmapped weights a forward pass has not
        touched (on Gemma 3 270M loaded from the safetensors cache, ~640 MB of the embedding / LM head when no logits
        were computed yet): file-backed, reclaimable pages, but they show in the process high-water mark.
        """
        if self._hash is None:
            self._hash = state_dict_hash(self.model.state_dict())
        return self._hash

    # --- one pass ----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _session(
        self, position_ids: Tensor, taps: frozenset[Tap], on_layer: LayerCallback | None, edits: Sequence[Edit]
    ) -> Iterator[_PassState]:
        attention_edits: dict[int, list[AttentionEdit]] = {}
        for edit in edits:
            if isinstance(edit, AttentionEdit):
                attention_edits.setdefault(edit.layer, []).append(edit)
        state = _PassState(self, taps, on_layer, position_ids, attention_edits)
        handles: list[Any] = []
        original_impl = self.model.config._attn_implementation
        swap = bool(taps & _ATTENTION_TAPS) or bool(attention_edits)
        token = _ACTIVE.set(state)
        try:
            if swap:
                _register_attention()
                self.model.set_attn_implementation(ATTN_NAME)
            handles += self._install_tap_hooks(state)
            handles += self._install_edit_hooks(edits)
            yield state
        finally:
            for handle in handles:
                handle.remove()
            if swap:
                self.model.set_attn_implementation(original_impl)
            _ACTIVE.reset(token)

    def _install_tap_hooks(self, state: _PassState) -> list[Any]:
        taps, handles = state.taps, []
        if not taps and state.on_layer is None:
            return handles
        info = self.info

        for layer, block in enumerate(self.blocks):
            attn = getattr(block, self.paths.attention)

            def block_pre(module: nn.Module, args: tuple, kwargs: dict, layer: int = layer) -> None:
                cap = state.capture(layer)
                if Tap.RESID_PRE in taps:
                    cap.resid_pre = args[0] if args else kwargs["hidden_states"]

            def attn_pre(module: nn.Module, args: tuple, kwargs: dict, layer: int = layer) -> None:
                if Tap.ATTN_IN in taps:
                    state.capture(layer).attn_in = args[0] if args else kwargs["hidden_states"]

            def attn_post(module: nn.Module, args: tuple, kwargs: dict, output: Any, layer: int = layer) -> None:
                if Tap.ATTN_OUT in taps:
                    state.capture(layer).attn_out = output[0] if isinstance(output, tuple) else output

            def block_post(module: nn.Module, args: tuple, kwargs: dict, output: Any, layer: int = layer) -> None:
                cap = state.capture(layer)
                del state.captures[layer]
                if Tap.RESID_POST in taps:
                    cap.resid_post = output[0] if isinstance(output, tuple) else output
                if state.on_layer is not None:
                    state.on_layer(cap)

            handles.append(block.register_forward_pre_hook(block_pre, with_kwargs=True))
            handles.append(attn.register_forward_pre_hook(attn_pre, with_kwargs=True))
            handles.append(attn.register_forward_hook(attn_post, with_kwargs=True))
            handles.append(block.register_forward_hook(block_post, with_kwargs=True))

            if {Tap.Q_PRE, Tap.K_PRE} & taps and info.layers[layer].has_rope:
                handles += self._pre_rotary_hooks(state, layer, attn)
        return handles

    def _pre_rotary_hooks(self, state: _PassState, layer: int, attn: nn.Module) -> list[Any]:
        """Capture q/k right before the rotation: after q_norm/k_norm where the model has them, else the projection."""
        info, paths = self.info, self.paths
        handles = []
        for which, norm_name, proj_name in (("q", paths.q_norm, paths.q_proj), ("k", paths.k_norm, paths.k_proj)):
            name = norm_name or proj_name
            if name is None:
                continue
            is_norm = norm_name is not None

            def hook(module: nn.Module, args: tuple, output: Tensor, which: str = which, is_norm: bool = is_norm) -> None:
                x = output
                if not is_norm:  # projection output [b, n, heads * d] -> [b, heads, n, d]
                    x = x.view(*x.shape[:2], -1, info.head_dim).transpose(1, 2)
                setattr(state.capture(layer), f"{which}_pre", x)

            handles.append(getattr(attn, name).register_forward_hook(hook))
        return handles

    def _install_edit_hooks(self, edits: Sequence[Edit]) -> list[Any]:
        handles = []
        for edit in edits:
            if isinstance(edit, ProjectionInputEdit):
                handles += self._projection_edit(edit)
            elif isinstance(edit, RotaryEdit):
                handles.append(self._rotary_edit(edit))
        return handles

    def _projection_edit(self, edit: ProjectionInputEdit) -> list[Any]:
        if self.paths.q_proj is None:
            raise InterventionError(
                f"{self.info.architecture} has a fused QKV projection; ProjectionInputEdit needs separate "
                f"q_proj/k_proj modules (Llama, Gemma, Qwen, Mistral families)."
            )
        attn = self.attention_module(edit.layer)
        dims = torch.tensor(edit.dims, dtype=torch.long)
        handles = []

        def scaled(x: Tensor, last_only: bool) -> Tensor:
            x = x.clone()
            if last_only:
                x[:, -1:, dims] *= edit.factor
            else:
                x[..., dims] *= edit.factor
            return x

        if edit.keys:
            handles.append(getattr(attn, self.paths.k_proj).register_forward_pre_hook(
                lambda m, args: (scaled(args[0], False), *args[1:])))
        if edit.queries != "none":
            last = edit.queries == "last"
            handles.append(getattr(attn, self.paths.q_proj).register_forward_pre_hook(
                lambda m, args: (scaled(args[0], last), *args[1:])))
        return handles

    def _rotary_edit(self, edit: RotaryEdit) -> Any:
        if not self.info.layers[edit.layer].has_rope:
            raise InterventionError(f"Layer {edit.layer} of {self.info.name} has no RoPE to disable.")

        def identity_rotation(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            cos, sin = kwargs["position_embeddings"]
            kwargs = dict(kwargs)
            kwargs["position_embeddings"] = (torch.ones_like(cos), torch.zeros_like(sin))
            return args, kwargs

        return self.attention_module(edit.layer).register_forward_pre_hook(identity_rotation, with_kwargs=True)

    def _forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        taps: frozenset[Tap],
        on_layer: LayerCallback | None,
        logit_positions: Tensor | None,
        edits: Sequence[Edit],
    ) -> Tensor | None:
        with self._session(position_ids, taps, on_layer, edits):
            if logit_positions is None:
                self.base(input_ids=input_ids, position_ids=position_ids, use_cache=False)
                return None
            out = self.model(
                input_ids=input_ids, position_ids=position_ids, use_cache=False, logits_to_keep=logit_positions
            )
            return out.logits

    def greedy(
        self, input_ids: Any, max_new_tokens: int, *, stop_ids: Sequence[int] = (), edits: Sequence[Edit] = ()
    ) -> Tensor:
        """KV-cached greedy decoding; edits apply at every step (queries are a suffix of the keys)."""
        from transformers import DynamicCache

        ids = self._check_ids(input_ids)
        n = ids.shape[1]
        all_edits = [*self._edits, *edits]
        self._validate_edits(all_edits)
        if any(isinstance(e, ProjectionInputEdit) and e.queries == "last" for e in all_edits):
            return self._greedy_last_query(ids, max_new_tokens, stop_ids, all_edits)
        cache = DynamicCache(config=self.model.config)
        new: list[Tensor] = []
        step_ids, pos = ids, torch.arange(n)[None].expand(ids.shape[0], -1)
        stop = torch.tensor(list(stop_ids), dtype=torch.long)
        with torch.inference_mode(), self._session(pos, frozenset(), None, all_edits):
            for _ in range(max_new_tokens):
                out = self.model(
                    input_ids=step_ids, position_ids=pos, past_key_values=cache, use_cache=True, logits_to_keep=1
                )
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                new.append(nxt)
                if len(stop) and bool(torch.isin(nxt, stop).all()):
                    break
                step_ids, pos = nxt, pos[:, -1:] + 1
        return torch.cat(new, dim=1)

    def _greedy_last_query(
        self, ids: Tensor, max_new_tokens: int, stop_ids: Sequence[int], edits: Sequence[Edit]
    ) -> Tensor:
        """Greedy decoding under edits that scale only the *last* query (Yu et al.), equal to recomputing the whole
        sequence every step but KV-cached: "last" is defined on the whole sequence, so a token's states depend on
        whether it is the last one. The cache holds every token but the last as a non-last token (query unscaled,
        keys scaled); each step runs the last token twice on top of it, once as the last token (on a copy of the
        cache: its logits choose the next token) and once as a non-last token (appended for the later steps).
        Two one-token passes per step instead of a pass over the whole sequence."""
        import copy

        from transformers import DynamicCache

        settle = [dataclasses.replace(e, queries="none") if isinstance(e, ProjectionInputEdit) and e.queries == "last"
                  else e for e in edits]
        b, n = ids.shape
        cache = DynamicCache(config=self.model.config)
        stop = torch.tensor(list(stop_ids), dtype=torch.long)
        new: list[Tensor] = []

        def step(tokens: Tensor, start: int, chosen: Sequence[Edit], kv: Any, logits: bool) -> Tensor | None:
            pos = torch.arange(start, start + tokens.shape[1])[None].expand(b, -1)
            with self._session(pos, frozenset(), None, chosen):
                if not logits:  # the decoder alone: no lm_head over the vocabulary
                    self.base(input_ids=tokens, position_ids=pos, past_key_values=kv, use_cache=True)
                    return None
                out = self.model(input_ids=tokens, position_ids=pos, past_key_values=kv, use_cache=True,
                                 logits_to_keep=1)
            return out.logits[:, -1]

        last = ids[:, -1:]
        with torch.inference_mode():
            if n > 1:
                step(ids[:, :-1], 0, settle, cache, logits=False)
            for k in range(max_new_tokens):
                position = n - 1 + k
                nxt = step(last, position, edits, copy.deepcopy(cache), logits=True).argmax(-1, keepdim=True)
                new.append(nxt)
                if (len(stop) and bool(torch.isin(nxt, stop).all())) or k == max_new_tokens - 1:
                    break
                step(last, position, settle, cache, logits=False)
                last = nxt
        return torch.cat(new, dim=1)

    def close(self) -> None:
        """Nothing persists between passes: hooks and the attention implementation are restored after each one."""
