"""The playground page at `/`: type text, pick or upload a voice, hear the answer as it streams.

One self-contained HTML file (serve/static/playground.html, plain JS, nothing fetched from elsewhere: servers and
their users are often offline) that calls this server's own `/v1/` API with the key typed into it, so it needs no
route or permission of its own. Its Content-Security-Policy lets it reach only this server."""

from functools import cache
from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter()

# inline script and style only; fetches to this origin only; no frames, forms posting elsewhere, or plugins
CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
    "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


@cache
def page() -> str:
    return files("serve").joinpath("static/playground.html").read_text(encoding="utf-8")


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def playground() -> HTMLResponse:
    return HTMLResponse(page(), headers={"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff"})
