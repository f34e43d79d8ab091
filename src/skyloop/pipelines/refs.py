"""Placeholders a pipeline body handles while it is compiled: task outputs and parameters."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NoReturn

from skyloop.errors import SpecError
from skyloop.pipelines.constants import check_constant
from skyloop.spec.pipeline import Condition, InputBinding, ParamInput, TaskInput

__all__ = ["OutputRef", "ParamRef", "Ref", "TaskHandle"]


def _refused(symbol: str, reflected: bool = False) -> Callable[..., NoReturn]:
    """An operator of `Ref` (unary, or binary with the other operand) that refuses to compute `symbol`: a ref
    has no value while the pipeline compiles."""
    def operator(self: Ref, *other: Any) -> NoReturn:
        self._arithmetic(symbol, *other, reflected=reflected)

    return operator


class Ref:
    """Something a pipeline body can pass to a step or test in `when(...)`."""

    type: Any = Any

    def binding(self) -> InputBinding:
        """The spec binding this placeholder stands for."""
        raise NotImplementedError

    def _compare(self, op: str, value: Any) -> Condition:
        if isinstance(value, ParamRef):
            return Condition(source=self.binding(), op=op, value_param=value.name)
        if isinstance(value, Ref):
            raise SpecError("a condition compares an output with a constant or a parameter; "
                            "compare two outputs inside a step")
        source = self.binding()
        if value is None and op not in ("==", "!="):
            raise SpecError(f"`{Condition(source=source).describe()} {op} None` cannot be evaluated: compare "
                            f"{self.describe()} with a number or a parameter, or test `== None`")
        check_constant(value, f"the value compared with {Condition(source=source).describe()} in when(...)")
        return Condition(source=source, op=op, value=value)

    def __eq__(self, value: object) -> Condition:  # type: ignore[override]
        return self._compare("==", value)

    def __ne__(self, value: object) -> Condition:  # type: ignore[override]
        return self._compare("!=", value)

    def __lt__(self, value: Any) -> Condition:
        return self._compare("<", value)

    def __le__(self, value: Any) -> Condition:
        return self._compare("<=", value)

    def __gt__(self, value: Any) -> Condition:
        return self._compare(">", value)

    def __ge__(self, value: Any) -> Condition:
        return self._compare(">=", value)

    def __hash__(self) -> int:
        return id(self)

    def describe(self) -> str:
        """What this placeholder stands for, in words: `parameter 'n'`, `step output train.model`."""
        return "a step output or parameter"

    def _label(self) -> str:
        return "it"

    def _no_value(self, doing: str) -> SpecError:
        return SpecError(
            f"{doing}: {self.describe()} has no value while the pipeline is compiled: use "
            "`with when(output >= 0.9): ...` instead of `if`, and do arithmetic inside a step"
        )

    def __bool__(self) -> bool:
        raise self._no_value("cannot test it with `if`, `and`, `or` or `not`")

    def _arithmetic(self, symbol: str, other: Any = None, *, reflected: bool = False) -> NoReturn:
        this = self._label()
        if other is None:
            expression = f"{symbol}{this}"
        else:
            shown = "another output" if isinstance(other, Ref) else repr(other)
            expression = f"{shown} {symbol} {this}" if reflected else f"{this} {symbol} {shown}"
        raise self._no_value(f"cannot compute `{expression}`")

    __add__ = _refused("+")
    __radd__ = _refused("+", reflected=True)
    __sub__ = _refused("-")
    __rsub__ = _refused("-", reflected=True)
    __mul__ = _refused("*")
    __rmul__ = _refused("*", reflected=True)
    __matmul__ = _refused("@")
    __rmatmul__ = _refused("@", reflected=True)
    __truediv__ = _refused("/")
    __rtruediv__ = _refused("/", reflected=True)
    __floordiv__ = _refused("//")
    __rfloordiv__ = _refused("//", reflected=True)
    __mod__ = _refused("%")
    __rmod__ = _refused("%", reflected=True)
    __pow__ = _refused("**")
    __rpow__ = _refused("**", reflected=True)
    __neg__ = _refused("-")
    __pos__ = _refused("+")

    def __abs__(self) -> NoReturn:
        raise self._no_value(f"cannot compute `abs({self._label()})`")

    def __int__(self) -> NoReturn:
        raise self._no_value("cannot convert it with int(...)")

    def __float__(self) -> NoReturn:
        raise self._no_value("cannot convert it with float(...)")

    def __index__(self) -> NoReturn:
        raise self._no_value("cannot use it as an index, a count or a range bound")

    def __iter__(self) -> Iterator[Any]:
        raise SpecError("a single step output cannot be unpacked while compiling; use `.map` to fan out")


class OutputRef(Ref):
    """One named output of a task."""

    def __init__(self, task: str, output: str, type_: Any = Any, gathered: bool = False) -> None:
        self.task = task
        self.output = output
        self.type = type_
        self.gathered = gathered
        """True for the outputs of a mapped task: downstream steps receive a list."""

    def binding(self) -> TaskInput:
        return TaskInput(task=self.task, output=self.output)

    def describe(self) -> str:
        return f"step output {self.task}.{self.output}"

    def _label(self) -> str:
        return f"{self.task}.{self.output}"

    def __repr__(self) -> str:
        return f"<output {self.task}.{self.output}>"


class ParamRef(Ref):
    """A pipeline parameter."""

    def __init__(self, name: str, type_: Any = Any) -> None:
        self.name = name
        self.type = type_

    def binding(self) -> ParamInput:
        return ParamInput(param=self.name)

    def describe(self) -> str:
        return f"parameter {self.name!r}"

    def _label(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"<param {self.name}>"


class TaskHandle(OutputRef):
    """What calling a step in a pipeline body returns.

    For a single-output step it is that output; for a NamedTuple step, read outputs as attributes
    (`split.train`) or unpack them (`train, test = split(...)`).
    """

    def __init__(self, task: str, outputs: dict[str, Any], multi: bool, gathered: bool) -> None:
        first = next(iter(outputs))
        super().__init__(task, first, outputs[first], gathered)
        self._outputs = {n: OutputRef(task, n, t, gathered) for n, t in outputs.items()}
        self._multi = multi
        self.after_tasks: list[str] = []

    def _single(self) -> None:
        if self._multi:
            raise SpecError(f"step {self.task!r} has several outputs {list(self._outputs)}; "
                            f"pick one, e.g. `{self.task}.{next(iter(self._outputs))}`")

    def binding(self) -> TaskInput:
        self._single()
        return super().binding()

    def describe(self) -> str:
        return f"the outputs {list(self._outputs)} of step {self.task!r}" if self._multi else super().describe()

    def __getattr__(self, name: str) -> OutputRef:
        outputs = self.__dict__.get("_outputs", {})
        if name in outputs:
            return outputs[name]  # type: ignore[no-any-return]
        raise AttributeError(f"step {self.__dict__.get('task')!r} has no output {name!r}; "
                             f"outputs are {list(outputs)}")

    def __iter__(self) -> Iterator[OutputRef]:
        if not self._multi:
            return super().__iter__()
        return iter(self._outputs.values())

    def __getitem__(self, index: int) -> OutputRef:
        return list(self._outputs.values())[index]

    def __repr__(self) -> str:
        return f"<task {self.task} outputs={list(self._outputs)}>"
