"""Tenants: API key names as the per-request label (service/telemetry/tenants.py), bound by
the middleware and found by the accounting from the engine's request ids."""

from __future__ import annotations

import pytest

from service.settings import Settings
from service.telemetry.tenants import DEFAULT_TENANT, TENANTS, TenantBook, parse_api_keys
from tests.unit.test_http_fuzz import client, make


def test_parse_named_and_bare_keys():
    assert parse_api_keys(["alice:sk-a", "sk-b", " bob : sk-c "]) == [
        ("alice", "sk-a"), ("key2", "sk-b"), ("bob", "sk-c")]
    # a key may itself contain ':' after the name
    assert parse_api_keys(["team.x:abc:def"]) == [("team.x", "abc:def")]


@pytest.mark.parametrize("entries, message", [
    (["a:k1", "a:k2"], "name is given twice"),
    (["a:k1", "b:k1"], "key is given twice"),
    (["bad name:k"], "use 1-64 letters"),
    (["a:"], "is empty"),
    (["default:k"], "reserved"),
])
def test_bad_key_entries_fail_at_start(entries, message):
    with pytest.raises(ValueError, match=message):
        parse_api_keys(entries)
    with pytest.raises(ValueError, match=message):
        Settings(api_keys=",".join(entries), profile=None)


def test_book_finds_the_tenant_by_every_engine_id_and_is_bounded():
    book = TenantBook(maxlen=2)
    book.bind("r1", "alice")
    assert book.tenant_of("chatcmpl-r1") == "alice"
    assert book.tenant_of("cmpl-r1-3") == "alice"
    assert book.tenant_of("resp_r1_0") == "alice"
    assert book.tenant_of("chatcmpl-unknown") == DEFAULT_TENANT
    book.bind("r2", "bob")
    book.bind("r3", "bob")
    assert book.tenant_of("chatcmpl-r1") == DEFAULT_TENANT  # evicted, oldest first


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.anyio
async def test_middleware_binds_each_generation_request_to_its_key_name(anyio_backend):
    TENANTS.clear()
    app, _, _ = make(api_keys="alice:k1,bob:k2")
    async with client(app) as c:
        for key, rid in (("k1", "ra"), ("k2", "rb")):
            r = await c.post("/v1/completions", json={"prompt": "ok"},
                             headers={"Authorization": f"Bearer {key}", "X-Request-Id": rid})
            assert r.status_code == 200
        assert (await c.post("/v1/completions", json={"prompt": "ok"},
                             headers={"Authorization": "Bearer nope", "X-Request-Id": "rc"})).status_code == 401
    assert TENANTS.tenant_of("cmpl-ra-0") == "alice"
    assert TENANTS.tenant_of("cmpl-rb-0") == "bob"
    assert TENANTS.tenant_of("cmpl-rc-0") == DEFAULT_TENANT  # refused: never bound


@pytest.mark.anyio
async def test_without_keys_every_request_is_the_default_tenant(anyio_backend):
    TENANTS.clear()
    TENANTS.bind("rd", "stale")
    app, _, _ = make()
    async with client(app) as c:
        r = await c.post("/v1/completions", json={"prompt": "ok"}, headers={"X-Request-Id": "rd"})
        assert r.status_code == 200
    assert TENANTS.tenant_of("cmpl-rd-0") == DEFAULT_TENANT
