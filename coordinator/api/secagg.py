"""The device endpoints of a secure-aggregation round (docs/secure-aggregation.md).

Signed device requests like every other device route; the messages are the binary layouts of
:mod:`fedge.shared.secagg.messages` (``application/octet-stream``). A device posts each message
once (the same bytes again: 200, a duplicate; different bytes: 409 ``message_differs``); a
``GET`` answers 425 ``phase_not_ready`` until the phase that produces what it asks for has
closed. The rules are in :mod:`fedge.coordinator.engine.secure_messages`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, Path, Response

from fedge.coordinator.api.deps import MAX_ID, DeviceDep, RuntimeDep, SessionDep
from fedge.coordinator.api.signals import kick_scheduler
from fedge.coordinator.db import utcnow
from fedge.coordinator.engine import secure_messages
from fedge.coordinator.errors import error_responses

router = APIRouter(prefix="/device/secagg", tags=["device"])

SIGNED_ERRORS = (401, 403, 413, 429)
RoundId = Annotated[int, Path(ge=1, le=MAX_ID, description="Round id")]
BINARY = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}


@router.get(
    "/{round_id}/config",
    summary="The round's public secure-aggregation parameters and this device's index",
    responses=error_responses(*SIGNED_ERRORS, 404),
)
def config(device: DeviceDep, session: SessionDep, round_id: RoundId) -> dict[str, Any]:
    return secure_messages.config_of(session, device.id, round_id)


_POST_DOC: dict[str, Any] = {
    "status_code": 201,
    "response_class": Response,
    "responses": {
        200: {"description": "The same message again (a duplicate)"},
        **error_responses(*SIGNED_ERRORS, 400, 404, 409, 422, 425),
    },
    "openapi_extra": {"requestBody": {"required": True, "content": BINARY}},
}
_GET_DOC: dict[str, Any] = {
    "response_class": Response,
    "responses": {
        200: {"content": BINARY},
        **error_responses(*SIGNED_ERRORS, 404, 409, 425),
    },
}


POSTS = {
    "advert": "Post the signed key advertisement",
    "shares": "Post the sealed share bundles",
    "masked": "Post the masked quantized update",
    "unmask": "Post the answer to the unmask request",
}
GETS = {
    "adverts": "The advertised neighbours' adverts",
    "shares": "The share bundles addressed to this device",
    "unmask": "This device's unmask request",
}


def _post_route(phase: str) -> Callable[..., Response]:
    def post(
        device: DeviceDep,
        session: SessionDep,
        runtime: RuntimeDep,
        background: BackgroundTasks,
        round_id: RoundId,
    ) -> Response:
        posted = secure_messages.post(
            session, device.id, round_id, phase, device.body or b"", now=utcnow()
        )
        if not posted.duplicate:
            background.add_task(kick_scheduler, runtime)
        body = {"phase": posted.phase, "duplicate": posted.duplicate}
        return Response(
            json.dumps(body),
            status_code=200 if posted.duplicate else 201,
            media_type="application/json",
        )

    post.__name__ = f"post_{phase}"
    return post


def _get_route(what: str) -> Callable[..., Response]:
    def get(device: DeviceDep, session: SessionDep, round_id: RoundId) -> Response:
        data = secure_messages.fetch(session, device.id, round_id, what)
        return Response(data, media_type="application/octet-stream")

    get.__name__ = f"get_{what}"
    return get


for _phase, _summary in POSTS.items():
    router.add_api_route(
        f"/{{round_id}}/{_phase}",
        _post_route(_phase),
        methods=["POST"],
        summary=_summary,
        **_POST_DOC,
    )
for _what, _summary in GETS.items():
    router.add_api_route(
        f"/{{round_id}}/{_what}", _get_route(_what), methods=["GET"], summary=_summary, **_GET_DOC
    )
