"""The ceiling of bench/ingest.py: a bare FastAPI endpoint that only verifies an Ed25519
request signature (the product's :mod:`fedge.shared.signing`) over the body, served by a single
uvicorn worker over TLS. Run as a subprocess:

    python bench/_ingest_ceiling.py CERT KEY PORT_FILE
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
from pathlib import Path

import uvicorn
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import FastAPI, Request, Response

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedge.shared.signing import (
    SignatureError,
    check_skew,
    parse_signed_headers,
    verify_request,
)

PUBLIC = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"ceiling").digest()).public_key()

app = FastAPI()


@app.post("/verify")
async def verify(request: Request) -> Response:
    body = await request.body()
    try:
        signed = parse_signed_headers(request.headers)
        verify_request(
            PUBLIC,
            signed,
            method="POST",
            path=request.url.path,
            query=request.url.query,
            body_sha256=hashlib.sha256(body).hexdigest(),
        )
        check_skew(signed.timestamp)
    except SignatureError:
        return Response(status_code=401)
    return Response(content=b'{"ok":true}', media_type="application/json")


def main() -> None:
    cert, key, port_file = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    tmp = port_file.with_suffix(".tmp")
    tmp.write_text(str(sock.getsockname()[1]))
    os.replace(tmp, port_file)
    config = uvicorn.Config(
        app, ssl_certfile=cert, ssl_keyfile=key, log_level="warning", access_log=False
    )
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
