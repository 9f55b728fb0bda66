"""The Kubernetes manifests and the container image definition in deploy/: they render with
kustomize, validate against the Kubernetes API schemas (offline), and pass only flags the
processes accept, on ports their probes and scrape annotations agree with."""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from dsgd import keys
from dsgd.config import config_from_arguments
from dsgd.security import CA_KEY, Security

ROOT = Path(__file__).resolve().parents[1]
KUBERNETES = ROOT / "deploy" / "kubernetes"
TREES = ["base", "overlays/example", "overlays/replicated"]
# the oldest release the manifests need (the pod-index label, gRPC probes) and the newest
# the validator knows
VERSIONS = ["1.28.0", kubernetes_validate.latest_version()]
MODULES = {
    "dsgd.coordinator": "dsgd.coordinator.process",
    "dsgd.shard": "dsgd.shard.process",
    "dsgd.worker": "dsgd.worker.process",
    "dsgd.evaluator": "dsgd.evaluator",
}
# what the downward API gives a pod, for the $(VAR) references in args
POD = {"POD_NAME": "dsgd-shard-1", "SHARD_ID": "1"}


def render(tree: str) -> list[dict[str, Any]]:
    """``kubectl kustomize`` (or ``kustomize build``) of a tree: its documents."""
    if shutil.which("kubectl"):
        command = ["kubectl", "kustomize", str(KUBERNETES / tree)]
    elif shutil.which("kustomize"):
        command = ["kustomize", "build", str(KUBERNETES / tree)]
    else:
        pytest.fail("no kustomize: install kubectl, or run scripts/test.sh (it installs one)")
    out = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.fixture(scope="module", params=TREES)
