"""Typed configuration: what each config value may be, and the check that runs before anything is built.

How a signature becomes checks
------------------------------
A config node such as ``{_target_: torch.optim.SGD, _partial_: true, lr: 0.01}`` is checked against the parameters of
its target (a learner: against its hyperparameters, see below):

* every key must be one of its parameters (a typo is reported with the list of valid ones);
* every value must fit the parameter's annotation. Ranges are part of the annotation, through the
  aliases defined below: ``epochs: PositiveInt`` allows integers >= 1, ``precision: Literal["bf16",
  "fp32"]`` those two strings, ``cpu_threads: PositiveInt | None`` also null. pydantic checks the value
  in strict mode (``"5"`` is not 5, ``true`` is not 1) and :func:`describe` words the annotation for
  the error message;
* a parameter annotated with something that is not plain data (a class such as ``Backbone``, or a
  ``Callable`` such as ``OptimizerFactory``) takes a nested ``_target_`` node, checked in the same
  way, or null where the annotation allows ``None``.

A learner (``{_target_: pilot.learners.l2p.L2P, epochs: 5, pool_size: 10}``) declares its hyperparameters
as annotated class attributes, so a new learner gets its checks by annotating them::

    class Mixer(Learner):
        mix: Probability = 0.5
        rounds: PositiveInt = 3

Its node also takes the training-loop settings, the fields of :class:`pilot.learners.base.Training`,
which its constructor's ``setup: LearnerSetup`` brings (``setup: InferenceSetup``: the batch sizes
only; see :data:`EXPANDED` and :func:`_learner_signature`).

Signatures are read from the target's source file (:mod:`ast`), without importing it: importing a
learner loads torch and timm, which takes seconds, and a config mistake should be answered at once.
Annotation names are looked up among this module's aliases, :mod:`typing` and the builtins; any
other name (``Backbone``, ``OptimizerFactory``, ``torch.device``) counts as "an object".

Callables whose own signature we cannot annotate (torch's optimizers and schedulers, which have no
range information, and a few classes owned elsewhere) get a stand-in signature in
:data:`STAND_INS`: a stub function with the same parameter names, annotated here. A key that a
stand-in does not list is looked up in the real signature (which imports it).
"""

from __future__ import annotations

import ast
import collections.abc
import dataclasses
import functools
import importlib.util
import inspect
import re
import textwrap
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Mapping, Sequence, Union

from annotated_types import Ge, Gt, Le, Len, Lt

from pilot.errors import ConfigError


# ------------------------------------------------------------------------------ the vocabulary
@dataclasses.dataclass(frozen=True)
class Check:
    """A constraint that :mod:`annotated_types` has no word for: ``test(value)`` must be true.

    ``says`` is how error messages word it: appended to the type's description (``"an integer >= 2,
    even"``), or in place of it when ``whole`` is true (``"auto, cpu, cuda or cuda:N"``).
    """

    says: str
    test: Callable[[Any], bool]
    whole: bool = False

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> Any:
        from pydantic_core import core_schema

        def validate(value: Any) -> Any:
            if not self.test(value):
                raise ValueError(self.says)
            return value

        return core_schema.no_info_after_validator_function(validate, handler(source))


def _is_device(value: str) -> bool:
    return re.fullmatch(r"auto|cpu|cuda(:\d+)?", value) is not None


