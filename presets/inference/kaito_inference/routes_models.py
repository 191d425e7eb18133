"""OpenAI's model listing: ``GET /v1/models`` and ``GET /v1/models/{id}`` (the client's ``models.retrieve``)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends

from .errors import ClientError
from .state import AppState, app_state

router = APIRouter()
State = Annotated[AppState, Depends(app_state)]


def check_model(state: AppState, name: str) -> None:
    """404 unless ``name`` is the served model's id."""
    if name != state.cfg.model_id:
        raise ClientError(
            f"The model `{name}` does not exist. This server serves `{state.cfg.model_id}`.",
            status=404,
            param="model",
        )


def _entry(state: AppState) -> dict[str, Any]:
    engine = state.require()
    return {
        "id": state.cfg.model_id,
        "object": "model",
        "created": state.created,
        "owned_by": "kaito",
        "root": state.cfg.pretrained_model_name_or_path,
        "parent": None,
        "max_model_len": engine.context_length,
        "adapters": [{"name": a.name, "strength": a.strength} for a in engine.loaded.adapters],
    }


@router.get("/v1/models")
async def list_models(state: State) -> dict[str, Any]:
    """The one model this server serves (adapters are merged into it)."""
    return {"object": "list", "data": [_entry(state)]}


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, state: State) -> dict[str, Any]:
    """One model by id (ids may contain slashes, like a weights path)."""
    check_model(state, model_id)
    return _entry(state)
