"""Playing conversations: one session sends its turns in order, each with the whole history.

Turn k of a session waits its think time after turn k-1's answer, then sends the system
prompt, every earlier user message followed by the answer the server returned for it, and
its own user message (``Conversation.messages``). A failed turn ends its session (the next
turn would have no answer to carry). On the completions endpoint (traces) a conversation's
one turn is sent as its text.

Closed loop (``load.concurrency``): C sessions in flight; a worker starts its next session
when the previous one has played its last turn. Open loop (``load.rate``): sessions start at
Poisson (or constant) arrival times, whatever is in flight. Trace replay (``load.speedup``):
each conversation starts at its ``arrival_s / speedup``. Request indices count the step's
requests in the order they are sent; each record carries its session and turn (from 1).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable, Sequence

from loadtest.core.config import Endpoint
from loadtest.core.loops import closed_workers, open_arrivals
from loadtest.core.results import RequestRecord
from loadtest.core.sessions import Conversation
from loadtest.core.workload import Prompt

# (request index, prompt, t0, scheduled offset) -> (record, answer text)
Exchange = Callable[[int, Prompt, float, "float | None"], Awaitable[tuple[RequestRecord, str]]]


def turn_prompt(conversation: Conversation, turn: int, answers: list[str], endpoint: Endpoint) -> Prompt:
    """The request of turn ``turn`` (0-based): the chat history, or a completion's text."""
    output = conversation.turns[turn].output_tokens
    if endpoint == "completions":
        if len(conversation.turns) > 1:
            raise ValueError("a multi-turn conversation needs the chat endpoint")
        return Prompt(output_tokens=output, text=conversation.turns[0].user)
    return Prompt(output_tokens=output, messages=conversation.messages(turn, answers))


class SessionPlayer:
    """Plays conversations through one ``exchange`` function; collects every turn's record."""

    def __init__(self, exchange: Exchange, endpoint: Endpoint, t0: float) -> None:
        self.exchange, self.endpoint, self.t0 = exchange, endpoint, t0
        self.counter = itertools.count()
        self.records: list[RequestRecord] = []

    async def play(self, session: int, conversation: Conversation, scheduled: float | None = None) -> None:
        answers: list[str] = []
        for k, turn in enumerate(conversation.turns):
            if k and turn.think_s > 0:
                await asyncio.sleep(turn.think_s)
            prompt = turn_prompt(conversation, k, answers, self.endpoint)
            record, answer = await self.exchange(next(self.counter), prompt, self.t0, scheduled if k == 0 else None)
            self.records.append(record.model_copy(update={"session": session, "turn": k + 1}))
            if not record.success:
                return
            answers.append(answer)

    async def _act(self, index: int, conversation: Conversation, scheduled: float | None) -> None:
        await self.play(index, conversation, scheduled)

    async def closed(
        self,
        conversations: Sequence[Conversation],
        concurrency: int,
        *,
        num_sessions: int | None,
        duration_s: float | None,
        ramp_up_s: float = 0.0,
    ) -> list[RequestRecord]:
        """``concurrency`` workers, each starting its next session when its previous one ends."""
        await closed_workers(self._act, conversations, concurrency, self.t0, count=num_sessions,
                             duration_s=duration_s, ramp_up_s=ramp_up_s)  # fmt: skip
        return self.records

    async def open(
        self, conversations: Sequence[Conversation], offsets: Sequence[float], max_concurrency: int | None = None
    ) -> list[RequestRecord]:
        """Session i starts at t0 + offsets[i], whatever is in flight (at most ``max_concurrency``
        sessions at once if set)."""
        await open_arrivals(self._act, conversations, offsets, self.t0, max_concurrency)
        return self.records


def trace_offsets(conversations: Sequence[Conversation], speedup: float, duration_s: float | None) -> list[float]:
    """Each conversation's start: its ``arrival_s / speedup`` (only those before ``duration_s``)."""
    if any(c.arrival_s is None for c in conversations):
        raise ValueError("trace replay needs an arrival time on every request")
    offsets = [float(c.arrival_s or 0.0) / speedup for c in conversations]
    return [t for t in offsets if duration_s is None or t < duration_s]