# Annotations for the parameters of what configs build. Each is a type plus its allowed range, e.g.
# ``epochs: PositiveInt``; combine them as usual: ``PositiveInt | None``, ``Sequence[NonNegativeInt]``.
PositiveInt = Annotated[int, Ge(1)]
NonNegativeInt = Annotated[int, Ge(0)]
EvenPositiveInt = Annotated[int, Ge(2), Check("even", lambda v: v % 2 == 0)]
ClassCount = Annotated[int, Ge(2)]
Seed = Annotated[int, Ge(0), Lt(2**32)]  # numpy's seed range
PositiveFloat = Annotated[float, Gt(0)]
NonNegativeFloat = Annotated[float, Ge(0)]
Probability = Annotated[float, Ge(0), Le(1)]
NonEmptyStr = Annotated[str, Check("a non-empty string", bool, whole=True)]
Device = Annotated[str, Check("one of auto, cpu, cuda, cuda:N (N: a GPU index)", _is_device, whole=True)]
Precision = Literal["bf16", "fp32"]
ClassOrder = Literal["shuffle", "natural"] | Sequence[NonNegativeInt]
ChannelMeans = Annotated[
    Sequence[float], Check("a list of 1 or 3 numbers (one per colour channel)", lambda v: len(v) in (1, 3), whole=True)
]
ChannelStds = Annotated[
    Sequence[PositiveFloat],
    Check("a list of 1 or 3 numbers > 0 (one per colour channel)", lambda v: len(v) in (1, 3), whole=True),
]
Betas = Annotated[Sequence[Annotated[float, Ge(0), Lt(1)]], Len(2, 2)]
_increasing = Check("in increasing order", lambda v: v[0] <= v[1])
ScaleRange = Annotated[Sequence[Annotated[float, Gt(0), Le(1)]], Len(2, 2), _increasing]
RatioRange = Annotated[Sequence[PositiveFloat], Len(2, 2), _increasing]


# --------------------------------------------------------------------------- stand-in signatures
def _adam(
    lr: PositiveFloat = 1e-3,
    betas: Betas = (0.9, 0.999),
    eps: PositiveFloat = 1e-8,
    weight_decay: NonNegativeFloat = 0.0,
    amsgrad: bool = False,
) -> None:
    """torch.optim.Adam (``params`` comes from the learner)."""


def _sgd(
    lr: PositiveFloat = 1e-3,
    momentum: NonNegativeFloat = 0.0,
    dampening: NonNegativeFloat = 0.0,
    weight_decay: NonNegativeFloat = 0.0,
    nesterov: bool = False,
) -> None:
    """torch.optim.SGD (``params`` comes from the learner)."""


def _multistep_lr(milestones: Sequence[NonNegativeInt], gamma: PositiveFloat = 0.1) -> None:
    """torch.optim.lr_scheduler.MultiStepLR (``optimizer`` comes from the learner)."""


def _cosine_annealing_lr(T_max: NonNegativeInt, eta_min: NonNegativeFloat = 0.0) -> None:  # noqa: N803 - torch's name
    """torch.optim.lr_scheduler.CosineAnnealingLR (``optimizer`` comes from the learner).

    ``T_max`` may be 0: the configs set it to the epochs of its learner (``${method.ca_epochs}``),
    and ``ca_epochs=0`` (SLCA without classifier alignment) never builds the scheduler."""


def _constant_lr(factor: Annotated[float, Gt(0), Le(1)] = 1 / 3, total_iters: NonNegativeInt = 5) -> None:
    """torch.optim.lr_scheduler.ConstantLR (DUCT: the reference's ``ConstantLR()``)."""


def _image_transforms(
    size: PositiveInt,
    mean: ChannelMeans | None = None,
    std: ChannelStds | None = None,
    train_scale: ScaleRange = (0.05, 1.0),
    train_ratio: RatioRange = (3 / 4, 4 / 3),
    hflip_prob: Probability = 0.5,
    test_crop_pct: Annotated[float, Gt(0), Le(1)] = 0.875,
    test_interpolation: Literal["bicubic", "bilinear"] = "bicubic",
) -> None:
    """pilot.data.transforms.ImageTransforms."""


def _efficientnet_lite0(
    pretrained: bool = True,
    checkpoint: str | None = None,
    input_size: PositiveInt = 224,
    mean: ChannelMeans | None = (0.5, 0.5, 0.5),
    std: ChannelStds | None = (0.5, 0.5, 0.5),
) -> None:
    """pilot.backbones.efficientnet_lite0.create_efficientnet_lite0."""


def _csv_sink(float_format: NonEmptyStr = "%.4f") -> None:
    """pilot.sinks.csv.CsvSink."""


def _wandb_sink(
    mode: Literal["offline", "online", "disabled"] = "offline",
    project: NonEmptyStr = "pilot",
    entity: str | None = None,
    tags: Sequence[str] | None = None,
) -> None:
    """pilot.sinks.wandb.WandbSink."""


