"""GET /v1/requests/{request_id}/metrics: one request's KV and attention figures, from the
ledger the accounting stat logger fills (service/telemetry/ledger.py), by the request's
X-Request-Id, its response id (``chatcmpl-...``, ``cmpl-...``, ``resp_...``) or engine id."""

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service.errors import error_body
from service.telemetry.ledger import LEDGER

router = APIRouter(tags=["requests"])


@router.get("/v1/requests/{request_id}/metrics")
async def request_metrics(request_id: str):
    records = LEDGER.get(request_id)
    if records is None:
        return JSONResponse(error_body(
            f"no figures for request `{request_id}` (unknown, not finished yet, or no longer kept)",
            "not_found_error", "request_id", "request_not_found"), status_code=404)
    return {"object": "request.metrics", "id": request_id, "data": records}
