"""Annotated dependencies: handlers reach the engine through these, never a global."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.api.serving import Gateway
from service.errors import ServiceUnavailableError


def get_gateway(request: Request) -> Gateway:
    gw = getattr(request.app.state, "gateway", None)
    if gw is None:
        raise ServiceUnavailableError("the engine is not started yet", code="starting")
    return gw


GatewayDep = Annotated[Gateway, Depends(get_gateway)]
