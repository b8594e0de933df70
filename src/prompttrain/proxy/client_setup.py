"""`GET /client-setup/{file}`: the files of the repository's `client-setup/` folder, which point Claude Code at
this proxy (a settings block with `ANTHROPIC_BASE_URL` and the `train-id` header, a setup script, a README).

The folder is found once, at app creation: next to the source tree in a checkout (`make run`, editable installs),
else where the wheel installs it (`<prefix>/share/prompttrain/client-setup`, the images). Names with `/` or `..`
are refused (400) before the file system is touched; a missing file is 404; both in Anthropic's error shape.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.types import Receive, Scope, Send

SOURCE_TREE_DIRECTORY = Path(__file__).resolve().parents[3] / "client-setup"
INSTALLED_DIRECTORY = Path(sys.prefix) / "share" / "prompttrain" / "client-setup"

CONTENT_TYPES = {
    ".json": "application/json",
    ".sh": "text/x-shellscript",
    ".md": "text/markdown",
    ".txt": "text/plain",
    ".ps1": "text/plain",
}
DEFAULT_CONTENT_TYPE = "application/octet-stream"


def find_directory(candidates: tuple[Path, ...] = (SOURCE_TREE_DIRECTORY, INSTALLED_DIRECTORY)) -> Path | None:
    """The first candidate that is a directory, or None (then every file is 404)."""
    return next((candidate for candidate in candidates if candidate.is_dir()), None)


def content_type(name: str) -> str:
    return CONTENT_TYPES.get(Path(name).suffix.lower(), DEFAULT_CONTENT_TYPE)


def _error(status: int, error_type: str, message: str) -> Response:
    return JSONResponse({"type": "error", "error": {"type": error_type, "message": message}}, status_code=status)


class ClientSetupFiles:
    """The route's endpoint (an ASGI app, so the route passes it through), bound to one directory."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory.resolve() if directory is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = await self.respond(Request(scope, receive))
        await response(scope, receive, send)

    async def respond(self, request: Request) -> Response:
        name: str = request.path_params["file"]
        if not name or "/" in name or "\\" in name or ".." in name:
            return _error(400, "invalid_request_error", "file: a plain file name without '/' or '..'")
        path = self.directory / name if self.directory is not None else None
        # Hidden files (editor swap files, .gitkeep) are not served.
        if path is None or name.startswith(".") or not await asyncio.to_thread(path.is_file):
            return _error(404, "not_found_error", f"no client-setup file named {name!r}")
        return FileResponse(path, media_type=content_type(name), headers={"cache-control": "no-cache"})
