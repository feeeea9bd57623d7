//! Conversions between the agent's domain types and protobuf, and the checks on what the guest
//! sends back: the guest is untrusted, so every reply is bounded before it reaches a caller.

use protobuf::MessageField;
use runvm_protocol::agent as pb;

use super::types::*;
use super::AgentError;

/// Most processes accepted in a process list.
const MAX_PROCESSES: usize = 65_536;
/// Longest command line accepted for a listed process.
const MAX_CMD: usize = 4096;
/// The longest terminal name a process list may give (`pts/N` is a few bytes).
const MAX_TTY_NAME: usize = 32;
/// Most network interfaces accepted in stats.
const MAX_INTERFACES: usize = 256;
/// Longest id or interface name accepted.
const MAX_NAME: usize = 128;

pub(super) fn reject(method: &'static str, reason: String) -> AgentError {
    AgentError::InvalidReply { method, reason }
}

/// A name from the guest (container id, interface): bounded and printable, or refused.
pub(super) fn checked_name(method: &'static str, name: String) -> Result<String, AgentError> {
    if name.len() > MAX_NAME || name.chars().any(char::is_control) {
        return Err(reject(
            method,
            format!(
                "a name of {} bytes or with control characters (limit {MAX_NAME} printable bytes)",
                name.len()
            ),
        ));
    }
    Ok(name)
}

/// The interface counters of a reply, bounded in number and names.
pub(super) fn network(
    method: &'static str,
    interfaces: Vec<pb::NetworkStats>,
) -> Result<Vec<NetworkStats>, AgentError> {
    if interfaces.len() > MAX_INTERFACES {
        return Err(reject(
            method,
            format!("{} interfaces (limit {MAX_INTERFACES})", interfaces.len()),
        ));
    }
    interfaces
        .into_iter()
        .map(|n| {
            Ok(NetworkStats {
                name: checked_name(method, n.name)?,
                rx_bytes: n.rx_bytes,
                rx_packets: n.rx_packets,
                rx_errors: n.rx_errors,
                rx_dropped: n.rx_dropped,
                tx_bytes: n.tx_bytes,
                tx_packets: n.tx_packets,
                tx_errors: n.tx_errors,
                tx_dropped: n.tx_dropped,
            })
        })
        .collect()
}

pub fn stdio(s: StdioSpec) -> MessageField<pb::StdioConfig> {
    MessageField::some(pb::StdioConfig {
        stdin: s.stdin,
        stdout: s.stdout,
        stderr: s.stderr,
        terminal: s.terminal,
        stream_token: s.stream_token.map(|t| t.to_vec()).unwrap_or_default(),
        ..Default::default()
    })
}

pub fn create_request(r: &CreateContainer) -> Result<pb::CreateContainerRequest, AgentError> {
    let spec = serde_json::to_vec(&r.spec).map_err(|e| AgentError::Transport {
        method: "CreateContainer",
        reason: format!("cannot encode the OCI spec: {e}"),
    })?;
    Ok(pb::CreateContainerRequest {
        container_id: r.container_id.clone(),
        sandbox_id: r.sandbox_id.clone(),
        oci_spec_json: spec,
        storages: r
            .storages
            .iter()
            .map(|s| pb::Storage {
                source: s.source.clone(),
                fstype: s.fstype.clone(),
                options: s.options.clone(),
                mount_point: s.mount_point.clone(),
                ..Default::default()
            })
            .collect(),
        stdio: stdio(r.stdio),
        ..Default::default()
    })
}

