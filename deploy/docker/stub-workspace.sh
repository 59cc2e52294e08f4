#!/bin/sh
# Gives every workspace member copied into the image so far (only its Cargo.toml) empty
# targets, so that `cargo fetch` can parse the workspace before the sources are copied: the
# dependency layer then depends on the manifests and Cargo.lock alone. Run from the workspace
# root; `--clean` removes the stubs again (the real sources replace them in the next layer).
set -eu

stubs=".stub-files"
if [ "${1:-}" = "--clean" ]; then
    xargs rm -f <"$stubs"
    rm -f "$stubs"
    exit 0
fi

: >"$stubs"
stub() {
    mkdir -p "$(dirname "$1")"
    if [ ! -e "$1" ]; then
        echo 'fn main() {}' >"$1"
        echo "$1" >>"$stubs"
    fi
}

for manifest in $(find . -mindepth 2 -name Cargo.toml); do
    dir=$(dirname "$manifest")
    stub "$dir/src/lib.rs"
    stub "$dir/src/main.rs"
    # Explicit [[bench]], [[test]] and [[example]] targets must exist under their default paths.
    for kind in bench:benches test:tests example:examples; do
        section=${kind%%:*}
        folder=${kind#*:}
        for name in $(sed -n "/^\[\[$section\]\]/,/^name/ s/^name *= *\"\(.*\)\"/\1/p" "$manifest"); do
            stub "$dir/$folder/$name.rs"
        done
    done
done
