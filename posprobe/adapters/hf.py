"""The default adapter: plain HF causal LMs of any decoder family, streamed through transformers' AttentionInterface.

Owns the translation of `Tap`s and edits into forward hooks, a registered attention function ("posprobe") and
short-lived wrappers of the modeling module's rotary function. Nothing here is per family: blocks, attention modules
and positional facts are found by `adapters/architectures.py`, whose few declarative exceptions say why.

The attention function receives what every transformers 5 family hands its attention kernel: rotated q/k, v, the
mask (None on SDPA's plain causal path, a boolean or additive tensor otherwise: sliding windows, attention chunks,
biases), `scaling`, `sliding_window`, `softcap` and learned sinks (`s_aux`). It records them as one `AttentionCall`
and gives probes patterns computed chunk-wise from exactly those inputs (`AttentionCall.probs`), then returns the
model's own output: SDPA where the model was on SDPA, the modeling module's eager function where it was eager or
where SDPA cannot run the model's attention (softcap, sinks), so logits are unchanged. Layers with an
`AttentionEdit` are computed in eager form from the edited probabilities.

Families that compute attention inside their module (Falcon, BLOOM: `FamilyException.outside_interface`) run under
eager attention for the pass; their patterns are the attention weights the module returns, and their rotated q/k
come from the rotary function. Everything is installed per pass and removed in `finally`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

from posprobe.access import (
    ROTARY_OVERRIDES,
    AttentionEdit,
    Edit,
    EditContext,
    LayerCallback,
    LayerCapture,
    ModelAccess,
    ProjectionInputEdit,
    RotaryEdit,
    Tap,
    causal_key_mask,
    expand_kv,
    grouped_matmul,
    query_key_range,
    widen_band,
)
from posprobe.adapters._compat import cache_kwargs
from posprobe.adapters._wrapping import state_dict_hash
from posprobe.adapters.architectures import (
    exception_for,
    get_path,
    model_info,
    module_paths,
)
from posprobe.devices import check_prefill_chunk, prefill_chunk_size
from posprobe.errors import InterventionError, UnsupportedModelError

ATTN_NAME = "posprobe"  # output through SDPA (masks in SDPA's format)
ATTN_EAGER_NAME = "posprobe_eager"  # output through the model's eager function (masks in eager's additive format)
_ACTIVE: contextvars.ContextVar[_PassState | None] = contextvars.ContextVar("posprobe_pass", default=None)
_ATTENTION_TAPS = frozenset({Tap.Q, Tap.K, Tap.PATTERN, Tap.SCORES, Tap.Q_PRE, Tap.K_PRE})
_ROTARY_FUNCTIONS = ("apply_rotary_pos_emb", "apply_rotary_emb", "apply_rotary_pos_emb_interleave",
                     "_apply_rotary_emb")  # module-level rotary functions of transformers' modeling files
_registered = False
_LENGTH_DEPENDENT_ROPE = frozenset({"dynamic", "longrope"})  # rope types whose frequencies follow the pass length


def _register_attention() -> None:
    """Register posprobe's attention functions with transformers (once per process, on first use)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    AttentionInterface.register(ATTN_NAME, _posprobe_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    AttentionInterface.register(ATTN_EAGER_NAME, _posprobe_attention)
    AttentionMaskInterface.register(ATTN_EAGER_NAME, eager_mask)
    _registered = True


def _mask_allows(mask: Tensor) -> Tensor:
    """Where a model's attention mask lets a query see a key: a boolean mask as it is; an additive one wherever it
    is not the blocking value (eager masks write finfo(dtype).min where a key is not allowed)."""
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


