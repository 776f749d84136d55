"""A decorated step keeps its function's signature for type checkers.

mypy checks a small user module that decorates functions with ``@step`` in
both forms. Calls that match the function type-check, with the function's own
return type; calls that do not are errors. If ``Step`` or ``step`` lost their
``ParamSpec`` typing (``Step`` calling as ``(*Any, **Any) -> Any``), the
revealed types change, the ``assert_type`` lines fail and the expected errors
vanish, so this test fails.

Only ``flowyml/__init__.py`` and ``flowyml/step.py`` are checked with the
user's module (other imports are skipped as ``Any``), which keeps the run
under a second; CI's ``mypy flowyml`` checks the whole package.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import flowyml

pytest.importorskip("mypy", reason="mypy is in the dev extra: pip install -e '.[dev]'")

PACKAGE = Path(flowyml.__file__).resolve().parent

# Each line that must be an error ends with "# E: <mypy error code>"; every
# other line must type-check.
USER_MODULE = '''\
from typing import assert_type

from flowyml import step


@step
def double(x: int) -> int:
    return 2 * x


@step(outputs=["halved"], retries=2)
def halve(x: float, *, exact: bool = False) -> float:
    return x / 2


count = step(len, name="count", inputs=["load"])

reveal_type(double)
reveal_type(halve)
reveal_type(step(double, name="again"))
assert_type(double(21), int)
assert_type(halve(3.0, exact=True), float)
assert_type(count([1, 2]), int)
assert_type(double.with_options(name="again")(1), int)
double.retries + 1

double("21")  # E: arg-type
double(1, 2)  # E: call-arg
double(y=1)  # E: call-arg
halve(1.0, True)  # E: call-arg
halve(1.0, exact="yes")  # E: arg-type
total: str = double(1)  # E: assignment
step(retries="2")  # E: call-overload
step(double, colour="red")  # E: call-overload
'''

REVEALED = [
    "Step[[x: int], int]",
    "Step[[x: float, *, exact: bool =], float]",
    "Step[[x: int], int]",
]


def test_a_decorated_step_keeps_its_signature_for_mypy(tmp_path: Path) -> None:
    module = tmp_path / "user_pipeline.py"
    module.write_text(USER_MODULE)
    config = tmp_path / "mypy.ini"
    config.write_text("[mypy]\n")  # not the project's config: the user's defaults
    completed = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(config), "--python-version", "3.11",
         "--follow-imports", "skip", "--no-incremental", "--cache-dir", str(tmp_path / "cache"),
         "--hide-error-context", "--no-error-summary", "--show-error-codes", "--no-pretty",
         str(module), str(PACKAGE / "__init__.py"), str(PACKAGE / "step.py")],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    output = completed.stdout + completed.stderr
    # Revealed types, with builtins' module prefix dropped (older mypy prints it).
    revealed = [m.replace("builtins.", "") for m in re.findall(r'Revealed type is "(.*)"', output)]
    revealed = [re.sub(r"^flowyml\.step\.", "", m) for m in revealed]
    assert revealed == REVEALED, output

    errors = {
        (int(line), code)
        for path, line, code in re.findall(r"^(.+?):(\d+): error: .*\[([\w-]+)\]$", output, re.MULTILINE)
        if Path(path).name == module.name
    }
    expected = {
        (number, match.group(1))
        for number, text in enumerate(USER_MODULE.splitlines(), start=1)
        if (match := re.search(r"# E: ([\w-]+)$", text))
    }
    assert errors == expected, output
    # Nothing else is wrong: flowyml's own files check clean in this setting too.
    assert not re.search(r"^(?!.*user_pipeline\.py).*: error:", output, re.MULTILINE), output
