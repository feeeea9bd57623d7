//! The agent's domain types: what the sandbox speaks, converted to protobuf only at the edge.

/// A mount the agent makes in the guest before creating a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Storage {
    /// What the guest mounts (a virtio-fs tag, a device).
    pub source: String,
    /// File-system type (`virtiofs`, ...).
    pub fstype: String,
    /// Mount options.
    pub options: Vec<String>,
    /// Absolute guest path.
    pub mount_point: String,
}

/// Which stdio streams of a process the host attaches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StdioSpec {
    /// The host writes to the process's stdin.
    pub stdin: bool,
    /// The host reads the process's stdout.
    pub stdout: bool,
    /// The host reads the process's stderr.
    pub stderr: bool,
    /// A pseudo-terminal (stderr merged into stdout).
    pub terminal: bool,
    /// The token of the host's stdio streams for the process
    /// ([`Streams::open`](crate::process::Streams::open) sets it): stdio travels only on those
    /// streams. `None`: no stream is attached, so `stdin`, `stdout` and `stderr` must all be
    /// false (the agent refuses a process asking for any of them without a token,
    /// `INVALID_ARGUMENT`); the process then has `/dev/null` as stdin, stdout and stderr.
    pub stream_token: Option<[u8; runvm_protocol::stdio::TOKEN_LEN]>,
}

impl StdioSpec {
    /// Every stream attached, as a runtime relaying its own stdio does; with a terminal,
    /// stderr is merged into stdout. The streams are opened with
    /// [`Streams::open`](crate::process::Streams::open) (which sets the token) before the
    /// process is asked for.
    pub fn attached(terminal: bool) -> Self {
        StdioSpec {
            stdin: true,
            stdout: true,
            stderr: !terminal,
            terminal,
            stream_token: None,
        }
    }
}

/// Everything the agent needs to create a container.
#[derive(Debug, Clone, PartialEq)]
pub struct CreateContainer {
    /// The container id.
    pub container_id: String,
    /// The sandbox it belongs to.
    pub sandbox_id: String,
    /// The OCI runtime spec with paths rewritten for the guest.
    pub spec: serde_json::Value,
    /// Mounts to make first (the sandbox's shared folder).
    pub storages: Vec<Storage>,
    /// The init process's stdio.
    pub stdio: StdioSpec,
}

/// A process in the guest: a container's init (empty `exec_id`) or an exec'd process.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProcessRef {
    /// The container.
    pub container_id: String,
    /// The exec id; empty for the container's init process.
    pub exec_id: String,
}

impl ProcessRef {
    /// The init process of `container_id`.
    pub fn init(container_id: impl Into<String>) -> Self {
        ProcessRef {
            container_id: container_id.into(),
            exec_id: String::new(),
        }
    }

    /// The exec'd process `exec_id` of `container_id`.
    pub fn exec(container_id: impl Into<String>, exec_id: impl Into<String>) -> Self {
        ProcessRef {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
        }
    }
}

impl std::fmt::Display for ProcessRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.exec_id.is_empty() {
            write!(f, "{} (init)", self.container_id)
        } else {
            write!(f, "{} exec {}", self.container_id, self.exec_id)
        }
    }
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus {
    /// As a shell reports it: the exit code, or 128+N for death by signal N.
    pub code: i32,
    /// When it exited, Unix time in nanoseconds.
    pub exited_at_unix_ns: i64,
}

/// A process as the guest lists it (what `ps -ef` shows of it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestProcess {
    /// Its pid in the guest.
    pub pid: i32,
    /// Its command line.
    pub cmd: String,
    /// Its parent's pid in the guest.
    pub ppid: i32,
    /// Its real uid.
    pub uid: u32,
    /// When it started (guest clock), ns since the Unix epoch.
    pub started_unix_ns: u64,
    /// Its terminal as ps names it (`pts/0`), empty for none.
    pub tty: String,
    /// CPU time used, ns.
    pub cpu_time_ns: u64,
}

/// CPU statistics of a container.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuStats {
    /// Total CPU time, ns.
    pub usage_total_ns: u64,
    /// Kernel-mode CPU time, ns.
    pub usage_kernel_ns: u64,
    /// User-mode CPU time, ns.
    pub usage_user_ns: u64,
    /// Periods throttled.
    pub throttled_periods: u64,
    /// Time throttled, ns.
    pub throttled_time_ns: u64,
}

/// Memory statistics of a container.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// Current usage, bytes.
    pub usage_bytes: u64,
    /// Peak usage, bytes.
    pub max_usage_bytes: u64,
    /// Limit, bytes (0 or u64::MAX for none).
    pub limit_bytes: u64,
    /// Page cache, bytes.
    pub cache_bytes: u64,
    /// OOM kills.
    pub oom_kills: u64,
}

/// Network statistics of one guest interface.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetworkStats {
    /// Interface name.
    pub name: String,
    /// Received bytes.
    pub rx_bytes: u64,
    /// Received packets.
    pub rx_packets: u64,
    /// Receive errors.
    pub rx_errors: u64,
    /// Received packets dropped.
    pub rx_dropped: u64,
    /// Sent bytes.
    pub tx_bytes: u64,
    /// Sent packets.
    pub tx_packets: u64,
    /// Send errors.
    pub tx_errors: u64,
    /// Sent packets dropped.
    pub tx_dropped: u64,
}

/// Resource usage of a container.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerStats {
    /// CPU.
    pub cpu: CpuStats,
    /// Memory.
    pub memory: MemoryStats,
    /// Current number of tasks.
    pub pids_current: u64,
    /// Task limit (0 for none).
    pub pids_limit: u64,
    /// Bytes read from block devices.
    pub io_read_bytes: u64,
    /// Bytes written to block devices.
    pub io_write_bytes: u64,
    /// Guest network interfaces.
    pub network: Vec<NetworkStats>,
}
