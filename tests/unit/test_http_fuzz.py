"""Schemathesis against the service's own OpenAPI schema (fake engine, in-process):
no input produces a 5xx, and every error body has the OpenAI shape."""

from __future__ import annotations

import pytest

pytest.importorskip("schemathesis")
import schemathesis  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402

from service.app import create_app  # noqa: E402
from service.settings import Settings  # noqa: E402
from service.telemetry.metrics import GatewayMetrics  # noqa: E402
from tests.conftest import DEFAULT_MODEL_DIR  # noqa: E402
from tests.fake_engine import fake_engine_factory  # noqa: E402


@pytest.fixture(scope="module")
def app():
    if not (DEFAULT_MODEL_DIR / "tokenizer.json").is_file():
        pytest.fail("default model missing: run `make model`")
    s = Settings(model=str(DEFAULT_MODEL_DIR), warmup=False, max_model_len=256)
    metrics = GatewayMetrics(include_engine_metrics=False)
    return create_app(s, engine_factory=fake_engine_factory(str(DEFAULT_MODEL_DIR), max_model_len=256),
                      metrics=metrics)


def check(response) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"}, body
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]


def test_no_5xx_and_openai_shaped_errors(app):
    # Driven through Hypothesis directly (schemathesis' pytest plugin lags pytest releases).
    api = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [r.ok() for r in api.get_all_operations()]
    assert {f"{o.method.upper()} {o.path}" for o in operations} >= {
        "POST /v1/chat/completions", "POST /v1/completions", "GET /v1/models"}
    for op in operations:
        @given(case=op.as_strategy())
        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def run(case):
            check(case.call())

        run()