STAND_INS: dict[str, Callable[..., None]] = {
    "torch.optim.Adam": _adam,
    "torch.optim.SGD": _sgd,
    "torch.optim.lr_scheduler.MultiStepLR": _multistep_lr,
    "torch.optim.lr_scheduler.CosineAnnealingLR": _cosine_annealing_lr,
    "torch.optim.lr_scheduler.ConstantLR": _constant_lr,
    "pilot.data.transforms.ImageTransforms": _image_transforms,
    "pilot.backbones.efficientnet_lite0.create_efficientnet_lite0": _efficientnet_lite0,
    "pilot.sinks.csv.CsvSink": _csv_sink,
    "pilot.sinks.wandb.WandbSink": _wandb_sink,
}

# The run's own settings (not instantiated): dotted key -> (type, default).
TOP_LEVEL: dict[str, tuple[Any, Any]] = {
    "seed": (Seed, 1993),
    "resume": (bool | Literal["auto"], False),
    "overwrite": (bool, False),
    "debug.stop_after_session": (NonNegativeInt | None, None),
    "paths.data_dir": (NonEmptyStr, "data"),
    "paths.results_dir": (NonEmptyStr, "results"),
}


# ------------------------------------------------------------------------------ signatures
REQUIRED = inspect.Parameter.empty
UNKNOWN = object()  # a default that is not a literal (e.g. ``partial(SGD, ...)``)


@dataclasses.dataclass(frozen=True)
class Param:
    name: str
    type: Any = Any  # the annotation; Any when there is none (then nothing is checked)
    default: Any = REQUIRED


@dataclasses.dataclass(frozen=True)
class Signature:
    params: dict[str, Param]
    open: bool = False  # takes **kwargs: any key is accepted


class _ObjectMeta(type):
    def __getattr__(cls, name: str) -> type:
        return cls

    def __getitem__(cls, item: Any) -> type:
        return cls


class AnObject(metaclass=_ObjectMeta):
    """Stands for an annotation name this module does not know (``Backbone``, ``torch.device``...)."""


class _Names(dict):
    """Names for evaluating annotation strings: ours and typing's, and :class:`AnObject` for any other."""

    def __missing__(self, key: str) -> Any:
        return AnObject


@functools.cache
def _annotation_names() -> _Names:
    names = _Names({name: getattr(typing, name) for name in typing.__all__})
    names.update({t.__name__: t for t in (int, float, str, bool, list, dict, tuple, set, type, object)})
    names.update({k: v for k, v in globals().items() if not k.startswith("_")})
    return names


def _evaluate(annotation: str) -> Any:
    try:
        return eval(annotation, {"__builtins__": {}}, _annotation_names())  # noqa: S307 - source we ship
    except Exception:  # noqa: BLE001 - an unreadable annotation is left unchecked
        return Any


def _literal(node: ast.expr | None) -> Any:
    if node is None:
        return REQUIRED
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError):
        return UNKNOWN


def _signature_from_source(target: str) -> Signature | None:
    """The signature of ``target`` read from its module's source, or None where that does not work
    (no such module or name, a C extension). A class without its own ``__init__``, or one whose
    ``__init__`` forwards ``**kwargs`` to ``super().__init__``, also takes its base class's parameters
    (see :func:`_with_inherited`); the base is the first one the ``class`` statement names, found in the
    same module or through its imports."""
    module, _, name = target.rpartition(".")
    tree = _parse_module(module)
    if tree is None:
        return None
    found = next((n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == name), None)
    if not isinstance(found, ast.ClassDef):
        return None if found is None else _own_signature(found)
    learner = _learner_signature(target)
    if learner is not None:
        return learner
    base = _base_target(tree, module, found)
    init = next((n for n in found.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
    if init is None and _is_dataclass(found):
        return _dataclass_signature(found)
    if init is None:
        return signature_of(base) if base is not None else None
    own = _own_signature(init)
    forwarded = _forwarded_arguments(init)
    if base is None or forwarded is None:
        return own
    return _with_inherited(own, signature_of(base), *forwarded)


@functools.cache
def _parse_module(module: str) -> ast.Module | None:
    """The syntax tree of ``module``'s source, or None (no such module, a C extension)."""
    try:
        spec = importlib.util.find_spec(module)  # imports the parent packages only
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    return ast.parse(Path(spec.origin).read_text(encoding="utf-8"))


def _parse_class(target: str) -> tuple[ast.Module, str, ast.ClassDef] | None:
    """The parsed module, module name and ``class`` statement of ``target``, or None (not a class in source)."""
    module, _, name = target.rpartition(".")
    tree = _parse_module(module)
    if tree is None:
        return None
    found = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name), None)
    return None if found is None else (tree, module, found)


