"""The code_interpreter tool as verl builds it from tool_config.yaml, against a real sandbox
server on loopback."""

from __future__ import annotations

import asyncio
import os

import httpx
import pytest

from runtime.data.retool_sft import TOOLS
from runtime.verl.recipe import ENV_SANDBOX_URL, ENV_TOOL_TIMEOUT_S, TOOL_CONFIG_PATH
from runtime.verl.recipe.code import NO_OUTPUT
from sandbox.testing import free_port, local_server


@pytest.fixture(scope="module")
def sandbox_url():
    with local_server(workers=2) as server:
        yield server.url


def _executions(url: str) -> int:
    return int(httpx.get(url + "/health", timeout=10).json()["executions"])


def _tool(url: str, timeout_s: float = 10.0):
    """The tool list verl's agent loop builds (tool_registry.initialize_tools_from_config)."""
    from verl.tools.tool_registry import initialize_tools_from_config

    saved = {k: os.environ.get(k) for k in (ENV_SANDBOX_URL, ENV_TOOL_TIMEOUT_S)}
    os.environ[ENV_SANDBOX_URL] = url
    os.environ[ENV_TOOL_TIMEOUT_S] = str(timeout_s)
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
        assert reward == 0.0
        return response.text, metrics

    return asyncio.run(go())


def test_tool_is_built_from_the_config_with_the_sft_schema(sandbox_url: str) -> None:
    tool = _tool(sandbox_url, timeout_s=7)
    assert tool.name == "code_interpreter"
    assert tool.tool_schema.model_dump(exclude_unset=True, exclude_none=True) == TOOLS[0]
    assert tool.settings.sandbox_url == sandbox_url and tool.settings.timeout_s == 7.0
    assert tool.settings.memory_limit_mb == 1024  # the yaml's default


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


def test_empty_code_is_answered_without_a_sandbox_call(sandbox_url: str) -> None:
    before = _executions(sandbox_url)
    text, _ = _run(_tool(sandbox_url), "   ")
    assert "non-empty" in text and _executions(sandbox_url) == before


def test_concurrent_calls_share_the_connection_pool(sandbox_url: str) -> None:
    tool = _tool(sandbox_url)

    async def go():
        results = await asyncio.gather(*[tool.execute("i", {"code": f"{i} * {i}"}) for i in range(6)])
        return [r[0].text for r in results]

    assert asyncio.run(go()) == [f"{i * i}\n" for i in range(6)]
