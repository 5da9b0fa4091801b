"""Interventions as specs: one protocol, one layer range, one registry (docs/interventions.md).

Owns `Intervention` (the base of every intervention and context-extension what-if), `LayerRange` (the one way
posprobe names a block of layers), the registry (`register`, `parse`, `list_interventions`, `parameters`), the
per-access calibration cache (`calibrated`, `calibrations`) and `Bound` (a spec tied to one access, what the
legacy factories such as `mask_heads(access, heads)` return).

An intervention is a frozen dataclass of settings plus a `name`; it holds no model. Whoever runs the model applies
it to the access it runs: `scan(model, intervention=spec)`, `evaluate_positions(model, ..., intervention=spec)`, or
in a notebook `with spec.applied(access) as edited: ...`. `applied` computes the edits for that access (calibrating
first when the intervention needs it, cached on the access), activates them through `access.editing`, and removes
them on exit, so the model is restored exactly. `to_dict()` / `from_dict()` round-trip the settings (provenance);
`describe(access)` adds what was resolved on that access (layers, calibration records). `parse("name:key=val,...")`
builds a spec from text (the CLI form), with defaults for every key left out.

Layer ranges: `LayerRange(start, stop)` is half-open like Python's `range` and slices: start inclusive, stop
exclusive; it prints (and parses) as a slice, `"9:18"` = layers 9, 10, ..., 17; `"9:"` runs to the last layer.
Every intervention, what-if and search takes and prints layers this way; explicit index lists (`[5, 11, 17]`) are
accepted only where an intervention documents them (disable_rope). Two-element tuples are refused: `(9, 17)` has
meant both "9..17" and "9..16" in the past.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from posprobe.access import Edit, ModelAccess
from posprobe.errors import InputError, InterventionError, UnknownNameError

# ---------------------------------------------------------------------------------------------------------------
# Layer ranges


@dataclass(frozen=True)
class LayerRange:
    """Layers start, start + 1, ..., stop - 1 (stop exclusive, like `range`); stop None = through the last layer.

    Printed and parsed as a slice: `str(LayerRange(9, 18)) == "9:18"`, `LayerRange.parse("9:")`.
    """

    start: int
    stop: int | None = None

    def __post_init__(self) -> None:
        for label, value in (("start", self.start), ("stop", self.stop)):
            if value is None and label == "stop":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InterventionError(f"LayerRange {label} must be a non-negative integer layer index; got "
                                        f"{value!r}. Write LayerRange(9, 18) (or \"9:18\") for layers 9..17.")
        if self.stop is not None and self.stop <= self.start:
            raise InterventionError(f"LayerRange({self.start}, {self.stop}) is empty: stop is exclusive and must be "
                                    f"greater than start (layers {self.start}..{self.stop - 1} would be none).")

    def __str__(self) -> str:
        return f"{self.start}:{'' if self.stop is None else self.stop}"

    def indices(self, n_layers: int, model: str = "the model") -> list[int]:
        """The layer indices of this range in a model of `n_layers` layers (raises if it does not fit)."""
        stop = n_layers if self.stop is None else self.stop
        if self.start >= n_layers or stop > n_layers:
            raise InterventionError(f"Layer range {self} (layers {self.start}..{stop - 1}) does not fit {model}, "
                                    f"which has layers 0..{n_layers - 1}. Use a range inside 0:{n_layers}.")
        return list(range(self.start, stop))

    @classmethod
    def parse(cls, text: str) -> LayerRange:
        """`"9:18"` -> LayerRange(9, 18); `"9:"` -> LayerRange(9); `"5"` -> LayerRange(5, 6) (one layer)."""
        match = re.fullmatch(r"\s*(\d+)\s*(?::\s*(\d*)\s*)?", str(text))
        if match is None:
            raise InterventionError(f"{text!r} is not a layer range. Write START:STOP with STOP exclusive, e.g. "
                                    f"\"9:18\" for layers 9..17, \"9:\" for 9 to the last layer, or \"5\" for one.")
        start = int(match.group(1))
        if match.group(2) is None:
            return cls(start, start + 1)
        return cls(start, int(match.group(2)) if match.group(2) else None)

    @classmethod
    def coerce(cls, value: Any, what: str = "layers") -> LayerRange | None:
        """None, a LayerRange, a `range` (step 1) or slice text -> LayerRange or None; anything else raises."""
        if value is None or isinstance(value, LayerRange):
            return value
        if isinstance(value, str):
            return cls.parse(value)
        if isinstance(value, range) and value.step == 1:
            return cls(value.start, value.stop)
        raise InterventionError(
            f"{what} must be a LayerRange (start inclusive, stop exclusive), slice text such as \"9:18\", a range(), "
            f"or None for the default; got {value!r}. A pair like (9, 17) is ambiguous (9..17 or 9..16?): write "
            f"LayerRange(9, 18) for layers 9..17.")


def layer_range_of(layers: Sequence[int]) -> str:
    """The printing form of a list of layers: `"9:18"` when contiguous, else the indices `"5,11,17"`."""
    layers = sorted(int(x) for x in layers)
    if layers and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}:{layers[-1] + 1}"
    return ",".join(str(x) for x in layers)


# ---------------------------------------------------------------------------------------------------------------
# Calibration cached on the access


_CACHE_ATTRIBUTE = "_posprobe_calibrations"
T = TypeVar("T")


def calibrated(access: ModelAccess, key: tuple[Any, ...], compute: Callable[[], T],
               record: Callable[[T], dict[str, Any]] | None = None) -> T:
    """`compute()` once per (access, key), cached on the access; `record(value)` (JSON-able) goes to provenance.

    key starts with the intervention's name and holds every setting the calibration depends on, so two specs that
    differ only in settings applied after calibration (a temperature, a layer range) share one calibration.
    """
    cache = vars(access).setdefault(_CACHE_ATTRIBUTE, {})
    if key not in cache:
        value = compute()
        cache[key] = (value, record(value) if record is not None else {})
    return cache[key][0]


def calibrations(access: ModelAccess, name: str | None = None) -> list[dict[str, Any]]:
    """Records of the calibrations made on `access` (of intervention `name`, or all), oldest first."""
    cache = vars(access).get(_CACHE_ATTRIBUTE, {})
    return [{"key": [str(k) for k in key], **rec} for key, (_, rec) in cache.items()
            if name is None or key[0] == name]


# ---------------------------------------------------------------------------------------------------------------
# The protocol


def check_access(access: Any, what: str = "An intervention") -> ModelAccess:
    """`access` if it is a ModelAccess; else the error that says interventions never load a model themselves."""
    if isinstance(access, ModelAccess):
        return access
    raise InterventionError(
        f"{what} is applied to a ModelAccess (what posprobe.load_model returns), not to {type(access).__name__} "
        f"{access!r}: an intervention never loads a model of its own, because the edited copy would not be the one "
        f"that is evaluated. Load once and apply to that access: `access = posprobe.load_model(...)`, then "
        f"`with spec.applied(access): ...` or `posprobe.evaluate_positions(access, intervention=spec)`.")


_Spec = TypeVar("_Spec", bound="Intervention")


@dataclass(frozen=True)
class Intervention:
    """Base of every intervention: frozen settings + `name`; applied by the runner to the runner's access.

    Subclasses are frozen dataclasses registered with `@register`; they implement `edits(access)` (edits active for
    the whole block) and/or `prompt_context(access, prompts)` (per generation batch, for interventions that need the
    prompts' document spans), or override `applied(access)` entirely. Fields may carry `metadata={"help": ...}`,
    shown by `posprobe interventions`.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one line for `posprobe interventions`
    # True: the edits depend on each prompt's structure (document spans), so runners apply it per generation batch
    # through `prompt_context` only, and `applied(access)` alone raises (it could not edit anything)
    per_prompt: ClassVar[bool] = False

    # --- what subclasses implement ------------------------------------------------------------------------------
    def edits(self, access: ModelAccess) -> list[Edit]:
        """The edits active for the whole block on `access` (validated there); calibrates first if needed."""
        return []

    def prompt_context(self, access: ModelAccess, prompts: Sequence[Any]) -> contextlib.AbstractContextManager[Any]:
        """Entered around every generation batch of structured prompts (row r = prompts[r]); default: nothing."""
        return contextlib.nullcontext(access)

    def resolved(self, access: ModelAccess) -> dict[str, Any]:
        """What the settings resolve to on `access` (e.g. the default layers), for provenance."""
        return {}

    def check_runner(self, runner: str) -> None:
        """Raise an InterventionError (what, why, the fix) if `runner` ("scan", "evaluate_positions", ...) cannot
        run this spec. `resolve` calls it, so the refusal comes before any model is loaded or run; default: none."""

    # --- applying -----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def applied(self, access: ModelAccess | Any) -> Iterator[ModelAccess]:
        """Apply to `access` inside the block (yields it); on exit the edits are removed and the model is exact."""
        access = check_access(access, f"{type(self).__name__}")
        if self.per_prompt:
            raise InterventionError(
                f"{self.name} edits each prompt by its document spans, so it cannot be applied to a model as a "
                f"whole. Give it to a runner that has structured prompts (posprobe.evaluate_positions(access, task, "
                f"intervention=spec)), or bind it to your prompt: `with spec.bind(access, [prompt]): ...`.")
        edits = self.edits(access)
        with access.editing(edits):
            yield access

    def bind(self, access: ModelAccess | Any, prompts: Sequence[Any] | None = None) -> Bound:
        """This spec tied to `access` (a reusable context manager); `prompts`: a per-prompt context too."""
        return Bound(self, check_access(access, type(self).__name__), prompts)

    # --- provenance -------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """{"name": ..., setting: value, ...} in JSON types (LayerRange as its slice text)."""
        out: dict[str, Any] = {"name": self.name}
        for f in dataclasses.fields(self):
            out[f.name] = _plain(getattr(self, f.name))
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Intervention:
        """The spec `to_dict` wrote (the registered class of d["name"] when called on Intervention)."""
        d = dict(d)
        name = d.pop("name", cls.name)
        target = _REGISTRY.get(name) if cls is Intervention else cls
        if target is None:
            raise UnknownNameError("intervention", str(name), _REGISTRY)
        return target.build(**d)

    def describe(self, access: ModelAccess | None = None) -> dict[str, Any]:
        """`to_dict()` plus, on `access`, the resolved settings and the calibrations made there."""
        out = self.to_dict()
        if access is not None:
            out["resolved"] = _plain(self.resolved(access))
            out["calibrations"] = calibrations(access, self.name)
        return out

    def __str__(self) -> str:
        """The `parse` form: name:key=value,... with the settings that differ from the defaults."""
        changed = [f"{f.name}={_text(getattr(self, f.name))}" for f in dataclasses.fields(self)
                   if _default(f) is not dataclasses.MISSING and getattr(self, f.name) != _default(f)]
        return self.name + (":" + ",".join(changed) if changed else "")

    # --- construction ---------------------------------------------------------------------------------------------
    @classmethod
    def _check_names(cls, settings: dict[str, Any]) -> None:
        names = [f.name for f in dataclasses.fields(cls)]
        bad = next((k for k in settings if k not in names), None)
        if bad is not None:
            raise UnknownNameError(f"{cls.name} setting", bad, names)

    @classmethod
    def build(cls, **settings: Any) -> Intervention:
        """cls(**settings) with a clear error for unknown setting names."""
        cls._check_names(settings)
        return cls(**settings)

    def replace(self: _Spec, **changes: Any) -> _Spec:
        """A copy with settings changed (calibration is shared through the access cache when it still applies)."""
        self._check_names(changes)
        return dataclasses.replace(self, **changes)


class Bound:
    """An intervention tied to one access: a reusable context manager (`with bound as access: ...`).

    Runners accept it only for the access it is bound to; any other raises, because the edits would go to a model
    nobody evaluates. `prompts` (optional): structured prompts whose per-prompt context is entered too (user spans
    for Found-in-the-Middle).
    """

    def __init__(self, spec: Intervention, access: ModelAccess, prompts: Sequence[Any] | None = None) -> None:
        self.spec, self.access = spec, access
        self.prompts = list(prompts) if prompts is not None else None
        self._stacks: list[contextlib.ExitStack] = []

    @property
    def name(self) -> str:
        return self.spec.name

    def __getattr__(self, item: str) -> Any:  # settings and helpers of the spec (bound.factor, bound.layers...)
        if item.startswith("_") or item in ("spec", "access", "prompts"):
            raise AttributeError(item)
        return getattr(self.spec, item)

    def __repr__(self) -> str:
        return f"Bound({self.spec!r}, model={self.access.info.name!r})"

    def to_dict(self) -> dict[str, Any]:
        return self.spec.to_dict()

    def describe(self, access: ModelAccess | None = None) -> dict[str, Any]:
        return self.spec.describe(access or self.access)

    def for_access(self, access: ModelAccess | Any) -> Intervention:
        """The spec, after checking that `access` is the one this object is bound to. Runners call it with the
        model they were given before loading anything: a name or another object would load another copy."""
        if access is not self.access:
            if isinstance(access, ModelAccess):
                running = f"{access.info.name}, object {id(access):#x}"
            else:
                running = f"{access!r}, which the runner would load as a new model" if access is not None else \
                    "None: the default model, which the runner would load anew"
            raise InterventionError(
                f"This {self.spec.name} intervention is bound to another model access ({self.access.info.name}, "
                f"object {id(self.access):#x}) than the one being run ({running}); its edits would change a model "
                f"nobody evaluates. Pass the spec itself, which the runner applies to its own model: "
                f"intervention={type(self.spec).__name__}(...) or the text form {str(self.spec)!r}, or run the "
                f"access it is bound to.")
        return self.spec

    def __enter__(self) -> ModelAccess:
        stack = contextlib.ExitStack()
        try:
            if not self.spec.per_prompt or self.prompts is None:
                stack.enter_context(self.spec.applied(self.access))  # raises for a per-prompt spec without prompts
            if self.prompts is not None:
                stack.enter_context(self.spec.prompt_context(self.access, self.prompts))
        except BaseException:
            stack.close()
            raise
        self._stacks.append(stack)
        return self.access

    def __exit__(self, *exc: object) -> None:
        self._stacks.pop().close()


def resolve(intervention: Any, access: ModelAccess | Any, *, prompts_available: bool = True,
            runner: str = "this runner") -> Intervention | None:
    """What a runner applies: a spec from a spec, its text / dict form, or a Bound (checked against `access`).

    Returns None for None and for objects that are not posprobe interventions (the runner handles those itself).
    Runners call it once with the `model` argument before loading (bad text, a Bound to another model: raise
    before minutes of work) and again with the loaded access. `prompts_available=False` (a runner without
    structured prompts, such as scan) refuses per-prompt specs.
    """
    spec: Intervention | None = None
    if isinstance(intervention, Intervention):
        spec = intervention
    elif isinstance(intervention, Bound):
        spec = intervention.for_access(access)
    elif isinstance(intervention, str):
        spec = parse(intervention)
    elif isinstance(intervention, dict) and "name" in intervention:
        spec = Intervention.from_dict(intervention)
    if spec is not None and spec.per_prompt and not prompts_available:
        raise InterventionError(f"{spec.name} edits each prompt by its document spans, and {runner} runs no "
                                f"structured prompts. Use it with posprobe.evaluate_positions(...).")
    if spec is not None:
        spec.check_runner(runner)  # a spec some runner cannot run (buckets in scan) raises before any pass
    return spec


def runner_contexts(intervention: Any, access: ModelAccess, *, prompts_available: bool = True,
                    runner: str = "this runner"
                    ) -> tuple[contextlib.AbstractContextManager[Any], Callable[[list[Any]], Any], Intervention | None]:
    """How a runner applies `intervention` to its own `access`: (context around the whole run, per-batch context
    factory `prompts -> context manager`, the spec or None).

    Accepted: None; a spec, its text or dict form, or a Bound (checked against `access`); and the user's own forms:
    a context manager (entered once), a callable `access -> context manager`, or an object with
    `prompt_context(access, prompts)`. `prompts_available=False` (a runner without structured prompts, such as scan)
    refuses per-prompt interventions up front.
    """
    spec = resolve(intervention, access, prompts_available=prompts_available, runner=runner)
    def nothing(prompts: list[Any]) -> Any:
        return contextlib.nullcontext()

    if spec is not None:
        if spec.per_prompt:
            return contextlib.nullcontext(), lambda prompts: spec.prompt_context(access, prompts), spec
        return spec.applied(access), nothing, spec
    if intervention is None:
        return contextlib.nullcontext(), nothing, None
    if hasattr(intervention, "prompt_context"):
        if not prompts_available:
            raise InterventionError(f"{type(intervention).__name__} works per prompt (prompt_context), and {runner} "
                                    f"runs no structured prompts.")
        return contextlib.nullcontext(), lambda prompts: intervention.prompt_context(access, prompts), None
    if hasattr(intervention, "__enter__") and hasattr(intervention, "__exit__"):
        return intervention, nothing, None
    if callable(intervention):
        manager = intervention(access)
        if not (hasattr(manager, "__enter__") and hasattr(manager, "__exit__")):
            raise InputError(f"intervention(access) returned a {type(manager).__name__}, not a context manager. "
                             f"Return an object with __enter__/__exit__ (e.g. `access.editing(edits)`).")
        return manager, nothing, None
    raise InputError(
        f"intervention must be an Intervention spec (e.g. MaskHeads(heads=[(5, 1)]) or the text "
        f"\"mask_heads:heads=L5H1\"; `posprobe interventions` lists them), a context manager, a callable access -> "
        f"context manager, or an object with a prompt_context(access, prompts) method; got "
        f"{type(intervention).__name__}.")


# ---------------------------------------------------------------------------------------------------------------
# Registry


_REGISTRY: dict[str, type[Intervention]] = {}
I = TypeVar("I", bound=type[Intervention])


def register(cls: I) -> I:
    """Class decorator: make the intervention available by `cls.name` (parse, CLI, list_interventions)."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} needs a class attribute `name` to be registered.")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise TypeError(f"An intervention named {cls.name!r} is already registered ({_REGISTRY[cls.name].__name__}).")
    _REGISTRY[cls.name] = cls
    return cls


def list_interventions() -> list[str]:
    """Names of the registered interventions and what-ifs."""
    _load_builtins()
    return sorted(_REGISTRY)


def get_class(name: str) -> type[Intervention]:
    _load_builtins()
    if name not in _REGISTRY:
        raise UnknownNameError("intervention", name, _REGISTRY,
                               hint="`posprobe interventions` lists them with their settings.")
    return _REGISTRY[name]


def parameters(name: str) -> list[dict[str, Any]]:
    """Settings of intervention `name`: [{"name", "default", "help"}] (default "required" when there is none)."""
    cls = get_class(name)
    out = []
    for f in dataclasses.fields(cls):
        default = _default(f)
        out.append({"name": f.name, "default": "required" if default is dataclasses.MISSING else _text(default),
                    "help": f.metadata.get("help", "")})
    return out


def parse(text: str) -> Intervention:
    """`"name"` or `"name:key=value,key=value"` -> the spec, every other setting at its default.

    Values are read as int, float, true/false, none, or text; a comma not followed by `key=` continues the previous
    value, so lists need no quotes: `"mask_heads:heads=L5H1,L11H2"`, `"positional_dimension:layers=9:18,factor=-1"`.
    """
    if isinstance(text, Intervention):
        return text
    name, _, rest = str(text).strip().partition(":")
    cls = get_class(name.strip())
    settings: dict[str, str] = {}
    last = None
    for piece in rest.split(",") if rest.strip() else []:
        key, eq, value = piece.partition("=")
        if eq and re.fullmatch(r"\s*[A-Za-z_]\w*\s*", key):
            last = key.strip()
            if last in settings:
                raise InterventionError(f"{text!r} sets {last} twice.")
            settings[last] = value.strip()
        elif last is not None:
            settings[last] += "," + piece.strip()
        else:
            raise InterventionError(f"Cannot read {text!r}: write name:key=value,key=value (e.g. "
                                    f"\"mask_heads:heads=L5H1,L11H2\"); `posprobe interventions` lists the settings.")
    return cls.build(**{k: _value(v) for k, v in settings.items()})


def _load_builtins() -> None:
    """Import the modules whose specs register themselves: the interventions and the context-extension what-ifs."""
    import importlib

    for module in ("posprobe.interventions", "posprobe.what_if"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:  # a checkout without what-ifs; any other import error propagates
            if exc.name != module:
                raise


# ---------------------------------------------------------------------------------------------------------------
# Helpers


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _value(text: str) -> Any:
    low = text.lower()
    if low in ("none", "null", ""):
        return None
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _plain(value: Any) -> Any:
    if isinstance(value, LayerRange):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    return repr(value)  # e.g. a Task object given instead of a task name


def _text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(_text(v) for v in value) if value else "none"
    return "none" if value is None else str(value)


__all__ = ["Bound", "Intervention", "LayerRange", "calibrated", "calibrations", "check_access", "get_class",
           "layer_range_of", "list_interventions", "parameters", "parse", "register", "resolve", "runner_contexts"]
