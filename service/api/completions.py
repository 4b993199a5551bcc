from fastapi import APIRouter, Request

from service.api import serving
from service.api.deps import GatewayDep
from service.api.protocol import CompletionRequest

router = APIRouter(tags=["completions"])


@router.post("/v1/completions")
async def create_completion(body: CompletionRequest, gw: GatewayDep, request: Request):
    """OpenAI text completions (JSON or SSE stream)."""
    return await serving.create(gw, "completion", body, request)
