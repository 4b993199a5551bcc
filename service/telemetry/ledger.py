"""Process-wide state the stat-logger plugin writes and the HTTP layer reads.

The plugin (loaded by vLLM into every AsyncLLM, in the API server's process, whether that
is our gateway or a plain ``vllm serve``) is the only writer. ``record()`` runs on the
API server's event loop, so no lock is needed between it and the request handlers.

- ``ENGINE_STATE``: the engine's queue and cache as of its last step; admission control
  (429 on queue length or KV pressure) reads it.
- ``LEDGER``: the last figures of each finished or aborted request, bounded, so a client
  can read its own request's KV and attention figures by id.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

DEFAULT_LEDGER_SIZE = 10_000


@dataclass
class EngineState:
    """The engine's queue and cache as of its last step."""

    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0


def ledger_keys(engine_request_id: str) -> list[str]:
    """Every id a client may know its request by.

    vLLM's server names engine requests after the response id: chat ``chatcmpl-<id>``,
    completions ``cmpl-<id>-<prompt index>``, responses ``resp_<id>_<n>``, where ``<id>``
    is the request's ``X-Request-Id`` (our middleware sets one when the client did not).
    The record is found by the engine id, by the response id and by the bare ``<id>``."""
    keys = [engine_request_id]
    rid = engine_request_id
    if rid.startswith("chatcmpl-"):
        keys.append(rid[len("chatcmpl-"):])
    elif rid.startswith("cmpl-"):
        base = rid[len("cmpl-"):]
        head, sep, tail = base.rpartition("-")
        if sep and tail.isdigit():
            keys += ["cmpl-" + head, head]
        else:
            keys.append(base)
    elif rid.startswith("resp_"):
        head, sep, tail = rid[len("resp_"):].rpartition("_")
        if sep and tail.isdigit():
            keys += ["resp_" + head, head]
    return list(dict.fromkeys(k for k in keys if k))


class Ledger:
    """Bounded map: request id -> list of per-sequence records (one per child of n>1,
    one per prompt of a batch completion). Oldest requests are dropped first."""

    def __init__(self, maxlen: int = DEFAULT_LEDGER_SIZE):
        self.maxlen = maxlen
        self._records: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()

    def add(self, engine_request_id: str, record: dict[str, Any]) -> None:
        for key in ledger_keys(engine_request_id):
            self._records.setdefault(key, []).append(record)
            self._records.move_to_end(key)
        while len(self._records) > self.maxlen:
            self._records.popitem(last=False)

    def get(self, request_id: str) -> list[dict[str, Any]] | None:
        return self._records.get(request_id)

    def __len__(self) -> int:
        return len(self._records)

    def clear(self) -> None:
        self._records.clear()


ENGINE_STATE = EngineState()
LEDGER = Ledger()
