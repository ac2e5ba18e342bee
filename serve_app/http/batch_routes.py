"""The Batch API's HTTP surface (`/v1/files`, `/v1/batches`), as OpenAI's SDK calls it: each call checked here and
forwarded to the Batches deployment, which keeps the files and batches. With API keys on, a key sees its own
files and batches; an admin key sees everyone's."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from serve_app.errors import GatewayError, file_too_large
from serve_app.http.request_body import read_json_body
from serve_app.policy.api_keys import KeyPolicy

MAX_LIST = 100


class BatchRoutes:
    """`batches`: the Batches deployment's handle, or None when `batch.enabled` is false."""

    def __init__(self, batches: Any, max_file_bytes: int, max_body_bytes: int) -> None:
        self.batches = batches
        self.max_file_bytes = max_file_bytes
        self.max_body_bytes = max_body_bytes
        self.routes = [
            Route("/v1/files", self._create_file, methods=["POST"]),
            Route("/v1/files", self._list_files, methods=["GET"]),
            Route("/v1/files/{file_id}", self._get_file, methods=["GET"]),
            Route("/v1/files/{file_id}", self._delete_file, methods=["DELETE"]),
            Route("/v1/files/{file_id}/content", self._file_content, methods=["GET"]),
            Route("/v1/batches", self._create_batch, methods=["POST"]),
            Route("/v1/batches", self._list_batches, methods=["GET"]),
            Route("/v1/batches/{batch_id}", self._get_batch, methods=["GET"]),
            Route("/v1/batches/{batch_id}/cancel", self._cancel_batch, methods=["POST"]),
        ]

    def _who(self, request: Request) -> tuple[Any, str, bool]:
        """The Batches handle, and the caller: (owner, admin)."""
        if self.batches is None:
            raise GatewayError(404, "the Batch API is off in this gateway (batch.enabled: false)")
        key: KeyPolicy | None = getattr(request.state, "key", None)
        return self.batches, key.name if key else "", bool(key and key.admin)

    # ---- files ---------------------------------------------------------------------------------

    async def _create_file(self, request: Request) -> Response:
        batches, owner, _ = self._who(request)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_file_bytes + 64 * 1024:
            raise file_too_large(int(declared), self.max_file_bytes)
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise GatewayError(400, "upload the file as multipart/form-data with fields 'file' and 'purpose'")
        try:
            async with request.form(max_files=1, max_fields=8) as form:
                upload, purpose = form.get("file"), form.get("purpose")
                if upload is None or isinstance(upload, str):
                    raise GatewayError(400, "the form has no 'file' part", param="file")
                if not isinstance(purpose, str):
                    raise GatewayError(400, "the form has no 'purpose' field: use purpose=batch", param="purpose")
                data = await upload.read(self.max_file_bytes + 1)
                filename = upload.filename or "upload.jsonl"
        except GatewayError:
            raise
        except Exception as exc:  # Starlette's parser: a malformed body
            raise GatewayError(400, f"the upload is not a valid multipart form: {exc}") from None
        if len(data) > self.max_file_bytes:
            raise file_too_large(len(data), self.max_file_bytes)
        return JSONResponse(await batches.create_file.remote(owner, filename, purpose, data))

    async def _list_files(self, request: Request) -> Response:
        batches, owner, admin = self._who(request)
        return JSONResponse(await batches.list_files.remote(owner, admin))

    async def _get_file(self, request: Request) -> Response:
        batches, owner, admin = self._who(request)
        return JSONResponse(await batches.get_file.remote(owner, admin, request.path_params["file_id"]))

    async def _delete_file(self, request: Request) -> Response:
        batches, owner, admin = self._who(request)
        return JSONResponse(await batches.delete_file.remote(owner, admin, request.path_params["file_id"]))

    async def _file_content(self, request: Request) -> Response:
        batches, owner, admin = self._who(request)
        data = await batches.file_content.remote(owner, admin, request.path_params["file_id"])
        return Response(data, media_type="application/jsonl")

    # ---- batches -------------------------------------------------------------------------------

    async def _create_batch(self, request: Request) -> Response:
        batches, owner, _ = self._who(request)
        body = await read_json_body(request, self.max_body_bytes)
        for field in ("input_file_id", "endpoint", "completion_window"):
            if not isinstance(body.get(field), str):
                raise GatewayError(400, f"{field} is required (a string)", param=field)
        created = await batches.create_batch.remote(
            owner, body["input_file_id"], body["endpoint"], body["completion_window"], body.get("metadata")
        )
        return JSONResponse(created)

    async def _list_batches(self, request: Request) -> Response:
        batches, owner, admin = self._who(request)
        try:
            limit = int(request.query_params.get("limit", 20))
        except ValueError:
            raise GatewayError(400, "limit must be an integer", param="limit") from None
        if not 1 <= limit <= MAX_LIST:
            raise GatewayError(400, f"limit must be from 1 to {MAX_LIST}", param="limit")
        return JSONResponse(await batches.list_batches.remote(owner, admin, request.query_params.get("after"), limit))

    async def _get_batch(self, request: Request) -> Response:
        batches, owner, admin = self._who(request)
        return JSONResponse(await batches.get_batch.remote(owner, admin, request.path_params["batch_id"]))

    async def _cancel_batch(self, request: Request) -> Response:
        batches, owner, admin = self._who(request)
        return JSONResponse(await batches.cancel_batch.remote(owner, admin, request.path_params["batch_id"]))
