"""The code_interpreter tool as verl builds it from tool_config.yaml, against a real sandbox
server on loopback; and the same outputs as the recipe's tool on many code shapes."""

from __future__ import annotations

import asyncio
import os
import re
import threading
import time

import httpx
import pytest

from runtime.data.retool_sft import TOOLS
from runtime.verl.recipe import (
    ENV_SANDBOX_URL,
    ENV_TOOL_LENIENT_FENCES,
    ENV_TOOL_QUEUE_TIMEOUT_S,
    ENV_TOOL_TIMEOUT_S,
    TOOL_CONFIG_PATH,
)
from runtime.verl.recipe.code import NO_OUTPUT, prepare_code
from sandbox.client import run_code
from sandbox.testing import free_port, local_server


@pytest.fixture(scope="module")
def sandbox_url():
    with local_server(workers=2) as server:
        yield server.url


def _executions(url: str) -> int:
    return int(httpx.get(url + "/health", timeout=10).json()["executions"])


def _tool(url: str, timeout_s: float = 10.0, lenient_fences: bool = False, queue_timeout_s: float | None = None):
    """The tool list verl's agent loop builds (tool_registry.initialize_tools_from_config)."""
    from verl.tools.tool_registry import initialize_tools_from_config

    names = (ENV_SANDBOX_URL, ENV_TOOL_TIMEOUT_S, ENV_TOOL_LENIENT_FENCES, ENV_TOOL_QUEUE_TIMEOUT_S)
    saved = {k: os.environ.get(k) for k in names}
    os.environ[ENV_SANDBOX_URL] = url
    os.environ[ENV_TOOL_TIMEOUT_S] = str(timeout_s)
    os.environ[ENV_TOOL_LENIENT_FENCES] = "true" if lenient_fences else "false"
    if queue_timeout_s is None:
        os.environ.pop(ENV_TOOL_QUEUE_TIMEOUT_S, None)
    else:
        os.environ[ENV_TOOL_QUEUE_TIMEOUT_S] = str(queue_timeout_s)
    try:
        (tool,) = initialize_tools_from_config(str(TOOL_CONFIG_PATH))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return tool


def _run(tool, code: str) -> tuple[str, dict]:
    async def go():
        instance, _ = await tool.create()
        try:
            response, reward, metrics = await tool.execute(instance, {"code": code})
        finally:
            await tool.release(instance)
        assert reward is None  # the recipe's tool gives no reward
        return response.text, metrics

    return asyncio.run(go())


def test_tool_is_built_from_the_config_with_the_sft_schema(sandbox_url: str) -> None:
    tool = _tool(sandbox_url, timeout_s=7)
    assert tool.name == "code_interpreter"
    assert tool.tool_schema.model_dump(exclude_unset=True, exclude_none=True) == TOOLS[0]
    assert tool.settings.sandbox_url == sandbox_url and tool.settings.timeout_s == 7.0
    assert tool.settings.memory_limit_mb == 1024  # the yaml's default
    assert tool.settings.queue_timeout_s == 300.0  # the yaml's default: generous
    assert _tool(sandbox_url, queue_timeout_s=45).settings.queue_timeout_s == 45.0
    assert tool.options.lenient_fences is False
    assert _tool(sandbox_url, lenient_fences=True).options.lenient_fences is True


def test_fenced_code_runs_with_its_last_expression_printed(sandbox_url: str) -> None:
    tool = _tool(sandbox_url)
    before = _executions(sandbox_url)
    text, metrics = _run(tool, "Let me compute it.\n```python\nimport math\nmath.factorial(5)\n```")
    assert text == "120\n" and metrics == {"sandbox_error": 0}
    assert _executions(sandbox_url) == before + 1


def test_stdout_then_stderr_of_a_failing_program(sandbox_url: str) -> None:
    text, _ = _run(_tool(sandbox_url), "print('before')\nprint(1 // 0)")
    assert text.startswith("before\n") and "ZeroDivisionError" in text


def test_timeout_shows_the_fixed_text(sandbox_url: str) -> None:
    text, metrics = _run(_tool(sandbox_url, timeout_s=1), "while True:\n    pass\nprint('never')")
    assert text == NO_OUTPUT and metrics == {"sandbox_error": 0}


def test_unreachable_sandbox_shows_the_fixed_text() -> None:
    text, metrics = _run(_tool(f"http://127.0.0.1:{free_port()}"), "print(1)")
    assert text == NO_OUTPUT and metrics == {"sandbox_error": 1}


def test_empty_code_runs_as_in_the_recipe(sandbox_url: str) -> None:
    before = _executions(sandbox_url)
    text, _ = _run(_tool(sandbox_url), "")
    assert text == "" and _executions(sandbox_url) == before + 1


