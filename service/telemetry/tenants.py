"""Tenants: the name of the API key a request came with, as a bounded metric label.

``GATEWAY_API_KEYS`` entries are ``name:key`` (or a bare ``key``, named ``key1``, ``key2``,
... by position). The name, never the key, labels every per-request counter, the ledger
record and the trace span; requests to a gateway without keys are the one tenant
``default``. The middleware binds each generation request's id to its tenant when it
admits it; the accounting plugin looks the tenant up by the engine's request id (the same
ids the ledger knows, see ``ledger.ledger_keys``). A plain ``vllm serve`` with the plugin
has no middleware, hence no tenants: everything it accounts is ``default``.

The number of label values is bounded by the number of configured keys plus one.
"""

from __future__ import annotations

import re
from collections import OrderedDict

from service.telemetry.ledger import DEFAULT_LEDGER_SIZE, ledger_keys

DEFAULT_TENANT = "default"
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def parse_api_keys(entries: list[str]) -> list[tuple[str, str]]:
    """``name:key`` / bare ``key`` entries -> [(name, key)]. Raises ValueError on a bad
    name, an empty key, or a name or key given twice."""
    out: list[tuple[str, str]] = []
    for i, entry in enumerate(entries, 1):
        name, sep, key = entry.partition(":")
        if not sep:
            name, key = f"key{i}", entry
        name, key = name.strip(), key.strip()
        if not _NAME.match(name):
            raise ValueError(f"API key name {name!r}: use 1-64 letters, digits, '_', '.' or '-'")
        if not key:
            raise ValueError(f"API key {name!r} is empty")
        if name == DEFAULT_TENANT:
            raise ValueError(f"API key name {DEFAULT_TENANT!r} is reserved for requests without a key")
        out.append((name, key))
    for what, values in (("name", [n for n, _ in out]), ("key", [k for _, k in out])):
        if len(set(values)) != len(values):
            raise ValueError(f"an API key {what} is given twice")
    return out


class TenantBook:
    """Bounded map: request id (the client-visible ``X-Request-Id``) -> tenant name."""

    def __init__(self, maxlen: int = DEFAULT_LEDGER_SIZE):
        self.maxlen = maxlen
        self._by_id: OrderedDict[str, str] = OrderedDict()

    def bind(self, request_id: str, tenant: str) -> None:
        self._by_id[request_id] = tenant
        self._by_id.move_to_end(request_id)
        while len(self._by_id) > self.maxlen:
            self._by_id.popitem(last=False)

    def tenant_of(self, engine_request_id: str) -> str:
        """The tenant of an engine request id (``chatcmpl-<id>``, ``cmpl-<id>-<i>``, ...)."""
        for key in ledger_keys(engine_request_id):
            tenant = self._by_id.get(key)
            if tenant is not None:
                return tenant
        return DEFAULT_TENANT

    def clear(self) -> None:
        self._by_id.clear()


TENANTS = TenantBook()