@functools.cache
def _learner_signature(target: str) -> Signature | None:
    """The settings of a learner class read from source, or None for a class that is not one.

    A learner (:class:`pilot.learners.base.Learner` and its subclasses) takes, as flat keys, the fields that
    its constructor's ``setup`` annotation brings (:data:`EXPANDED`) and its hyperparameters: the annotated
    class attributes with a value (not ``ClassVar``) of the class and of every learner base class, a
    subclass's default over its base's. A class is a learner when its own ``__init__`` takes an
    :data:`EXPANDED` parameter or one of its bases (found in its module or through its imports) is one."""
    parsed = _parse_class(target)
    if parsed is None:
        return None
    tree, module, cls = parsed
    bases = [_name_target(tree, module, b.id) for b in cls.bases if isinstance(b, ast.Name)]
    inherited = [sig for sig in (_learner_signature(b) for b in bases if b is not None) if sig is not None]
    init = next((n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
    arguments = init.args.args if init is not None else []
    setup = next((a for a in arguments if a.annotation and ast.unparse(a.annotation) in EXPANDED), None)
    if setup is None and not inherited:
        return None
    params: dict[str, Param] = {}
    for signature in reversed(inherited):  # the first base wins, as in the MRO
        params.update(signature.params)
    if setup is not None and setup.annotation is not None:
        training, allowed = EXPANDED[ast.unparse(setup.annotation)]
        fields = signature_of(training).params
        params = {k: p for k, p in params.items() if k not in fields}  # this class's setup decides them
        params = {**{k: p for k, p in fields.items() if allowed is None or k in allowed}, **params}
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            annotation = ast.unparse(node.annotation)
            if not annotation.startswith(("ClassVar", "typing.ClassVar")):
                params[node.target.id] = Param(node.target.id, _evaluate(annotation), _literal(node.value))
    return Signature(params)


def _own_signature(function: ast.FunctionDef) -> Signature:
    args = function.args
    positional = args.posonlyargs + args.args
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    pairs = list(zip(positional, defaults)) + list(zip(args.kwonlyargs, args.kw_defaults))
    params: dict[str, Param] = {}
    for arg, default in pairs:
        if arg.arg in ("self", "cls"):
            continue
        annotation = ast.unparse(arg.annotation) if arg.annotation else None
        params[arg.arg] = Param(arg.arg, _evaluate(annotation) if annotation else Any, _literal(default))
    return Signature(params, open=args.kwarg is not None)


EXPANDED: dict[str, tuple[str, frozenset[str] | None]] = {
    "LearnerSetup": ("pilot.learners.base.Training", None),
    "InferenceSetup": ("pilot.learners.base.Training", frozenset({"batch_size", "eval_batch_size"})),
}
"""A parameter annotated with one of these names also takes, as flat keys of the same node, the fields
of the named dataclass (all, or the listed ones): a learner's ``setup: LearnerSetup`` brings the
training-loop settings (``method.epochs``, ``method.optimizer``...), which
:meth:`pilot.learners.base.Learner.create` sorts out; a training-free learner's ``setup: InferenceSetup``
only the batch sizes."""


def _is_dataclass(cls: ast.ClassDef) -> bool:
    names = [ast.unparse(d.func if isinstance(d, ast.Call) else d) for d in cls.decorator_list]
    return any(name in ("dataclass", "dataclasses.dataclass") for name in names)


def _dataclass_signature(cls: ast.ClassDef) -> Signature:
    """The ``__init__`` that ``@dataclass`` writes for ``cls``: its annotated fields, in order."""
    fields = [n for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)]
    return Signature(
        {
            f.target.id: Param(f.target.id, _evaluate(ast.unparse(f.annotation)), _literal(f.value))  # type: ignore[union-attr]
            for f in fields
            if not ast.unparse(f.annotation).startswith("ClassVar")
        }
    )


def _base_target(tree: ast.Module, module: str, cls: ast.ClassDef) -> str | None:
    """The dotted name of the first base class of ``cls`` (defined in ``module`` or imported by name)."""
    if not cls.bases or not isinstance(cls.bases[0], ast.Name):
        return None
    return _name_target(tree, module, cls.bases[0].id)


def _name_target(tree: ast.Module, module: str, name: str) -> str | None:
    """The dotted name of ``name`` as ``module`` (parsed: ``tree``) sees it: defined there or imported by name."""
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return f"{module}.{name}"
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    return f"{node.module}.{alias.name}"
    return None


def _forwarded_arguments(init: ast.FunctionDef) -> tuple[int, frozenset[str]] | None:
    """For an ``__init__(..., **kwargs)`` that calls ``super().__init__(a, b, key=..., **kwargs)``: how many
    arguments that call passes by position, and the keywords it passes itself. None for any other."""
    if init.args.kwarg is None:
        return None
    kwarg = init.args.kwarg.arg
    for node in ast.walk(init):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "__init__"
            and isinstance(node.func.value, ast.Call)
            and isinstance(node.func.value.func, ast.Name)
            and node.func.value.func.id == "super"
            and any(k.arg is None and isinstance(k.value, ast.Name) and k.value.id == kwarg for k in node.keywords)
        ):
            return len(node.args), frozenset(k.arg for k in node.keywords if k.arg is not None)
    return None


