"""/metrics: vLLM's default-registry metrics (``vllm:*``, and everything else registered
there, e.g. the accounting plugin) plus the gateway's own registry, in the Prometheus text
format, or OpenMetrics (with exemplars) when asked."""

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OM_CONTENT_TYPE
from prometheus_client.openmetrics.exposition import generate_latest as om_generate_latest

router = APIRouter(tags=["metrics"])


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    registry = request.app.state.runtime.metrics.registry
    if "application/openmetrics-text" in request.headers.get("accept", ""):
        return Response(om_generate_latest(registry), media_type=OM_CONTENT_TYPE)
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
