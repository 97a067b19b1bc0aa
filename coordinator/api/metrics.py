"""``GET /metrics``: the Prometheus exposition (:mod:`fedge.coordinator.metrics`).

Read with an API key like the admin API's read routes (``Authorization: Bearer``; a viewer
key is enough and is what a scraper should hold)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from fedge.coordinator.api.deps import SessionDep, SettingsDep, ViewerDep
from fedge.coordinator.errors import NotFound, error_responses
from fedge.coordinator.metrics import Metrics

router = APIRouter(tags=["metrics"])


@router.get(
    "/metrics",
    summary="Prometheus metrics (text exposition format)",
    response_class=Response,
    responses={
        200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}},
        **error_responses(401, 404),
    },
)
def metrics(
    request: Request, session: SessionDep, settings: SettingsDep, _caller: ViewerDep
) -> Response:
    registry: Metrics | None = getattr(request.app.state, "metrics", None)
    if registry is None:
        raise NotFound("metrics are disabled (FEDGE_METRICS_ENABLED=false)")
    return Response(registry.exposition(session, settings), media_type=CONTENT_TYPE_LATEST)
