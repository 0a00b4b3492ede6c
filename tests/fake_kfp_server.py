"""A small fake of the Kubeflow Pipelines v2beta1 REST API on 127.0.0.1, recording every request.

It implements only what kfp.Client 2.17 (kfp_server_api) calls to upload, run and schedule a pipeline:

    GET  /apis/v2beta1/healthz
    GET  /apis/v2beta1/pipelines                        (filter on display_name/name, namespace)
    POST /apis/v2beta1/pipelines                        (create a pipeline without versions)
    GET  /apis/v2beta1/pipelines/{id}
    POST /apis/v2beta1/pipelines/upload                 (multipart `uploadfile`; pipeline + first version)
    POST /apis/v2beta1/pipelines/upload_version         (multipart `uploadfile`; ?name=&pipelineid=)
    GET  /apis/v2beta1/pipelines/{id}/versions          (filter on display_name/name)
    GET  /apis/v2beta1/pipelines/{id}/versions/{vid}
    GET  /apis/v2beta1/experiments                      (filter on display_name, namespace)
    POST /apis/v2beta1/experiments
    GET  /apis/v2beta1/experiments/{id}
    POST /apis/v2beta1/runs
    POST /apis/v2beta1/recurringruns
    GET  /apis/v2beta1/recurringruns                    (experiment_id, filter on display_name)

Errors are google.rpc.Status JSON ({"code", "message", "details"}) with the HTTP status the real server
uses: 404 for an unknown pipeline/experiment/version, 409 for a duplicate name, 400 for a bad request,
401 when `token` is set and the request's bearer token differs. Ids are deterministic.
"""

from __future__ import annotations

import dataclasses
import email.parser
import email.policy
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

CREATED_AT = "2026-01-01T00:00:00Z"
API = "/apis/v2beta1"
GRPC_CODES = {400: 3, 401: 16, 404: 5, 409: 6, 500: 13}


