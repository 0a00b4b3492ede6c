"""Upload a compiled version to a KFP server through `kfp.Client` (its v2beta1 REST API), then run or
schedule it. Uploads are idempotent: pipeline, version and experiment are found by name or created, a
reused version is checked to hold the same spec. Tokens are sent, never printed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import time
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

from sermtl.errors import redact_text, redact_uri
from sermtl.mlops.kfp_inputs import CompiledVersion, KfpError, normalize_cron, run_parameters

DEFAULT_EXPERIMENT = "sermtl"
TOKEN_ENV = "KFP_TOKEN"
HEALTHZ_TIMEOUT_S = 10


@dataclasses.dataclass(frozen=True)
class Uploaded:
    pipeline_id: str
    version_id: str
    version_name: str
    pipeline_created: bool
    version_created: bool
    experiment_id: str
    experiment: str


@dataclasses.dataclass(frozen=True)
class SubmitResult:
    upload: Uploaded
    run_id: str
    run_name: str
    run_url: str
    parameters: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ScheduleResult:
    upload: Uploaded
    recurring_run_id: str
    name: str
    cron: str
    max_concurrency: int
    created: bool  # False: an identical recurring run already existed and was kept
    url: str


def resolve_token(token: str | None = None) -> str | None:
    """--token, else $KFP_TOKEN, else none."""
    return token or os.environ.get(TOKEN_ENV) or None


def _check_host(host: str) -> str:
    host = host.strip().rstrip("/")
    if not re.match(r"^https?://[^/\s]+", host):
        raise KfpError(f"--host {host!r} must be an http:// or https:// URL of the KFP API")
    return host


def _server_message(body: Any) -> str:
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    if not body:
        return ""
    try:
        data = json.loads(body)
    except (TypeError, ValueError):
        return str(body).strip()[:500]
    if isinstance(data, dict):
        return str(data.get("message") or data.get("error_message") or data.get("error") or data)[:500]
    return str(data)[:500]


@contextlib.contextmanager
def _api_errors(host: str, action: str, token: str | None) -> Iterator[None]:
    """Turn kfp_server_api / urllib3 failures into a KfpError naming the host, the step and the answer."""
    import kfp_server_api
    import urllib3

    def scrub(text: str) -> str:  # neither the token nor user-info in the host URL
        return redact_text(text.replace(token, "***") if token else text)

    try:
        yield
    except kfp_server_api.ApiException as exc:
        message = _server_message(exc.body)
        raise KfpError(
            scrub(
                f"KFP API at {host} answered {exc.status} {exc.reason or ''} while {action}"
                + (f": {message}" if message else "")
            )
        ) from None
    except urllib3.exceptions.HTTPError as exc:
        reason = getattr(exc, "reason", None) or exc
        raise KfpError(scrub(f"cannot reach the KFP API at {host} while {action}: {reason}")) from None


def _healthz(host: str, token: str | None):
    """GET /apis/v2beta1/healthz with a timeout, before kfp.Client (which retries it for 25 s)."""
    import kfp_server_api

    config = kfp_server_api.Configuration(host=host)
    config.retries = 0  # fail fast; no urllib3 retry warnings
    if token:
        config.api_key["authorization"] = token
        config.api_key_prefix["authorization"] = "Bearer"
    api = kfp_server_api.HealthzServiceApi(kfp_server_api.ApiClient(config))
    with _api_errors(host, "checking /apis/v2beta1/healthz", token):
        return api.healthz_service_get_healthz(_request_timeout=HEALTHZ_TIMEOUT_S)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """kfp.Client prints links and warns about server versions; the CLI reports for itself."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore", FutureWarning)
        yield


def connect(host: str, *, namespace: str | None = None, existing_token: str | None = None):
    """A kfp.Client for `host` after a health check that fails fast with the reason."""
    import kfp

    host = _check_host(host)
    token = resolve_token(existing_token)
    health = _healthz(host, token)
    if getattr(health, "multi_user", False) and not namespace:
        raise KfpError(
            f"the KFP API at {redact_uri(host)} is multi-user: pass --namespace (your profile's namespace)"
        )
    with _quiet(), _api_errors(host, "connecting", token):
        return kfp.Client(host=host, namespace=namespace or "kubeflow", existing_token=token)


def _equals_filter(key: str, value: str) -> str:
    return json.dumps({"predicates": [{"operation": "EQUALS", "key": key, "stringValue": value}]})


def _spec_of(stored: Any) -> Any:
    """The PipelineSpec inside a version's stored pipeline_spec (with a platform spec, it is nested)."""
    if isinstance(stored, dict) and "pipeline_spec" in stored and "root" not in stored:
        return stored["pipeline_spec"]
    return stored


