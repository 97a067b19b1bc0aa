"""Load-generator processes of bench/ingest.py (private module).

Each process runs one asyncio loop with one ``httpx.AsyncClient`` and drives a slice of the
enrolled devices. Every request is signed with the product's
:func:`fedge.shared.signing.sign_request` and every upload carries its own update body, built
with the product's encoder (:func:`fedge.shared.compression.compress` +
:func:`fedge.shared.wire.encode_update`) from one of a few noise deltas and a fresh draw of the
stochastic quantization, so no two bodies are byte-identical: the coordinator's
content-addressed blob store writes and fsyncs every one, as it does for real devices (a
repeated body would be found on disk and skipped). A process checks the digests of its bodies
and draws again on a repeat, and reports its own CPU time over the measured window (and the
part of it spent building bodies), so a reader can see whether it was saturated.
Phases (``cfg["phase"]``):

- ``steady``: every device loops get work -> upload -> repeat until ``t_end``; uploads
  completed inside ``[t0, t1]`` are counted, with their latency. ``device_mode`` ``agent``
  (the default) does what the agent does: long-poll for work (``wait=poll_wait_s``) and
  upload with ``next=1``, taking the next assignment from the answer when there is one;
  ``busy`` polls with ``wait=0`` and sleeps 20 ms when there is no work. With ``cfg["rate"]``
  (uploads per second of this process) the load is open-loop: an upload waits for the next
  slot of a fixed schedule (``1/rate`` apart), so the coordinator sees that rate as long as
  it keeps up, whatever its latency (slots more than a second behind are dropped, not
  bunched; rate 0: devices take work and upload nothing).
- ``assign``: every device gets one assignment, then the process waits for ``go``.
- ``upload``: (after ``assign``) every device uploads its one assignment (measured).
- ``longpoll``: every device sends one ``GET /work?wait=W`` and records when it is answered.
- ``ceiling``: like ``steady`` against the bare signature-check app (``POST /verify``).
- ``ladder``: one request at a time (no concurrency at all), kind by kind, with the
  coordinator's CPU (the schedstat of each thread of ``cfg["pid"]``) read before and after
  each kind: what each kind of request costs the coordinator when nothing contends (see
  :func:`_ladder`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import resource
import ssl
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedge.shared.architectures import build_spec
from fedge.shared.compression import compress
from fedge.shared.policy import CompressionPolicy
from fedge.shared.signing import sign_request
from fedge.shared.wire import encode_update

API = "/api/v1"


def _raise_nofile(n: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, n))
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def thread_cpu_ns(pid: int) -> dict[int, int]:
    """Each thread's CPU time (ns, exact: the scheduler's own sum, where /proc/<pid>/stat's
    utime and stime are 10 ms ticks sampled) from /proc/<pid>/task/<tid>/schedstat."""
    times: dict[int, int] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            times[int(task.name)] = int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):  # the thread ended meanwhile
            continue
    return times


def cpu_between(before: dict[int, int], after: dict[int, int]) -> float:
    """CPU seconds of a process's threads between two :func:`thread_cpu_ns` readings (a thread
    that ended meanwhile is not counted: the coordinator's idle worker threads end only after
    seconds without work)."""
    return sum(ns - before.get(tid, 0) for tid, ns in after.items()) / 1e9


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


#: Noise deltas per process; each body is one of them compressed with a fresh draw of the
#: stochastic quantization (fresh noise per body cost 6 ms of generator CPU against 1.6 ms).
DELTAS = 8


class _Bodies:
    """A new update body for every upload, each distinct from every other this process built
    (and from other processes': their seeds differ)."""

    def __init__(self, model: dict[str, Any], compression: dict[str, Any], seed: int) -> None:
        self.spec = build_spec(model)
        self.policy = CompressionPolicy.from_dict(compression)
        rng = np.random.default_rng(seed)
        self.deltas = [
            {t.name: rng.standard_normal(t.shape).astype(np.float32) for t in self.spec.tensors}
            for _ in range(DELTAS)
        ]
        self.rng = rng
        self._seen: set[bytes] = set()
        self.built = 0
        self.redrawn = 0
        self.build_s = 0.0

    def new(self, task_id: int, base_version: int) -> bytes:
        start = time.perf_counter()
        while True:
            delta = self.deltas[(self.built + self.redrawn) % DELTAS]
            c = compress(delta, self.policy, self.rng)
            body = encode_update(c, task_id=task_id, base_version=base_version, num_examples=32)
            digest = hashlib.sha256(body).digest()
            if digest not in self._seen:
                break
            self.redrawn += 1
        self._seen.add(digest)
        self.built += 1
        self.build_s += time.perf_counter() - start
        return body

    def report(self) -> dict[str, Any]:
        return {"built": self.built, "redrawn": self.redrawn, "build_cpu_s": self.build_s}


class _Device:
    def __init__(self, device_id: str, key: bytes) -> None:
        self.id = device_id
        self.key = Ed25519PrivateKey.from_private_bytes(key)
        self.seq = 0

    def headers(self, method: str, path: str, query: str = "", body: bytes = b"") -> dict[str, str]:
        return sign_request(
            self.key, device_id=self.id, method=method, path=path, query=query, body=body
        )


def _client(cfg: dict[str, Any], n: int) -> httpx.AsyncClient:
    ctx = ssl.create_default_context(cafile=cfg["ca_file"]) if cfg.get("ca_file") else False
    return httpx.AsyncClient(
        base_url=cfg["url"],
        verify=ctx,
        timeout=httpx.Timeout(cfg.get("timeout", 120.0)),
        limits=httpx.Limits(max_connections=n + 8, max_keepalive_connections=n + 8),
    )


async def _get_work(
    client: httpx.AsyncClient, dev: _Device, wait: int = 0
) -> tuple[int, dict[str, Any] | None]:
    query = f"wait={wait}"
    path = f"{API}/device/work"
    r = await client.get(f"{path}?{query}", headers=dev.headers("GET", path, query))
    if r.status_code == 200:
        body: dict[str, Any] = r.json()
        return 200, body
    return r.status_code, None


async def _upload(
    client: httpx.AsyncClient,
    dev: _Device,
    work: dict[str, Any],
    body: bytes,
    *,
    want_next: bool = False,
) -> httpx.Response:
    """The upload; ``want_next`` asks for the next assignment in the answer (``next=1``, as
    the agent does)."""
    path = str(work["upload_url"])
    query = "next=1" if want_next else ""
    dev.seq += 1
    headers = dev.headers("POST", path, query, body)
    headers["Idempotency-Key"] = f"b{work['assignment_id']}-{dev.seq}"
    headers["Content-Type"] = "application/octet-stream"
    url = f"{path}?{query}" if query else path
    return await client.post(url, content=body, headers=headers)


class _Pacer:
    """Slots ``1/rate`` apart from ``start``: each upload of the process takes the next one."""

    def __init__(self, rate: float, start: float, end: float) -> None:
        self.gap = 1.0 / rate if rate > 0 else 0.0
        self.next = start if rate > 0 else end  # rate 0: no slot before the end
        self.skipped = 0

    async def wait(self) -> None:
        now = time.time()
        if self.gap == 0.0:
            await asyncio.sleep(max(0.0, self.next - now))
            return
        if now - self.next > 1.0:  # the schedule fell behind: drop the missed slots
            missed = int((now - self.next) / self.gap)
            self.skipped += missed
            self.next += missed * self.gap
        slot = self.next
        self.next += self.gap
        if slot > now:
            await asyncio.sleep(slot - now)


class _Stats:
    def __init__(self) -> None:
        self.latencies: list[float] = []  # accepted uploads completed inside the window
        self.codes: dict[str, int] = {}
        self.work_200 = 0
        self.work_other = 0
        self.errors: dict[str, int] = {}

    def code(self, kind: str, status: int) -> None:
        k = f"{kind}_{status}"
        self.codes[k] = self.codes.get(k, 0) + 1

    def error(self, exc: BaseException) -> None:
        k = type(exc).__name__
        self.errors[k] = self.errors.get(k, 0) + 1


async def _steady(cfg: dict[str, Any]) -> dict[str, Any]:
    devices = [_Device(d, bytes.fromhex(k)) for d, k in cfg["devices"]]
    bodies = _Bodies(cfg["model"], cfg["compression"], cfg["seed"])
    t0, t1, t_end = cfg["t0"], cfg["t1"], cfg["t_end"]
    st = _Stats()
    in_window = {"work": 0, "work_200": 0, "uploads": 0, "next_with_upload": 0}
    cpu: dict[str, float] = {}

    def inside(t: float) -> bool:
        return t0 <= t <= t1

    # "agent": long-poll for work and take the next assignment from the upload's answer, as
    # the agent does; "busy": poll without a wait, 20 ms apart when there is none (the
    # benchmark's earlier device model: about two work requests per update).
    agent_like = cfg.get("device_mode", "agent") == "agent"
    poll_wait = int(cfg.get("poll_wait_s", 20)) if agent_like else 0
    pacer = None
    if cfg.get("rate") is not None:
        pacer = _Pacer(float(cfg["rate"]), cfg["t_start"], cfg["t_end"])

    async def device_loop(dev: _Device) -> None:
        work: dict[str, Any] | None = None
        while time.time() < t_end:
            try:
                if work is None:
                    wait = max(0, min(poll_wait, int(t_end - time.time())))
                    status, work = await _get_work(client, dev, wait)
                    now = time.time()
                    st.code("work", status)
                    if inside(now):
                        in_window["work"] += 1
                    if work is None or work.get("status") == "cancelled":
                        work = None
                        if not agent_like:
                            await asyncio.sleep(cfg.get("idle_sleep_s", 0.02))
                        continue
                    if inside(now):
                        in_window["work_200"] += 1
                if pacer is not None:
                    await pacer.wait()
                    if time.time() >= t_end:
                        break
                body = bodies.new(int(work["task_id"]), int(work["base_version"]))
                start = time.perf_counter()
                r = await _upload(client, dev, work, body, want_next=agent_like)
                lat = time.perf_counter() - start
                now = time.time()
                st.code("upload", r.status_code)
                work = None
                if r.status_code == 201:
                    work = r.json().get("next")
                    if inside(now):
                        in_window["uploads"] += 1
                        in_window["next_with_upload"] += work is not None
                        st.latencies.append(lat)
                elif r.status_code >= 400:
                    await asyncio.sleep(0.05)
            except httpx.HTTPError as exc:
                st.error(exc)
                work = None
                await asyncio.sleep(0.1)

    async def cpu_marks() -> None:
        await asyncio.sleep(max(0.0, t0 - time.time()))
        cpu["t0"] = _cpu()
        cpu["build0"] = bodies.build_s
        await asyncio.sleep(max(0.0, t1 - time.time()))
        cpu["t1"] = _cpu()
        cpu["build1"] = bodies.build_s

    async with _client(cfg, len(devices)) as client:
        await asyncio.sleep(max(0.0, cfg["t_start"] - time.time()))
        await asyncio.gather(cpu_marks(), *(device_loop(d) for d in devices))
    return {
        "latencies": st.latencies,
        "codes": st.codes,
        "errors": st.errors,
        "in_window": in_window,
        "cpu_s": cpu.get("t1", 0.0) - cpu.get("t0", 0.0),
        "body_build_s_in_window": cpu.get("build1", 0.0) - cpu.get("build0", 0.0),
        "bodies": bodies.report(),
        "slots_skipped": pacer.skipped if pacer is not None else 0,
    }


async def _assign_upload(cfg: dict[str, Any], ready: Any, go: Any) -> dict[str, Any]:
    """Phase ``assign`` then, after ``go``, phase ``upload``."""
    devices = [_Device(d, bytes.fromhex(k)) for d, k in cfg["devices"]]
    bodies = _Bodies(cfg["model"], cfg["compression"], cfg["seed"])
    st = _Stats()
    works: list[tuple[_Device, dict[str, Any], bytes]] = []
    async with _client(cfg, len(devices)) as client:
        sem = asyncio.Semaphore(cfg.get("assign_concurrency", 50))

        async def assign(dev: _Device) -> None:
            async with sem:
                for _ in range(50):
                    status, work = await _get_work(client, dev)
                    st.code("work", status)
                    if work is not None and work.get("status") != "cancelled":
                        # built before the burst: the burst measures the coordinator
                        body = bodies.new(int(work["task_id"]), int(work["base_version"]))
                        works.append((dev, work, body))
                        return
                    await asyncio.sleep(0.05)

        await asyncio.gather(*(assign(d) for d in devices))
        ready.set()
        while not go.is_set():
            await asyncio.sleep(0.005)
        cpu0 = _cpu()
        start_all = time.time()

        async def up(dev: _Device, work: dict[str, Any], body: bytes) -> None:
            start = time.perf_counter()
            try:
                r = await _upload(client, dev, work, body)
            except httpx.HTTPError as exc:
                st.error(exc)
                return
            st.code("upload", r.status_code)
            if r.status_code == 201:
                st.latencies.append(time.perf_counter() - start)

        await asyncio.gather(*(up(d, w, b) for d, w, b in works))
        end_all = time.time()
    return {
        "assigned": len(works),
        "latencies": st.latencies,
        "codes": st.codes,
        "errors": st.errors,
        "cpu_s": _cpu() - cpu0,
        "bodies": bodies.report(),
        "start": start_all,
        "end": end_all,
    }


async def _longpoll(cfg: dict[str, Any], ready: Any) -> dict[str, Any]:
    """Every device sends one long-poll; the answer times (wall clock) are returned."""
    devices = [_Device(d, bytes.fromhex(k)) for d, k in cfg["devices"]]
    st = _Stats()
    answered: list[float] = []
    statuses: list[int] = []
    sent = 0
    async with _client(cfg, len(devices)) as client:
        # Open the connections first (TLS handshakes are not part of the wake-up).
        sem = asyncio.Semaphore(50)

        async def warm(dev: _Device) -> None:
            async with sem:
                try:
                    r = await client.get("/healthz")
                    st.code("healthz", r.status_code)
                except httpx.HTTPError as exc:
                    st.error(exc)

        await asyncio.gather(*(warm(d) for d in devices))

        async def poll(dev: _Device) -> None:
            nonlocal sent
            path = f"{API}/device/work"
            query = f"wait={cfg['wait']}"
            deadline = time.time() + cfg["poll_for_s"]
            while time.time() < deadline:
                try:
                    sent += 1
                    r = await client.get(f"{path}?{query}", headers=dev.headers("GET", path, query))
                except httpx.HTTPError as exc:
                    st.error(exc)
                    await asyncio.sleep(0.5)
                    continue
                st.code("work", r.status_code)
                if r.status_code == 200:
                    answered.append(time.time())
                    statuses.append(r.status_code)
                    return
                if r.status_code != 204:
                    await asyncio.sleep(1.0)

        tasks = [asyncio.create_task(poll(d)) for d in devices]
        await asyncio.sleep(1.0)
        ready.set()
        cpu0 = _cpu()
        await asyncio.gather(*tasks)
    return {
        "answered": answered,
        "requests_sent": sent,
        "codes": st.codes,
        "errors": st.errors,
        "cpu_s": _cpu() - cpu0,
    }


async def _ceiling(cfg: dict[str, Any]) -> dict[str, Any]:
    """Steady signed POSTs of a 2 KB body to the bare verification app."""
    n = cfg["concurrency"]
    key = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"ceiling").digest())
    body = np.random.default_rng(cfg["seed"]).bytes(2048)
    t0, t1, t_end = cfg["t0"], cfg["t1"], cfg["t_end"]
    lat: list[float] = []
    st = _Stats()
    cpu: dict[str, float] = {}

    async def loop() -> None:
        while time.time() < t_end:
            headers = sign_request(
                key, device_id="ceiling", method="POST", path="/verify", body=body
            )
            start = time.perf_counter()
            try:
                r = await client.post("/verify", content=body, headers=headers)
            except httpx.HTTPError as exc:
                st.error(exc)
                continue
            now = time.time()
            st.code("verify", r.status_code)
            if r.status_code == 200 and t0 <= now <= t1:
                lat.append(time.perf_counter() - start)

    async def cpu_marks() -> None:
        await asyncio.sleep(max(0.0, t0 - time.time()))
        cpu["t0"] = _cpu()
        await asyncio.sleep(max(0.0, t1 - time.time()))
        cpu["t1"] = _cpu()

    async with _client(cfg, n) as client:
        await asyncio.sleep(max(0.0, cfg["t_start"] - time.time()))
        await asyncio.gather(cpu_marks(), *(loop() for _ in range(n)))
    return {
        "latencies": lat,
        "codes": st.codes,
        "errors": st.errors,
        "cpu_s": cpu.get("t1", 0.0) - cpu.get("t0", 0.0),
    }