def _with_inherited(own: Signature, base: Signature, positional: int, passed: frozenset[str]) -> Signature:
    """``own`` (whose ``**kwargs`` go to the base class) with the base's parameters that the forwarding call
    leaves to the caller: not its first ``positional`` ones, not those ``passed`` by keyword, not those
    ``own`` lists (the subclass's default wins). Open where the base is open."""
    inherited = {k: p for k, p in list(base.params.items())[positional:] if k not in passed and k not in own.params}
    return Signature({**own.params, **inherited}, open=base.open)


def _signature_of_callable(fn: Callable[..., Any]) -> Signature:
    """The signature of an imported callable, with its annotations evaluated (Any where they fail).
    For a class, that of its ``__init__`` (a metaclass ``__call__`` would hide it from ``inspect``), with
    the base class's parameters where ``__init__`` forwards ``**kwargs`` to it (as :func:`_signature_from_source`)."""
    if isinstance(fn, type) and callable(getattr(fn, "hyperparameters", None)):
        return _imported_learner_signature(fn)
    function = getattr(fn, "__init__") if isinstance(fn, type) else fn
    try:
        hints = typing.get_type_hints(function, include_extras=True)
    except Exception:  # noqa: BLE001 - foreign annotations we cannot evaluate are left unchecked
        hints = {}
    parameters = list(inspect.signature(function).parameters.values())
    if isinstance(fn, type):
        parameters = parameters[1:]  # self
    params, is_open = {}, False
    for p in parameters:
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            is_open = True
        elif p.kind is not inspect.Parameter.VAR_POSITIONAL:
            params[p.name] = Param(p.name, hints.get(p.name, Any), p.default)
    own = Signature(params, open=is_open)
    if not (is_open and isinstance(fn, type)):
        return own
    mro = fn.__mro__
    owner = next(i for i, c in enumerate(mro) if "__init__" in vars(c))  # the class whose __init__ this is
    forwarded = _forwarded_arguments_of(function)
    if forwarded is None or owner + 1 == len(mro):
        return own
    return _with_inherited(own, _signature_of_callable(mro[owner + 1]), *forwarded)  # what super() reaches


def _imported_learner_signature(cls: type) -> Signature:
    """:func:`_learner_signature` for an imported learner class: the fields its nearest ``setup`` annotation
    brings, then ``cls.hyperparameters()`` with their evaluated annotations."""
    written = ""
    for klass in cls.__mro__:
        init = vars(klass).get("__init__")
        setup = inspect.signature(init).parameters.get("setup") if init is not None else None
        if setup is not None:
            # The written name (InferenceSetup is LearnerSetup once imported): a string under postponed annotations.
            written = setup.annotation if isinstance(setup.annotation, str) else setup.annotation.__name__
            break
    target, keys = EXPANDED.get(written, EXPANDED["LearnerSetup"])
    params = {k: p for k, p in signature_of(target).params.items() if keys is None or k in keys}
    try:
        hints = typing.get_type_hints(cls, include_extras=True)
    except Exception:  # noqa: BLE001 - foreign annotations we cannot evaluate are left unchecked
        hints = {}
    for name, default in getattr(cls, "hyperparameters")().items():
        params[name] = Param(name, hints.get(name, Any), default)
    return Signature(params)


