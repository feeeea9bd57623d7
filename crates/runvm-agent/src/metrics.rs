//! GetGuestMetrics: the guest's own view for the host's `runvm monitor` — memory, CPU time by
//! mode, load averages, each container's cgroup usage and the network counters. A handful of
//! small /proc and cgroup files, read from a root given by the caller (tests use a folder).

use std::path::{Path, PathBuf};

use runvm_protocol::agent;

use crate::container::stats;

/// Reads the guest metrics under `proc_root` (`/proc` in the guest) and `net_root`
/// (`/sys/class/net`); `containers` are the ids and cgroup folders of the agent's containers.
/// A missing file reads as zeros.
pub fn read(
    proc_root: &Path,
    net_root: &Path,
    containers: &[(String, PathBuf)],
) -> agent::GuestMetricsResponse {
    let text = |name: &str| std::fs::read_to_string(proc_root.join(name)).unwrap_or_default();
    let (mem_total_bytes, mem_available_bytes) = crate::service::parse_meminfo(&text("meminfo"));
    let [load1, load5, load15] = parse_loadavg(&text("loadavg"));
    agent::GuestMetricsResponse {
        mem_total_bytes,
        mem_available_bytes,
        cpu: protobuf::MessageField::some(parse_cpu_line(&text("stat"), clock_ticks())),
        load1,
        load5,
        load15,
        containers: containers
            .iter()
            .map(|(id, dir)| container_usage(id, dir))
            .collect(),
        network: stats::net_dev(&text("net/dev"))
            .into_iter()
            .filter(|n| is_up(net_root, &n.name))
            .collect(),
        ..Default::default()
    }
}

/// Whether interface `name` is up (IFF_UP in `NET_ROOT/NAME/flags`). The kernel's own
/// fallback devices (tunl0, sit0, bond0, dummy0, ...) stay down and would only add empty
/// series; an interface whose flags cannot be read is kept.
fn is_up(net_root: &Path, name: &str) -> bool {
    const IFF_UP: u64 = 0x1;
    let Ok(text) = std::fs::read_to_string(net_root.join(name).join("flags")) else {
        return true;
    };
    u64::from_str_radix(text.trim().trim_start_matches("0x"), 16).map_or(true, |f| f & IFF_UP != 0)
}

/// USER_HZ: the unit of /proc/stat's times.
fn clock_ticks() -> u64 {
    // SAFETY: sysconf reads a constant of the system and has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(ticks).ok().filter(|t| *t > 0).unwrap_or(100)
}

/// The aggregate `cpu` line of a /proc/stat text, in ns (`ticks` per second).
fn parse_cpu_line(text: &str, ticks: u64) -> agent::GuestCpuTime {
    let fields: Vec<u64> = text
        .lines()
        .find_map(|l| l.strip_prefix("cpu "))
        .map(|rest| {
            rest.split_whitespace()
                .map(|v| v.parse().unwrap_or(0))
                .collect()
        })
        .unwrap_or_default();
    let ns_per_tick = 1_000_000_000 / ticks.max(1);
    let ns = |i: usize| {
        fields
            .get(i)
            .copied()
            .unwrap_or(0)
            .saturating_mul(ns_per_tick)
    };
    agent::GuestCpuTime {
        user_ns: ns(0),
        nice_ns: ns(1),
        system_ns: ns(2),
        idle_ns: ns(3),
        iowait_ns: ns(4),
        irq_ns: ns(5),
        softirq_ns: ns(6),
        steal_ns: ns(7),
        ..Default::default()
    }
}

/// The three load averages of a /proc/loadavg text (zeros if unreadable).
fn parse_loadavg(text: &str) -> [f64; 3] {
    let mut out = [0.0; 3];
    for (slot, value) in out.iter_mut().zip(text.split_whitespace()) {
        *slot = value.parse().unwrap_or(0.0);
    }
    out
}