def reference_ms(repeats: int = 5) -> float:
    """Thread CPU (ms, the best of ``repeats``) of a fixed piece of interpreter work: JSON,
    dicts, sorting, string formatting. On a shared machine the same code runs up to twice as
    slow from one hour to the next; this figure, taken beside a measurement, tells two runs'
    machines apart."""
    doc = {f"k{i}": [i, str(i), {"x": i * 0.5}] for i in range(2000)}
    best = float("inf")
    for _ in range(repeats):
        start = time.thread_time()
        for _ in range(5):
            text = json.dumps(doc)
            back = json.loads(text)
            sorted(back, key=lambda k: back[k][0] % 97)
            "".join(f"{k}={v[1]};" for k, v in back.items())
        best = min(best, time.thread_time() - start)
    return 1000 * best


async def _ladder(cfg: dict[str, Any]) -> dict[str, Any]:
    """Request kinds one at a time, each device in turn, the coordinator's CPU around each
    kind. The coordinator runs two async tasks that never aggregate (buffers larger than the
    fleet) and nothing else; every device has no assignment yet. In order:

    ``healthz`` (unsigned ``GET /healthz``: HTTP, TLS and the middleware), ``work_assign``
    (a signed ``GET /device/work`` that creates an assignment of the first task),
    ``work_again`` (the same request, answered with the assignment it already has),
    ``upload_next_found`` (the upload with ``next=1``: its answer carries an assignment of the
    second task), ``upload_next_none`` (the upload of that one: nothing is left to assign),
    ``work_none`` (a signed ``GET /device/work`` with no work to give: 204)."""
    devices = [_Device(d, bytes.fromhex(k)) for d, k in cfg["devices"]]
    bodies = _Bodies(cfg["model"], cfg["compression"], cfg["seed"])
    pid = int(cfg["pid"])
    repeats = int(cfg.get("repeats", 4))
    kinds: dict[str, dict[str, Any]] = {}
    works: dict[str, dict[str, Any]] = {}
    nexts: dict[str, dict[str, Any]] = {}

    async with _client(cfg, 1) as client:
        for _ in range(3):  # the connection and its TLS session first
            (await client.get("/healthz")).raise_for_status()

        async def healthz(dev: _Device) -> int:
            return (await client.get("/healthz")).status_code

        async def work_assign(dev: _Device) -> int:
            status, work = await _get_work(client, dev)
            if work is not None:
                works[dev.id] = work
            return status

        async def work_again(dev: _Device) -> int:
            return (await _get_work(client, dev))[0]

        async def upload_next_found(dev: _Device) -> int:
            work = works[dev.id]
            body = bodies.new(int(work["task_id"]), int(work["base_version"]))
            r = await _upload(client, dev, work, body, want_next=True)
            if r.status_code == 201 and r.json().get("next"):
                nexts[dev.id] = r.json()["next"]
            return r.status_code

        async def upload_next_none(dev: _Device) -> int:
            work = nexts[dev.id]
            body = bodies.new(int(work["task_id"]), int(work["base_version"]))
            r = await _upload(client, dev, work, body, want_next=True)
            return r.status_code if not r.json().get("next") else -1

        # (name, request, passes over the devices, the status it should answer, the devices
        # it applies to: those the previous kinds gave what it needs)
        steps: list[tuple[str, Any, int, int, Any]] = [
            ("healthz", healthz, repeats, 200, None),
            ("work_assign", work_assign, 1, 200, None),
            ("work_again", work_again, repeats, 200, works),
            ("upload_next_found", upload_next_found, 1, 201, works),
            ("upload_next_none", upload_next_none, 1, 201, nexts),
            ("work_none", work_again, repeats, 204, None),
        ]
        for name, fn, times, want, needs in steps:
            chosen = [d for d in devices if needs is None or d.id in needs]
            statuses: dict[int, int] = {}
            cpu0, t0 = thread_cpu_ns(pid), time.time()
            for _ in range(times):
                for dev in chosen:
                    code = await fn(dev)
                    statuses[code] = statuses.get(code, 0) + 1
            cpu1, t1 = thread_cpu_ns(pid), time.time()
            kinds[name] = {
                "requests": sum(statuses.values()),
                "expected_status": want,
                "statuses": {str(k): v for k, v in statuses.items()},
                "coordinator_cpu_s": cpu_between(cpu0, cpu1),
                # the event loop's own thread (HTTP, TLS, the middleware, signature checks)
                "event_loop_cpu_s": (cpu1.get(pid, 0) - cpu0.get(pid, 0)) / 1e9,
                "wall_s": t1 - t0,
            }
    return {"kinds": kinds, "reference_ms": reference_ms()}


def worker(cfg: dict[str, Any], out: Any, ready: Any = None, go: Any = None) -> None:
    """Entry point of one load-generator process; puts its result dict on ``out``."""
    _raise_nofile(4096)
    phase = cfg["phase"]
    try:
        if phase == "steady":
            result = asyncio.run(_steady(cfg))
        elif phase == "assign_upload":
            result = asyncio.run(_assign_upload(cfg, ready, go))
        elif phase == "longpoll":
            result = asyncio.run(_longpoll(cfg, ready))
        elif phase == "ceiling":
            result = asyncio.run(_ceiling(cfg))
        elif phase == "ladder":
            result = asyncio.run(_ladder(cfg))
        else:
            raise ValueError(phase)
    except BaseException as exc:  # reported to the parent rather than lost
        out.put({"error": f"{type(exc).__name__}: {exc}"})
        raise
    out.put(result)