@dataclass
class AttentionCall:
    """One call of a layer's attention kernel, as the model made it: everything its logits depend on.

    q [b, H, nq, d] and k [b, G, nk, d] are post-rotary; queries are the last nq of the nk keys (nq = nk in a full
    pass). `mask` is the model's own mask (None = plain causal, plus `sliding_window` when given), boolean (True =
    allowed) or additive, [b or 1, 1 or H, nq, nk]. `sinks` [H] are learned sink logits that join the softmax.
    """

    q: Tensor
    k: Tensor
    mask: Tensor | None
    scale: float
    softcap: float | None
    sliding_window: int | None
    sinks: Tensor | None

    @property
    def n_keys(self) -> int:
        return int(self.k.shape[2])

    @property
    def q_offset(self) -> int:
        return self.n_keys - int(self.q.shape[2])

    def key_range(self, query_index: Tensor) -> tuple[int, int]:
        """Keys [start, stop) these queries (indices into the keys) may see: causal + window (the mask, where there
        is one, may exclude more: attention chunks, padding)."""
        return query_key_range(query_index, self.sliding_window)

    def masked_scores(self, query_index: Tensor, start: int, stop: int) -> Tensor:
        """Softcapped logits [b, H, cq, stop - start] in float32 or wider; disallowed keys are -inf, and an
        additive mask (ALiBi-style biases included) is added as the model adds it."""
        q = self.q[:, :, query_index - self.q_offset]
        k = self.k[:, :, start:stop]
        dtype = torch.promote_types(q.dtype, torch.float32)
        s = grouped_matmul(q.to(dtype), k.to(dtype).transpose(-1, -2)).mul_(self.scale)  # GQA without expand_kv
        if self.softcap is not None:
            s = torch.tanh(s / self.softcap) * self.softcap
        if self.mask is None:
            allowed = causal_key_mask(query_index, stop, self.sliding_window, key_start=start)
            return s.masked_fill_(~allowed, float("-inf"))
        m = self.mask[..., query_index - self.q_offset, start:stop]
        if m.dtype == torch.bool:
            return s.masked_fill_(~m, float("-inf"))
        return torch.where(~_mask_allows(m), float("-inf"), s + m.to(dtype))

    def blocks_keys_from(self, query_index: Tensor, stop: int) -> bool:
        """Whether no query of `query_index` may see a key at `stop` or later (True without a mask: causal)."""
        if self.mask is None or stop >= self.n_keys:
            return True
        return not bool(_mask_allows(self.mask[..., query_index - self.q_offset, stop:]).any())

    def softmax(self, scores: Tensor) -> Tensor:
        """Probabilities over the keys; with learned sinks, the sink column joins the softmax and is dropped (rows
        then sum to 1 - sink mass), as the model's eager attention does."""
        if self.sinks is None:
            return torch.softmax(scores, dim=-1)
        sink = self.sinks.to(scores.dtype).reshape(1, -1, 1, 1).expand(*scores.shape[:3], 1)
        combined = torch.cat((scores, sink), dim=-1)
        combined = combined - combined.max(dim=-1, keepdim=True).values
        return torch.softmax(combined, dim=-1)[..., :-1]

    def band(self, query_index: Tensor) -> tuple[Tensor, int]:
        """(probs [b, H, cq, stop - start], start): the given queries' probabilities over the keys [start, stop)
        they may see (`key_range`); every other key is exactly 0 in `probs`."""
        start, stop = self.key_range(query_index)
        return self.softmax(self.masked_scores(query_index, start, stop)), start

    def probs(self, query_index: Tensor) -> Tensor:
        """Attention probabilities [b, H, cq, nk] of the given queries (key indices); masked entries exactly 0."""
        return widen_band(*self.band(query_index), self.n_keys)

    def scores(self, query_index: Tensor) -> Tensor:
        """Scaled, softcapped, unmasked logits [b, H, cq, nk] (what `LayerCapture.scores` promises)."""
        q = self.q[:, :, query_index - self.q_offset]
        s = grouped_matmul(q, self.k.transpose(-1, -2)) * self.scale
        return torch.tanh(s / self.softcap) * self.softcap if self.softcap is not None else s


@dataclass
class _PassState:
    access: HFAccess
    taps: frozenset[Tap]
    on_layer: LayerCallback | None
    position_ids: Tensor
    attention_edits: dict[int, list[AttentionEdit]]
    rotary_off: frozenset[int] = frozenset()  # layers whose rotation is replaced by the identity (RotaryEdit)
    output_eager: bool = False
    captures: dict[int, LayerCapture] = field(default_factory=dict)
    current_layer: int | None = None  # the layer whose attention module is running
    rotary_depth: int = 0

    def capture(self, layer: int) -> LayerCapture:
        if layer not in self.captures:
            info = self.access.info
            self.captures[layer] = LayerCapture(
                layer=layer, info=info.layers[layer], model=info, position_ids=self.position_ids
            )
        return self.captures[layer]


def _eager_function(module: nn.Module) -> Any:
    """The eager attention function of the module's own modeling file (softcap and sinks included)."""
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise UnsupportedModelError(
            f"{type(module).__name__} needs eager attention (softcap or learned sinks cannot run in SDPA), but its "
            f"modeling module {type(module).__module__} has no eager_attention_forward. Load the model with "
            f"attn_implementation='eager' and report the family to posprobe."
        )
    return fn


def _additive_mask(mask: Tensor | None, query: Tensor, key: Tensor, window: int | None) -> Tensor:
    """The eager (additive float) form of an SDPA mask: None = causal (+ window), boolean True = allowed."""
    if mask is not None and mask.dtype != torch.bool:
        return mask
    if mask is None:
        n_keys = key.shape[2]
        mask = causal_key_mask(torch.arange(n_keys - query.shape[2], n_keys, device=query.device), n_keys,
                               window)[None, None]
    return torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
        ~mask, torch.finfo(query.dtype).min)


class _OneKeyHeadPerQueryHead:
    """The attention module as its kernel sees it after a "qk" edit gave every query head its own key / value head
    (Ms-PoE rotates each head's keys differently): `num_key_value_groups` 1, so the kernel does not repeat them
    again; every other attribute is the module's."""

    num_key_value_groups = 1

    def __init__(self, module: nn.Module) -> None:
        self._module = module

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


def _model_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None,
                     kwargs: dict[str, Any], eager: bool) -> tuple[Tensor, Any]:
    """The model's own attention output: SDPA, or the modeling module's eager function when the model ran eager
    or when SDPA cannot compute this attention (softcap, learned sinks)."""
    kernel_module: Any = module
    if key.shape[1] == query.shape[1] and getattr(module, "num_key_value_groups", 1) > 1:  # a "qk" edit's keys
        value = expand_kv(value, query.shape[1])
        kernel_module = _OneKeyHeadPerQueryHead(module)
    if eager or kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        if not eager:  # SDPA-format mask handed to an eager function
            mask = _additive_mask(mask, query, key, kwargs.get("sliding_window"))
        return _eager_function(module)(kernel_module, query, key, value, mask, **kwargs)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(kernel_module, query, key, value, mask, **kwargs)