pub fn processes(r: pb::ListProcessesResponse) -> Result<Vec<GuestProcess>, AgentError> {
    if r.processes.len() > MAX_PROCESSES {
        return Err(reject(
            "ListProcesses",
            format!(
                "{} processes listed (limit {MAX_PROCESSES})",
                r.processes.len()
            ),
        ));
    }
    r.processes
        .into_iter()
        .map(|p| {
            if p.cmd.len() > MAX_CMD {
                return Err(reject(
                    "ListProcesses",
                    format!(
                        "command of pid {} is {} bytes (limit {MAX_CMD})",
                        p.pid,
                        p.cmd.len()
                    ),
                ));
            }
            if p.tty.len() > MAX_TTY_NAME {
                return Err(reject(
                    "ListProcesses",
                    format!(
                        "terminal of pid {} is {} bytes (limit {MAX_TTY_NAME})",
                        p.pid,
                        p.tty.len()
                    ),
                ));
            }
            Ok(GuestProcess {
                pid: p.pid,
                cmd: p.cmd.chars().filter(|c| !c.is_control()).collect(),
                ppid: p.ppid,
                uid: p.uid,
                started_unix_ns: p.started_unix_ns,
                tty: p.tty.chars().filter(|c| !c.is_control()).collect(),
                cpu_time_ns: p.cpu_time_ns,
            })
        })
        .collect()
}

pub fn stats(r: pb::StatsContainerResponse) -> Result<ContainerStats, AgentError> {
    let cpu = r.cpu.into_option().unwrap_or_default();
    let mem = r.memory.into_option().unwrap_or_default();
    let pids = r.pids.into_option().unwrap_or_default();
    let io = r.io.into_option().unwrap_or_default();
    let network = network("StatsContainer", r.network)?;
    Ok(ContainerStats {
        cpu: CpuStats {
            usage_total_ns: cpu.usage_total_ns,
            usage_kernel_ns: cpu.usage_kernel_ns,
            usage_user_ns: cpu.usage_user_ns,
            throttled_periods: cpu.throttled_periods,
            throttled_time_ns: cpu.throttled_time_ns,
        },
        memory: MemoryStats {
            usage_bytes: mem.usage_bytes,
            max_usage_bytes: mem.max_usage_bytes,
            limit_bytes: mem.limit_bytes,
            cache_bytes: mem.cache_bytes,
            oom_kills: mem.oom_kills,
        },
        pids_current: pids.current,
        pids_limit: pids.limit,
        io_read_bytes: io.read_bytes,
        io_write_bytes: io.write_bytes,
        network,
    })
}

pub fn oom_container(r: pb::OOMEvent) -> Result<String, AgentError> {
    let id = r.container_id;
    let ok = !id.is_empty()
        && id.len() <= MAX_NAME
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if !ok {
        return Err(reject(
            "GetOOMEvent",
            "container id is not a valid id".into(),
        ));
    }
    Ok(id)
}

pub fn exit_status(r: pb::WaitProcessResponse) -> Result<ExitStatus, AgentError> {
    if !(0..=255).contains(&r.status) {
        return Err(reject(
            "WaitProcess",
            format!("exit status {} is outside 0 to 255", r.status),
        ));
    }
    Ok(ExitStatus {
        code: r.status,
        exited_at_unix_ns: r.exited_at_unix_ns,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_status_outside_shell_range_is_rejected() {
        let ok = pb::WaitProcessResponse {
            status: 143,
            ..Default::default()
        };
        assert_eq!(exit_status(ok).unwrap().code, 143);
        let bad = pb::WaitProcessResponse {
            status: -1,
            ..Default::default()
        };
        assert!(exit_status(bad).is_err());
    }

    #[test]
    fn oom_event_with_a_path_for_id_is_rejected() {
        let bad = pb::OOMEvent {
            container_id: "../x".into(),
            ..Default::default()
        };
        assert!(oom_container(bad).is_err());
        let good = pb::OOMEvent {
            container_id: "c-1".into(),
            ..Default::default()
        };
        assert_eq!(oom_container(good).unwrap(), "c-1");
    }

    #[test]
    fn process_list_commands_are_bounded_and_cleaned() {
        let r = pb::ListProcessesResponse {
            processes: vec![pb::ProcessInfo {
                pid: 7,
                cmd: "sleep\u{1b}[2J 10".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(processes(r).unwrap()[0].cmd, "sleep[2J 10");
        let r = pb::ListProcessesResponse {
            processes: vec![pb::ProcessInfo {
                pid: 7,
                cmd: "x".repeat(5000),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert!(processes(r).is_err());
    }
}
