from fastapi import APIRouter

from service.api.deps import GatewayDep
from service.errors import NotFoundError

router = APIRouter(tags=["models"])


def _card(gw: GatewayDep) -> dict:
    h = gw.handle
    return {
        "id": h.model_name, "object": "model", "created": int(h.started_at), "owned_by": "kv-gateway",
        "root": h.model_path, "max_model_len": h.max_model_len,
        "kv_cache": {**h.geometry.as_dict(), "num_blocks": h.num_blocks,
                     "capacity_tokens": h.capacity_tokens},
    }


@router.get("/v1/models")
async def list_models(gw: GatewayDep):
    return {"object": "list", "data": [_card(gw)]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, gw: GatewayDep):
    if model_id != gw.handle.model_name:
        raise NotFoundError(f"The model `{model_id}` does not exist.", param="model", code="model_not_found")
    return _card(gw)
