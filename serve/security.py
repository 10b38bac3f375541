"""Who may call, and how much one request may send.

API keys come from the `api_keys` setting and the `CSM_SERVE_API_KEYS` environment variable (comma-separated);
every `/v1/` request must carry one as `Authorization: Bearer KEY` (what the `openai` client sends), compared in
constant time against each key. A server without keys answers anyone who can reach it, so it refuses to listen on
anything but the loopback interface. Request bodies are bounded before they are read (`Content-Length`) and
while they arrive (chunked bodies), so an oversized upload is cut off instead of filling the disk.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os

ENV_KEYS = "CSM_SERVE_API_KEYS"
LOOPBACK_NAMES = ("localhost",)


def api_keys(configured) -> list[str]:
    keys = [str(k) for k in (configured or [])]
    keys += [k.strip() for k in os.environ.get(ENV_KEYS, "").split(",") if k.strip()]
    return keys


def check_bind(host: str, keys: list[str]) -> None:
    """Refuse to serve without keys beyond this machine."""
    if keys:
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host in LOOPBACK_NAMES
    if not loopback:
        raise SystemExit(
            f"refusing to listen on {host} without API keys: anyone who reaches it could use the model. Set "
            f"api_keys=[...] or {ENV_KEYS}=key1,key2, or listen on 127.0.0.1"
        )


async def _send_error(send, status: int, message: str, code: str) -> None:
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": code}
    body = json.dumps({"error": error}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class KeyAuth:
    """ASGI middleware: `/v1/` routes need a valid key when keys are configured."""

    def __init__(self, app, keys: list[str]):
        self.app, self.keys = app, [k.encode() for k in keys]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.keys or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"")
        given = header[7:].strip() if header[:7].lower() == b"bearer " else b""
        valid = False
        for key in self.keys:  # every key compared, in constant time each
            valid |= hmac.compare_digest(given, key)
        if not valid:
            message = "missing API key: send Authorization: Bearer KEY" if not given else "incorrect API key"
            return await _send_error(send, 401, message, "invalid_api_key")
        return await self.app(scope, receive, send)


class BodyLimit:
    """ASGI middleware: a body over `max_bytes` gets 413 and the application sees the client gone."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        message = f"request body over the server's limit of {self.max_bytes} bytes"
        if declared is not None:
            if not declared.isdigit():
                return await _send_error(send, 400, "invalid Content-Length", "invalid_value")
            if int(declared) > self.max_bytes:
                return await _send_error(send, 413, message, "body_too_large")
        received, refused = 0, False

        async def limited_receive():
            nonlocal received, refused
            event = await receive()
            if event["type"] == "http.request":
                received += len(event.get("body", b""))
                if received > self.max_bytes and not refused:
                    refused = True
                    await _send_error(send, 413, message, "body_too_large")
                if refused:
                    return {"type": "http.disconnect"}
            return event

        async def guarded_send(event):
            if not refused:
                await send(event)

        await self.app(scope, limited_receive, guarded_send)
