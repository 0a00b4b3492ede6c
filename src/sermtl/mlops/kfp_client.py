"""Compile the Kubeflow pipeline into a named version, upload it to a KFP server, run and schedule it.

A *version* is the compiled IR YAML of pipelines/sermtl_pipeline.py with params.yaml's text compiled in
as the default of the `params_yaml` parameter, so a version is self-contained: its name says which
package version, git commit and params.yaml produced it, and a run of it needs only `corpus_uri`.

    <out>/<version>/pipeline.yaml    the IR YAML that is uploaded (byte-for-byte deterministic)
    <out>/<version>/manifests.yaml   the Pipeline and PipelineVersion Kubernetes resources (KFP's
                                     Kubernetes-native API: `kubectl apply -f`)

Talking to the server goes through `kfp.Client` (its v2beta1 REST API). Uploads are idempotent: the
pipeline is found by name or created, a version of the same name is reused (after checking that it
holds the same spec), the experiment is found or created. Tokens are sent, never printed.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import importlib
import io
import json
import os
import re
import time
import warnings
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from sermtl.errors import redact_text, redact_uri
from sermtl.fsutil import atomic_write
from sermtl.mlops import gitinfo
from sermtl.params import DEFAULT_PARAMS_PATH, ParamsError, load_params

PACKAGE = "sermtl"
PIPELINE_MODULE = "pipelines.sermtl_pipeline"
PIPELINE_FILE = "pipeline.yaml"
MANIFESTS_FILE = "manifests.yaml"
PARAMS_PARAMETER = "params_yaml"  # the pipeline parameter that carries params.yaml's text
DEFAULT_OUT_DIR = Path("artifacts/kfp")
DEFAULT_EXPERIMENT = "sermtl"
TOKEN_ENV = "KFP_TOKEN"
MAX_NAME = 63  # Kubernetes label-style names (metadata.name of the manifests, DNS-1123 label)
HEALTHZ_TIMEOUT_S = 10
_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class KfpError(RuntimeError):
    """A pipeline could not be compiled, uploaded, run or scheduled; the message says why."""


# --- version names ------------------------------------------------------------------------------------


IMAGE_REPOSITORY = "ghcr.io/sermtl/sermtl"  # where infra/docker/README.md pushes the project images


def git_state() -> tuple[str | None, bool]:
    """(commit, dirty): `$SERMTL_GIT_COMMIT` (images built without .git; never dirty), else git's HEAD.

    Dirty counts untracked files too: a new, not yet added component changes the compiled pipeline.
    """
    if gitinfo.pinned_commit():
        return gitinfo.pinned_commit(), False
    commit = gitinfo.commit()
    return commit, bool(commit and gitinfo.changed(untracked=True))


def image_tag(commit: str | None = None) -> str | None:
    """`<version>-<short commit>[-dirty]`, the tag infra/docker/image-tag.sh gives the images built from
    this tree (dirty: tracked files changed); None without a commit."""
    if commit is None:
        commit, _ = git_state()
    if not commit:
        return None
    dirty = bool(gitinfo.changed())
    return f"{package_version().replace('+', '-')}-{commit[:7]}{'-dirty' if dirty else ''}"


def _slug(text: str) -> str:
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]", "-", text.lower())).strip("-")


def package_version() -> str:
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        return "0.0.0"


def params_digest(params_path: str | Path) -> str:
    """sha256 of params.yaml's bytes (hex)."""
    path = Path(params_path)
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        raise KfpError(f"{path}: cannot read the parameter file ({exc.strerror or exc})") from exc


def version_name(params_path: str | Path, commit: str | None = None, *, dirty: bool | None = None) -> str:
    """`sermtl-<package version>-<commit[:7]>[-dirty]-p<sha256(params.yaml)[:8]>`, e.g.
    `sermtl-0-1-0-3bc016d-p1f2e3d4c`: lowercase [a-z0-9-], at most 63 characters.

    Without `commit` the checkout's HEAD (or $SERMTL_GIT_COMMIT) is used and `dirty` is detected;
    an explicit commit is taken as clean unless dirty=True. No git at all gives `nogit`.
    """
    if commit is None:
        commit, detected = git_state()
        dirty = detected if dirty is None else dirty
    sha = _slug(commit or "")[:7] or "nogit"
    suffix = f"-{sha}{'-dirty' if dirty else ''}-p{params_digest(params_path)[:8]}"
    room = MAX_NAME - len(PACKAGE) - 1 - len(suffix) - 1
    pkg = _slug(package_version())[:room].strip("-") or "0"
    name = f"{PACKAGE}-{pkg}{suffix}"
    assert _NAME_RE.match(name) and len(name) <= MAX_NAME, name
    return name