def test_bad_arguments_raise_for_verls_agent_loop_as_the_recipes_tool_does(sandbox_url: str) -> None:
    """verl's tool agent loop turns the exception into `Error executing tool 'code_interpreter': ...`."""
    tool = _tool(sandbox_url)
    with pytest.raises(KeyError):
        asyncio.run(tool.execute("i", {"source": "print(1)"}))
    with pytest.raises(TypeError):
        asyncio.run(tool.execute("i", {"code": 5}))


def test_concurrent_calls_share_the_connection_pool(sandbox_url: str) -> None:
    tool = _tool(sandbox_url)

    async def go():
        results = await asyncio.gather(*[tool.execute("i", {"code": f"{i} * {i}"}) for i in range(6)])
        return [r[0].text for r in results]

    assert asyncio.run(go()) == [f"{i * i}\n" for i in range(6)]


def test_waiting_for_a_busy_sandbox_never_changes_what_the_model_sees() -> None:
    """One worker, held by another call for longer than the tool's run timeout + 10 s would
    allow in total: the queued call still sees its program's output; with a queue bound it
    cannot meet, it sees the recipe's sandbox-failure text, counted as a sandbox error."""
    code = "```python\nimport math\nmath.comb(10, 3)\n```"
    with local_server(workers=1, preload=[]) as server:
        alone, _ = _run(_tool(server.url, timeout_s=1), code)
        for tool, hold_s, expected, error in (
            (_tool(server.url, timeout_s=1), 12, alone, 0),
            (_tool(server.url, timeout_s=1, queue_timeout_s=0.2), 3, NO_OUTPUT, 1),
        ):
            holder = threading.Thread(
                target=run_code, args=(server.url, f"import time\ntime.sleep({hold_s})"), kwargs={"timeout": 60}
            )
            holder.start()
            try:
                while httpx.get(server.url + "/health", timeout=10).json()["lifetime"]["in_flight"] < 1:
                    time.sleep(0.05)
                text, metrics = _run(tool, code)
            finally:
                holder.join()
            assert (text, metrics) == (expected, {"sandbox_error": error})
    assert alone == "120\n"


# --------------------------------------------------------------------------- the recipe's tool, side by side

RECIPE_FENCE = re.compile(r"```python(.*?)```", re.DOTALL)


def recipe_code(code: str) -> str:
    """The recipe's `CustomSandboxFusionTool.execute` code transformation, line for line."""
    matches = RECIPE_FENCE.findall(code)
    if matches:
        code = matches[0].strip()
    lines = code.split("\n")
    for i, line in reversed(list(enumerate(lines))):
        if line == "":
            continue
        if not lines[i].startswith("print"):
            lines[i] = f"print({line})"
        break
    return "\n".join(lines)


def recipe_text(url: str, code: str, timeout: int = 10) -> str:
    """What the recipe's tool returns for `code`: verl's own SandboxFusion client call
    (`SandboxFusionTool.execute_code`), then stdout + stderr or the fixed text."""
    from verl.utils.reward_score.sandbox_fusion.utils import _process_single_case

    _, metadata = _process_single_case(0, None, None, url + "/run_code", recipe_code(code), timeout, 1024, "python")
    if metadata["run_status"] == "Finished":
        return metadata["stdout"] + metadata["stderr"]
    return "no stdout here"


BODIES = [
    "x = 6\nx * 7",
    "import math\nmath.factorial(5)",
    "print('hi')",
    "for i in range(2):\n    print(i)",
    "y = [1, 2]\nsum(y)\n\n",
    "z = 3\nz\n   \n",
    "printed = 5\nprinted",
    "1/0",
    "# only a comment",
    "",
]
WRAPPERS = [
    "{b}",
    "```python\n{b}\n```",
    "Let me compute.\n```python\n{b}\n```\nDone.",
    "```python {b}```",
    "```py\n{b}\n```",
    "```\n{b}\n```",
    "```python\n{b}\n```\nand then\n```python\nprint('second')\n```",
    "```py\nprint('py first')\n```\n```python\n{b}\n```",
    "{b}\n\n\n",
]
CODES = [w.format(b=b) for w in WRAPPERS for b in BODIES]


def test_code_transformation_is_the_recipes() -> None:
    assert len(CODES) == 90
    for code in CODES:
        assert prepare_code(code) == recipe_code(code), code


def test_outputs_match_the_recipes_tool_through_a_real_sandbox(sandbox_url: str) -> None:
    tool = _tool(sandbox_url)

    async def go() -> list[str]:  # one event loop: the tool's connection pool lives in it
        return [(await tool.execute("i", {"code": code}))[0].text for code in CODES]

    ours = asyncio.run(go())
    theirs = [recipe_text(sandbox_url, code) for code in CODES]
    assert ours == theirs
    # the inputs reach both kinds of outcome: values printed and errors shown
    assert "42\n" in ours and "120\n" in ours and sum("SyntaxError" in o for o in ours) >= 10
