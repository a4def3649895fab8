"""Our stderr, stdout and exit status against a plain `python main.py` of the same code.

The model reads these tracebacks, so they must be byte-identical to what SandboxFusion (which
runs `python file.py`) returns: caret columns, source lines, SyntaxError markers, chained
exceptions, the recursion depth of a RecursionError, encodings, line endings.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.client import run_code
from sandbox.executor import program_env
from sandbox.testing import LocalServer, local_server

PROGRAMS = {
    "assert without a newline": "assert 1 == 2",
    "assert": "x = 1\nassert x == 2, 'x is ' + str(x)\n",
    "assert in a block": "if True:\n    assert 1 == 2\n",
    "assert with trailing spaces": "assert 1 == 2   \n",
    "CRLF line endings": "x = 1\r\nassert x == 2\r\n",
    "CR line endings": "x = 1\rassert x == 2\r",
    "byte order mark": "\ufeffassert 1 == 2\n",
    "form feed": "\x0cassert 1 == 2\n",
    "tab indentation": "if True:\n\tx = [1]\n\ty = x[3]\n",
    "frames in functions": "def f(a):\n    return a / 0\n\ndef g():\n    return f(1) + 1\n\ng()\n",
    "non-ASCII columns": "def f():\n    s = 'ñandú'; return s['é']\nf()\n",
    "wide characters": "s = '漢字漢字'; t = s + 1\n",
    "multi-line call": "def f(a, b):\n    return a + b\nf(1,\n  None)\n",
    "multi-line expression": "x = (1 +\n     2 +\n     None)\n",
    "chained": "try:\n    1/0\nexcept Exception as e:\n    raise ValueError('bad') from e\n",
    "during handling": "try:\n    {}['k']\nexcept KeyError:\n    None.attr\n",
    "syntax error": "int a = 1\n",
    "indentation error": "def f():\nreturn 1\n",
    "notes": "e = ValueError('v')\ne.add_note('a note')\nraise e\n",
    "exception group": "raise ExceptionGroup('eg', [ValueError(1), TypeError(2)])\n",
    "recursion": "def f(n):\n    return f(n + 1)\nf(0)\n",
    "library frames": "import json\njson.loads('{bad')\n",
    "sys.exit with a message": "import sys\nsys.exit('fatal: stop')\n",
    "KeyboardInterrupt": "print('before')\nraise KeyboardInterrupt\n",
    "latin-1 cookie": "# -*- coding: latin-1 -*-\ns = 'abc'\nassert s == 'x'\n",
    "warning and __file__": "import warnings\nwarnings.warn('careful')\nprint(__file__)\n",
    "output, then a failure": "print('partial output')\nraise RuntimeError('after output')\n",
}


@pytest.fixture(scope="module")
def server() -> Iterator[LocalServer]:
    with local_server(workers=2, preload=[]) as srv:
        yield srv


def plain_run(code: str, tmp_path: Path) -> tuple[int, str, str]:
    """`python main.py` in a fresh directory, paths rewritten to the sandbox's /tmp/main.py."""
    path = tmp_path / "main.py"
    path.write_bytes(code.encode("utf-8"))
    done = subprocess.run(
        [sys.executable, str(path)], cwd=tmp_path, env={**program_env(), "HOME": str(tmp_path)},
        capture_output=True, text=True, timeout=60,
    )
    return done.returncode, done.stdout.replace(str(path), "/tmp/main.py"), done.stderr.replace(str(path), "/tmp/main.py")


@pytest.mark.parametrize("code", list(PROGRAMS.values()), ids=list(PROGRAMS))
def test_output_is_byte_identical_to_a_plain_python_run(server: LocalServer, code: str, tmp_path: Path) -> None:
    result = run_code(server.url, code, timeout=30).run_result
    assert result is not None
    ours = (result.return_code, result.stdout, result.stderr)
    assert ours == plain_run(code, tmp_path)


def test_the_code_is_on_disk_as_for_python_main_py(server: LocalServer) -> None:
    code = "import inspect, os\ndef f():\n    return 1\nprint(os.listdir('.'), inspect.getsource(f).strip())"
    result = run_code(server.url, code).run_result
    assert result is not None and result.stdout == "['main.py'] def f():\n    return 1\n", result
