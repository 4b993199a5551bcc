"""Health: /health (engine alive), /health/live (process serves), /health/ready
(engine alive and not draining). 503 bodies use the OpenAI error shape."""

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from service.errors import error_body

router = APIRouter(tags=["health"])


def _unavailable(message: str) -> JSONResponse:
    return JSONResponse(error_body(message, "service_unavailable"), status_code=503)


@router.get("/health")
async def health(request: Request):
    gw = getattr(request.app.state, "gateway", None)
    if gw is None:
        return _unavailable("engine starting")
    if gw.handle.engine.errored:
        return _unavailable("engine dead")
    return {"status": "ok"}


@router.get("/health/live")
async def live():
    return {"status": "ok"}


@router.get("/health/ready")
async def ready(request: Request):
    gw = getattr(request.app.state, "gateway", None)
    if gw is None:
        return _unavailable("engine starting")
    if gw.handle.engine.errored:
        return _unavailable("engine dead")
    if gw.draining:
        return _unavailable("draining")
    return {"status": "ok"}
