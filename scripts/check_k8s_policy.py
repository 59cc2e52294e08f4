#!/usr/bin/env python3
"""Policy checks over rendered Kubernetes manifests (the output of `kubectl kustomize`).

    check_k8s_policy.py [--require-image-tags] RENDERED.yaml...

Schema validity is kubernetes-validate's job; this checks what a schema cannot: that every
workload is probed, bounded and locked down, and that every Tandem service is deployed the way
its shutdown sequence and configuration need. Every violation is listed, then the exit status
is 1; 0 when there are none. Needs PyYAML (in the tools venv); tomllib is in Python >= 3.11.

Rules, for every Deployment and StatefulSet container:
  - readiness and liveness probes;
  - cpu and memory requests and limits;
  - runAsNonRoot true (container or pod), readOnlyRootFilesystem true, allowPrivilegeEscalation
    false, capabilities drop ALL, seccomp RuntimeDefault or Localhost (container or pod);
  - with --require-image-tags, an image with an explicit tag other than `latest`.
For every Tandem service (a Deployment whose container runs `serve <service>`):
  - args `serve <svc> --config /etc/tandem/<svc>.toml`, with that file mounted from a ConfigMap;
  - gRPC startup, readiness (service tandem.<svc>.v1.*Service) and liveness (overall health)
    probes on port 50051, and container ports 50051 and 9090;
  - a preStop sleep, and terminationGracePeriodSeconds >= preStop + 25 and greater than
    preStop + grpc.not_serving_delay + grpc.drain_timeout (from the mounted TOML and the env)
    + 9 s of stopping after the drain;
  - TANDEM_* variables only for its own prefix, the database URL from a Secret;
  - bus.stream_replicas no larger than the NATS StatefulSet's replicas;
  - a Service (port 50051, appProtocol kubernetes.io/h2c), a PodDisruptionBudget and a
    HorizontalPodAutoscaler that select or target it, no fixed spec.replicas beside the HPA;
  - a NetworkPolicy admitting 50051, and a default-deny policy in its namespace.
"""

from __future__ import annotations

import re
import sys
import tomllib
from dataclasses import dataclass, field

import yaml

GRPC_PORT = 50051
METRICS_PORT = 9090
MIN_GRACE_OVER_PRESTOP = 25
# After the drain a service waits up to 5 s for its background tasks, 2 s for the bus flush and
# 2 s for its database connections (crates/platform/src/runtime.rs).
AFTER_DRAIN = 9
WORKLOAD_KINDS = {"Deployment", "StatefulSet"}


@dataclass
class Report:
    violations: list[str] = field(default_factory=list)

    def add(self, where: str, message: str) -> None:
        self.violations.append(f"{where}: {message}")


def load(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [doc for doc in yaml.safe_load_all(fh) if isinstance(doc, dict)]


def ns_of(doc: dict) -> str:
    return doc.get("metadata", {}).get("namespace", "default")


def name_of(doc: dict) -> str:
    return doc.get("metadata", {}).get("name", "?")


def selector_matches(selector: dict | None, labels: dict) -> bool:
    """A LabelSelector (matchLabels + matchExpressions) against a label set. `{}` matches all."""
    if selector is None:
        return False
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


DURATION_UNITS = {
    "ms": 0.001, "msec": 0.001, "s": 1, "sec": 1, "secs": 1, "m": 60, "min": 60, "mins": 60,
    "h": 3600, "hr": 3600, "hrs": 3600, "d": 86400, "day": 86400, "days": 86400,
}


def parse_duration(text: str) -> float:
    """humantime-style durations as the configuration writes them: "250ms", "5s", "1m 30s"."""
    total, pos = 0.0, 0
    for match in re.finditer(r"\s*(\d+(?:\.\d+)?)\s*([a-z]+)\s*", text):
        if match.start() != pos or match.group(2) not in DURATION_UNITS:
            raise ValueError(f"unreadable duration {text!r}")
        total += float(match.group(1)) * DURATION_UNITS[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text:
        raise ValueError(f"unreadable duration {text!r}")
    return total


def is_true(value) -> bool:
    return value is True


def check_container(where: str, c: dict, pod_sc: dict, probes: bool, require_tags: bool, r: Report) -> None:
    for probe in ("readinessProbe", "livenessProbe") if probes else ():
        if not c.get(probe):
            r.add(where, f"no {probe}")
    resources = c.get("resources") or {}
    for part in ("requests", "limits"):
        for res in ("cpu", "memory"):
            if not (resources.get(part) or {}).get(res):
                r.add(where, f"no {part}.{res}")
    sc = c.get("securityContext") or {}
    if not is_true(sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))):
        r.add(where, "runAsNonRoot is not true")
    if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
        r.add(where, "runs as UID 0")
    if not is_true(sc.get("readOnlyRootFilesystem")):
        r.add(where, "readOnlyRootFilesystem is not true")
    if sc.get("allowPrivilegeEscalation") is not False:
        r.add(where, "allowPrivilegeEscalation is not false")
    if sc.get("privileged"):
        r.add(where, "privileged")
    if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
        r.add(where, "capabilities do not drop ALL")
    seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
    if seccomp not in ("RuntimeDefault", "Localhost"):
        r.add(where, f"seccompProfile is {seccomp or 'unset'}, not RuntimeDefault")
    if require_tags:
        image = c.get("image", "")
        last = image.rsplit("/", 1)[-1]
        if "@" not in image and (":" not in last or last.endswith(":latest")):
            r.add(where, f"image {image!r} has no pinned tag")