def _find_version(client, pipeline_id: str, name: str):
    page_token = ""
    while True:
        listed = client.list_pipeline_versions(
            pipeline_id, page_token=page_token, page_size=100, filter=_equals_filter("display_name", name)
        )
        for version in listed.pipeline_versions or []:
            if name in (version.display_name, version.name):
                return version
        page_token = listed.next_page_token or ""
        if not page_token:
            return None


def _find_pipeline(client, name: str, namespace: str | None) -> str | None:
    listed = client.list_pipelines(
        page_size=100, filter=_equals_filter("display_name", name), namespace=namespace
    )
    for pipeline in listed.pipelines or []:
        if name in (pipeline.display_name, pipeline.name):
            return pipeline.pipeline_id
    return None


def _ensure_pipeline(
    client, host: str, compiled: CompiledVersion, namespace: str | None, token: str | None
) -> tuple[str, bool]:
    """(pipeline id, created): the pipeline of `compiled`, found by name or created."""
    import kfp_server_api

    with _api_errors(host, f"looking up pipeline {compiled.pipeline_name!r}", token):
        pipeline_id = _find_pipeline(client, compiled.pipeline_name, namespace)
    if pipeline_id is not None:
        return pipeline_id, False
    body = kfp_server_api.V2beta1Pipeline(
        display_name=compiled.pipeline_name,
        name=compiled.pipeline_name,
        description=compiled.ir()[0].get("pipelineInfo", {}).get("description"),
        namespace=namespace,
    )
    try:
        with _api_errors(host, f"creating pipeline {compiled.pipeline_name!r}", token):
            pipeline_id = client.pipelines.pipeline_service_create_pipeline(pipeline=body).pipeline_id
        return pipeline_id, True
    except KfpError:  # created concurrently (409)? then it can be found now
        with _api_errors(host, f"looking up pipeline {compiled.pipeline_name!r}", token):
            pipeline_id = _find_pipeline(client, compiled.pipeline_name, namespace)
        if pipeline_id is None:
            raise
        return pipeline_id, False


def _ensure_version(
    client, host: str, compiled: CompiledVersion, pipeline_id: str, token: str | None
) -> tuple[Any, bool]:
    """(version, created): the version named `compiled.name`, found or uploaded."""
    with _api_errors(host, f"looking up version {compiled.name!r}", token):
        existing = _find_version(client, pipeline_id, compiled.name)
    if existing is not None:
        return existing, False
    try:
        with _api_errors(host, f"uploading version {compiled.name!r}", token):
            uploaded = client.upload_pipeline_version(
                str(compiled.pipeline_path),
                compiled.name,
                pipeline_id=pipeline_id,
                description=compiled.description,
            )
        return uploaded, True
    except KfpError:  # uploaded concurrently (409)? then reuse it
        with _api_errors(host, f"looking up version {compiled.name!r}", token):
            existing = _find_version(client, pipeline_id, compiled.name)
        if existing is None:
            raise
        return existing, False


def upload(
    client,
    host: str,
    compiled: CompiledVersion,
    *,
    experiment: str,
    namespace: str | None = None,
    token: str | None = None,
) -> Uploaded:
    """Find or create the pipeline, upload the version unless it exists, find or create the experiment."""
    with _quiet():
        pipeline_id, pipeline_created = _ensure_pipeline(client, host, compiled, namespace, token)
        existing, version_created = _ensure_version(client, host, compiled, pipeline_id, token)
        # A clean commit + params hash pins the content; a dirty tree may reuse a name for other code.
        pinned = compiled.commit and not compiled.dirty
        reused = not version_created and existing.pipeline_spec
        if reused and not pinned and _spec_of(existing.pipeline_spec) != compiled.ir()[0]:
            raise KfpError(
                f"pipeline version {compiled.name!r} already exists on {redact_uri(host)} with a different "
                "spec (compiled from uncommitted changes?): commit them, or pass another version name"
            )

        with _api_errors(host, f"finding or creating experiment {experiment!r}", token):
            found = client.create_experiment(name=experiment, namespace=namespace)  # get-or-create
    return Uploaded(
        pipeline_id=pipeline_id,
        version_id=existing.pipeline_version_id,
        version_name=compiled.name,
        pipeline_created=pipeline_created,
        version_created=version_created,
        experiment_id=found.experiment_id,
        experiment=experiment,
    )