def _forwarded_arguments_of(function: Callable[..., Any]) -> tuple[int, frozenset[str]] | None:
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    except (OSError, TypeError, SyntaxError):
        return None
    init = tree.body[0] if tree.body else None
    return _forwarded_arguments(init) if isinstance(init, ast.FunctionDef) else None


@functools.cache
def signature_of(target: str) -> Signature:
    """The parameters of ``target``: from its source if possible, else by importing it."""
    found = _signature_from_source(target)
    if found is not None:
        return found
    from hydra.utils import get_object

    return _signature_of_callable(get_object(target))


def _signature_for(target: str, keys: list[str]) -> Signature:
    """The stand-in of ``target`` when it lists every key of the node, else the real signature with
    the stand-in's annotations over it."""
    stand_in = STAND_INS.get(target)
    if stand_in is None:
        return signature_of(target)
    own = _signature_of_callable(stand_in)
    if all(k in own.params for k in keys):
        return own
    real = signature_of(target)
    return Signature({**real.params, **own.params}, real.open)


# ------------------------------------------------------------------------------------ checks
def check_node(path: str, node: Any, injected: frozenset[str] | set[str] = frozenset()) -> None:
    """Check a resolved config node (plain dicts and lists) with a ``_target_``: its keys, its values,
    and its nested ``_target_`` nodes. ``injected``: parameters the run loop passes itself."""
    if not isinstance(node, dict) or not isinstance(node.get("_target_"), str):
        raise ConfigError(f"config '{path}' must be a mapping with a _target_ (got {type(node).__name__})")
    target = node["_target_"]
    keys = [str(k) for k in node if not str(k).startswith("_")]
    try:
        signature = _signature_for(target, keys)
    except Exception as err:  # noqa: BLE001 - any import failure is a config error here
        raise ConfigError(f"{path}._target_={target} cannot be imported: {err}") from err
    settable = sorted(name for name in signature.params if name not in injected)
    for key in keys:
        if key in injected:
            raise ConfigError(f"{path}.{key} is passed by the run itself and cannot be set in the config.")
        if key not in signature.params:
            if signature.open:
                continue
            raise ConfigError(f"{path}.{key} is not a parameter of {target}. Its parameters are: {', '.join(settable)}")
        check_value(f"{path}.{key}", node[key], signature.params[key])
    if not node.get("_partial_") and "_args_" not in node:
        missing = [name for name in settable if signature.params[name].default is REQUIRED and name not in node]
        if missing:
            raise ConfigError(f"{path}.{missing[0]} is not set, and {target} needs it ({path}.{missing[0]}=<value>).")


def check_value(path: str, value: Any, param: Param) -> None:
    """Check one value against ``param``'s annotation (a nested ``_target_`` node against its own)."""
    if isinstance(value, dict) and "_target_" in value:
        check_node(path, value)
        return
    if takes_objects(param.type):
        if value is None and allows_none(param.type):
            return
        either = "null or " if allows_none(param.type) else ""
        raise ConfigError(
            f"{path}={show(value)} is not allowed: it must be {either}a config node with a _target_ "
            f"(the class or function to build, as the files in configs/ show)."
        )
    if not is_valid(param.type, value):
        raise ConfigError(bad_value_message(path, value, param.type, param.default))


def bad_value_message(path: str, value: Any, annotation: Any, default: Any = REQUIRED) -> str:
    """``"method.epochs=0 is not allowed: it must be an integer >= 1 (e.g. method.epochs=5)."``"""
    text = f"{path}={show(value)} is not allowed: it must be {describe(annotation)}"
    if default is not REQUIRED and default is not UNKNOWN and default is not None and _wants_example(annotation):
        if is_valid(annotation, default):
            text += f" (e.g. {path}={show(default)})"
    return text + "."