def env_literal(container: dict, name: str):
    for env in container.get("env") or []:
        if env.get("name") == name and "value" in env:
            return env["value"]
    return None


def mounted_toml(path: str, pod: dict, container: dict, configmaps: dict, ns: str):
    """The TOML text mounted at `path` from a ConfigMap, or None."""
    for mount in container.get("volumeMounts") or []:
        if mount.get("mountPath") != path:
            continue
        volume = next((v for v in pod.get("volumes") or [] if v.get("name") == mount.get("name")), None)
        if not volume or "configMap" not in volume:
            return None
        cm = configmaps.get((ns, volume["configMap"].get("name")))
        if cm is None:
            return None
        key = mount.get("subPath") or path.rsplit("/", 1)[-1]
        return (cm.get("data") or {}).get(key)
    return None


def check_tandem_service(where: str, svc: str, doc: dict, c: dict, ctx: dict, r: Report) -> None:
    ns = ns_of(doc)
    pod = doc["spec"]["template"]["spec"]
    labels = doc["spec"]["template"].get("metadata", {}).get("labels") or {}
    prefix = f"TANDEM_{svc.upper()}__"
    config_path = f"/etc/tandem/{svc}.toml"

    if c.get("args") != ["serve", svc, "--config", config_path]:
        r.add(where, f"args {c.get('args')} are not ['serve', '{svc}', '--config', '{config_path}']")
    ports = {p.get("containerPort") for p in c.get("ports") or []}
    for port in (GRPC_PORT, METRICS_PORT):
        if port not in ports:
            r.add(where, f"no containerPort {port}")

    def grpc_probe(kind: str):
        probe = c.get(kind) or {}
        grpc = probe.get("grpc")
        if not grpc or grpc.get("port") != GRPC_PORT:
            r.add(where, f"{kind} is not a gRPC probe on port {GRPC_PORT}")
            return None
        return grpc

    grpc_probe("startupProbe")
    readiness = grpc_probe("readinessProbe")
    if readiness is not None:
        service = readiness.get("service", "")
        if not re.fullmatch(rf"tandem\.{svc}\.v1\.[A-Z][A-Za-z]*Service", service):
            r.add(where, f"readinessProbe asks for {service!r}, not a tandem.{svc}.v1 service")
    liveness = grpc_probe("livenessProbe")
    if liveness is not None and liveness.get("service"):
        r.add(where, "livenessProbe must ask for the overall health, not a service")

    # Shutdown: preStop sleep, then NOT_SERVING for not_serving_delay, then drain_timeout.
    prestop = (((c.get("lifecycle") or {}).get("preStop") or {}).get("sleep") or {}).get("seconds")
    grace = pod.get("terminationGracePeriodSeconds", 30)
    if prestop is None:
        r.add(where, "no lifecycle.preStop.sleep")
        prestop = 0
    if grace < prestop + MIN_GRACE_OVER_PRESTOP:
        r.add(where, f"terminationGracePeriodSeconds {grace} < preStop {prestop} + {MIN_GRACE_OVER_PRESTOP}")

    text = mounted_toml(config_path, pod, c, ctx["configmaps"], ns)
    config: dict = {}
    if text is None:
        r.add(where, f"{config_path} is not mounted from a ConfigMap in this render")
    else:
        try:
            config = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            r.add(where, f"{config_path} is not valid TOML: {e}")

    def setting(section: str, key: str, default):
        env = env_literal(c, f"{prefix}{section.upper()}__{key.upper()}")
        return env if env is not None else config.get(section, {}).get(key, default)

    try:
        delay = parse_duration(str(setting("grpc", "not_serving_delay", "0s")))
        drain = parse_duration(str(setting("grpc", "drain_timeout", "20s")))
        if grace <= prestop + delay + drain + AFTER_DRAIN:
            r.add(where, f"terminationGracePeriodSeconds {grace} <= preStop {prestop} + "
                         f"not_serving_delay {delay:g} + drain_timeout {drain:g} + "
                         f"{AFTER_DRAIN} s of stopping after the drain")
    except ValueError as e:
        r.add(where, str(e))

    replicas = int(setting("bus", "stream_replicas", 1))
    nats = ctx["nats_replicas"].get(ns)
    if nats is not None and replicas > nats:
        r.add(where, f"bus.stream_replicas {replicas} exceeds the {nats} NATS server(s)")

    names = [env.get("name", "") for env in c.get("env") or []]
    for name in sorted({n for n in names if names.count(n) > 1}):
        r.add(where, f"env {name} is set more than once")
    for name in names:
        if name.startswith("TANDEM_") and not name.startswith(prefix):
            r.add(where, f"env {name} is not for this service (expected prefix {prefix})")
    url = next((e for e in c.get("env") or [] if e.get("name") == f"{prefix}DATABASE__URL"), None)
    if url is None or "secretKeyRef" not in (url.get("valueFrom") or {}):
        r.add(where, f"{prefix}DATABASE__URL does not come from a secretKeyRef")

    # Companions: Service, PodDisruptionBudget, HorizontalPodAutoscaler, NetworkPolicies.
    kind_where = f"{ctx['path']}: {doc['kind']}/{name_of(doc)}"
    services = [s for s in ctx["by_kind"].get("Service", []) if ns_of(s) == ns
                and s.get("spec", {}).get("selector") and selector_matches({"matchLabels": s["spec"]["selector"]}, labels)]
    grpc_ports = [p for s in services for p in s["spec"].get("ports") or [] if p.get("port") == GRPC_PORT]
    if not services:
        r.add(kind_where, "no Service selects its pods")
    elif not any(p.get("appProtocol") == "kubernetes.io/h2c" for p in grpc_ports):
        r.add(kind_where, f"no Service port {GRPC_PORT} with appProtocol kubernetes.io/h2c")
    if not any(ns_of(p) == ns and selector_matches(p.get("spec", {}).get("selector"), labels)
               for p in ctx["by_kind"].get("PodDisruptionBudget", [])):
        r.add(kind_where, "no PodDisruptionBudget selects its pods")
    hpas = [h for h in ctx["by_kind"].get("HorizontalPodAutoscaler", []) if ns_of(h) == ns
            and (h.get("spec", {}).get("scaleTargetRef") or {}).get("kind") == "Deployment"
            and h["spec"]["scaleTargetRef"].get("name") == name_of(doc)]
    if not hpas:
        r.add(kind_where, "no HorizontalPodAutoscaler targets it")
    elif "replicas" in doc["spec"]:
        r.add(kind_where, "sets spec.replicas although an HPA owns the count")

    ctx["service_namespaces"].add(ns)
    policies = [p for p in ctx["by_kind"].get("NetworkPolicy", []) if ns_of(p) == ns]
    admits = False
    for p in policies:
        if not selector_matches(p["spec"].get("podSelector"), labels):
            continue
        for rule in p["spec"].get("ingress") or []:
            if any(port.get("port") in (GRPC_PORT, "grpc") for port in rule.get("ports") or []):
                admits = True
    if not admits:
        r.add(kind_where, f"no NetworkPolicy admits gRPC on {GRPC_PORT}")