# --- compiling ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CompiledVersion:
    """A compiled pipeline version on disk."""

    name: str  # the version name (also metadata.name of the PipelineVersion manifest)
    pipeline_name: str  # the KFP pipeline the version belongs to
    directory: Path
    pipeline_path: Path  # IR YAML
    manifests_path: Path  # Pipeline + PipelineVersion manifests
    params_sha256: str
    commit: str | None
    dirty: bool
    description: str = ""

    def ir(self) -> list[dict[str, Any]]:
        """The IR YAML's documents: the PipelineSpec, then the PlatformSpec if there is one."""
        return [doc for doc in yaml.safe_load_all(self.pipeline_path.read_text()) if doc is not None]

    def parameters(self) -> dict[str, dict[str, Any]]:
        """The pipeline's input parameters: name -> {parameterType, defaultValue?, isOptional?}."""
        root = self.ir()[0].get("root", {})
        return dict(root.get("inputDefinitions", {}).get("parameters", {}))


def _import_pipeline_module():
    """pipelines/ and components/ install with the library (pyproject's wheel packages)."""
    try:
        return importlib.import_module(PIPELINE_MODULE)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in ("pipelines", "components"):
            raise  # a real missing dependency of the pipeline: let it say which
        raise KfpError(
            f"cannot import the pipeline definition {PIPELINE_MODULE} ({exc}): install sermtl from its "
            "repository (`uv sync`, `pip install .`), which installs pipelines/ and components/ with it"
        ) from exc


@contextlib.contextmanager
def standard_yaml_dumpers() -> Iterator[None]:
    """kfp's compiler relies on PyYAML sorting mapping keys. oyaml (imported by opensmile's audobject)
    swaps the dict representer of every PyYAML Dumper for an insertion-order one, process-wide; restore
    the standard one while compiling, so the compiled bytes do not depend on what was imported before."""
    dumpers = [getattr(yaml.dumper, name) for name in yaml.dumper.__all__]
    cyaml = getattr(yaml, "cyaml", None)
    if cyaml is not None:
        dumpers += [getattr(cyaml, name) for name in cyaml.__all__ if name.endswith("Dumper")]
    saved = [(dumper, dumper.__dict__.get("yaml_representers")) for dumper in dumpers]
    try:
        for dumper in dumpers:
            dumper.yaml_representers = {
                **dumper.yaml_representers,
                dict: yaml.representer.SafeRepresenter.represent_dict,
            }
        yield
    finally:
        for dumper, own in saved:
            if own is None:
                del dumper.yaml_representers
            else:
                dumper.yaml_representers = own


def _summarize(value: str) -> str:
    lines = value.splitlines()
    return f"<{len(lines)} lines, sha256:{hashlib.sha256(value.encode()).hexdigest()[:16]}>"


def _repair_header(path: Path, pipeline_func: Any, parameters: Mapping[str, Any]) -> None:
    """kfp 2.17 writes string defaults into the YAML's comment header without escaping newlines, so a
    multi-line default (params.yaml's text) leaves uncommented lines there and the file does not parse.
    Rewrite exactly that header with multi-line defaults summarized; the spec below is untouched."""
    text = path.read_text()
    try:
        from google.protobuf import json_format
        from kfp.compiler import pipeline_spec_builder as builder

        spec = builder.modify_pipeline_spec_with_override(
            pipeline_spec=pipeline_func.pipeline_spec,
            pipeline_name=None,
            pipeline_parameters=dict(parameters),
        )
        spec_dict = json_format.MessageToDict(spec)
        written = builder.extract_comments_from_pipeline_spec(spec_dict, pipeline_func.description)
        shown = copy.deepcopy(spec_dict)
        for body in shown.get("root", {}).get("inputDefinitions", {}).get("parameters", {}).values():
            default = body.get("defaultValue")
            if isinstance(default, str) and len(default.splitlines()) > 1:
                body["defaultValue"] = _summarize(default)
        repaired = builder.extract_comments_from_pipeline_spec(shown, pipeline_func.description)
    except (ImportError, AttributeError, KeyError, TypeError):  # a kfp without these internals
        written = repaired = ""
    if written != repaired and text.startswith(written):
        text = repaired + text[len(written) :]
        path.write_text(text)
    try:
        list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        raise KfpError(f"{path}: the compiled pipeline is not valid YAML ({exc})") from exc


