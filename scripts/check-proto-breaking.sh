#!/usr/bin/env bash
# Checks the protobuf contracts for breaking changes (WIRE_JSON rules, see buf.yaml).
#
# On a branch other than main the baseline is main; on main it is the previous commit, so every
# landing is compared with what was there before it. `PROTO_BASELINE` overrides (any buf input,
# e.g. '.git#ref=v0.1.0,subdir=proto').
set -euo pipefail
cd "$(dirname "$0")/.."
BUF="${1:-buf}"

branch="$(git rev-parse --abbrev-ref HEAD 2>/dev/null || echo detached)"
# A shallow clone may lack the previous commit: fetch it rather than skip the check.
if [[ -z "${PROTO_BASELINE:-}" && "$(git rev-parse --is-shallow-repository 2>/dev/null)" == "true" ]]; then
    git fetch -q --deepen=1 2>/dev/null || true
fi
if [[ -n "${PROTO_BASELINE:-}" ]]; then
    against="$PROTO_BASELINE"
elif [[ "$branch" != "main" ]] && git rev-parse --verify -q main >/dev/null; then
    against=".git#branch=main,subdir=proto"
elif [[ "$branch" != "main" ]] && git rev-parse --verify -q origin/main >/dev/null; then
    against=".git#ref=origin/main,subdir=proto"
elif git rev-parse --verify -q HEAD~1 >/dev/null && git cat-file -e HEAD~1:proto 2>/dev/null; then
    against=".git#ref=HEAD~1,subdir=proto"
elif git rev-parse --verify -q HEAD~1 >/dev/null || [[ -z "${CI:-}" ]]; then
    # The previous commit has no contracts (they are new), or a local checkout without history.
    echo "proto breaking check: no earlier contracts to compare with"
    exit 0
else
    echo "proto breaking check: no baseline in this clone (set PROTO_BASELINE)" >&2
    exit 1
fi
echo "proto breaking check against $against"
"$BUF" breaking proto --against "$against"
