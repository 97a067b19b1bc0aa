"""URL paths the coordinator serves, defined once (routers, middleware and the payloads that
tell devices where to go all build on these)."""

from __future__ import annotations

#: Every route but the health probes lives under this prefix.
API_PREFIX = "/api/v1"
#: The device routes (signed requests).
DEVICE_PREFIX = f"{API_PREFIX}/device"