def compile_version(
    out_dir: str | Path = DEFAULT_OUT_DIR,
    params_path: str | Path = DEFAULT_PARAMS_PATH,
    *,
    version: str | None = None,
    namespace: str | None = None,
) -> CompiledVersion:
    """Compile the pipeline with params.yaml compiled in into <out_dir>/<version>/{pipeline,manifests}.yaml.

    `version` overrides the computed version name (tests, hotfix names); `namespace` goes into the
    manifests' metadata. Compiling the same inputs twice gives identical bytes.
    """
    from kfp import compiler

    params_path = Path(params_path)
    try:
        params = load_params(params_path)  # a broken params.yaml must not become a version
    except ParamsError as exc:
        raise KfpError(str(exc)) from exc
    commit, dirty = git_state()
    name = version or version_name(params_path, commit, dirty=dirty)
    if not _NAME_RE.match(name) or len(name) > MAX_NAME:
        raise KfpError(f"version name {name!r} is not a valid name (lowercase a-z, 0-9, '-'; <= {MAX_NAME})")
    module = _import_pipeline_module()
    # The cluster section of *this* params file (images, GPU, requests, retries, Secrets) shapes the DAG.
    cluster = params.cluster
    tag = image_tag(commit)
    if tag and not cluster.images.cpu and not os.environ.get("SERMTL_IMAGE"):
        # The images built from this commit (infra/docker/README.md), unless params or env name others.
        images = dataclasses.replace(cluster.images, cpu=f"{IMAGE_REPOSITORY}:{tag}")
        cluster = dataclasses.replace(cluster, images=images)
    pipeline_func = module.build_pipeline(cluster)
    pipeline_name = getattr(module, "PIPELINE_NAME", pipeline_func.name)
    parameters = {PARAMS_PARAMETER: params_path.read_text()}
    digest = params_digest(params_path)

    directory = Path(out_dir) / name
    directory.mkdir(parents=True, exist_ok=True)
    pipeline_path, manifests_path = directory / PIPELINE_FILE, directory / MANIFESTS_FILE

    def write_ir(tmp: Path) -> None:
        compiler.Compiler().compile(
            pipeline_func=pipeline_func, package_path=str(tmp), pipeline_parameters=parameters
        )
        _repair_header(tmp, pipeline_func, parameters)

    def write_manifests(tmp: Path) -> None:
        options = compiler.KubernetesManifestOptions(
            pipeline_name=pipeline_name,
            pipeline_display_name=pipeline_name,
            pipeline_version_name=name,
            pipeline_version_display_name=name,
            namespace=namespace,
            include_pipeline_manifest=True,
        )
        compiler.Compiler().compile(
            pipeline_func=pipeline_func,
            package_path=str(tmp),
            pipeline_parameters=parameters,
            kubernetes_manifest_options=options,
            kubernetes_manifest_format=True,
        )

    try:
        with standard_yaml_dumpers():
            atomic_write(pipeline_path, write_ir)
            atomic_write(manifests_path, write_manifests)
    except ValueError as exc:  # e.g. the pipeline lost its params_yaml parameter
        raise KfpError(f"compiling {PIPELINE_MODULE} failed: {exc}") from exc
    describe = f"{PACKAGE} {package_version()}, commit {commit or 'unknown'}{' (dirty)' if dirty else ''}"
    return CompiledVersion(
        name=name,
        pipeline_name=pipeline_name,
        directory=directory,
        pipeline_path=pipeline_path,
        manifests_path=manifests_path,
        params_sha256=digest,
        commit=commit,
        dirty=dirty,
        description=f"{describe}, params.yaml sha256 {digest[:12]}",
    )


# --- run parameters and cron ----------------------------------------------------------------------------


def parse_param_pairs(pairs: list[str] | tuple[str, ...]) -> dict[str, str]:
    """['key=value', ...] -> {key: value}; the value may contain '='."""
    parsed: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise KfpError(f"--param {pair!r} is not key=value")
        parsed[key.strip()] = value
    return parsed


def _typed(name: str, value: Any, parameter_type: str) -> Any:
    if not isinstance(value, str) or parameter_type in ("STRING", ""):
        return value
    try:
        if parameter_type == "NUMBER_INTEGER":
            return int(value)
        if parameter_type == "NUMBER_DOUBLE":
            return float(value)
        if parameter_type == "BOOLEAN":
            lowered = value.strip().lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return lowered in ("true", "1", "yes")
        if parameter_type in ("LIST", "STRUCT"):
            return json.loads(value)
    except (ValueError, json.JSONDecodeError) as exc:
        raise KfpError(f"pipeline parameter {name}={value!r} is not a valid {parameter_type}") from exc
    return value


def run_parameters(compiled: CompiledVersion, params: Mapping[str, Any]) -> dict[str, Any]:
    """Check `params` against the compiled pipeline's inputs (names, required ones) and type them."""
    declared = compiled.parameters()
    unknown = sorted(set(params) - set(declared))
    if unknown:
        raise KfpError(
            f"unknown pipeline parameter(s) {', '.join(unknown)}; valid: {', '.join(sorted(declared))}"
        )
    missing = sorted(
        name
        for name, body in declared.items()
        if name not in params and "defaultValue" not in body and not body.get("isOptional")
    )
    if missing:
        flags = " ".join(f"--param {name}=VALUE" for name in missing)
        raise KfpError(f"missing required pipeline parameter(s) {', '.join(missing)}: pass {flags}")
    return {
        name: _typed(name, value, declared[name].get("parameterType", "STRING"))
        for name, value in params.items()
    }


