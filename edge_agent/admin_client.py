"""A small client of the coordinator's admin REST API (docs/protocol.md, "Administrators").

Authenticates with ``Authorization: Bearer <api key>``, pins the coordinator's CA like the
device client and retries the same way (connection errors, 5xx, 429). Rejections raise the
:mod:`fedge.edge_agent.errors` family with the coordinator's code and detail. Used by the demo, the
fleet simulation and ``fedge admin``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import httpx

from fedge.edge_agent.transport import RetryPolicy, Session

API = "/api/v1"
LIFECYCLE_ACTIONS = ("start", "pause", "resume", "cancel")


class AdminClient:
    """Admin API calls; every method returns the decoded JSON answer."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        ca_file: str | None = None,
        transport: httpx.BaseTransport | None = None,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], Any] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._session = Session(
            base_url,
            ca_file=ca_file,
            transport=transport,
            timeout=timeout,
            retry=retry,
            sleep=sleep,
            rng=rng,
            headers={"Authorization": f"Bearer {api_key}"},
        )

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._session.request(method, f"{API}{path}", **kwargs)
        if response.status_code == 204 or not response.content:
            return None
        return response.json()

    def _page(self, path: str, *, limit: int = 50, offset: int = 0, **filters: Any) -> Any:
        params = {"limit": limit, "offset": offset}
        params |= {k: v for k, v in filters.items() if v is not None}
        return self._json("GET", path, params=params)

    def iterate(self, path: str, *, page_size: int = 500, **filters: Any) -> Iterator[Any]:
        """Every item of a list endpoint, page by page."""
        offset = 0
        while True:
            page = self._page(path, limit=page_size, offset=offset, **filters)
            yield from page["items"]
            offset += len(page["items"])
            if not page["items"] or offset >= page["total"]:
                return

    # -- health ----------------------------------------------------------------------------

    def health(self) -> Any:
        return self._session.request("GET", "/healthz").json()

    # -- tasks -----------------------------------------------------------------------------

    def create_task(self, body: Mapping[str, Any]) -> Any:
        return self._json("POST", "/tasks", json_body=dict(body))

    def list_tasks(self, *, status: str | None = None, limit: int = 50, offset: int = 0) -> Any:
        return self._page("/tasks", limit=limit, offset=offset, status=status)

    def get_task(self, task_id: int) -> Any:
        return self._json("GET", f"/tasks/{task_id}")

    def update_task(self, task_id: int, changes: Mapping[str, Any]) -> Any:
        return self._json("PATCH", f"/tasks/{task_id}", json_body=dict(changes))

    def upload_initial_model(self, task_id: int, body: bytes) -> Any:
        return self._json(
            "PUT",
            f"/tasks/{task_id}/model",
            content=body,
            headers={"Content-Type": "application/octet-stream"},
        )

    def task_action(self, task_id: int, action: str) -> Any:
        if action not in LIFECYCLE_ACTIONS:
            raise ValueError(f"unknown task action {action!r}")
        return self._json("POST", f"/tasks/{task_id}/{action}")

    def start_task(self, task_id: int) -> Any:
        return self.task_action(task_id, "start")

    def pause_task(self, task_id: int) -> Any:
        return self.task_action(task_id, "pause")

    def resume_task(self, task_id: int) -> Any:
        return self.task_action(task_id, "resume")

    def cancel_task(self, task_id: int) -> Any:
        return self.task_action(task_id, "cancel")

    def list_rounds(self, task_id: int, *, limit: int = 50, offset: int = 0) -> Any:
        return self._page(f"/tasks/{task_id}/rounds", limit=limit, offset=offset)

    def get_round(self, task_id: int, number: int) -> Any:
        return self._json("GET", f"/tasks/{task_id}/rounds/{number}")

    def list_round_declines(
        self, task_id: int, number: int, *, limit: int = 50, offset: int = 0
    ) -> Any:
        """The round's declined assignments with the devices' reasons, newest first."""
        return self._page(f"/tasks/{task_id}/rounds/{number}/declines", limit=limit, offset=offset)

    def list_models(self, task_id: int, *, limit: int = 50, offset: int = 0) -> Any:
        return self._page(f"/tasks/{task_id}/models", limit=limit, offset=offset)

    def download_model(
        self, task_id: int, version: int | str = "latest", *, dtype: str | None = None
    ) -> bytes:
        """The model version's wire bytes (``version`` may be ``"latest"``)."""
        params = {"dtype": dtype} if dtype else None
        response = self._session.request(
            "GET", f"{API}/tasks/{task_id}/models/{version}", params=params
        )
        return response.content

    # -- devices, tokens, keys ---------------------------------------------------------------

    def list_devices(self, *, status: str | None = None, limit: int = 50, offset: int = 0) -> Any:
        return self._page("/devices", limit=limit, offset=offset, status=status)

    def get_device(self, device_id: str) -> Any:
        return self._json("GET", f"/devices/{device_id}")

    def set_device_tags(self, device_id: str, tags: Sequence[str]) -> Any:
        """Replace the device's tags; its record."""
        return self._json("PATCH", f"/devices/{device_id}", json_body={"tags": list(tags)})

    def list_device_declines(self, device_id: str, *, limit: int = 50, offset: int = 0) -> Any:
        """The assignments the device declined with its reasons, newest first."""
        return self._page(f"/devices/{device_id}/declines", limit=limit, offset=offset)

    def revoke_device(self, device_id: str) -> Any:
        return self._json("POST", f"/devices/{device_id}/revoke")

    def create_enrollment_token(
        self,
        *,
        label: str = "",
        max_uses: int | None = None,
        expires_in_s: int | None = None,
    ) -> Any:
        """A new token; the answer's ``token`` is the secret (shown only this once)."""
        body: dict[str, Any] = {"label": label} if label else {}
        if max_uses is not None:
            body["max_uses"] = max_uses
        if expires_in_s is not None:
            body["expires_in_s"] = expires_in_s
        return self._json("POST", "/enrollment-tokens", json_body=body)

    def list_enrollment_tokens(self, *, limit: int = 50, offset: int = 0) -> Any:
        return self._page("/enrollment-tokens", limit=limit, offset=offset)

    def revoke_enrollment_token(self, token_id: int) -> Any:
        return self._json("POST", f"/enrollment-tokens/{token_id}/revoke")

    def create_api_key(self, *, role: str, name: str = "") -> Any:
        return self._json("POST", "/api-keys", json_body={"role": role, "name": name})

    def list_api_keys(self, *, limit: int = 50, offset: int = 0) -> Any:
        return self._page("/api-keys", limit=limit, offset=offset)

    def revoke_api_key(self, key_id: int) -> Any:
        return self._json("POST", f"/api-keys/{key_id}/revoke")