def _edit_query_key(query: Tensor, key: Tensor, layer: int, edits: list[AttentionEdit], state: _PassState,
                    kwargs: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """The layer's q/k after its "qk"-stage edits, in order (queries are the last nq of the nk keys)."""
    n_keys = int(key.shape[2])
    scaling = kwargs.get("scaling")
    ctx = EditContext(layer=layer, query_index=torch.arange(n_keys - query.shape[2], n_keys, device=query.device),
                      n_keys=n_keys, position_ids=state.position_ids, query=query, key=key,
                      scale=float(scaling if scaling is not None else query.shape[-1] ** -0.5),
                      softcap=kwargs.get("softcap"))
    for edit in edits:
        if edit.stage == "qk":
            query, key = edit.fn((query, key), ctx)
            ctx = dataclasses.replace(ctx, query=query, key=key)
    return query, key


def _posprobe_attention(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, **kwargs: Any
) -> tuple[Tensor, Any]:
    state = _ACTIVE.get()
    layer = getattr(module, "layer_idx", None)
    eager = state.output_eager if state is not None else (attention_mask is not None
                                                          and attention_mask.dtype != torch.bool)
    if state is None or layer is None:
        return _model_attention(module, query, key, value, attention_mask, kwargs, eager)
    edits = state.attention_edits.get(layer) or []
    rotated = query, key  # what the rotary function returned (the pre-rotary capture matches these heads)
    if any(edit.stage == "qk" for edit in edits):
        query, key = _edit_query_key(query, key, layer, edits, state, kwargs)
        edits = [edit for edit in edits if edit.stage != "qk"]
    scaling = kwargs.get("scaling")
    call = AttentionCall(
        q=query, k=key, mask=attention_mask, scale=float(scaling if scaling is not None else query.shape[-1] ** -0.5),
        softcap=kwargs.get("softcap"), sliding_window=kwargs.get("sliding_window"), sinks=kwargs.get("s_aux"))
    if state.taps & _ATTENTION_TAPS:
        cap = state.capture(layer)
        cap.q, cap.k = query, key
        cap.extras["attn_scale"] = call.scale
        cap.extras["attention_call"] = call
        cap.pattern_source = call.probs
        cap.band_source = (cap.pattern_source, call.band)
        _settle_pre_rotary(cap, *rotated)
    if not edits:
        return _model_attention(module, query, key, value, attention_mask, kwargs, eager)
    return _edited_attention(call, value, layer, edits, state)


def _settle_pre_rotary(cap: LayerCapture, query: Tensor, key: Tensor) -> None:
    """Pre-rotary q/k in the [b, heads, n, d] layout of the post-rotary ones (the rotary function's inputs, which
    some families hand over as [b, n, heads, d] or as the rotated part only); pre == post on layers without RoPE."""
    if not cap.info.has_rope:
        cap.q_pre, cap.k_pre = query, key
        return
    raw = cap.extras.pop("rotary_inputs", None)
    if raw is None:
        return
    cap.q_pre, cap.k_pre = (_as_layout(x, post, cap.info) for x, post in zip(raw, (query, key)))


def _as_layout(x: Tensor, post: Tensor, info: Any) -> Tensor | None:
    if x.dim() != 4:
        return None
    candidates = [c for c in (x, x.transpose(1, 2)) if c.shape[:3] == post.shape[:3]]
    if not candidates:
        return None
    if len(candidates) == 2 and x.shape[1] == x.shape[2]:  # heads == tokens: the rotation preserves chunk norms
        from posprobe.probes.rope_chunks import chunk_norms

        full = [_fill(c, post, info) for c in candidates]
        errs = [float((chunk_norms(f, info) - chunk_norms(post, info)).abs().max()) for f in full]
        return full[errs.index(min(errs))]
    return _fill(candidates[0], post, info)


def _deinterleave(x: Tensor) -> Tensor:
    """transformers' `apply_rotary_pos_emb_interleave` reorder: pairs (2k, 2k+1) become (k, k + r/2)."""
    *lead, r = x.shape
    return x.view(*lead, r // 2, 2).transpose(-1, -2).reshape(*lead, r)


def _fill(x: Tensor, post: Tensor, info: Any) -> Tensor:
    """Put the rotated part `x` (pre-rotation) into the non-rotated dims of the post-rotary head."""
    if x.shape[-1] == post.shape[-1]:
        return x
    full = post.clone()
    full[..., info.rotary_offset: info.rotary_offset + x.shape[-1]] = x
    return full


def _edited_attention(
    call: AttentionCall, value: Tensor, layer: int, edits: list[AttentionEdit], state: _PassState
) -> tuple[Tensor, None]:
    """Eager attention with edits applied, from the same masked logits the statistics use (mask, bias, window,
    softcap, sinks as the model has them); queries may be a suffix of the keys (KV-cached generation)."""
    n_keys = call.n_keys
    query_index = torch.arange(call.q_offset, n_keys, device=call.q.device)
    v = expand_kv(value, call.q.shape[1])
    ctx = EditContext(layer=layer, query_index=query_index, n_keys=n_keys, position_ids=state.position_ids,
                      query=call.q, key=call.k, scale=call.scale, softcap=call.softcap)

    def prefix_probs(index: Tensor) -> tuple[Tensor, int]:
        """The edited probabilities of queries `index` over keys [0, stop) and stop: with `prefix`, only the keys
        up to the last of these queries (causal: the rest are exactly 0), computed as a call over that prefix
        (what a chunk of a chunked prefill is); else every key."""
        stop = min(n_keys, int(index.max()) + 1) if prefix else n_keys
        if stop < n_keys and not call.blocks_keys_from(index, stop):
            stop = n_keys  # a mask that lets a query see later keys (prefix-LM): the whole row
        if stop == n_keys:
            at = ctx if index is query_index else dataclasses.replace(ctx, query_index=index)
        else:
            pos = ctx.position_ids
            at = dataclasses.replace(ctx, query_index=index, n_keys=stop, query=call.q[:, :, :stop - call.q_offset],
                                     key=call.k[:, :, :stop],
                                     position_ids=pos[..., :stop] if pos is not None and pos.shape[-1] == n_keys
                                     else None)
        scores = call.masked_scores(index, 0, stop)
        for edit in edits:
            if edit.stage == "scores":
                scores = edit.fn(scores, at)
        probs = call.softmax(scores)
        for edit in edits:
            if edit.stage == "probs":
                probs = edit.fn(probs, at)
        return probs, stop

    def edited_probs(index: Tensor) -> Tensor:
        probs, stop = prefix_probs(index)
        return probs if stop == n_keys else torch.nn.functional.pad(probs, (0, n_keys - stop))

    def chunk_output(index: Tensor) -> Tensor:
        probs, stop = prefix_probs(index)
        return torch.matmul(probs.to(v.dtype), v[:, :, :stop])

    rows = _query_chunk(edits, call)
    # Query chunks may stop at their last query's key when every edit gives a chunked prefill's values (the
    # `prefill_chunks` contract: queries a suffix of the keys): O(rows x stop), about half the work of full rows.
    prefix = rows is not None and all(getattr(edit.fn, "prefill_chunks", True) for edit in edits)
    if rows is not None and rows < len(query_index):  # every edit works on query chunks: O(rows x n) memory
        out = torch.cat([chunk_output(index) for index in query_index.split(rows)], dim=2)
        if state.taps & _ATTENTION_TAPS and call.q_offset == 0:  # recomputed for the queries a probe reads
            state.capture(layer).pattern_source = edited_probs
        return out.transpose(1, 2).contiguous(), None
    probs = edited_probs(query_index)
    if state.taps & _ATTENTION_TAPS and call.q_offset == 0:  # probes read the pattern the edited layer used
        state.capture(layer).pattern_source = lambda index, probs=probs: probs[:, :, index]
    out = torch.matmul(probs.to(v.dtype), v)
    return out.transpose(1, 2).contiguous(), None


def _query_chunk(edits: list[AttentionEdit], call: AttentionCall) -> int | None:
    """Query rows per chunk when every edit's fn declares `query_chunk(batch, heads, n_keys) -> rows` (it gives
    the same values on any subset of the queries, with `EditContext.query_index` naming them); else None."""
    sizes = [size for edit in edits if (size := getattr(edit.fn, "query_chunk", None)) is not None]
    if not sizes or len(sizes) < len(edits):  # no edits, or one that needs every query at once
        return None
    b, heads = int(call.q.shape[0]), int(call.q.shape[1])
    return max(1, min(int(size(b, heads, call.n_keys)) for size in sizes))


class _Restore:
    """Undo a module-level attribute swap (a `.remove()` like a hook handle)."""

    def __init__(self, owner: Any, name: str, original: Any) -> None:
        self.owner, self.name, self.original = owner, name, original

    def remove(self) -> None:
        setattr(self.owner, self.name, self.original)


class HFAccess(ModelAccess):
    """ModelAccess over an HF `PreTrainedModel` causal LM (the default backend), any decoder family."""

    backend = "hf"
    supports_attention_mask = True  # padded batches: the mask reaches the attention function (AttentionCall.mask)
    attention_edit_stages = ("scores", "probs", "qk")  # "qk": _edit_query_key, before the model's own kernel

    def __init__(self, model: nn.Module, tokenizer: Any, name: str | None = None) -> None:
        super().__init__()
        if not hasattr(model, "config") or not hasattr(model, "base_model_prefix"):
            raise UnsupportedModelError(
                f"Expected a transformers causal LM (PreTrainedModel), got {type(model).__name__}. Load one with "
                f"AutoModelForCausalLM.from_pretrained(...) or pass a name/path to posprobe.load_model."
            )
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.paths = module_paths(model)
        self.exception = exception_for(model.config)
        self.info = model_info(model, name or getattr(model, "name_or_path", "") or type(model).__name__, tokenizer,
                               self.paths)
        self._hash: str | None = None

    # --- structure ----------------------------------------------------------------------------------------------
    @property
    def blocks(self) -> nn.ModuleList:
        return get_path(self.model, self.paths.layers)

    def attention_module(self, layer: int) -> nn.Module:
        return get_path(self.blocks[layer], self.paths.attention)

    @property
    def base(self) -> nn.Module:
        """The decoder without the LM head (`base_model_prefix`; Llama 4's text model names it `model` instead)."""
        base = getattr(self.model, str(self.model.base_model_prefix), None)
        if base is None:
            blocks = self.blocks
            base = next(child for child in self.model.children()
                        if any(m is blocks for m in child.modules()))
        return base

    @property
    def _exception_reason(self) -> str:
        return self.exception.reason if self.exception is not None else ""

    @property
    def outside_interface(self) -> bool:
        """Whether attention runs inside the module instead of through the AttentionInterface (Falcon, BLOOM)."""
        return bool(self.exception and self.exception.outside_interface)

    def weights_hash(self) -> str:
        """`_wrapping.state_dict_hash` of the state dict (zero-copy per tensor); memoised.

        Memory: reading every weight pages in any mmapped weights a forward pass has not
        touched (on Gemma 3 270M loaded from the safetensors cache, ~640 MB of the embedding / LM head when no logits
        were computed yet): file-backed, reclaimable pages, but they show in the process high-water mark.
        """
        if self._hash is None:
            from posprobe.devices import hashable_state_dict

            self._hash = state_dict_hash(hashable_state_dict(self.model))  # offloaded (accelerate) weights too
        return self._hash

    # --- one pass ----------------------------------------------------------------------------------------------
    def _check_edits_apply(self, edits: Sequence[Edit]) -> None:
        for edit in edits:
            if isinstance(edit, AttentionEdit) and self.outside_interface:
                raise InterventionError(
                    f"{self.info.architecture} computes attention inside its module ({self._exception_reason}); "
                    f"posprobe cannot replace its attention probabilities, so AttentionEdit (mask_heads, "
                    f"found_in_the_middle) does not apply. Read-only probes work on this family."
                )
            if isinstance(edit, ProjectionInputEdit):
                self._projection_paths()
            if isinstance(edit, RotaryEdit) and not self.info.layers[edit.layer].has_rope:
                raise InterventionError(f"Layer {edit.layer} of {self.info.name} has no RoPE to disable "
                                        f"({self.info.layers[edit.layer].positional.value}).")

    @contextlib.contextmanager
    def _session(
        self, position_ids: Tensor, taps: frozenset[Tap], on_layer: LayerCallback | None, edits: Sequence[Edit]
    ) -> Iterator[_PassState]:
        self._check_edits_apply(edits)
        attention_edits: dict[int, list[AttentionEdit]] = {}
        for edit in edits:
            if isinstance(edit, AttentionEdit):
                attention_edits.setdefault(edit.layer, []).append(edit)
        rotary_off = frozenset(e.layer for e in edits if isinstance(e, RotaryEdit))
        original_impl = cast(Any, self.model.config)._attn_implementation
        state = _PassState(self, taps, on_layer, position_ids, attention_edits, rotary_off,
                           output_eager=original_impl == "eager" or not getattr(self.model, "_supports_sdpa", True))
        handles: list[Any] = []
        reads = bool(taps & _ATTENTION_TAPS)
        swap = reads or bool(attention_edits)
        target = "eager" if self.outside_interface else (ATTN_EAGER_NAME if state.output_eager else ATTN_NAME)
        token = _ACTIVE.set(state)
        try:
            if swap and target != original_impl:
                _register_attention()
                self._set_attention(target)
            handles += self._install_tap_hooks(state)
            if rotary_off or (taps & {Tap.Q_PRE, Tap.K_PRE}) or (self.outside_interface and reads):
                handles += self._install_rotary_wrappers(state)
            handles += self._install_edit_hooks(edits)
            yield state
        finally:
            for handle in reversed(handles):
                handle.remove()
            if cast(Any, self.model.config)._attn_implementation != original_impl:
                self._set_attention(original_impl)
            _ACTIVE.reset(token)

    def _set_attention(self, name: str) -> None:
        """Switch the attention implementation. Families outside the interface (Falcon) refuse
        `set_attn_implementation` and read `config._attn_implementation` at run time: set it directly."""
        if self.outside_interface:
            for module in self.model.modules():
                config = getattr(module, "config", None)
                if config is not None and hasattr(config, "_attn_implementation"):
                    config._attn_implementation = name
        else:
            cast(Any, self.model).set_attn_implementation(name)

    def _install_tap_hooks(self, state: _PassState) -> list[Any]:
        taps, handles = state.taps, list[Any]()
        if not taps and state.on_layer is None:
            return handles
        outside = self.outside_interface and bool(taps & _ATTENTION_TAPS)

        for layer, block in enumerate(self.blocks):
            attn = get_path(block, self.paths.attention)

            def block_pre(module: nn.Module, args: tuple, kwargs: dict, layer: int = layer) -> None:
                cap = state.capture(layer)
                if Tap.RESID_PRE in taps:
                    cap.resid_pre = args[0] if args else kwargs["hidden_states"]

            def attn_pre(module: nn.Module, args: tuple, kwargs: dict, layer: int = layer) -> None:
                if Tap.ATTN_IN in taps:
                    state.capture(layer).attn_in = args[0] if args else kwargs["hidden_states"]

            def attn_post(module: nn.Module, args: tuple, kwargs: dict, output: Any, layer: int = layer) -> None:
                cap = state.capture(layer)
                if Tap.ATTN_OUT in taps:
                    cap.attn_out = output[0] if isinstance(output, tuple) else output
                if outside:  # eager weights the module returned: [b, H, n, n]
                    probs = output[1] if isinstance(output, tuple) and len(output) > 1 else None
                    if probs is None:
                        raise UnsupportedModelError(
                            f"{type(module).__name__} returned no attention weights under eager attention; posprobe "
                            f"reads this family's patterns from them ({self._exception_reason}).")
                    cap.pattern_source = lambda query_index, probs=probs: probs[:, :, query_index]
                    cap.extras["attn_scale"] = cap.info.attn_scale
                    if not cap.info.has_rope:
                        cap.q_pre, cap.k_pre = cap.q, cap.k

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
        return handles

    def _install_rotary_wrappers(self, state: _PassState) -> list[Any]:
        """Wrap the modeling module's rotary function(s) for this pass: record their inputs (pre-rotary q/k) and,
        where attention runs outside the interface, their outputs (post-rotary q/k); return the inputs unchanged on
        layers with a RotaryEdit (the identity rotation, whatever form the family's cos/sin take)."""
        handles: list[Any] = []
        outside = self.outside_interface
        record = bool(state.taps & {Tap.Q_PRE, Tap.K_PRE}) or (outside and bool(state.taps & _ATTENTION_TAPS))
        modules = {sys.modules[type(self.attention_module(i)).__module__] for i in range(self.info.n_layers)}
        for owner in modules:
            for fname in _ROTARY_FUNCTIONS:
                original = getattr(owner, fname, None)
                if not callable(original):
                    continue

                # Which variant this is comes from the modeling module's attribute name, not the callable's
                # __name__: `kernels` replaces these functions with nn.Module wrappers (no __name__, or another).
                interleaved = fname == "apply_rotary_pos_emb_interleave"

                def wrapped(*args: Any, _original: Any = original, _interleaved: bool = interleaved,
                            **kwargs: Any) -> Any:
                    state.rotary_depth += 1
                    try:
                        out = _original(*args, **kwargs)
                    finally:
                        state.rotary_depth -= 1
                    layer = state.current_layer
                    if layer is None or state.rotary_depth:  # not inside an attention module, or a nested call
                        return out
                    if layer in state.rotary_off:
                        out = tuple(args[: len(out)]) if isinstance(out, tuple) else args[0]
                    if record and isinstance(out, tuple) and len(out) == 2:
                        cap = state.capture(layer)
                        pre: tuple[Any, ...] = (args[0], args[1])
                        if _interleaved:
                            pre = tuple(_deinterleave(x) for x in pre)  # (2k, 2k+1) -> (k, k + r/2), as it does
                        if outside:
                            cap.q, cap.k = out
                            cap.q_pre, cap.k_pre = pre
                        else:
                            cap.extras["rotary_inputs"] = pre
                    return out

                setattr(owner, fname, wrapped)
                handles.append(_Restore(owner, fname, original))

        for layer in range(self.info.n_layers):
            attn = self.attention_module(layer)

            def enter(module: nn.Module, args: tuple, kwargs: dict, layer: int = layer) -> None:
                state.current_layer = layer

            def leave(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
                state.current_layer = None

            handles.append(attn.register_forward_pre_hook(enter, with_kwargs=True))
            handles.append(attn.register_forward_hook(leave, with_kwargs=True))
        return handles

    def _install_edit_hooks(self, edits: Sequence[Edit]) -> list[Any]:
        handles = []
        for edit in edits:
            if isinstance(edit, ProjectionInputEdit):
                handles += self._projection_edit(edit)
        return handles

    def _projection_paths(self) -> tuple[str, str]:
        """The attribute names of the query and key projections whose inputs ProjectionInputEdit scales."""
        q_proj, k_proj = self.paths.q_proj, self.paths.k_proj
        if q_proj is None or k_proj is None:
            raise InterventionError(
                f"{self.info.architecture} has no separate query and key projections (fused QKV or MLA "
                f"low-rank projections); ProjectionInputEdit (positional_dimension) scales the input of q_proj "
                f"and k_proj, so it does not apply to this family."
            )
        return q_proj, k_proj

    def _projection_edit(self, edit: ProjectionInputEdit) -> list[Any]:
        q_proj, k_proj = self._projection_paths()
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
            handles.append(getattr(attn, k_proj).register_forward_pre_hook(
                lambda m, args: (scaled(args[0], False), *args[1:])))
        if edit.queries != "none":
            last = edit.queries == "last"
            handles.append(getattr(attn, q_proj).register_forward_pre_hook(
                lambda m, args: (scaled(args[0], last), *args[1:])))
        return handles

    def _forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        taps: frozenset[Tap],
        on_layer: LayerCallback | None,
        logit_positions: Tensor | None,
        edits: Sequence[Edit],
        attention_mask: Tensor | None = None,
    ) -> Tensor | None:
        with self._session(position_ids, taps, on_layer, edits):
            if logit_positions is None:
                self.base(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                          use_cache=False)
                return None
            out = self.model(
                input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False,
                logits_to_keep=logit_positions
            )
            return out.logits

    def new_kv_cache(self, edits: Sequence[Edit] = ()) -> Any:
        """An empty decoder KV cache for this model (what `greedy` uses; what-ifs that decode several passes in
        lockstep keep one each).

        transformers' cache keeps only the last window of keys on a sliding-window layer, so a decoding step's key
        0 is then not the prompt's first token. Attention edits index keys from the first token (sinks, spans,
        grouped positions), so where an `AttentionEdit` acts on a sliding-window layer the cache keeps every key
        of every layer instead (the model's mask still applies the window): more memory (a full-length K / V on
        those layers), the values of a pass over the whole sequence. Only for caches of plain attention layers;
        another layer kind keeps the model's cache."""
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

        cache = DynamicCache(config=self.model.config)
        layers = list(getattr(cache, "layers", None) or [])
        edited = {e.layer for e in edits if isinstance(e, AttentionEdit)}
        trimmed = {i for i, layer in enumerate(layers) if isinstance(layer, DynamicSlidingWindowLayer)}
        if edited & trimmed and all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) for layer in layers):
            return DynamicCache()  # lazily made full layers: keys from the first token on every layer
        return cache

    def greedy(
        self, input_ids: Any, max_new_tokens: int, *, stop_ids: Sequence[int] = (), edits: Sequence[Edit] = (),
        prefill_chunk: int | Literal["auto"] | None = "auto",
    ) -> Tensor:
        """KV-cached greedy decoding; edits apply at every step (queries are a suffix of the keys).

        prefill_chunk: prompt tokens per prefill pass on the cache. "auto" (default): the whole prompt in one pass
        unless one layer's float32 attention scores over it would not fit the memory budget
        (`posprobe.devices.prefill_chunk_size`: 1 GiB; Gemma 3 270M prefills one row of 8192 tokens at once, 16k in
        4 chunks), then chunks that fit; None: one pass; an int: chunks of that many tokens. A chunk's queries are a
        suffix of the keys, as a decoding step's are, so chunks give the tokens of one pass (to float rounding);
        where they might not (`_prefill_blocker`: length-dependent RoPE, edits that read the whole prompt), the
        prompt runs in one pass whatever is asked.
        """
        ids = self._check_ids(input_ids)
        check_prefill_chunk(prefill_chunk)
        b, n = ids.shape
        all_edits = [*self._edits, *edits]
        self._validate_edits(all_edits)
        if max_new_tokens < 1:
            return ids.new_zeros(b, 0)
        if any(isinstance(e, ProjectionInputEdit) and e.queries == "last" for e in all_edits):
            return self._greedy_last_query(ids, max_new_tokens, stop_ids, all_edits, prefill_chunk)
        cache = self.new_kv_cache(all_edits)
        chunk = self._prefill_chunk(ids, all_edits, cache, prefill_chunk)
        new: list[Tensor] = []
        pos = torch.arange(n, device=ids.device)[None].expand(b, -1)
        stop = torch.tensor(list(stop_ids), dtype=torch.long, device=ids.device)
        with torch.inference_mode(), self._session(pos, frozenset(), None, all_edits):
            logits = self._prefill(ids, cache, chunk)
            for step in range(max_new_tokens):
                nxt = logits.argmax(-1, keepdim=True)
                new.append(nxt)
                if (len(stop) and bool(torch.isin(nxt, stop).all())) or step == max_new_tokens - 1:
                    break
                out = self.model(input_ids=nxt, position_ids=torch.full_like(nxt, n + step),
                                 **cache_kwargs(self.model, cache), use_cache=True, logits_to_keep=1)
                logits = out.logits[:, -1]
        return torch.cat(new, dim=1)

    def _prefill(self, ids: Tensor, cache: Any, chunk: int | None) -> Tensor:
        """Feed the prompt `ids` [b, n] (positions 0..n-1) to `cache` inside an open session, `chunk` tokens per
        pass (None: one pass); the logits [b, V] of its last token. Chunks before the last run the decoder alone
        (no LM head over the vocabulary)."""
        b, n = ids.shape
        start = 0 if chunk is None else chunk * ((n - 1) // chunk)  # the last chunk's first token
        for at in range(0, start, chunk or n):
            part = ids[:, at:at + (chunk or n)]
            pos = torch.arange(at, at + part.shape[1], device=ids.device)[None].expand(b, -1)
            self.base(input_ids=part, position_ids=pos, **cache_kwargs(self.base, cache), use_cache=True)
        pos = torch.arange(start, n, device=ids.device)[None].expand(b, -1)
        out = self.model(input_ids=ids[:, start:], position_ids=pos, **cache_kwargs(self.model, cache),
                         use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    def _prefill_chunk(self, ids: Tensor, edits: Sequence[Edit], cache: Any,
                       requested: int | str | None) -> int | None:
        """Prompt tokens per prefill pass of this greedy call on `cache` (None: the whole prompt in one pass)."""
        b, n = ids.shape
        if requested is None:
            return None
        chunk = prefill_chunk_size(self.info, n, b, device=ids.device) if requested == "auto" else int(requested)
        if chunk is None or chunk >= n or self._prefill_blocker(n, edits, cache) is not None:
            return None
        return chunk

    def _prefill_blocker(self, n: int, edits: Sequence[Edit], cache: Any) -> str | None:
        """Why a prompt of `n` tokens is prefilled in one pass whatever `prefill_chunk` asks, or None when chunks
        give the values of one pass (queries a suffix of the keys, as in a decoding step). Chunks are refused for:
        - a cache layer other than transformers' full and sliding-window `DynamicCache` layers (recurrent states,
          indexed or quantised layers): posprobe does not check that they extend chunk-wise;
        - a rotary embedding of rope type "dynamic" or "longrope" (the model's own or a what-if's): transformers
          recomputes its frequencies from the largest position of each pass, so chunks would be rotated at other
          frequencies than the whole prompt;
        - an `AttentionEdit` on a layer whose cache keeps a sliding window of at most `n` tokens: later chunks see
          keys that no longer start at the first token, while edits index keys from it (sinks, spans, positions);
        - an `AttentionEdit` whose function sets `prefill_chunks = False`: it needs the whole prompt in one call
          (Ms-PoE's outlier head order, ranked by the call's last query; Found-in-the-Middle, which refuses a call
          that does not reach the end of its documents)."""
        from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

        layers = list(getattr(cache, "layers", None) or [])
        for index, layer in enumerate(layers):
            if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer):
                return f"cache layer {index} is a {type(layer).__name__}"
        rotaries = [m for m in self.model.modules() if hasattr(m, "rope_type")]
        rotaries += [module for module, _ in vars(self).get(ROTARY_OVERRIDES, {}).values()]
        for rotary in rotaries:
            kinds = rotary.rope_type.values() if isinstance(rotary.rope_type, dict) else [rotary.rope_type]
            if any(kind in _LENGTH_DEPENDENT_ROPE for kind in kinds):
                return f"{type(rotary).__name__} has rope type {rotary.rope_type!r} (frequencies from the length)"
        windows = {i: int(layer.sliding_window) for i, layer in enumerate(layers)
                   if isinstance(layer, DynamicSlidingWindowLayer)}
        for edit in edits:
            if not isinstance(edit, AttentionEdit):
                continue  # RotaryEdit and ProjectionInputEdit act on each token alone
            if not getattr(edit.fn, "prefill_chunks", True):
                return f"{edit.fn!r} needs the whole prompt in one call"
            if edit.layer in windows and n >= windows[edit.layer]:
                return f"an attention edit on layer {edit.layer}, whose cache keeps {windows[edit.layer]} tokens"
        return None

    def _greedy_last_query(
        self, ids: Tensor, max_new_tokens: int, stop_ids: Sequence[int], edits: Sequence[Edit],
        prefill_chunk: int | str | None = "auto",
    ) -> Tensor:
        """Greedy decoding under edits that scale only the *last* query (Yu et al.), equal to recomputing the whole
        sequence every step but KV-cached: "last" is defined on the whole sequence, so a token's states depend on
        whether it is the last one. The cache holds every token but the last as a non-last token (query unscaled,
        keys scaled); each step runs the last token twice on top of it, once as the last token (on a copy of the
        cache: its logits choose the next token) and once as a non-last token (appended for the later steps).
        Two one-token passes per step instead of a pass over the whole sequence. The prompt but its last token is
        prefilled `prefill_chunk` tokens per pass (as `greedy`): its tokens are all non-last ones."""
        import copy

        b, n = ids.shape
        cache = self.new_kv_cache(edits)
        chunk = self._prefill_chunk(ids, edits, cache, prefill_chunk)
        settle = [dataclasses.replace(e, queries="none") if isinstance(e, ProjectionInputEdit) and e.queries == "last"
                  else e for e in edits]
        stop = torch.tensor(list(stop_ids), dtype=torch.long, device=ids.device)
        new: list[Tensor] = []

        def positions(tokens: Tensor, start: int) -> Tensor:
            return torch.arange(start, start + tokens.shape[1], device=tokens.device)[None].expand(b, -1)

        def extend(tokens: Tensor, start: int, kv: Any) -> None:
            """Append `tokens` to `kv` as non-last tokens: the decoder alone, no lm_head over the vocabulary."""
            pos = positions(tokens, start)
            with self._session(pos, frozenset(), None, settle):
                self.base(input_ids=tokens, position_ids=pos, **cache_kwargs(self.base, kv), use_cache=True)

        def last_logits(tokens: Tensor, start: int, kv: Any) -> Tensor:
            """Logits of the last token of `tokens` run as the last token, on top of `kv`."""
            pos = positions(tokens, start)
            with self._session(pos, frozenset(), None, edits):
                out = self.model(input_ids=tokens, position_ids=pos, **cache_kwargs(self.model, kv), use_cache=True,
                                 logits_to_keep=1)
            return out.logits[:, -1]

        last = ids[:, -1:]
        with torch.inference_mode():
            step = chunk or max(1, n - 1)
            for start in range(0, n - 1, step):
                extend(ids[:, start:min(start + step, n - 1)], start, cache)
            for k in range(max_new_tokens):
                position = n - 1 + k
                nxt = last_logits(last, position, copy.deepcopy(cache)).argmax(-1, keepdim=True)
                new.append(nxt)
                if (len(stop) and bool(torch.isin(nxt, stop).all())) or k == max_new_tokens - 1:
                    break
                extend(last, position, cache)
                last = nxt
        return torch.cat(new, dim=1)

    def close(self) -> None:
        """Nothing persists between passes: hooks and the attention implementation are restored after each one."""
