#!/usr/bin/env bash
# Fails if a service's pure domain code reaches for infrastructure: transport, storage, the bus,
# the process environment or the wall clock. Those belong in adapters and ports.
set -euo pipefail
cd "$(dirname "$0")/.."

pattern='tonic|sqlx|async_nats|tokio::net|std::env|SystemTime::now|Utc::now|Instant::now'
status=0
for dir in services/*/src/domain; do
    [[ -d "$dir" ]] || continue
    if grep -rnE "$pattern" "$dir"; then
        echo "domain purity: $dir must not use: $pattern" >&2
        status=1
    fi
done
exit $status
