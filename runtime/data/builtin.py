"""Builtin dataset generators: `builtin:tiny_sft` and `builtin:tiny_math`.

`tiny_sft` writes ReTool-format solutions (one fixed phrase, one `<code>` block, the
`<interpreter>` output, an `<answer>`) and converts them with the same `convert_solution`
used for the real ReTool-SFT data. The interpreter output is what our sandbox actually
printed for the code; a mismatch with the known answer is an error, so a broken sandbox
or generator never produces silently wrong data. `tiny_math` writes verl RL rows for the
same kind of problems (a different seed gives different problems).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from reconciler.builtins import GENERATORS as GENERATORS  # re-exported: runtime.data.prepare reads it here
from reconciler.builtins import GeneratorOptions
from reconciler.errors import TerminalError
from runtime.data.problems import CALL_PHRASE, Problem, generate
from runtime.data.retool_sft import TOOLS, convert_solution, solution_text
from runtime.data.rl_rows import ANSWER_FORMAT, to_rl_row

def parse_options(generator: str, options: dict[str, Any]) -> GeneratorOptions:
    """Validated options. The spec already checked them when it loaded; this guards callers
    that build a `Dataset` without validation."""
    try:
        return GeneratorOptions.model_validate(options)
    except ValidationError as exc:
        raise TerminalError(
            f"invalid options for builtin:{generator}", str(exc),
            "valid options: rows (int), seed (int), problems (mixed | fixed_shape), heldout (bool)",
        ) from None


def problems_for(options: GeneratorOptions) -> list[Problem]:
    """Exactly the problems a builtin dataset with these options holds, in its row order."""
    return generate(options.rows, options.seed, heldout=options.heldout, problems=options.problems)


def user_content(problem: Problem) -> str:
    """The user turn for a generated problem: the same text an RL prompt carries."""
    return problem.text + ANSWER_FORMAT


def final_answer_text(answer: int | str) -> str:
    return f"The answer is \\boxed{{{answer}}}."


def solution_for(problem: Problem, interpreter_output: str) -> str:
    """The ReTool-format solution text of a generated problem."""
    return solution_text(CALL_PHRASE, problem.code, interpreter_output, final_answer_text(problem.answer))


def expected_sft_messages(problem: Problem) -> list[dict[str, Any]]:
    """The messages a correct sandbox yields for `problem` (no execution; for the tokenizer corpus)."""
    return convert_solution(user_content(problem), solution_for(problem, str(problem.answer)))


def tiny_sft_rows(
    options: GeneratorOptions, run_code: Callable[[str], str], concurrency: int = 4
) -> list[dict[str, Any]]:
    """messages+tools rows; `run_code(code) -> printed output` executes each solution's code
    (`concurrency` calls at a time; the rows keep the generator's order)."""
    from concurrent.futures import ThreadPoolExecutor

    problems = problems_for(options)
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        outputs = list(pool.map(run_code, [p.code for p in problems]))
    rows: list[dict[str, Any]] = []
    for problem, raw_output in zip(problems, outputs):
        output = raw_output.strip()
        if output != str(problem.answer):
            raise TerminalError(
                "the sandbox printed an unexpected result while generating tiny_sft",
                f"code {problem.code!r} printed {output!r}, expected {problem.answer}",
                "check the sandbox (retool sandbox serve) with this code",
            )
        rows.append({"messages": convert_solution(user_content(problem), solution_for(problem, output)), "tools": TOOLS})
    return rows


def tiny_math_rows(options: GeneratorOptions, data_source: str = "tiny_math") -> list[dict[str, Any]]:
    """verl RL rows for generated problems."""
    return [to_rl_row(p.text, str(p.answer), data_source, i) for i, p in enumerate(problems_for(options))]
