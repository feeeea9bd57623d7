//! Container statistics from its cgroup v2 files and the network counters of its network
//! namespace. A missing file (controller not enabled) reads as zeros. Unlimited values
//! (`max`) read as `u64::MAX`, as containerd's cgroup v2 metrics report them.

use std::collections::HashMap;
use std::path::Path;

use runvm_protocol::agent;

/// `key value` lines (cpu.stat, memory.stat, memory.events) as a map.
pub fn flat_keyed(text: &str) -> HashMap<&str, u64> {
    text.lines()
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            let key = parts.next()?;
            let value = parts.next()?.parse().ok()?;
            Some((key, value))
        })
        .collect()
}

/// A one-value file (memory.current, memory.max, pids.max, ...); `max` is `u64::MAX`.
pub fn single_value(text: &str) -> Option<u64> {
    match text.trim() {
        "max" => Some(u64::MAX),
        v => v.parse().ok(),
    }
}

/// Bytes read and written, summed over the devices of an io.stat text.
pub fn io_totals(text: &str) -> (u64, u64) {
    let mut read = 0u64;
    let mut written = 0u64;
    for field in text.split_whitespace() {
        if let Some(v) = field.strip_prefix("rbytes=") {
            read = read.saturating_add(v.parse().unwrap_or(0));
        } else if let Some(v) = field.strip_prefix("wbytes=") {
            written = written.saturating_add(v.parse().unwrap_or(0));
        }
    }
    (read, written)
}

/// The interfaces of a /proc/net/dev text, `lo` left out.
pub fn net_dev(text: &str) -> Vec<agent::NetworkStats> {
    text.lines()
        .filter_map(|line| {
            let (name, counters) = line.split_once(':')?;
            let name = name.trim();
            if name == "lo" || name.is_empty() {
                return None;
            }
            let f: Vec<u64> = counters
                .split_whitespace()
                .map(|v| v.parse().unwrap_or(0))
                .collect();
            if f.len() < 16 {
                return None;
            }
            Some(agent::NetworkStats {
                name: name.to_string(),
                rx_bytes: f[0],
                rx_packets: f[1],
                rx_errors: f[2],
                rx_dropped: f[3],
                tx_bytes: f[8],
                tx_packets: f[9],
                tx_errors: f[10],
                tx_dropped: f[11],
                ..Default::default()
            })
        })
        .collect()
}

fn read(dir: &Path, file: &str) -> String {
    std::fs::read_to_string(dir.join(file)).unwrap_or_default()
}

/// The memory.events `oom_kill` count of a cgroup folder.
pub fn oom_kills(cgroup_dir: &Path) -> u64 {
    flat_keyed(&read(cgroup_dir, "memory.events"))
        .get("oom_kill")
        .copied()
        .unwrap_or(0)
}

