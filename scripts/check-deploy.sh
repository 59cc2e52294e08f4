#!/usr/bin/env bash
# Offline checks of deploy/ (run by `make lint`): nothing here needs a cluster, a Docker engine
# or the network, only the pinned tools of scripts/tools.sh.
#
#   bash scripts/check-deploy.sh
#
#  1. yamllint over deploy/ (deploy/.yamllint.yaml)
#  2. hadolint over deploy/Dockerfile, and the Dockerfile against the workspace: every member's
#     Cargo.toml copied into the dependency layer, every binary built
#  3. the Kubernetes copies of the service configuration identical to deploy/config/*.example.toml
#  4. the NATS configurations parsed by nats-server itself (`-t`)
#  5. deploy/compose.yaml: each service's variables, schema and dependencies
#  6. every Kustomize tree (base, overlays/*) rendered with `kubectl kustomize`, validated against
#     the Kubernetes $K8S_VERSION schemas with kubernetes-validate --strict, then checked by
#     scripts/check_k8s_policy.py (probes, limits, security context, PDB/HPA/Service, shutdown)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BIN="$ROOT/.tools/venv/bin"
K8S_VERSION="${K8S_VERSION:-1.33.0}"
SERVICES=(dialog routing knowledge feedback policy)

for tool in yamllint hadolint kubectl kubernetes-validate nats-server python; do
    if [[ ! -x "$BIN/$tool" ]]; then
        bash scripts/tools.sh >/dev/null
        break
    fi
done

OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT

step() { echo "check-deploy: $*"; }

step "yamllint deploy/"
"$BIN/yamllint" -c deploy/.yamllint.yaml --strict deploy

step "hadolint deploy/Dockerfile"
"$BIN/hadolint" deploy/Dockerfile
sh -n deploy/docker/stub-workspace.sh

step "Dockerfile copies every workspace manifest and builds every binary"
"$BIN/python" - <<'EOF'
import pathlib, re, sys, tomllib
root = tomllib.loads(pathlib.Path("Cargo.toml").read_text())
dockerfile = pathlib.Path("deploy/Dockerfile").read_text()
problems = []
for member in root["workspace"]["members"]:
    if not re.search(rf"^COPY {re.escape(member)}/Cargo\.toml {re.escape(member)}/$", dockerfile, re.M):
        problems.append(f"workspace member {member}: add `COPY {member}/Cargo.toml {member}/` to the dependency layer")
    manifest = tomllib.loads(pathlib.Path(member, "Cargo.toml").read_text())
    for binary in manifest.get("bin", []):
        name = binary["name"]
        if f"--bin {name}" not in dockerfile or f"target/release/{name}" not in dockerfile:
            problems.append(f"binary {name} ({member}) is not built and copied by deploy/Dockerfile")
for problem in problems:
    print(f"  - {problem}", file=sys.stderr)
sys.exit(1 if problems else 0)
EOF

step "Kubernetes service configuration matches deploy/config/*.example.toml"
for svc in "${SERVICES[@]}"; do
    if ! cmp -s "deploy/config/$svc.example.toml" "deploy/k8s/base/$svc/$svc.toml"; then
        echo "  - deploy/k8s/base/$svc/$svc.toml differs from deploy/config/$svc.example.toml;" \
            "copy it: cp deploy/config/$svc.example.toml deploy/k8s/base/$svc/$svc.toml" >&2
        exit 1
    fi
done

step "nats-server -t on the NATS configurations"
for conf in deploy/k8s/base/nats/nats.conf deploy/k8s/overlays/prod/nats.conf; do
    if ! output="$(POD_NAME=nats-0 "$BIN/nats-server" -c "$conf" -t 2>&1)"; then
        echo "  - $output" >&2
        exit 1
    fi
done

step "deploy/compose.yaml services"
"$BIN/python" - "${SERVICES[@]}" <<'EOF'
import sys, yaml
services = sys.argv[1:]
compose = yaml.safe_load(open("deploy/compose.yaml"))["services"]
problems = []
for svc in services:
    spec = compose.get(svc)
    if spec is None:
        problems.append(f"{svc}: missing")
        continue
    prefix = f"TANDEM_{svc.upper()}__"
    env = spec.get("environment") or {}
    if spec.get("command") != ["serve", svc]:
        problems.append(f"{svc}: command is {spec.get('command')}, not ['serve', '{svc}']")
    problems += [f"{svc}: {k} is not for this service" for k in env if k.startswith("TANDEM_") and not k.startswith(prefix)]
    for key, want in (("DATABASE__SCHEMA", svc), ("GRPC__LISTEN_ADDR", "0.0.0.0:50051")):
        if str(env.get(prefix + key)) != want:
            problems.append(f"{svc}: {prefix}{key} should be {want}")
    for key in ("DATABASE__URL", "BUS__NATS_URL"):
        if prefix + key not in env:
            problems.append(f"{svc}: {prefix}{key} is not set")
    for dep in ("postgres", "nats"):
        if (spec.get("depends_on") or {}).get(dep, {}).get("condition") != "service_healthy":
            problems.append(f"{svc}: does not wait for {dep} to be healthy")
for name in ("postgres", "nats"):
    if "healthcheck" not in compose.get(name, {}):
        problems.append(f"{name}: no healthcheck")
for problem in problems:
    print(f"  - compose: {problem}", file=sys.stderr)
sys.exit(1 if problems else 0)
EOF

trees=(deploy/k8s/base)
for overlay in deploy/k8s/overlays/*/; do
    trees+=("${overlay%/}")
done
for tree in "${trees[@]}"; do
    name="$(basename "$tree").rendered.yaml"
    rendered="$OUT/$name"
    step "kubectl kustomize $tree"
    "$BIN/kubectl" kustomize "$tree" >"$rendered"
    step "kubernetes-validate --strict -k $K8S_VERSION $tree ($(grep -c '^kind:' "$rendered") objects)"
    "$BIN/kubernetes-validate" --strict -k "$K8S_VERSION" --quiet "$rendered"
    # The base names the image without a tag: the overlays set it.
    tags=()
    [[ "$tree" == */overlays/* ]] && tags=(--require-image-tags)
    (cd "$OUT" && "$BIN/python" "$ROOT/scripts/check_k8s_policy.py" "${tags[@]}" "$name")
done

step "ok"
