"""`skyloop` with one fault put into a run's bookkeeping, for the tests of what such an error fails.

    python faulty_agent.py {activate,launch,finish} TASK agent --backend local ...

`activate`: activating the task raises (as reading its inputs or looking up its cache could); `launch`:
building an attempt of it raises (as pickling a step defined in `__main__` could); `finish`: taking the end
of one of its attempts raises (as working out a retry delay did). The error is an
ordinary exception the orchestrator does not expect; everything else is the real `skyloop` command.
"""

from __future__ import annotations

import sys
from typing import Any

from skyloop.execution.runstate import RunState


class InjectedFault(Exception):
    """The fault put in."""


def main() -> None:
    where, task, *argv = sys.argv[1:]
    if where == "activate":
        activate = RunState._activate

        def _activate(self: RunState, name: str, *args: Any) -> None:
            if name == task:
                raise InjectedFault(f"activating {name}")
            activate(self, name, *args)

        RunState._activate = _activate  # type: ignore[method-assign]
    elif where == "launch":
        launch = RunState.launch

        def _launch(self: RunState, unit: Any) -> Any:
            if unit.task.name == task:
                raise InjectedFault(f"launching {unit.task.name}")
            return launch(self, unit)

        RunState.launch = _launch  # type: ignore[method-assign]
    else:
        finish = RunState.finish

        def _finish(self: RunState, unit: Any, result: Any) -> float | None:
            if unit.task.name == task:
                raise InjectedFault(f"taking the end of {unit.task.name}")
            return finish(self, unit, result)

        RunState.finish = _finish  # type: ignore[method-assign]
    from skyloop.cli.main import main as skyloop

    sys.argv = ["skyloop", *argv]
    skyloop()


if __name__ == "__main__":
    main()