def submit(
    host: str,
    compiled: CompiledVersion,
    *,
    experiment: str = DEFAULT_EXPERIMENT,
    params: Mapping[str, Any] | None = None,
    run_name: str | None = None,
    namespace: str | None = None,
    existing_token: str | None = None,
) -> SubmitResult:
    """Upload `compiled` (idempotently) and start one run of it with `params` in `experiment`."""
    parameters = run_parameters(compiled, params or {})  # before any request
    host = _check_host(host)
    token = resolve_token(existing_token)
    client = connect(host, namespace=namespace, existing_token=token)
    uploaded = upload(client, host, compiled, experiment=experiment, namespace=namespace, token=token)
    name = run_name or f"{compiled.name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    with _quiet(), _api_errors(host, f"starting run {name!r}", token):
        run = client.run_pipeline(
            experiment_id=uploaded.experiment_id,
            job_name=name,
            params=parameters,
            pipeline_id=uploaded.pipeline_id,
            version_id=uploaded.version_id,
        )
    return SubmitResult(
        upload=uploaded,
        run_id=run.run_id,
        run_name=name,
        run_url=f"{redact_uri(host)}/#/runs/details/{run.run_id}",
        parameters=parameters,
    )


def _existing_recurring_run(
    client,
    host: str,
    uploaded: Uploaded,
    *,
    name: str,
    cron6: str,
    max_concurrency: int,
    token: str | None,
) -> ScheduleResult | None:
    """The recurring run `name` if it exists with the same version and cron; another one is an error."""
    with _api_errors(host, f"looking up recurring run {name!r}", token):
        listed = client.list_recurring_runs(
            experiment_id=uploaded.experiment_id,
            page_size=100,
            filter=_equals_filter("display_name", name),
        )
    for job in listed.recurring_runs or []:
        if job.display_name != name:
            continue
        reference = job.pipeline_version_reference
        same_version = reference is not None and reference.pipeline_version_id == uploaded.version_id
        same_cron = (
            job.trigger is not None
            and job.trigger.cron_schedule is not None
            and (job.trigger.cron_schedule.cron == cron6)
        )
        if same_version and same_cron:
            return ScheduleResult(
                upload=uploaded,
                recurring_run_id=job.recurring_run_id,
                name=name,
                cron=cron6,
                max_concurrency=int(job.max_concurrency or max_concurrency),
                created=False,
                url=f"{redact_uri(host)}/#/recurringrun/details/{job.recurring_run_id}",
            )
        raise KfpError(
            f"a recurring run named {name!r} already exists in experiment {uploaded.experiment!r} "
            f"(id {job.recurring_run_id}) with another version or schedule: pass another --name, "
            "or disable/delete it first"
        )
    return None


def schedule(
    host: str,
    compiled: CompiledVersion,
    *,
    cron: str,
    experiment: str = DEFAULT_EXPERIMENT,
    params: Mapping[str, Any] | None = None,
    name: str | None = None,
    max_concurrency: int = 1,
    no_catchup: bool = True,
    namespace: str | None = None,
    existing_token: str | None = None,
) -> ScheduleResult:
    """Upload `compiled` and create a recurring run of it on `cron` (5 or 6 fields; checked first).

    `name` defaults to the version name. If a recurring run of that name exists in the experiment with
    the same version and cron, it is kept (idempotent); with anything else it is an error.
    """
    cron6 = normalize_cron(cron)
    if max_concurrency < 1:
        raise KfpError(f"--max-concurrency must be at least 1, not {max_concurrency}")
    parameters = run_parameters(compiled, params or {})
    host = _check_host(host)
    token = resolve_token(existing_token)
    client = connect(host, namespace=namespace, existing_token=token)
    uploaded = upload(client, host, compiled, experiment=experiment, namespace=namespace, token=token)
    name = name or compiled.name
    with _quiet():
        kept = _existing_recurring_run(
            client, host, uploaded, name=name, cron6=cron6, max_concurrency=max_concurrency, token=token
        )
        if kept is not None:
            return kept
        with _api_errors(host, f"creating recurring run {name!r}", token):
            job = client.create_recurring_run(
                experiment_id=uploaded.experiment_id,
                job_name=name,
                description=f"{compiled.description}; cron {cron6}",
                cron_expression=cron6,
                max_concurrency=max_concurrency,
                no_catchup=no_catchup,
                params=parameters,
                pipeline_id=uploaded.pipeline_id,
                version_id=uploaded.version_id,
            )
    return ScheduleResult(
        upload=uploaded,
        recurring_run_id=job.recurring_run_id,
        name=name,
        cron=cron6,
        max_concurrency=max_concurrency,
        created=True,
        url=f"{redact_uri(host)}/#/recurringrun/details/{job.recurring_run_id}",
    )
