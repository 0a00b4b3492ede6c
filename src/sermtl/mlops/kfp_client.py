"""Compile the Kubeflow pipeline into a named, self-contained version: params.yaml's text is compiled in
as the default of `params_yaml`, and the name says which package version, commit and params.yaml made it.
Also the public face of the KFP client: uploading, running and scheduling (kfp_server) and the checks of
their inputs (kfp_inputs) are re-exported here.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import importlib
import os
import re
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from sermtl.fsutil import atomic_write
from sermtl.mlops import gitinfo
from sermtl.mlops.kfp_inputs import (
    CompiledVersion,
    KfpError,
    normalize_cron,
    parse_param_pairs,
    run_parameters,
)
from sermtl.mlops.kfp_server import (
    DEFAULT_EXPERIMENT,
    HEALTHZ_TIMEOUT_S,
    TOKEN_ENV,
    ScheduleResult,
    SubmitResult,
    Uploaded,
    connect,
    resolve_token,
    schedule,
    submit,
    upload,
)
from sermtl.params import DEFAULT_PARAMS_PATH, ClusterParams, Params, ParamsError, load_params

__all__ = [
    "DEFAULT_EXPERIMENT",
    "DEFAULT_OUT_DIR",
    "HEALTHZ_TIMEOUT_S",
    "IMAGE_REPOSITORY",
    "MANIFESTS_FILE",
    "MAX_NAME",
    "PACKAGE",
    "PARAMS_PARAMETER",
    "PIPELINE_FILE",
    "PIPELINE_MODULE",
    "TOKEN_ENV",
    "CompiledVersion",
    "KfpError",
    "ScheduleResult",
    "SubmitResult",
    "Uploaded",
    "compile_version",
    "connect",
    "git_state",
    "image_tag",
    "normalize_cron",
    "package_version",
    "params_digest",
    "parse_param_pairs",
    "resolve_token",
    "run_parameters",
    "schedule",
    "standard_yaml_dumpers",
    "submit",
    "upload",
    "version_name",
]

PACKAGE = "sermtl"
PIPELINE_MODULE = "pipelines.sermtl_pipeline"
PIPELINE_FILE = "pipeline.yaml"
MANIFESTS_FILE = "manifests.yaml"
PARAMS_PARAMETER = "params_yaml"  # the pipeline parameter that carries params.yaml's text
DEFAULT_OUT_DIR = Path("artifacts/kfp")
MAX_NAME = 63  # Kubernetes label-style names (metadata.name of the manifests, DNS-1123 label)
_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


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


def _load_checked_params(params_path: Path) -> Params:
    try:
        return load_params(params_path)  # a broken params.yaml must not become a version
    except ParamsError as exc:
        raise KfpError(str(exc)) from exc


def _cluster_with_images(cluster: ClusterParams, commit: str | None) -> ClusterParams:
    """The cluster section of *this* params file (images, GPU, requests, retries, Secrets) shapes the DAG;
    without images named by params or env, those built from this commit (infra/docker/README.md)."""
    tag = image_tag(commit)
    if tag and not cluster.images.cpu and not os.environ.get("SERMTL_IMAGE"):
        images = dataclasses.replace(cluster.images, cpu=f"{IMAGE_REPOSITORY}:{tag}")
        cluster = dataclasses.replace(cluster, images=images)
    return cluster


def _write_version(
    directory: Path,
    pipeline_func: Any,
    parameters: Mapping[str, Any],
    *,
    pipeline_name: str,
    name: str,
    namespace: str | None,
) -> tuple[Path, Path]:
    """Write <directory>/pipeline.yaml (the IR) and manifests.yaml atomically; returns their paths."""
    from kfp import compiler

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
    return pipeline_path, manifests_path


def compile_version(
    out_dir: str | Path = DEFAULT_OUT_DIR,
    params_path: str | Path = DEFAULT_PARAMS_PATH,
    *,
    version: str | None = None,
    namespace: str | None = None,
) -> CompiledVersion:
    """Compile the pipeline with params.yaml compiled in into <out_dir>/<version>/{pipeline,manifests}.yaml.

    pipeline.yaml is the IR YAML that is uploaded (byte-for-byte deterministic); manifests.yaml holds the
    Pipeline and PipelineVersion Kubernetes resources (KFP's Kubernetes-native API: `kubectl apply -f`).
    `version` overrides the computed version name (tests, hotfix names); `namespace` goes into the
    manifests' metadata. Compiling the same inputs twice gives identical bytes.
    """
    params_path = Path(params_path)
    params = _load_checked_params(params_path)
    commit, dirty = git_state()
    name = version or version_name(params_path, commit, dirty=dirty)
    if not _NAME_RE.match(name) or len(name) > MAX_NAME:
        raise KfpError(f"version name {name!r} is not a valid name (lowercase a-z, 0-9, '-'; <= {MAX_NAME})")
    module = _import_pipeline_module()
    pipeline_func = module.build_pipeline(_cluster_with_images(params.cluster, commit))
    pipeline_name = getattr(module, "PIPELINE_NAME", pipeline_func.name)
    parameters = {PARAMS_PARAMETER: params_path.read_text()}
    digest = params_digest(params_path)

    directory = Path(out_dir) / name
    directory.mkdir(parents=True, exist_ok=True)
    pipeline_path, manifests_path = _write_version(
        directory, pipeline_func, parameters, pipeline_name=pipeline_name, name=name, namespace=namespace
    )
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
