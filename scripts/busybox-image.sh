#!/usr/bin/env bash
# Builds an OCI image tarball of busybox offline, from Debian's busybox-static, with umoci.
#   scripts/busybox-image.sh OUT.tar [CMD ARG...]   (the image's command; default: sh)
# Import it with: ctr -a SOCK images import --base-name docker.io/library/busybox OUT.tar
set -euo pipefail
out="$(realpath -m "${1:?usage: busybox-image.sh OUT.tar}")"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
layout="$work/layout"
umoci init --layout "$layout"
umoci new --image "$layout:latest"
umoci unpack --image "$layout:latest" "$work/bundle" >/dev/null
rootfs="$work/bundle/rootfs"
mkdir -p "$rootfs/bin" "$rootfs/etc" "$rootfs/tmp" "$rootfs/root" "$rootfs/proc" "$rootfs/sys" "$rootfs/dev"
chmod 1777 "$rootfs/tmp"
cp /bin/busybox "$rootfs/bin/busybox"
for applet in $("$rootfs/bin/busybox" --list); do
    [ -e "$rootfs/bin/$applet" ] || ln -s busybox "$rootfs/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' > "$rootfs/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$rootfs/etc/group"
umoci repack --image "$layout:latest" "$work/bundle"
shift
[ "$#" -gt 0 ] || set -- sh
cmd_flags=()
for arg in "$@"; do cmd_flags+=(--config.cmd "$arg"); done
umoci config --image "$layout:latest" "${cmd_flags[@]}" \
    --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
umoci gc --layout "$layout"
tar -C "$layout" -cf "$out" .
echo "busybox image written to $out"
