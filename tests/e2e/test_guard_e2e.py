"""
The guard on a real daemon with ``auth.token_file``: the status page's link
with ``?token=`` sets an HttpOnly, SameSite=Strict cookie that the page's
read-only routes accept, and the token is required on the new doors too,
with the refusal in OpenAI's shape on OpenAI paths.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
import treq

from tests.stack import ScriptedStack, start_stack

TOKEN = "page-token-for-tests-0123456789"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: Any) -> Iterator[ScriptedStack]:
    workdir = tmp_path_factory.mktemp("guard")
    (workdir / "token").write_text(TOKEN + "\n")
    built = start_stack(
        workdir,
        config={"auth": {"token_file": "token"}, "openai": {"chat": "llm"}},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    yield built
    assert built.stop() == 0, built.daemon.log()


@pytest_twisted.ensureDeferred
async def test_the_page_link_sets_a_cookie_the_status_route_accepts(stack: ScriptedStack) -> None:
    page = await treq.get(stack.url(f"/?token={TOKEN}"))
    assert page.code == 200
    await page.content()
    [cookie] = page.headers.getRawHeaders("set-cookie")
    attributes = {part.strip().lower() for part in cookie.split(";")[1:]}
    assert {"httponly", "samesite=strict"} <= attributes
    pair = cookie.split(";")[0]
    status = await treq.get(stack.url("/v1/status"), headers={"Cookie": pair})
    assert status.code == 200
    await status.content()
    job = await treq.post(stack.url("/v1/tts"), data=b"{}", headers={"Cookie": pair})
    assert job.code == 401, "the cookie opens the page's reads, never a GPU job"
    await job.content()


@pytest_twisted.ensureDeferred
async def test_the_new_doors_need_the_token(stack: ScriptedStack) -> None:
    passthrough = await treq.get(stack.url("/upstream/llm/api/tags"))
    assert passthrough.code == 401
    assert (await passthrough.json())["error"] == "unauthorized"
    chat = await treq.post(stack.url("/v1/chat/completions"), data=b"{}")
    assert chat.code == 401
    assert (await chat.json())["error"]["code"] == "unauthorized"
    allowed = await treq.get(stack.url("/upstream/llm/api/tags"), headers=stack.headers)
    assert allowed.code != 401
    await allowed.content()
