//! The guest's own view of itself (GetGuestMetrics), for `runvm monitor`: memory, CPU time by
//! mode, load averages, each container's cgroup usage, network counters. The reply comes from
//! the untrusted guest: counts and names are bounded and load averages must be finite.

use runvm_protocol::agent as pb;

use super::convert::{checked_name, network, reject};
use super::{AgentError, NetworkStats};

const METHOD: &str = "GetGuestMetrics";
/// Most containers accepted in one reply.
const MAX_CONTAINERS: usize = 1024;

/// CPU time of all the guest's CPUs together, by mode, nanoseconds (/proc/stat).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GuestCpuTime {
    /// User mode.
    pub user_ns: u64,
    /// User mode at low priority.
    pub nice_ns: u64,
    /// Kernel mode.
    pub system_ns: u64,
    /// Idle.
    pub idle_ns: u64,
    /// Idle waiting for I/O.
    pub iowait_ns: u64,
    /// Serving interrupts.
    pub irq_ns: u64,
    /// Serving soft interrupts.
    pub softirq_ns: u64,
    /// Stolen by the host (the vCPU waited for a host CPU).
    pub steal_ns: u64,
}

impl GuestCpuTime {
    /// Each mode's name (as node_exporter names them) with its time.
    pub fn modes(&self) -> [(&'static str, u64); 8] {
        [
            ("user", self.user_ns),
            ("nice", self.nice_ns),
            ("system", self.system_ns),
            ("idle", self.idle_ns),
            ("iowait", self.iowait_ns),
            ("irq", self.irq_ns),
            ("softirq", self.softirq_ns),
            ("steal", self.steal_ns),
        ]
    }
}

/// A container's cgroup usage in the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerUsage {
    /// The container id.
    pub container_id: String,
    /// memory.current, bytes.
    pub memory_bytes: u64,
    /// cpu.stat's usage, nanoseconds.
    pub cpu_usage_ns: u64,
}

/// What the guest reports of its own use.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GuestMetrics {
    /// MemTotal, bytes.
    pub mem_total_bytes: u64,
    /// MemAvailable, bytes.
    pub mem_available_bytes: u64,
    /// CPU time by mode.
    pub cpu: GuestCpuTime,
    /// Load averages over 1, 5 and 15 minutes.
    pub load: [f64; 3],
    /// Each container's usage.
    pub containers: Vec<ContainerUsage>,
    /// The guest's interfaces that are up (loopback left out).
    pub network: Vec<NetworkStats>,
}

/// The reply checked and converted.
pub(super) fn from_reply(r: pb::GuestMetricsResponse) -> Result<GuestMetrics, AgentError> {
    if r.containers.len() > MAX_CONTAINERS {
        return Err(reject(
            METHOD,
            format!("{} containers (limit {MAX_CONTAINERS})", r.containers.len()),
        ));
    }
    let load = [r.load1, r.load5, r.load15];
    if load.iter().any(|l| !l.is_finite() || *l < 0.0) {
        return Err(reject(METHOD, format!("load averages {load:?}")));
    }
    let cpu = r.cpu.into_option().unwrap_or_default();
    let containers = r
        .containers
        .into_iter()
        .map(|c| {
            Ok(ContainerUsage {
                container_id: checked_name(METHOD, c.container_id)?,
                memory_bytes: c.memory_bytes,
                cpu_usage_ns: c.cpu_usage_ns,
            })
        })
        .collect::<Result<_, AgentError>>()?;
    Ok(GuestMetrics {
        mem_total_bytes: r.mem_total_bytes,
        mem_available_bytes: r.mem_available_bytes,
        cpu: GuestCpuTime {
            user_ns: cpu.user_ns,
            nice_ns: cpu.nice_ns,
            system_ns: cpu.system_ns,
            idle_ns: cpu.idle_ns,
            iowait_ns: cpu.iowait_ns,
            irq_ns: cpu.irq_ns,
            softirq_ns: cpu.softirq_ns,
            steal_ns: cpu.steal_ns,
        },
        load,
        containers,
        network: network(METHOD, r.network)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply() -> pb::GuestMetricsResponse {
        pb::GuestMetricsResponse {
            mem_total_bytes: 1 << 30,
            mem_available_bytes: 1 << 29,
            cpu: protobuf::MessageField::some(pb::GuestCpuTime {
                user_ns: 5,
                steal_ns: 7,
                ..Default::default()
            }),
            load1: 0.5,
            load5: 0.25,
            load15: 0.0,
            containers: vec![pb::ContainerUsage {
                container_id: "c1".into(),
                memory_bytes: 4096,
                cpu_usage_ns: 1000,
                ..Default::default()
            }],
            network: vec![pb::NetworkStats {
                name: "eth0".into(),
                rx_bytes: 10,
                tx_bytes: 20,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn a_well_formed_reply_converts_field_by_field() {
        let m = from_reply(reply()).unwrap();
        assert_eq!(m.mem_total_bytes, 1 << 30);
        assert_eq!((m.cpu.user_ns, m.cpu.steal_ns), (5, 7));
        assert_eq!(m.cpu.modes()[7], ("steal", 7));
        assert_eq!(m.load, [0.5, 0.25, 0.0]);
        assert_eq!(m.containers[0].container_id, "c1");
        assert_eq!((m.network[0].rx_bytes, m.network[0].tx_bytes), (10, 20));
    }

    #[test]
    fn hostile_replies_are_refused() {
        let mut r = reply();
        r.load5 = f64::NAN;
        assert!(from_reply(r).unwrap_err().to_string().contains("load"));
        let mut r = reply();
        r.containers[0].container_id = "x\u{1b}[2J".into();
        assert!(from_reply(r).is_err());
        let mut r = reply();
        r.containers = vec![pb::ContainerUsage::default(); MAX_CONTAINERS + 1];
        let err = from_reply(r).unwrap_err().to_string();
        assert!(err.contains("1025 containers"), "{err}");
        let mut r = reply();
        r.network[0].name = "n".repeat(500);
        assert!(from_reply(r).is_err());
    }
}
