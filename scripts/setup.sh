#!/usr/bin/env bash
# Installs everything runvm needs on a Debian 12 host, once. Safe to run again:
# every step is skipped when its result is already present.
#
#   RUNVM_PREFIX     where virtiofsd and vhost-device-vsock are installed (default /opt/runvm)
#   RUNVM_VMM_USER   the system user confined VM processes run as (default runvm-vmm)
set -euo pipefail

PREFIX="${RUNVM_PREFIX:-/opt/runvm}"
step() { printf '\n==> %s\n' "$*"; }

need_pkgs=()
# The second line builds runvm's guest kernel (cargo xtask guest): Debian's kernel source and
# the kernel's build tools (LZ4 compresses the kernel image). prometheus gives promtool and the
# server the `runvm monitor` test checks its metrics with.
for p in qemu-system-x86 qemu-utils libseccomp-dev libcap-ng-dev pkg-config cpio busybox-static \
         containerd runc containernetworking-plugins umoci protobuf-compiler iptables prometheus \
         linux-source-6.1 build-essential bc bison flex libelf-dev libssl-dev xz-utils lz4; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need_pkgs+=("$p")
done
if ((${#need_pkgs[@]})); then
    step "installing Debian packages: ${need_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${need_pkgs[@]}"
else
    step "Debian packages present"
fi
# apt-get download of Debian's cloud kernel (cargo xtask guest --kernel debian-cloud) needs
# package lists.
if [ -z "$(ls -A /var/lib/apt/lists/ 2>/dev/null | grep -v -e lock -e partial)" ]; then
    step "refreshing apt package lists"
    apt-get update -q
fi

mkdir -p "$PREFIX/bin"
for spec in virtiofsd@1.14.0 vhost-device-vsock@0.3.0; do
    tool="${spec%@*}"
    if [ -x "$PREFIX/bin/$tool" ]; then
        step "$tool present in $PREFIX/bin"
    else
        step "building $tool from crates.io into $PREFIX (takes a few minutes on 2 cores)"
        cargo install --locked --root "$PREFIX" "$spec"
    fi
done
# The unprivileged user QEMU and vhost-device-vsock run as (hypervisor.user).
VMM_USER="${RUNVM_VMM_USER:-runvm-vmm}"
if id -u "$VMM_USER" >/dev/null 2>&1; then
    step "user $VMM_USER present"
else
    step "creating the system user $VMM_USER (confined VM processes run as it)"
    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$VMM_USER"
fi
# Subordinate uids for it: each VM's processes run as one of them (no two VMs share a uid).
if ! grep -q "^$VMM_USER:" /etc/subuid 2>/dev/null; then
    # The first free block of 65536 at or above 1000000, past every range listed.
    start=$(awk -F: 'BEGIN { m = 1000000 } NF >= 3 && $2 + $3 > m { m = $2 + $3 } END { print m }' \
        /etc/subuid 2>/dev/null || echo 1000000)
    step "giving $VMM_USER the subordinate uids $start-$((start + 65535)) (one per VM)"
    echo "$VMM_USER:$start:65536" >> /etc/subuid
fi
step "host set-up complete"