def check(paths: list[str], require_tags: bool) -> Report:
    r = Report()
    for path in paths:
        docs = load(path)
        by_kind: dict[str, list[dict]] = {}
        for doc in docs:
            by_kind.setdefault(doc.get("kind", "?"), []).append(doc)
        ctx = {
            "path": path,
            "service_namespaces": set(),
            "by_kind": by_kind,
            "configmaps": {(ns_of(d), name_of(d)): d for d in by_kind.get("ConfigMap", [])},
            "nats_replicas": {ns_of(d): d["spec"].get("replicas", 1) for d in by_kind.get("StatefulSet", [])
                              if name_of(d) == "nats"},
        }
        workloads = [d for d in docs if d.get("kind") in WORKLOAD_KINDS]
        if not workloads:
            r.add(path, "no Deployment or StatefulSet found")
        for doc in workloads:
            pod = ((doc.get("spec") or {}).get("template") or {}).get("spec") or {}
            pod_sc = pod.get("securityContext") or {}
            for c in pod.get("initContainers") or []:
                where = f"{path}: {doc['kind']}/{name_of(doc)} init container {c.get('name')}"
                check_container(where, c, pod_sc, False, require_tags, r)
            for c in pod.get("containers") or []:
                where = f"{path}: {doc['kind']}/{name_of(doc)} container {c.get('name')}"
                check_container(where, c, pod_sc, True, require_tags, r)
                args = c.get("args") or []
                if doc["kind"] == "Deployment" and len(args) >= 2 and args[0] == "serve":
                    check_tandem_service(where, args[1], doc, c, ctx, r)
        for ns in sorted(ctx["service_namespaces"]):
            if not any(ns_of(p) == ns and p["spec"].get("podSelector") == {} and not p["spec"].get("ingress")
                       and not p["spec"].get("egress") and {"Ingress", "Egress"} <= set(p["spec"].get("policyTypes") or [])
                       for p in by_kind.get("NetworkPolicy", [])):
                r.add(f"{path}: namespace {ns}", "no default-deny NetworkPolicy (ingress and egress)")
    return r


def main(argv: list[str]) -> int:
    require_tags = "--require-image-tags" in argv
    paths = [a for a in argv if not a.startswith("--")]
    if not paths:
        print(__doc__, file=sys.stderr)
        return 2
    report = check(paths, require_tags)
    if report.violations:
        print(f"k8s policy: {len(report.violations)} violation(s):", file=sys.stderr)
        for v in report.violations:
            print(f"  - {v}", file=sys.stderr)
        return 1
    print(f"k8s policy: ok ({', '.join(paths)})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
