"""The recipe's code_interpreter rules: extraction, print-wrapping, what the model sees."""

from __future__ import annotations

import pytest

from runtime.verl.recipe.code import NO_OUTPUT, code_argument, extract_code, observation, prepare_code, wrap_last_line


def test_first_python_block_is_taken() -> None:
    code = "Let me compute.\n```python\nx = 2\nx * 3\n```\nand also\n```python\nprint('second')\n```"
    assert extract_code(code) == "x = 2\nx * 3"


def test_only_python_fences_count_as_in_the_recipe() -> None:
    assert extract_code("```py\nprint(1)\n```") == "```py\nprint(1)\n```"
    assert extract_code("```\nprint(2)\n```") == "```\nprint(2)\n```"
    assert extract_code("```python print(3)```") == "print(3)"  # no newline needed; the body is stripped
    assert extract_code("```python3\nprint(4)\n```") == "3\nprint(4)"  # the recipe's regex, literally


def test_lenient_fences_option_also_takes_py_and_bare_fences() -> None:
    assert extract_code("```py\nprint(1)\n```", lenient_fences=True) == "print(1)"
    assert extract_code("```\nprint(2)\n```", lenient_fences=True) == "print(2)"
    # a ```python block still wins, wherever it is
    assert extract_code("```\nprint(2)\n```\n```python\nprint(5)\n```", lenient_fences=True) == "print(5)"


def test_unfenced_code_is_kept() -> None:
    assert extract_code("a = 1\nprint(a)") == "a = 1\nprint(a)"


def test_last_expression_is_printed() -> None:
    assert wrap_last_line("x = 2\nx * 3") == "x = 2\nprint(x * 3)"


def test_trailing_empty_lines_are_skipped_and_kept() -> None:
    assert wrap_last_line("x = 2\nx + 1\n\n\n") == "x = 2\nprint(x + 1)\n\n\n"


def test_a_whitespace_only_last_line_is_wrapped_as_in_the_recipe() -> None:
    # the recipe skips only lines equal to "": a line of spaces is the one it wraps
    assert wrap_last_line("x = 2\nx + 1\n\n  \n") == "x = 2\nx + 1\n\nprint(  )\n"


def test_print_line_is_left_alone() -> None:
    assert wrap_last_line("print(5)") == "print(5)"
    assert wrap_last_line("x = 1\nprint(x, end='')") == "x = 1\nprint(x, end='')"


def test_check_is_on_the_raw_line_as_in_the_recipe() -> None:
    # An indented last line does not start with `print`, so it is wrapped (and later fails
    # to compile in the sandbox; the model sees the traceback).
    assert wrap_last_line("for i in range(2):\n    print(i)") == "for i in range(2):\nprint(    print(i))"


def test_code_argument_fails_like_the_recipe() -> None:
    assert code_argument({"code": "x"}) == "x"
    with pytest.raises(KeyError):
        code_argument({"source": "x"})
    with pytest.raises(TypeError, match="expected string or bytes-like object, got 'int'"):
        code_argument({"code": 5})


def test_empty_code_stays_empty() -> None:
    assert wrap_last_line("") == ""
    assert wrap_last_line("\n\n") == "\n\n"


def test_prepare_code_extracts_then_wraps() -> None:
    assert prepare_code("Compute:\n```python\nimport math\nmath.factorial(5)\n```") == "import math\nprint(math.factorial(5))"


def _response(status: str, run_status: str | None, stdout: str = "", stderr: str = "") -> dict:
    run = None if run_status is None else {
        "status": run_status, "execution_time": 0.01, "return_code": 0, "stdout": stdout, "stderr": stderr,
    }
    return {"status": status, "message": "", "compile_result": None, "run_result": run, "files": {}}


def test_finished_run_shows_stdout_then_stderr() -> None:
    assert observation(_response("Success", "Finished", "120\n", "")) == "120\n"
    # A non-zero exit is `Failed` overall but its run `Finished`: the traceback is shown.
    assert observation(_response("Failed", "Finished", "partial\n", "Traceback ...\nZeroDivisionError\n")) == (
        "partial\nTraceback ...\nZeroDivisionError\n"
    )


def test_unfinished_run_shows_the_fixed_text() -> None:
    assert observation(_response("Failed", "TimeLimitExceeded", "ignored")) == NO_OUTPUT
    assert observation(_response("SandboxError", None)) == NO_OUTPUT
    assert observation(None) == NO_OUTPUT
    assert observation({}) == NO_OUTPUT
