"""The runner against a real server: the core runner plus what it reads from the server.

``ObservedRunner`` is ``loadtest.core.runner.Runner`` with its two server hooks filled: a
``Scraper`` of ``/metrics`` during each step (``target.scrape``), and, once every measured
request is over, the join of each request's own figures from ``/v1/requests/{id}/metrics``
(``target.request_metrics``). Every command that drives a server uses this one.
"""

from __future__ import annotations

import aiohttp

from loadtest.core.client import api_root
from loadtest.core.results import RequestMetricsJoin, StepResult
from loadtest.core.runner import Runner
from loadtest.server.request_metrics import join_request_metrics
from loadtest.server.scrape import Scraper


class ObservedRunner(Runner):
    """``Runner`` that scrapes ``/metrics`` per step and joins per-request server figures."""

    def _scraper(self, session: aiohttp.ClientSession, headers: dict[str, str]) -> Scraper:
        target = self.config.target
        root = api_root(target.base_url or "")
        url = target.metrics_url or f"{root}/metrics"
        # the API key goes to /metrics (the gateway can protect it) only on the same server
        same_server = url.startswith(root + "/")
        return Scraper(session, url, target.model, target.scrape_interval_s, headers if same_server else None)

    async def _join(self, steps: list[StepResult], headers: dict[str, str]) -> RequestMetricsJoin:
        return await join_request_metrics(steps, self.config.target.base_url or "", headers)
