"""GET /v1/models and /v1/models/{id}: vLLM's model list (base model and LoRA adapters),
with the KV-cache card (geometry, blocks, capacity) added to the base model's entry.
OpenAI clients keep unknown fields (``model.model_extra["kv_cache"]``)."""

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from service.errors import error_body

router = APIRouter(tags=["models"])


async def _cards(request: Request) -> list[dict]:
    rt = request.app.state.runtime
    listing = await request.app.state.openai_serving_models.show_available_models()
    cards = listing.model_dump()["data"]
    for card in cards:
        if card.get("parent") is None and rt.info is not None:
            card["kv_cache"] = rt.info.card()
    return cards


@router.get("/v1/models")
async def list_models(request: Request):
    return {"object": "list", "data": await _cards(request)}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request):
    for card in await _cards(request):
        if card["id"] == model_id:
            return card
    return JSONResponse(error_body(f"The model `{model_id}` does not exist.", "not_found_error",
                                   "model", "model_not_found"), status_code=404)
