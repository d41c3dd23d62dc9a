#!/usr/bin/env bash
# Makes the Dockerfile's base images from Debian's own packages, for machines that cannot reach
# an image registry: localhost/debian:bookworm (debootstrap --variant=minbase, the same variant
# Debian's official image is built from) and localhost/debian:bookworm-slim (the same, with the
# official slim image's dpkg path excludes: no man pages, docs or translations). Images that
# already exist are kept (FORCE=1 remakes them). Needs root, debootstrap and buildah (podman
# is used for the import where it is installed).
#   scripts/make-base-images.sh [MIRROR]     (default http://deb.debian.org/debian)
# Then: buildah bud --build-arg BUILD_BASE=localhost/debian:bookworm \
#         --build-arg RUNTIME_BASE=localhost/debian:bookworm-slim -t pare .
set -euo pipefail
MIRROR=${1:-http://deb.debian.org/debian}
FULL=localhost/debian:bookworm
SLIM=localhost/debian:bookworm-slim

have() { buildah inspect --type image "$1" >/dev/null 2>&1; }
if [ "${FORCE:-0}" != 1 ] && have "$FULL" && have "$SLIM"; then
  echo "make-base-images: $FULL and $SLIM exist"
  exit 0
fi
[ "$(id -u)" -eq 0 ] || { echo "make-base-images: needs root (debootstrap, buildah)" >&2; exit 1; }
for tool in debootstrap buildah; do
  command -v "$tool" >/dev/null || { echo "make-base-images: $tool is not installed" >&2; exit 1; }
done

work=$(mktemp -d /var/tmp/pare-bases.XXXXXX)
trap 'rm -rf "$work"' EXIT
root=$work/rootfs

# import DIR IMAGE: the folder as a one-layer image, with the official image's CMD.
import() {
  if command -v podman >/dev/null; then
    tar --numeric-owner --xattrs -C "$1" -c . | podman import -q --change 'CMD ["bash"]' - "$2" >/dev/null
  else
    tar --numeric-owner --xattrs -C "$1" -cf "$work/rootfs.tar" .
    local ctr
    ctr=$(buildah from scratch)
    buildah add "$ctr" "$work/rootfs.tar" / >/dev/null
    buildah config --cmd bash "$ctr"
    buildah commit --rm "$ctr" "$2" >/dev/null
    rm -f "$work/rootfs.tar"
  fi
  echo "make-base-images: $2 ($(buildah images --format '{{.Size}}' "$2"))"
}

echo "make-base-images: debootstrap --variant=minbase bookworm ($MIRROR)"
debootstrap --variant=minbase bookworm "$root" "$MIRROR" >"$work/debootstrap.log" 2>&1 \
  || { tail -20 "$work/debootstrap.log" >&2; echo "make-base-images: debootstrap failed" >&2; exit 1; }
# The official image's sources: the release, its updates and the security archive.
rm -f "$root/etc/apt/sources.list"
cat >"$root/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${MIRROR%/debian}/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
# No services start while images are built (as in the official image).
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
chmod 0755 "$root/usr/sbin/policy-rc.d"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/tmp/* "$root"/var/log/*.log
: >"$root/etc/hostname"
import "$root" "$FULL"

# Slim: what the official slim variant excludes, removed now and kept out of later installs.
cat >"$root/etc/dpkg/dpkg.cfg.d/docker-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/man/*
EOF
find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
rm -rf "$root"/usr/share/groff/* "$root"/usr/share/info/* "$root"/usr/share/linda/* \
       "$root"/usr/share/lintian/* "$root"/usr/share/man/*
find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} +
import "$root" "$SLIM"
