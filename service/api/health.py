"""Health: /health (engine alive), /health/live (process serves and its engine is alive:
a dead engine never recovers in-process, so the orchestrator should restart us),
/health/ready (engine alive and not draining). 503 bodies use the OpenAI error shape."""

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from service.errors import error_body

router = APIRouter(tags=["health"])
OK = {"status": "ok"}


def _engine_problem(request: Request) -> str | None:
    rt = request.app.state.runtime
    if rt.engine is None:
        return "engine starting"
    if rt.engine_dead:
        return "engine dead"
    return None


def _answer(problem: str | None):
    if problem is None:
        return OK
    return JSONResponse(error_body(problem, "service_unavailable", None, problem.replace(" ", "_")),
                        status_code=503)


@router.get("/health")
async def health(request: Request):
    return _answer(_engine_problem(request))


@router.get("/health/live")
async def live(request: Request):
    return _answer("engine dead" if request.app.state.runtime.engine_dead else None)


@router.get("/health/ready")
async def ready(request: Request):
    problem = _engine_problem(request)
    if problem is None and request.app.state.runtime.draining:
        problem = "draining"
    return _answer(problem)
