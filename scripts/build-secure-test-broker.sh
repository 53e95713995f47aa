#!/usr/bin/env bash
# Builds the local Docker image of the broker for the TLS and SASL tests:
# nisshi 0.8.1 (tansu renamed) from crates.io, which does TLS and SCRAM
# (tansu 0.6 does neither). The image holds the binary and the shared
# libraries it links, nothing else. About 15 minutes on 2 cores, once.
#
#   scripts/build-secure-test-broker.sh [IMAGE]     (default strom/nisshi:0.8.1)
#
# NISSHI_BIN=path uses an already built nisshi 0.8.1 binary instead.
#
# Needs: cargo, docker.
set -euo pipefail
image=${1:-strom/nisshi:0.8.1}
version=0.8.1

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
bin=${NISSHI_BIN:-}
if [[ -z $bin ]]; then
  CARGO_TARGET_DIR="$work/target" cargo install --quiet --locked --ignore-rust-version \
    nisshi --version "$version" --root "$work/install" >&2
  bin="$work/install/bin/nisshi"
fi
mkdir -p "$work/rootfs/data" "$work/rootfs/tmp"
cp "$bin" "$work/rootfs/nisshi"
for lib in $(ldd "$bin" | grep -o '/[^ ]*'); do
  mkdir -p "$work/rootfs$(dirname "$lib")"
  cp -L "$lib" "$work/rootfs$lib"
done
tar -C "$work/rootfs" -c . |
  docker import --change 'ENTRYPOINT ["/nisshi"]' --change 'WORKDIR /data' - "$image" >/dev/null
echo "built $image" >&2