def rendered(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return render(request.param)


def workloads(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in docs:
        if doc["kind"] in ("StatefulSet", "Deployment"):
            yield doc["metadata"]["name"], doc["spec"]["template"]


def containers(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for name, template in workloads(docs):
        for container in template["spec"]["containers"]:
            yield name, container


def parsed(container: dict[str, Any]) -> tuple[str, Any]:
    """The container's module and its args as that module's own parser reads them (a flag
    it does not know fails here, as it would in the pod)."""
    command = container["command"]
    assert command[:2] == ["python", "-m"] and command[2] in MODULES, command
    args = [re.sub(r"\$\((\w+)\)", lambda m: POD[m.group(1)], arg) for arg in container["args"]]
    module = importlib.import_module(MODULES[command[2]])
    try:
        return command[2], module.parse_args(args)
    except SystemExit:
        pytest.fail(f"{command[2]} refuses the manifest's args {args}")


@pytest.mark.parametrize("version", VERSIONS)
def test_manifests_validate_against_the_kubernetes_schemas(
    rendered: list[dict[str, Any]], version: str
) -> None:
    kinds = {doc["kind"] for doc in rendered}
    assert {"Service", "StatefulSet", "Deployment"} <= kinds
    for doc in rendered:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except jsonschema.ValidationError as exc:  # what the validator raises, or a subclass
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at {exc.path}")


def test_every_flag_the_manifests_pass_exists_and_parses(rendered: list[dict[str, Any]]) -> None:
    roles = {}
    for name, container in containers(rendered):
        module, args = parsed(container)
        roles[module] = (name, args)
        if module == "dsgd.coordinator":
            config_from_arguments(args)  # the values make a valid training config
    assert set(roles) == set(MODULES), "every role is deployed"


def test_probes_and_scrapes_point_at_ports_the_processes_serve(
    rendered: list[dict[str, Any]],
) -> None:
    for name, template in workloads(rendered):
        container = template["spec"]["containers"][0]
        module, args = parsed(container)
        # every process probes its plaintext health-only port: the coordinator's and the
        # shards' own gRPC ports ask for mutual TLS, which a kubelet's probe cannot speak
        grpc_port = args.health_port
        assert grpc_port is not None, name
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == grpc_port, (name, probe)
        declared = {p["containerPort"] for p in container["ports"]}
        assert grpc_port in declared, name
        annotations = template["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert int(annotations["prometheus.io/port"]) == args.metrics_port, name
        assert args.metrics_host == "0.0.0.0", f"{name}: a scraper must reach the metrics"
        assert container["resources"]["requests"], name


def test_every_process_runs_secured_with_the_keys_its_secret_mount_holds(
    rendered: list[dict[str, Any]], tmp_path: Path
) -> None:
    """The Secret made as the kustomization says (``kubectl create secret generic
    --from-file=DIR``: the regular files at DIR's top) and mounted as each manifest mounts
    it loads as that process's keys; only shards get the shards' CURVE secret, and the
    CA's key is never in the Secret."""
    keys.init(tmp_path / "keys", [])
    secret = {p.name: p for p in (tmp_path / "keys").iterdir() if p.is_file()}
    assert all(re.fullmatch(r"[-._a-zA-Z0-9]+", key) for key in secret), "valid Secret keys"
    assert not any(
        p.read_bytes() == (tmp_path / "keys" / CA_KEY).read_bytes() for p in secret.values()
    )
    for name, template in workloads(rendered):
        container = template["spec"]["containers"][0]
        module, args = parsed(container)
        assert args.secure is not None and not args.insecure, name
        volume = next(v for v in template["spec"]["volumes"] if "secret" in v)
        assert volume["secret"]["secretName"] == "dsgd-keys", name
        mount = next(m for m in container["volumeMounts"] if m["name"] == volume["name"])
        assert Path(mount["mountPath"]) == args.secure and mount["readOnly"], name
        items = volume["secret"].get("items") or [{"key": k, "path": k} for k in secret]
        mounted = tmp_path / name  # what the kubelet writes
        mounted.mkdir()
        for item in items:
            shutil.copy(secret[item["key"]], mounted / item["path"])
        loaded = Security.load(mounted)  # as the process will, or a one-line error
        assert (loaded.server_secret is not None) == (module == "dsgd.shard"), name
        if module == "dsgd.shard":
            assert (mounted / "admitted-member.key").is_file(), "shards admit the members"
        fs_group = template["spec"]["securityContext"].get("fsGroup")
        assert fs_group is not None and volume["secret"]["defaultMode"] & 0o040, name


def test_shards_have_stable_names_ids_and_checkpoint_volumes(
    rendered: list[dict[str, Any]],
) -> None:
    shards = next(
        d for d in rendered if d["metadata"]["name"] == "dsgd-shard" and d["kind"] == "StatefulSet"
    )
    headless = next(
        d for d in rendered if d["metadata"]["name"] == "dsgd-shard" and d["kind"] == "Service"
    )
    assert headless["spec"]["clusterIP"] == "None" and shards["spec"]["serviceName"] == "dsgd-shard"
    container = shards["spec"]["template"]["spec"]["containers"][0]
    _, args = parsed(container)
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    claims = [c["metadata"]["name"] for c in shards["spec"]["volumeClaimTemplates"]]
    assert str(args.checkpoint_dir) == mounts["checkpoints"] and "checkpoints" in claims
    assert args.advertise_host.endswith(".dsgd-shard"), "workers dial a shard by its stable name"
    coordinator = next(c for n, c in containers(rendered) if c["command"][2] == "dsgd.coordinator")
    _, coordinator_args = parsed(coordinator)
    assert coordinator_args.num_shards == shards["spec"]["replicas"]


def test_the_replicated_overlay_serves_every_range_with_two_processes_apart() -> None:
    docs = render("overlays/replicated")
    shard_sets = [
        d
        for d in docs
        if d["kind"] == "StatefulSet"
        and d["spec"]["template"]["spec"]["containers"][0]["command"][2] == "dsgd.shard"
    ]
    _, coordinator = parsed(
        next(c for _, c in containers(docs) if c["command"][2] == "dsgd.coordinator")
    )
    assert coordinator.replicas == len(shard_sets) == 2
    replicas = {}
    for sts in shard_sets:
        _, args = parsed(sts["spec"]["template"]["spec"]["containers"][0])
        replicas[args.replica] = sts
        # every range once per StatefulSet, each pod named through the headless Service
        assert sts["spec"]["replicas"] == coordinator.num_shards
        assert sts["spec"]["serviceName"] == "dsgd-shard"
        assert args.advertise_host.endswith(".dsgd-shard")
    assert sorted(replicas) == [0, 1]
    for j, sts in replicas.items():
        other = replicas[1 - j]
        # neither StatefulSet claims the other's pods, and each prefers the other's nodes not
        selector = sts["spec"]["selector"]["matchLabels"]
        other_labels = other["spec"]["template"]["metadata"]["labels"]
        assert any(other_labels.get(k) != v for k, v in selector.items())
        affinity = sts["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
        term = affinity["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
        wanted = term["labelSelector"]["matchLabels"]
        assert all(other_labels.get(k) == v for k, v in wanted.items())
        assert term["topologyKey"] == "kubernetes.io/hostname"


def test_the_example_overlay_mounts_its_model_where_every_role_imports_it() -> None:
    docs = render("overlays/example")
    model = next(d for d in docs if d["kind"] == "ConfigMap")
    source = model["data"]["mymodel.py"]
    namespace: dict[str, Any] = {}
    exec(compile(source, "mymodel.py", "exec"), namespace)  # what the pods import
    spec = namespace["iris"]()
    assert spec.dataset.x_train.shape[1] == spec.init_params["w1"].shape[0]
    for name, container in containers(docs):
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert env["PYTHONPATH"] in mounts, name
        assert container["image"].startswith("registry.example.com/"), name
    _, args = parsed(next(c for _, c in containers(docs) if c["command"][2] == "dsgd.coordinator"))
    assert args.model == "mymodel:iris"
    worker = next(d for d in docs if d["metadata"]["name"] == "dsgd-worker")
    assert worker["spec"]["replicas"] == 4


def test_the_image_definition_copies_what_exists() -> None:
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    copies = re.findall(r"^COPY\s+(.+)\s+\S+$", dockerfile, flags=re.MULTILINE)
    sources = [source for line in copies for source in line.split()]
    assert "dsgd" in sources and "pyproject.toml" in sources
    for source in sources:
        assert (ROOT / source).exists(), source
