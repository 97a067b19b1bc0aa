"""Model versions (admin API): list, and binary download with ETag / If-None-Match.

The download helpers are shared with the device API (:mod:`fedge.coordinator.api.device`).
Versions are stored once, as float32 wire blobs; ``?dtype=f16`` re-encodes on the fly and has
its own ETag (the digest with a ``-f16`` suffix), so caches never confuse the two.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Path, Query, Response
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from fedge.coordinator.api.deps import BlobsDep, Pagination, SessionDep, ViewerDep, page_of
from fedge.coordinator.api.tasks import TaskId, get_task
from fedge.coordinator.blobstore import BlobNotFound, BlobStore
from fedge.coordinator.errors import Gone, NotFound, Unprocessable, error_responses
from fedge.coordinator.models import ModelVersion
from fedge.coordinator.schemas.model_versions import ModelVersionsPublic
from fedge.coordinator.tasks import version_to_public
from fedge.shared import wire
from fedge.shared.modelspec import ModelSpec

router = APIRouter(prefix="/tasks/{task_id}/models", tags=["model versions"])

VersionRef = Annotated[
    str,
    Path(
        pattern=r"^(latest|0|[1-9][0-9]{0,8})$",
        description="A version number, or `latest`",
        examples=["latest", "0"],
    ),
]
Dtype = Annotated[
    Literal["f32", "f16"], Query(description="Precision of the download (stored as f32)")
]
IfNoneMatch = Annotated[str | None, Header(description="ETag(s) the client holds")]

#: OpenAPI description of a binary model answer and of 304.
MODEL_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The model in the binary wire format (docs/wire-format.md)",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        "headers": {"ETag": {"description": "Quoted digest", "schema": {"type": "string"}}},
    },
    304: {"description": "Not modified: the client's ETag is current"},
}


def find_version(session: Session, task_id: int, ref: str) -> ModelVersion:
    """The task's version ``ref`` (a number or ``latest``), or 404."""
    if ref == "latest":
        number = session.scalar(
            select(func.max(ModelVersion.version)).where(ModelVersion.task_id == task_id)
        )
        if number is None:
            raise NotFound(f"task {task_id} has no model yet")
    else:
        number = int(ref)
    row = session.scalar(
        select(ModelVersion).where(ModelVersion.task_id == task_id, ModelVersion.version == number)
    )
    if row is None:
        raise NotFound(f"task {task_id} has no model version {number}")
    return row


def etag_of(digest: str, dtype: str) -> str:
    return f'"{digest}"' if dtype == "f32" else f'"{digest}-{dtype}"'


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """RFC 9110 weak comparison of ``If-None-Match`` against one ETag."""
    if not if_none_match:
        return False
    for candidate in if_none_match.split(","):
        tag = candidate.strip()
        if tag == "*":
            return True
        if tag.startswith("W/"):
            tag = tag[2:]
        if tag == etag:
            return True
    return False


def model_response(
    blobs: BlobStore, digest: str, spec: ModelSpec, *, dtype: str, if_none_match: str | None
) -> Response:
    """200 with the model stored under ``digest``, or 304 when the client's ETag is current."""
    etag = etag_of(digest, dtype)
    headers = {"ETag": etag, "Cache-Control": "private, no-cache"}
    if etag_matches(if_none_match, etag):
        return Response(status_code=304, headers=headers)
    data = blobs.get(digest)
    if dtype == "f16":
        weights = wire.decode_model(data, spec=spec)
        try:
            data = wire.encode_model(weights, dtype="f16")
        except ValueError as exc:
            raise Unprocessable(f"dtype=f16: {exc}") from None
    return Response(content=data, media_type="application/octet-stream", headers=headers)


def pruned_error(row: ModelVersion) -> Gone:
    return Gone(
        f"model version {row.version} of task {row.task_id} was pruned by the retention "
        "policy (keep_versions); the task's model versions list shows which are kept",
        code="version_pruned",
    )


def version_response(
    session: Session,
    blobs: BlobStore,
    row: ModelVersion,
    digest: str,
    spec: ModelSpec,
    *,
    dtype: str,
    if_none_match: str | None,
) -> Response:
    """:func:`model_response` for one of ``row``'s blobs; 410 ``version_pruned`` when the
    retention policy released the version (before or while this request read it). A client
    whose ETag is current still gets 304: it holds the bytes."""
    if row.pruned_at is not None and not etag_matches(if_none_match, etag_of(digest, dtype)):
        raise pruned_error(row)
    try:
        return model_response(blobs, digest, spec, dtype=dtype, if_none_match=if_none_match)
    except BlobNotFound:
        pruned = session.scalar(select(ModelVersion.pruned_at).where(ModelVersion.id == row.id))
        if pruned is not None:  # pruned and swept after this request read the row
            raise pruned_error(row) from None
        raise


@router.get(
    "",
    response_model=ModelVersionsPublic,
    summary="List a task's model versions (oldest first) with their metrics",
    responses=error_responses(401, 404, 422),
)
def list_versions(
    task_id: TaskId, _caller: ViewerDep, session: SessionDep, page: Pagination
) -> ModelVersionsPublic:
    get_task(session, task_id)
    stmt = (
        select(ModelVersion).where(ModelVersion.task_id == task_id).order_by(ModelVersion.version)
    )
    return page_of(ModelVersionsPublic, session, stmt, page, version_to_public)


@router.get(
    "/{version}",
    response_class=Response,
    summary="Download a model version (binary; ETag and If-None-Match)",
    description="410 `version_pruned`: the retention policy released the version's blobs.",
    responses={**MODEL_RESPONSES, **error_responses(401, 404, 410, 422)},
)
def download(
    task_id: TaskId,
    version: VersionRef,
    _caller: ViewerDep,
    session: SessionDep,
    blobs: BlobsDep,
    dtype: Dtype = "f32",
    if_none_match: IfNoneMatch = None,
) -> Response:
    task = get_task(session, task_id)
    row = find_version(session, task_id, version)
    spec = ModelSpec.from_dict(task.model_spec)
    return version_response(
        session, blobs, row, row.blob_digest, spec, dtype=dtype, if_none_match=if_none_match
    )
