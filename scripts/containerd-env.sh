#!/usr/bin/env bash
# A private containerd for tests: config, root, state and socket all under DIR.
#   scripts/containerd-env.sh start DIR   # prints the socket path when it answers
#   scripts/containerd-env.sh stop DIR
# Extra runtimes: put TOML into DIR/runtimes.toml before start; it is appended to the config.
set -euo pipefail
cmd="${1:?usage: containerd-env.sh start|stop DIR}"
dir="$(realpath -m "${2:?usage: containerd-env.sh start|stop DIR}")"
case "$cmd" in
start)
    mkdir -p "$dir/root" "$dir/state" "$dir/cni/conf" "$dir/cni/bin"
    cat > "$dir/config.toml" <<TOML
version = 2
root = "$dir/root"
state = "$dir/state"
[grpc]
  address = "$dir/containerd.sock"
[plugins."io.containerd.grpc.v1.cri".cni]
  bin_dir = "/usr/lib/cni"
  conf_dir = "$dir/cni/conf"
TOML
    [ -f "$dir/runtimes.toml" ] && cat "$dir/runtimes.toml" >> "$dir/config.toml"
    containerd --config "$dir/config.toml" > "$dir/containerd.log" 2>&1 &
    echo $! > "$dir/containerd.pid"
    for _ in $(seq 1 100); do
        if ctr -a "$dir/containerd.sock" version >/dev/null 2>&1; then
            echo "$dir/containerd.sock"
            exit 0
        fi
        sleep 0.1
    done
    echo "containerd did not answer; its log:" >&2
    tail -20 "$dir/containerd.log" >&2
    exit 1
    ;;
stop)
    if [ -f "$dir/containerd.pid" ]; then
        pid="$(cat "$dir/containerd.pid")"
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
        rm -f "$dir/containerd.pid"
    fi
    # Unmount what containerd left (snapshots, shm) so the folder can go.
    grep -F "$dir" /proc/self/mountinfo | awk '{print $5}' | sort -r | while read -r m; do
        umount -l "$m" 2>/dev/null || true
    done
    ;;
*) echo "usage: containerd-env.sh start|stop DIR" >&2; exit 2 ;;
esac