fn container_usage(id: &str, cgroup_dir: &Path) -> agent::ContainerUsage {
    let read = |f: &str| std::fs::read_to_string(cgroup_dir.join(f)).unwrap_or_default();
    let cpu = read("cpu.stat");
    let usage_usec = stats::flat_keyed(&cpu)
        .get("usage_usec")
        .copied()
        .unwrap_or(0);
    agent::ContainerUsage {
        container_id: id.to_string(),
        memory_bytes: stats::single_value(&read("memory.current")).unwrap_or(0),
        cpu_usage_ns: usage_usec.saturating_mul(1000),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_metrics_are_read_from_proc_and_cgroup_files() {
        let dir = tempfile::tempdir().unwrap();
        let proc = dir.path().join("proc");
        std::fs::create_dir_all(proc.join("net")).unwrap();
        std::fs::write(
            proc.join("meminfo"),
            "MemTotal:  1000 kB\nMemFree: 10 kB\nMemAvailable:  600 kB\n",
        )
        .unwrap();
        std::fs::write(
            proc.join("stat"),
            "cpu  10 1 5 200 3 0 2 4 0 0\ncpu0 10 1 5 200 3 0 2 4 0 0\nbtime 1\n",
        )
        .unwrap();
        std::fs::write(proc.join("loadavg"), "0.50 0.25 0.10 1/80 123\n").unwrap();
        std::fs::write(
            proc.join("net/dev"),
            "Inter-| Receive | Transmit\n face |bytes\n\
             lo: 1 1 0 0 0 0 0 0 1 1 0 0 0 0 0 0\n\
             eth0: 700 7 0 0 0 0 0 0 300 3 0 0 0 0 0 0\n\
             tunl0: 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0\n",
        )
        .unwrap();
        let net = dir.path().join("net");
        for (name, flags) in [("eth0", "0x1003"), ("tunl0", "0x80")] {
            std::fs::create_dir_all(net.join(name)).unwrap();
            std::fs::write(net.join(name).join("flags"), format!("{flags}\n")).unwrap();
        }
        let cg = dir.path().join("cg");
        std::fs::create_dir_all(&cg).unwrap();
        std::fs::write(cg.join("memory.current"), "4096\n").unwrap();
        std::fs::write(cg.join("cpu.stat"), "usage_usec 1500\nuser_usec 1000\n").unwrap();
        let m = read(
            &proc,
            &net,
            &[
                ("c1".to_string(), cg),
                ("gone".to_string(), dir.path().join("none")),
            ],
        );
        assert_eq!(
            (m.mem_total_bytes, m.mem_available_bytes),
            (1_024_000, 614_400)
        );
        let ns_per_tick = 1_000_000_000 / clock_ticks();
        assert_eq!(m.cpu.user_ns, 10 * ns_per_tick);
        assert_eq!(m.cpu.idle_ns, 200 * ns_per_tick);
        assert_eq!(m.cpu.steal_ns, 4 * ns_per_tick);
        assert_eq!((m.load1, m.load5, m.load15), (0.5, 0.25, 0.1));
        assert_eq!(m.containers.len(), 2);
        assert_eq!(m.containers[0].container_id, "c1");
        assert_eq!(m.containers[0].memory_bytes, 4096);
        assert_eq!(m.containers[0].cpu_usage_ns, 1_500_000);
        assert_eq!(
            (m.containers[1].memory_bytes, m.containers[1].cpu_usage_ns),
            (0, 0)
        );
        // tunl0 is down: left out, as lo.
        assert_eq!(m.network.len(), 1);
        assert_eq!(m.network[0].name, "eth0");
        assert_eq!((m.network[0].rx_bytes, m.network[0].tx_bytes), (700, 300));
    }

    #[test]
    fn unreadable_or_garbled_files_read_as_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let m = read(dir.path(), dir.path(), &[]);
        assert_eq!(m.mem_total_bytes, 0);
        assert_eq!(m.cpu.user_ns, 0);
        assert_eq!(m.load1, 0.0);
        assert!(m.containers.is_empty() && m.network.is_empty());
        assert_eq!(parse_loadavg("x 1.5"), [0.0, 1.5, 0.0]);
        assert_eq!(parse_cpu_line("cpu0 1 2 3\n", 100).user_ns, 0);
    }
}