@functools.lru_cache(maxsize=None)
def _adapter(annotation: Any) -> Any:
    from pydantic import ConfigDict, TypeAdapter

    return TypeAdapter(annotation, config=ConfigDict(strict=True, allow_inf_nan=False))


def is_valid(annotation: Any, value: Any) -> bool:
    """Whether ``value`` fits ``annotation`` (strict: no conversions). Unsupported annotations pass."""
    from pydantic import ValidationError

    try:
        adapter = _adapter(annotation)
    except Exception:  # noqa: BLE001 - pydantic cannot check it (tests/test_config_schema.py keeps ours checkable)
        return True
    try:
        adapter.validate_python(value)
    except ValidationError:
        return False
    return True


_PLAIN = (int, float, str, bool, type(None), list, tuple, dict, set, collections.abc.Sequence, collections.abc.Mapping)


def takes_objects(annotation: Any) -> bool:
    """True when the annotation names something a YAML value cannot be: a class that is not plain data
    (``Backbone``, :class:`AnObject`) or a ``Callable``."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return takes_objects(typing.get_args(annotation)[0])
    if origin is Literal:
        return False
    if origin is collections.abc.Callable:
        return True
    if origin is not None:
        return any(takes_objects(a) for a in typing.get_args(annotation) if a is not Ellipsis)
    return annotation is not Any and annotation not in _PLAIN


def allows_none(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (Union, types.UnionType) and type(None) in typing.get_args(annotation)


# --------------------------------------------------------------------------- words for messages
_NOUNS = {int: ("an integer", "integers"), float: ("a number", "numbers"), str: ("a string", "strings")}
_BOUNDS = {Ge: (">=", "ge"), Gt: (">", "gt"), Le: ("<=", "le"), Lt: ("<", "lt")}


def describe(annotation: Any, plural: bool = False) -> str:
    """The values ``annotation`` allows, in words: ``Annotated[int, Ge(1)]`` -> ``"an integer >= 1"``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return _describe_annotated(args[0], args[1:], plural)
    if origin is Literal:
        return "one of " + ", ".join(show(a) for a in args)
    if origin in (Union, types.UnionType):
        options = [describe(a, plural) for a in args if a is not type(None)]
        return ", or ".join(options) + (", or null" if type(None) in args else "")
    if origin in (list, tuple, collections.abc.Sequence):
        return "a list of " + describe(args[0], plural=True) if args else "a list"
    if annotation is dict or origin in (dict, collections.abc.Mapping):
        return "a mapping"
    if annotation is bool:
        return "true or false"
    if annotation in _NOUNS:
        return _NOUNS[annotation][plural]
    return "a value" if annotation is Any else getattr(annotation, "__name__", str(annotation))


def _describe_annotated(base: Any, metadata: tuple[Any, ...], plural: bool) -> str:
    checks = [m for m in metadata if isinstance(m, Check)]
    whole = next((c.says for c in checks if c.whole), None)
    if whole is not None:
        return whole
    text = describe(base, plural)
    length = next((m for m in metadata if isinstance(m, Len)), None)
    if length is not None and length.min_length == length.max_length and text.startswith("a list of "):
        text = f"a list of {length.min_length} {text.removeprefix('a list of ')}"
    bounds = [f"{_BOUNDS[type(m)][0]} {show(getattr(m, _BOUNDS[type(m)][1]))}" for m in metadata if type(m) in _BOUNDS]
    if bounds:
        text += " " + " and ".join(bounds)
    return ", ".join([text] + [c.says for c in checks])


def _wants_example(annotation: Any) -> bool:
    """An example helps for numbers and lists, not where the allowed values are already listed."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return not any(isinstance(m, Check) and m.whole for m in args[1:]) and _wants_example(args[0])
    if origin in (Union, types.UnionType):
        return all(_wants_example(a) for a in args if a is not type(None))
    return origin is not Literal and annotation is not bool


def show(value: Any) -> str:
    """``value`` as it is written on the command line: ``null``, ``true``, ``[0.9,0.1]``, ``fast``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value if value and value == value.strip() else repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(show(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {show(v)}" for k, v in value.items()) + "}"
    return repr(value)
