#!/bin/sh
# Build the operator image without a Docker engine or a registry (docs/install.md):
#   1. a base image from Debian's packages (mmdebstrap: python3, python3-venv, ca-certificates),
#   2. the repository's Dockerfile on top of it, with buildah (BASE build argument),
#   3. its root filesystem unpacked to $OUT/rootfs, for tests/e2e/test_image.py to run.
# Needs root (or buildah's rootless set-up), buildah and mmdebstrap (Debian packages).
set -eu
OUT=${OUT:-.cache/image}
TAG=${TAG:-localhost/virtshift:dev}
BASE=localhost/debian-python:bookworm
export STORAGE_DRIVER=${STORAGE_DRIVER:-vfs}
mkdir -p "$OUT"
if ! buildah inspect "$BASE" >/dev/null 2>&1; then
    mmdebstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        --aptopt='Acquire::Languages "none"' \
        --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
        bookworm "$OUT/base.tar" \
        "deb http://deb.debian.org/debian bookworm main" \
        "deb http://deb.debian.org/debian-security bookworm-security main"
    c=$(buildah from scratch)
    buildah add "$c" "$OUT/base.tar" / >/dev/null
    buildah commit -q "$c" "$BASE"
    buildah rm "$c" >/dev/null
fi
# The host's CA bundle only while building (pip behind a TLS-inspecting proxy); not in the image.
buildah bud --isolation=chroot --network=host --layers \
    -v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro \
    --build-arg BASE="$BASE" -t "$TAG" .
buildah inspect --type image "$TAG" > "$OUT/inspect.json"
rm -rf "$OUT/rootfs" && mkdir -p "$OUT/rootfs"
c=$(buildah from "$TAG")
mnt=$(buildah mount "$c")
cp -a "$mnt/." "$OUT/rootfs/"
buildah umount "$c" >/dev/null
buildah rm "$c" >/dev/null
echo "image $TAG: config in $OUT/inspect.json, root filesystem in $OUT/rootfs"