# robfig/cron (KFP's scheduler): second minute hour day-of-month month day-of-week.
_CRON_FIELDS = (
    ("second", 0, 59, {}),
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day of month", 1, 31, {}),
    (
        "month",
        1,
        12,
        {
            m: i + 1
            for i, m in enumerate(
                ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
            )
        },
    ),
    ("day of week", 0, 6, {d: i for i, d in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))}),
)
_CRON_DESCRIPTORS = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}
_GO_DURATION = re.compile(r"^(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$")


def _cron_value(text: str, low: int, high: int, names: dict[str, int], field: str, expr: str) -> int:
    value = names.get(text.lower()) if not text.isdigit() else int(text)
    if value is None or not low <= value <= high:
        raise KfpError(f"cron expression {expr!r}: {field} value {text!r} is not in {low}-{high}")
    return value


def normalize_cron(expression: str) -> str:
    """A 6-field cron expression (seconds first) as KFP wants it; 5 fields get `0 ` prefixed.

    Also accepts robfig descriptors (@daily, @every 1h, ...). Anything else is refused with the reason.
    """
    expr = " ".join(expression.split())
    if expr.startswith("@"):
        head, _, rest = expr.partition(" ")
        if head in _CRON_DESCRIPTORS and not rest:
            return expr
        if head == "@every" and _GO_DURATION.match(rest):
            return expr
        raise KfpError(
            f"cron expression {expression!r}: unknown descriptor; use {', '.join(sorted(_CRON_DESCRIPTORS))} "
            "or '@every <duration>' (e.g. @every 6h)"
        )
    fields = expr.split(" ") if expr else []
    if len(fields) == 5:
        fields = ["0", *fields]
    if len(fields) != 6:
        raise KfpError(
            f"cron expression {expression!r} has {len(fields)} field(s); expected 5 (minute hour day month "
            "weekday) or 6 (second first, as KFP uses), e.g. '0 3 * * *'"
        )
    for text, (field, low, high, names) in zip(fields, _CRON_FIELDS, strict=True):
        for item in text.split(","):
            span, slash, step = item.partition("/")
            if slash and (not step.isdigit() or int(step) == 0):
                raise KfpError(
                    f"cron expression {expression!r}: {field} step {step!r} is not a positive number"
                )
            if span in ("*", "?"):
                continue
            start, dash, end = span.partition("-")
            first = _cron_value(start, low, high, names, field, expression)
            if dash and _cron_value(end, low, high, names, field, expression) < first:
                raise KfpError(f"cron expression {expression!r}: {field} range {span!r} is reversed")
    return " ".join(fields)


# --- talking to the server ----------------------------------------------------------------------------


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
    import kfp_server_api

    with _quiet():
        with _api_errors(host, f"looking up pipeline {compiled.pipeline_name!r}", token):
            pipeline_id = _find_pipeline(client, compiled.pipeline_name, namespace)
        pipeline_created = False
        if pipeline_id is None:
            body = kfp_server_api.V2beta1Pipeline(
                display_name=compiled.pipeline_name,
                name=compiled.pipeline_name,
                description=compiled.ir()[0].get("pipelineInfo", {}).get("description"),
                namespace=namespace,
            )
            try:
                with _api_errors(host, f"creating pipeline {compiled.pipeline_name!r}", token):
                    pipeline_id = client.pipelines.pipeline_service_create_pipeline(pipeline=body).pipeline_id
                pipeline_created = True
            except KfpError:  # created concurrently (409)? then it can be found now
                with _api_errors(host, f"looking up pipeline {compiled.pipeline_name!r}", token):
                    pipeline_id = _find_pipeline(client, compiled.pipeline_name, namespace)
                if pipeline_id is None:
                    raise

        with _api_errors(host, f"looking up version {compiled.name!r}", token):
            existing = _find_version(client, pipeline_id, compiled.name)
        version_created = existing is None
        if existing is None:
            try:
                with _api_errors(host, f"uploading version {compiled.name!r}", token):
                    existing = client.upload_pipeline_version(
                        str(compiled.pipeline_path),
                        compiled.name,
                        pipeline_id=pipeline_id,
                        description=compiled.description,
                    )
            except KfpError:  # uploaded concurrently (409)? then reuse it
                with _api_errors(host, f"looking up version {compiled.name!r}", token):
                    existing = _find_version(client, pipeline_id, compiled.name)
                if existing is None:
                    raise
                version_created = False
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
                f"a recurring run named {name!r} already exists in experiment {experiment!r} "
                f"(id {job.recurring_run_id}) with another version or schedule: pass another --name, "
                "or disable/delete it first"
            )
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