/// Reads the statistics of the cgroup folder `cgroup_dir`; `net_dev_file` is the
/// /proc/net/dev of the container's network namespace.
pub fn read_stats(cgroup_dir: &Path, net_dev_file: &Path) -> agent::StatsContainerResponse {
    let cpu_text = read(cgroup_dir, "cpu.stat");
    let cpu = flat_keyed(&cpu_text);
    let us = |k: &str| cpu.get(k).copied().unwrap_or(0).saturating_mul(1000);
    let memory_stat_text = read(cgroup_dir, "memory.stat");
    let memory_stat = flat_keyed(&memory_stat_text);
    let value = |f: &str| single_value(&read(cgroup_dir, f)).unwrap_or(0);
    let (read_bytes, write_bytes) = io_totals(&read(cgroup_dir, "io.stat"));
    let network = std::fs::read_to_string(net_dev_file)
        .map(|t| net_dev(&t))
        .unwrap_or_default();
    agent::StatsContainerResponse {
        cpu: protobuf::MessageField::some(agent::CpuStats {
            usage_total_ns: us("usage_usec"),
            usage_kernel_ns: us("system_usec"),
            usage_user_ns: us("user_usec"),
            throttled_periods: cpu.get("nr_throttled").copied().unwrap_or(0),
            throttled_time_ns: us("throttled_usec"),
            ..Default::default()
        }),
        memory: protobuf::MessageField::some(agent::MemoryStats {
            usage_bytes: value("memory.current"),
            // memory.peak exists from Linux 5.19 on.
            max_usage_bytes: value("memory.peak"),
            limit_bytes: value("memory.max"),
            cache_bytes: memory_stat.get("file").copied().unwrap_or(0),
            oom_kills: oom_kills(cgroup_dir),
            ..Default::default()
        }),
        pids: protobuf::MessageField::some(agent::PidsStats {
            current: value("pids.current"),
            limit: value("pids.max"),
            ..Default::default()
        }),
        io: protobuf::MessageField::some(agent::IoStats {
            read_bytes,
            write_bytes,
            ..Default::default()
        }),
        network,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NET_DEV: &str = "\
Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:    1000      10    0    0    0     0          0         0     1000      10    0    0    0     0       0          0
  eth0:12345678     100    1    2    0     0          0         0     5432      50    3    4    0     0       0          0
";

    #[test]
    fn stats_are_read_from_cgroup_files() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let files = [
            (
                "cpu.stat",
                "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 9\n\
                 nr_throttled 2\nthrottled_usec 40\n",
            ),
            ("memory.current", "4096000\n"),
            ("memory.peak", "8192000\n"),
            ("memory.max", "max\n"),
            ("memory.stat", "anon 100\nfile 2048\nkernel 7\n"),
            (
                "memory.events",
                "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\noom_group_kill 0\n",
            ),
            ("pids.current", "3\n"),
            ("pids.max", "100\n"),
            (
                "io.stat",
                "254:0 rbytes=1000 wbytes=200 rios=1 wios=2 dbytes=0 dios=0\n\
                 254:16 rbytes=24 wbytes=56 rios=1 wios=1 dbytes=0 dios=0\n",
            ),
        ];
        for (name, text) in files {
            std::fs::write(d.join(name), text).unwrap();
        }
        std::fs::write(d.join("net_dev"), NET_DEV).unwrap();
        let s = read_stats(d, &d.join("net_dev"));
        assert_eq!(s.cpu.usage_total_ns, 1_500_000);
        assert_eq!(s.cpu.usage_user_ns, 1_000_000);
        assert_eq!(s.cpu.usage_kernel_ns, 500_000);
        assert_eq!(s.cpu.throttled_periods, 2);
        assert_eq!(s.cpu.throttled_time_ns, 40_000);
        assert_eq!(s.memory.usage_bytes, 4_096_000);
        assert_eq!(s.memory.max_usage_bytes, 8_192_000);
        assert_eq!(s.memory.limit_bytes, u64::MAX);
        assert_eq!(s.memory.cache_bytes, 2048);
        assert_eq!(s.memory.oom_kills, 1);
        assert_eq!((s.pids.current, s.pids.limit), (3, 100));
        assert_eq!((s.io.read_bytes, s.io.write_bytes), (1024, 256));
        assert_eq!(s.network.len(), 1);
        let eth0 = &s.network[0];
        assert_eq!(eth0.name, "eth0");
        assert_eq!((eth0.rx_bytes, eth0.rx_packets), (12_345_678, 100));
        assert_eq!((eth0.rx_errors, eth0.rx_dropped), (1, 2));
        assert_eq!((eth0.tx_bytes, eth0.tx_packets), (5432, 50));
        assert_eq!((eth0.tx_errors, eth0.tx_dropped), (3, 4));
    }

    #[test]
    fn missing_files_read_as_zero() {
        let dir = tempfile::tempdir().unwrap();
        let s = read_stats(dir.path(), &dir.path().join("none"));
        assert_eq!(s.cpu.usage_total_ns, 0);
        assert_eq!(s.memory.limit_bytes, 0);
        assert!(s.network.is_empty());
        assert_eq!(oom_kills(dir.path()), 0);
    }

    #[test]
    fn single_values_and_garbage() {
        assert_eq!(single_value("max\n"), Some(u64::MAX));
        assert_eq!(single_value(" 12 "), Some(12));
        assert_eq!(single_value("x"), None);
        assert!(flat_keyed("a\nb x\nc 1 2\n").get("c") == Some(&1));
        assert_eq!(io_totals(""), (0, 0));
    }
}
