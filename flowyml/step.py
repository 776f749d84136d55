"""Steps: plain functions plus the options that say how a pipeline runs them.

A :class:`Step` still calls like the function it wraps, so ``clean(df)`` works in
a unit test. Everything a pipeline needs to wire it (asset names, params, how
inputs bind to parameters) is resolved here, once, when the step is added, so
that mistakes surface while the pipeline is being built rather than at 3 a.m.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, ParamSpec, TypedDict, TypeVar, Unpack, overload

from .exceptions import OptionError, ParameterError, PipelineError

__all__ = ["Binding", "Step", "step"]

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)

# A step's parameters and return type, so that ``@step`` keeps the decorated
# function's signature for type checkers and editors (``Step[P, R]``).
P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True)
class Binding:
    """How a step's inputs and params reach its function's parameters.

    ``positional`` names the input (by asset) for each leading positional
    parameter, ``keyword`` maps parameter name -> asset for the rest,
    ``varargs`` lists the assets a ``*args`` parameter collects.
    """

    positional: tuple[str, ...]
    keyword: tuple[tuple[str, str], ...]
    varargs: tuple[str, ...]


@dataclass(frozen=True, eq=False)
class Step(Generic[P, R]):
    """A function with the options a pipeline runs it under.

    Build one with :func:`step`; ``Pipeline.add_step`` makes renamed or
    re-parametrized copies with :meth:`with_options`. A ``Step[P, R]`` calls
    like the ``Callable[P, R]`` it wraps, so type checkers and editors see the
    function's own parameters and return type.

    Examples
    --------
    >>> @step(outputs=["doubled"])
    ... def double(x=2):
    ...     return 2 * x
    >>> double(21)
    42
    >>> double.outputs
    ('doubled',)
    """

    func: Callable[P, R]
    name: str
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    per_partition: bool = False
    retries: int = 0
    retry_delay: float = 0.0
    timeout: float | None = None
    tags: tuple[str, ...] = ()
    resources: Mapping[str, float] | None = None
    # A whole-dataset step over a partitioned input runs as a tree of at most
    # this many inputs a task (compile.py); None: one task over all partitions.
    split_every: int | None = None
    # A pandera schema (or {output: schema}) each task's output is validated
    # against on the worker (tasks.py); None: no contract.
    output_schema: Any = None
    # Runs once after every partition of a per-partition step, with the list of
    # partition results; its return value becomes the step's asset (sinks use it
    # to commit their output). None: the partitions themselves are the asset.
    finalize: Callable[[list[Any]], Any] | None = None
    # Called on the driver with the run id when a run that includes this step
    # fails or is interrupted (sinks remove their staged, uncommitted files).
    abort: Callable[[str], None] | None = None
    # Called on the driver with the run id before a run in which this step has
    # tasks to run (sinks check that their output can be written, and record
    # who stages there), so a missing bucket fails before any task starts.
    begin: Callable[[str], None] | None = None

    def __post_init__(self) -> None:
        _check_options(self)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.func(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<Step {self.name!r} inputs={list(self.inputs)} outputs={list(self.asset_names)}>"

    @property
    def asset_names(self) -> tuple[str, ...]:
        """The assets this step produces: its ``outputs``, else its own name."""
        return self.outputs if self.outputs is not None else (self.name,)

    def with_options(self, **options: Any) -> Step[P, R]:
        """A copy with some fields replaced (``name``, ``params``, ``retries``...)."""
        unknown = set(options) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ParameterError(
                f"step {self.name!r}: unknown option(s) {sorted(unknown)}; "
                f"valid options are {sorted(_OPTION_NAMES)}"
            )
        for key in ("inputs", "outputs", "tags"):
            if options.get(key) is not None:
                options[key] = _names(options[key], key, options.get("name", self.name))
        return dataclasses.replace(self, **options)

    @property
    def signature(self) -> inspect.Signature:
        return _signature(self.func)

    def bind(self) -> Binding:
        """Resolve how inputs map to parameters; checks ``params`` and required parameters.

        Input *i* binds to the parameter of the same name, else to the next free
        positional parameter, else to ``*args``. ``params`` fill the rest; a
        required parameter left unfilled is an error now, not at run time.
        """
        parameters = list(self.signature.parameters.values())
        by_name = {p.name: p for p in parameters if p.kind not in _VARIADIC}
        has_varargs = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters)
        has_varkw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)

        named = {asset: asset for asset in self.inputs if asset in by_name}
        free = [p.name for p in parameters if p.kind in _POSITIONAL and p.name not in named]
        unnamed = [asset for asset in self.inputs if asset not in named]
        positional_slots = free[: len(unnamed)]
        varargs = tuple(unnamed[len(positional_slots) :])
        if varargs and not has_varargs:
            raise ParameterError(
                f"step {self.name!r} has {len(self.inputs)} inputs {list(self.inputs)} but its "
                f"function {self.func.__name__}{self.signature} takes fewer; add parameters, "
                f"a *args parameter, or list fewer inputs"
            )
        assigned = dict(zip(positional_slots, unnamed)) | named
        self._check_params(by_name, assigned, has_varkw)

        # Leading positional parameters are passed positionally so that a
        # *args parameter after them receives the rest in order.
        order = [p.name for p in parameters if p.kind in _POSITIONAL]
        lead: list[str] = []
        for parameter in order:
            if parameter not in assigned:
                break
            lead.append(parameter)
        if varargs and len(lead) < len(order):
            missing = order[len(lead)]
            raise ParameterError(
                f"step {self.name!r}: parameter {missing!r} comes before *args but no input "
                f"fills it; list an input for it or move it after *args"
            )
        keyword = tuple((p, assigned[p]) for p in assigned if p not in lead)
        return Binding(tuple(assigned[p] for p in lead), keyword, varargs)

    def _check_params(self, by_name: dict, assigned: dict[str, str], has_varkw: bool) -> None:
        for key in self.params:
            if key in assigned:
                raise ParameterError(
                    f"step {self.name!r}: params key {key!r} is already filled by input "
                    f"{assigned[key]!r}; remove it from params or from inputs"
                )
            if key not in by_name and not has_varkw:
                raise ParameterError(
                    f"step {self.name!r}: unknown params key {key!r}; "
                    f"{self.func.__name__}() takes {sorted(by_name) or 'no parameters'}"
                )
        for parameter in by_name.values():
            filled = parameter.name in assigned or parameter.name in self.params
            if not filled and parameter.default is inspect.Parameter.empty:
                raise ParameterError(
                    f"step {self.name!r}: required parameter {parameter.name!r} of "
                    f"{self.func.__name__}() is filled by no input and no param; add "
                    f"params={{{parameter.name!r}: ...}} or inputs=[...] to add_step"
                )


_VARIADIC = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
_OPTION_NAMES = {f.name for f in dataclasses.fields(Step)} - {"func"}


def _signature(func: Callable[..., Any]) -> inspect.Signature:
    try:
        return inspect.signature(func)
    except (TypeError, ValueError) as exc:  # some builtins have none
        raise PipelineError(f"cannot read the signature of {func!r}: {exc}") from exc


def _names(value: str | Iterable[str], option: str, step_name: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    names = tuple(value)
    for name in names:
        if not isinstance(name, str) or not name:
            raise PipelineError(
                f"step {step_name!r}: {option} must be non-empty strings, got {name!r}"
            )
    if len(set(names)) != len(names):
        raise PipelineError(f"step {step_name!r}: {option} {list(names)} repeats a name")
    return names


def _check_options(s: Step) -> None:
    if not callable(s.func):
        raise PipelineError(f"step {s.name!r}: {s.func!r} is not callable")
    if not isinstance(s.name, str) or not s.name:
        raise PipelineError(f"a step name must be a non-empty string, got {s.name!r}")
    if s.outputs is not None and not s.outputs:
        raise PipelineError(f"step {s.name!r}: outputs=[] produces nothing; omit it or name one")
    if not isinstance(s.retries, int) or s.retries < 0:
        raise PipelineError(f"step {s.name!r}: retries must be an int >= 0, got {s.retries!r}")
    if s.retry_delay < 0:
        raise PipelineError(f"step {s.name!r}: retry_delay must be >= 0, got {s.retry_delay!r}")
    if s.timeout is not None and not s.timeout > 0:
        raise PipelineError(f"step {s.name!r}: timeout must be > 0 seconds, got {s.timeout!r}")
    if not isinstance(s.params, Mapping):
        raise PipelineError(f"step {s.name!r}: params must be a dict, got {type(s.params).__name__}")
    if s.split_every is not None:
        _check_split_every(s)
    if s.output_schema is not None:
        _check_output_schema(s)


def _check_output_schema(s: Step) -> None:
    schemas = s.output_schema
    if isinstance(schemas, Mapping):
        unknown = sorted(set(schemas) - set(s.asset_names))
        if unknown:
            raise OptionError(
                f"step {s.name!r}: output_schema names {unknown}, which it does not produce; "
                f"its outputs are {list(s.asset_names)}"
            )
        schemas = list(schemas.values())
    else:
        schemas = [schemas]
    for schema in schemas:
        if not callable(getattr(schema, "validate", None)):
            raise OptionError(
                f"step {s.name!r}: output_schema must be a pandera schema (DataFrameSchema, "
                f"SeriesSchema or a DataFrameModel class), or a dict of them by output; got "
                f"{type(schema).__name__}. pip install 'flowyml[pandera]'"
            )


def _check_split_every(s: Step) -> None:
    k = s.split_every
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise OptionError(
            f"step {s.name!r}: split_every must be an int >= 2 (the most inputs one task of "
            f"the tree combines), got {k!r}; omit it for one task over all partitions"
        )
    if s.per_partition:
        raise OptionError(
            f"step {s.name!r}: split_every makes a whole-dataset step a tree; a per_partition "
            f"step already runs once per partition. Use one or the other"
        )
    if s.outputs is not None and len(s.outputs) > 1:
        raise OptionError(
            f"step {s.name!r}: split_every feeds the step's output back into it, so it needs "
            f"one output, not {list(s.outputs)}; return one value (a tuple or dict is fine)"
        )


class StepOptions(TypedDict, total=False):
    """The keyword options of :func:`step`, for type checkers (see ``step``'s overloads)."""

    name: str | None
    inputs: str | Iterable[str] | None
    outputs: str | Iterable[str] | None
    per_partition: bool
    retries: int
    retry_delay: float
    timeout: float | None
    tags: Iterable[str]
    resources: Mapping[str, float] | None
    split_every: int | None
    output_schema: Any


# Typed in two forms so that the decorated function keeps its signature:
# ``@step`` and ``step(func, ...)`` give a ``Step[P, R]``; ``@step(...)`` gives
# a decorator that turns a ``Callable[P, R]`` into a ``Step[P, R]``. The options
# are listed once, in StepOptions; the implementation below keeps them spelt
# out with their defaults, for ``help(step)`` and ``inspect.signature``.
@overload
def step(func: Callable[P, R], **options: Unpack[StepOptions]) -> Step[P, R]: ...


@overload
def step(func: None = None, **options: Unpack[StepOptions]) -> Callable[[Callable[P, R]], Step[P, R]]: ...


def step(
    func: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    inputs: str | Iterable[str] | None = None,
    outputs: str | Iterable[str] | None = None,
    per_partition: bool = False,
    retries: int = 0,
    retry_delay: float = 0.0,
    timeout: float | None = None,
    tags: Iterable[str] = (),
    resources: Mapping[str, float] | None = None,
    split_every: int | None = None,
    output_schema: Any = None,
) -> Step[..., Any] | Callable[[Callable[..., Any]], Step[..., Any]]:
    """Mark a function as a pipeline step; usable bare (``@step``) or with options.

    Parameters
    ----------
    func : callable, optional
        The function (when used bare).
    name : str, optional
        The step's name; defaults to the function's name.
    inputs : list of str, optional
        Asset names bound to the function's parameters (by name, else in order;
        a ``*args`` parameter collects the rest).
    outputs : list of str, optional
        Asset names produced. None: one asset named after the step. Several:
        the function returns a tuple/list of that length or a dict with those keys.
    per_partition : bool
        Run once per partition of the first partitioned input, in parallel.
    retries, retry_delay : int, float
        Extra attempts per task, and the seconds to wait between them.
    timeout : float, optional
        Seconds one attempt may take.
    tags : iterable of str
        Free-form labels (shown in reports).
    resources : dict, optional
        Dask worker resources one task needs (``{"GPU": 1}``), honoured on ``distributed``.
    split_every : int, optional
        For a step that is not ``per_partition`` and reads a partitioned input:
        run it as a tree, as ``split_every`` does in ``dask.dataframe``: first
        over groups of at most ``split_every`` partitions, then over groups of
        its own results, until one remains. The step must combine its own
        outputs correctly (partial sums, counts, top-n); see "Tree reductions"
        in docs/partitions.md.
    output_schema : pandera schema, optional
        A contract for the step's output (``pandera.DataFrameSchema``,
        ``SeriesSchema`` or a ``DataFrameModel``; a dict of them by output for
        a step with several), checked on the worker for every task: each
        partition of a per-partition step. A failing check fails the task with
        a :class:`~flowyml.exceptions.ContractError` naming the step, the
        partition and the first failing rows; see docs/data-contracts.md.

    Returns
    -------
    Step
        Calls like ``func``.

    Examples
    --------
    >>> @step
    ... def load():
    ...     return [1, 2, 3]
    >>> load()
    [1, 2, 3]
    >>> step(len, name="count", inputs=["load"]).inputs
    ('load',)
    """

    def make(function: Callable[..., Any]) -> Step[..., Any]:
        if isinstance(function, Step):
            function = function.func
        step_name = name or getattr(function, "__name__", None) or type(function).__name__
        return Step(
            func=function,
            name=step_name,
            inputs=_names(inputs, "inputs", step_name) if inputs is not None else (),
            outputs=_names(outputs, "outputs", step_name) if outputs is not None else None,
            per_partition=per_partition,
            retries=retries,
            retry_delay=retry_delay,
            timeout=timeout,
            tags=_names(tags, "tags", step_name) if tags else (),
            resources=dict(resources) if resources else None,
            split_every=split_every,
            output_schema=output_schema,
        )

    return make(func) if func is not None else make