@dataclasses.dataclass
class Recorded:
    """One request as the server saw it."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    json: Any = None  # the JSON body, if any
    files: dict[str, tuple[str, bytes]] = dataclasses.field(default_factory=dict)  # field -> (name, bytes)
    status: int = 0  # what the fake answered

    def arg(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[0] if values else None


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _matches(item: dict, filter_json: str | None) -> bool:
    if not filter_json:
        return True
    try:
        predicates = json.loads(filter_json).get("predicates", [])
    except (ValueError, AttributeError) as exc:
        raise ApiError(400, f"Invalid filter: {filter_json}") from exc
    for predicate in predicates:
        if predicate.get("operation") not in ("EQUALS", 1):
            raise ApiError(400, f"Unsupported filter operation in the fake: {predicate.get('operation')}")
        key = predicate.get("key")
        if key not in ("display_name", "name"):
            raise ApiError(400, f"Invalid filter key: {key}")
        if item.get(key) != predicate.get("stringValue", predicate.get("string_value")):
            return False
    return True


def _parse_spec(data: bytes) -> dict:
    """Like the server: the first document is the PipelineSpec; with a PlatformSpec, both are nested."""
    try:
        docs = [doc for doc in yaml.safe_load_all(data.decode()) if doc is not None]
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"Failed to parse the pipeline spec: {exc}") from exc
    if not docs or not isinstance(docs[0], dict) or "root" not in docs[0]:
        raise ApiError(400, "Invalid pipeline spec: no root")
    if len(docs) > 1:
        return {"pipeline_spec": docs[0], "platform_spec": docs[1]}
    return docs[0]


class FakeKfpServer:
    """Use as a context manager; `url` is the host for kfp.Client, `requests` what was received."""

    def __init__(self, *, token: str | None = None, multi_user: bool = False) -> None:
        self.token = token
        self.multi_user = multi_user
        self.requests: list[Recorded] = []
        self.pipelines: dict[str, dict] = {}
        self.versions: dict[str, dict] = {}  # version id -> version (with pipeline_id)
        self.experiments: dict[str, dict] = {}
        self.runs: dict[str, dict] = {}
        self.recurring_runs: dict[str, dict] = {}
        # (method, path) -> (HTTP status, message): answer that request with this error instead
        self.failures: dict[tuple[str, str], tuple[int, str]] = {}
        self._ids = 0
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ---

    @property
    def url(self) -> str:
        assert self._httpd is not None, "not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> FakeKfpServer:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                fake._handle(self, "GET")

            def do_POST(self) -> None:
                fake._handle(self, "POST")

            def do_DELETE(self) -> None:
                fake._handle(self, "DELETE")

            def log_message(self, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-kfp", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> FakeKfpServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- helpers for tests ---

    def calls(self, method: str | None = None, path: str | None = None) -> list[Recorded]:
        """Recorded requests, optionally only those with this method and path (without the query)."""
        with self._lock:
            return [
                r
                for r in self.requests
                if (method is None or r.method == method) and (path is None or r.path == path)
            ]

    def _new_id(self) -> str:
        self._ids += 1
        return f"00000000-0000-4000-8000-{self._ids:012d}"

    # --- HTTP ---

    def _handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        split = urlsplit(handler.path)
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        record = Recorded(
            method=method,
            path=split.path,
            query=parse_qs(split.query, keep_blank_values=True),
            headers={k.lower(): v for k, v in handler.headers.items()},
        )
        content_type = handler.headers.get("Content-Type", "")
        try:
            if content_type.startswith("multipart/form-data"):
                record.files = self._multipart(content_type, body)
            elif body:
                try:
                    record.json = json.loads(body)
                except ValueError as exc:
                    raise ApiError(400, f"invalid JSON body: {exc}") from exc
            with self._lock:
                self.requests.append(record)
                if self.token is not None and record.headers.get("authorization") != f"Bearer {self.token}":
                    raise ApiError(401, "Unauthenticated: missing or invalid bearer token")
                if (method, split.path) in self.failures:
                    raise ApiError(*self.failures[(method, split.path)])
                status, answer = self._route(method, split.path, record)
        except ApiError as exc:
            status = exc.status
            answer = {"code": GRPC_CODES.get(status, 2), "message": exc.message, "details": []}
        record.status = status
        data = json.dumps(answer).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    @staticmethod
    def _multipart(content_type: str, body: bytes) -> dict[str, tuple[str, bytes]]:
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body
        )
        files = {}
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            files[name] = (part.get_filename() or "", part.get_payload(decode=True) or b"")
        return files

    def _route(self, method: str, path: str, request: Recorded) -> tuple[int, Any]:
        if not path.startswith(API + "/"):
            raise ApiError(404, f"Not Found: {path}")
        parts = path[len(API) + 1 :].split("/")
        match method, parts:
            case "GET", ["healthz"]:
                return 200, {"multi_user": self.multi_user, "pipeline_store": "database"}
            case "GET", ["pipelines"]:
                return 200, self._list("pipelines", self.pipelines.values(), request)
            case "POST", ["pipelines"]:
                return 200, self._create_pipeline(request.json or {})
            case "POST", ["pipelines", "upload"]:
                return 200, self._upload_pipeline(request)
            case "POST", ["pipelines", "upload_version"]:
                return 200, self._upload_version(request)
            case "GET", ["pipelines", pipeline_id]:
                return 200, self._get(self.pipelines, pipeline_id, "Pipeline")
            case "GET", ["pipelines", pipeline_id, "versions"]:
                self._get(self.pipelines, pipeline_id, "Pipeline")
                versions = [v for v in self.versions.values() if v["pipeline_id"] == pipeline_id]
                return 200, self._list("pipeline_versions", versions, request)
            case "GET", ["pipelines", pipeline_id, "versions", version_id]:
                version = self._get(self.versions, version_id, "PipelineVersion")
                if version["pipeline_id"] != pipeline_id:
                    raise ApiError(404, f"PipelineVersion {version_id} not found in pipeline {pipeline_id}")
                return 200, version
            case "GET", ["experiments"]:
                namespace = request.arg("namespace") or ""
                items = [e for e in self.experiments.values() if e["namespace"] == namespace]
                return 200, self._list("experiments", items, request)
            case "POST", ["experiments"]:
                return 200, self._create_experiment(request.json or {})
            case "GET", ["experiments", experiment_id]:
                return 200, self._get(self.experiments, experiment_id, "Experiment")
            case "POST", ["runs"]:
                return 200, self._create_run(request.json or {}, request.arg("experiment_id"))
            case "POST", ["recurringruns"]:
                return 200, self._create_recurring_run(request.json or {})
            case "GET", ["recurringruns"]:
                experiment_id = request.arg("experiment_id")
                items = [
                    r
                    for r in self.recurring_runs.values()
                    if experiment_id is None or r["experiment_id"] == experiment_id
                ]
                return 200, self._list("recurringRuns", items, request)
        raise ApiError(404, f"Not Found: {method} {path}")

    @staticmethod
    def _get(table: dict[str, dict], item_id: str, kind: str) -> dict:
        if item_id not in table:
            raise ApiError(404, f"{kind} {item_id} not found")
        return table[item_id]

    @staticmethod
    def _list(key: str, items: Any, request: Recorded) -> dict:
        found = [item for item in items if _matches(item, request.arg("filter"))]
        return {key: found, "total_size": len(found)} if found else {}

    # --- resources ---

    def _create_pipeline(self, body: dict) -> dict:
        name = body.get("name") or body.get("display_name")
        if not name:
            raise ApiError(400, "Invalid input error: pipeline name is empty")
        namespace = body.get("namespace") or ""
        if any(p["name"] == name and p["namespace"] == namespace for p in self.pipelines.values()):
            raise ApiError(409, f"Already exist error: pipeline with name {name} already exists")
        pipeline = {
            "pipeline_id": self._new_id(),
            "name": name,
            "display_name": body.get("display_name") or name,
            "description": body.get("description") or "",
            "namespace": namespace,
            "created_at": CREATED_AT,
        }
        self.pipelines[pipeline["pipeline_id"]] = pipeline
        return pipeline

    def _add_version(
        self, pipeline_id: str, name: str, display_name: str, description: str, spec: dict
    ) -> dict:
        if any(v["pipeline_id"] == pipeline_id and v["name"] == name for v in self.versions.values()):
            raise ApiError(409, f"Already exist error: pipeline version with name {name} already exists")
        version = {
            "pipeline_id": pipeline_id,
            "pipeline_version_id": self._new_id(),
            "name": name,
            "display_name": display_name or name,
            "description": description,
            "created_at": CREATED_AT,
            "pipeline_spec": spec,
        }
        self.versions[version["pipeline_version_id"]] = version
        return version

    def _uploaded_spec(self, request: Recorded) -> dict:
        if "uploadfile" not in request.files:
            raise ApiError(400, "Failed to read pipeline spec file: no multipart field 'uploadfile'")
        return _parse_spec(request.files["uploadfile"][1])

    def _upload_pipeline(self, request: Recorded) -> dict:
        spec = self._uploaded_spec(request)
        name = request.arg("name") or request.arg("display_name") or request.files["uploadfile"][0]
        pipeline = self._create_pipeline(
            {
                "name": name,
                "display_name": request.arg("display_name") or name,
                "description": request.arg("description") or "",
                "namespace": request.arg("namespace") or "",
            }
        )
        self._add_version(pipeline["pipeline_id"], name, pipeline["display_name"], "", spec)
        return pipeline

    def _upload_version(self, request: Recorded) -> dict:
        spec = self._uploaded_spec(request)
        pipeline_id = request.arg("pipelineid") or ""
        self._get(self.pipelines, pipeline_id, "Pipeline")
        name = request.arg("name") or request.arg("display_name") or request.files["uploadfile"][0]
        return self._add_version(
            pipeline_id, name, request.arg("display_name") or name, request.arg("description") or "", spec
        )

    def _create_experiment(self, body: dict) -> dict:
        name = body.get("display_name")
        if not name:
            raise ApiError(400, "Invalid input error: experiment name is empty")
        namespace = body.get("namespace") or ""
        if any(e["display_name"] == name and e["namespace"] == namespace for e in self.experiments.values()):
            raise ApiError(409, f"Already exist error: experiment with name {name} already exists")
        experiment = {
            "experiment_id": self._new_id(),
            "display_name": name,
            "description": body.get("description") or "",
            "namespace": namespace,
            "created_at": CREATED_AT,
            "storage_state": "AVAILABLE",
        }
        self.experiments[experiment["experiment_id"]] = experiment
        return experiment

    def _check_run_target(self, body: dict) -> None:
        if not body.get("display_name"):
            raise ApiError(400, "Invalid input error: name is empty")
        self._get(self.experiments, body.get("experiment_id") or "", "Experiment")
        reference = body.get("pipeline_version_reference") or {}
        if not reference and not body.get("pipeline_spec"):
            raise ApiError(400, "Invalid input error: a pipeline spec or a pipeline version is required")
        if reference:
            version = self._get(self.versions, reference.get("pipeline_version_id") or "", "PipelineVersion")
            if version["pipeline_id"] != reference.get("pipeline_id"):
                raise ApiError(404, "PipelineVersion not found in the referenced pipeline")

    def _create_run(self, body: dict, experiment_id: str | None) -> dict:
        self._check_run_target(body)
        run = {
            **body,
            "run_id": self._new_id(),
            "created_at": CREATED_AT,
            "state": "PENDING",
            "storage_state": "AVAILABLE",
        }
        self.runs[run["run_id"]] = run
        return run

    def _create_recurring_run(self, body: dict) -> dict:
        self._check_run_target(body)
        trigger = body.get("trigger") or {}
        cron = (trigger.get("cron_schedule") or {}).get("cron")
        interval = (trigger.get("periodic_schedule") or {}).get("interval_second")
        if not cron and not interval:
            raise ApiError(400, "Invalid input error: a cron or periodic schedule is required")
        if cron and not cron.startswith("@") and len(cron.split()) != 6:
            raise ApiError(400, f"Invalid input error: invalid cron schedule {cron!r}: expected 6 fields")
        job = {
            **body,
            "recurring_run_id": self._new_id(),
            "created_at": CREATED_AT,
            "updated_at": CREATED_AT,
            "status": "ENABLED" if body.get("mode") == "ENABLE" else "DISABLED",
        }
        self.recurring_runs[job["recurring_run_id"]] = job
        return job
