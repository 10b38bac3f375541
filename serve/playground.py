"""The playground page at `/` (placeholder: issue 16, item 9)."""

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter()


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def playground() -> str:
    return "<!doctype html><title>csm-train serve</title>"
