from fastapi import APIRouter, Request

from service.api import serving
from service.api.deps import GatewayDep
from service.api.protocol import ChatCompletionRequest

router = APIRouter(tags=["chat"])


@router.post("/v1/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, gw: GatewayDep, request: Request):
    """OpenAI chat completions (JSON or SSE stream)."""
    return await serving.create(gw, "chat", body, request)
