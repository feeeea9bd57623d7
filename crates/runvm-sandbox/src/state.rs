//! What a sandbox and its containers are, as persisted: the lifecycle [`State`] and the records
//! the [`store`](crate::store) writes to disk.
//!
//! A record holds what a later process needs to take over a sandbox *without touching the
//! guest*: the VM as `Hypervisor::save` describes it (config, host processes with their start
//! times so that a recycled pid is not mistaken for QEMU), where the agent is, and the
//! containers with their processes and the host mounts made for them.
//!
//! # Compatibility
//! State files outlive the runvm binary that wrote them (an upgrade while sandboxes run).
//! Unknown fields are ignored and missing ones take their defaults, so adding an optional field
//! needs nothing more. Bump [`RECORD_VERSION`] only when an older runvm must not read a file any
//! more: a file with a newer version is refused on load rather than half understood and then
//! written back without the fields it did not know.
//!
//! ```
//! use runvm_sandbox::state::State;
//! let state = State::Ready.transition(State::Running).unwrap();
//! assert_eq!(state.oci_status(), "running");
//! let err = State::Stopped.transition(State::Paused).unwrap_err();
//! assert!(err.to_string().starts_with("cannot go from stopped to paused"));
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use runvm_hypervisor::qemu::RunDirLayout;
use runvm_hypervisor::{Accelerator, AgentAddress, VmConfig, VmState};
use serde::{Deserialize, Deserializer, Serialize};

use crate::config::Config;
pub use crate::id::ContainerId;
use crate::id::SandboxId;

/// The version of the record format this runvm writes, and the newest it reads.
pub const RECORD_VERSION: u32 = 1;

fn record_version() -> u32 {
    RECORD_VERSION
}

/// The lifecycle state of a sandbox or a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Created, not started yet (runc's `created`).
    Ready,
    /// Running.
    Running,
    /// Paused: vCPUs (sandbox) or processes (container) frozen.
    Paused,
    /// Stopped; may be started again.
    Stopped,
}

impl State {
    /// Every state.
    pub const ALL: [State; 4] = [State::Ready, State::Running, State::Paused, State::Stopped];

    /// The states reachable from this one in one move.
    pub fn legal_targets(self) -> &'static [State] {
        match self {
            State::Ready => &[State::Running, State::Stopped],
            State::Running => &[State::Paused, State::Stopped],
            State::Paused => &[State::Running, State::Stopped],
            State::Stopped => &[State::Running],
        }
    }

    /// Whether `self → to` is a legal move.
    pub fn can_transition(self, to: State) -> bool {
        self.legal_targets().contains(&to)
    }

    /// The state after moving to `to`, or why that move is illegal. Staying put is not a move.
    pub fn transition(self, to: State) -> Result<State, InvalidTransition> {
        if self.can_transition(to) {
            Ok(to)
        } else {
            Err(InvalidTransition { from: self, to })
        }
    }

    /// The status the OCI runtime spec (and runc's `state`) uses: `created`, `running`,
    /// `paused` or `stopped`.
    pub fn oci_status(self) -> &'static str {
        match self {
            State::Ready => "created",
            State::Running => "running",
            State::Paused => "paused",
            State::Stopped => "stopped",
        }
    }

    /// The name used in state files and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Ready => "ready",
            State::Running => "running",
            State::Paused => "paused",
            State::Stopped => "stopped",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refused state change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("cannot go from {from} to {to}; from {from} the legal moves are to {}", legal_list(*from))]
pub struct InvalidTransition {
    /// The current state.
    pub from: State,
    /// The state asked for.
    pub to: State,
}

fn legal_list(from: State) -> String {
    let names: Vec<&str> = from.legal_targets().iter().map(|s| s.as_str()).collect();
    names.join(" or ")
}

/// Now, in nanoseconds since the Unix epoch (the unit of every timestamp in a record).
pub fn unix_now_ns() -> u64 {
    system_time_ns(SystemTime::now())
}

/// `at` in ns since the Unix epoch (0 before it).
pub fn system_time_ns(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A sandbox as persisted in `ROOT/ID/sandbox.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxRecord {
    /// The record format ([`RECORD_VERSION`] when written by this runvm).
    #[serde(default = "record_version")]
    pub version: u32,
    /// The sandbox id; must match its folder.
    pub id: SandboxId,
    /// The lifecycle state.
    pub state: State,
    /// When the sandbox was created, ns since the Unix epoch.
    #[serde(default)]
    pub created_at: u64,
    /// The VM: its config (accelerator, vsock backend, run and shared folders, kernel, sizes)
    /// and, once started, its host processes with their start times; what
    /// `Qemu::attach` takes to drive the VM from another process. Update it from
    /// `Hypervisor::save` after start, pause and resume.
    pub vm: VmState,
    /// Where the host reaches the agent; known once the VM started.
    #[serde(default)]
    pub agent_address: Option<AgentAddress>,
    /// The configuration the sandbox was made with. Keys this runvm does not know (written by a
    /// newer one) are dropped with a warning instead of failing the whole record.
    #[serde(default, deserialize_with = "lenient_config")]
    pub config: Config,
    /// The sandbox's annotations.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// The containers, in creation order.
    #[serde(default)]
    pub containers: Vec<ContainerId>,
    /// The guest's memory block size in bytes (for memory hotplug), once the guest told it.
    #[serde(default)]
    pub memory_block_size: Option<u64>,
    /// Phase names with their time, ns since the Unix epoch, in the order they happened.
    #[serde(default)]
    pub timeline: Vec<(String, u64)>,
    /// The pod network: its namespace and what runvm made there (taps, qdiscs, filters).
    #[serde(default)]
    pub network: Option<crate::network::NetworkRecord>,
    /// The host cgroup the VM's processes live in (`linux.cgroupsPath`), recorded before it
    /// is made, so whichever process removes the sandbox removes it too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_cgroup: Option<crate::host_cgroup::HostCgroupRecord>,
    /// The factory VM this sandbox adopted ([`crate::factory`]), whose run and shared folders
    /// lie in `ROOT/.vmhome~ID` (computed from the root and this id, never read as a path);
    /// `None`: the VM was booted for this sandbox, in its own folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factory_vm: Option<SandboxId>,
    /// The pod's own size (the configured base plus CRI's sandbox limits and annotations) when
    /// its VM booted smaller (a factory VM) and was hot-plugged to it: resizes never go below.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_size: Option<runvm_hypervisor::VmSize>,
}

impl SandboxRecord {
    /// A new sandbox in state `ready`, created now.
    pub fn new(id: SandboxId, vm: VmConfig, config: Config) -> SandboxRecord {
        let now = unix_now_ns();
        SandboxRecord {
            version: RECORD_VERSION,
            id,
            state: State::Ready,
            created_at: now,
            vm: VmState {
                config: vm,
                processes: Vec::new(),
                paused: false,
            },
            agent_address: None,
            config,
            annotations: BTreeMap::new(),
            containers: Vec::new(),
            memory_block_size: None,
            timeline: vec![("created".into(), now)],
            network: None,
            host_cgroup: None,
            factory_vm: None,
            pod_size: None,
        }
    }

    /// Moves to `to` if that is legal; the record is unchanged otherwise.
    pub fn transition(&mut self, to: State) -> Result<(), InvalidTransition> {
        self.state = self.state.transition(to)?;
        Ok(())
    }

    /// Appends `phase` to the timeline, stamped now.
    pub fn mark(&mut self, phase: &str) {
        self.timeline.push((phase.to_string(), unix_now_ns()));
    }

    /// The accelerator the VM runs under.
    pub fn accelerator(&self) -> Accelerator {
        self.vm.config.accelerator
    }

    /// The VM's run folder (sockets, logs).
    pub fn run_dir(&self) -> &Path {
        &self.vm.config.run_dir
    }

    /// QEMU's QMP socket, in the run folder.
    pub fn qmp_socket(&self) -> PathBuf {
        RunDirLayout::new(self.run_dir()).qmp_socket()
    }
}

/// The standard streams of a process, as given by the caller (fifo paths or URIs).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StdioRecord {
    /// Standard input.
    #[serde(default)]
    pub stdin: Option<String>,
    /// Standard output.
    #[serde(default)]
    pub stdout: Option<String>,
    /// Standard error.
    #[serde(default)]
    pub stderr: Option<String>,
}

/// A process of a container: its init process or an exec'd one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRecord {
    /// The exec id; empty for the init process.
    #[serde(default)]
    pub exec_id: String,
    /// Its pid in the guest, once started.
    #[serde(default)]
    pub pid: Option<u32>,
    /// Its standard streams.
    #[serde(default)]
    pub stdio: StdioRecord,
    /// Whether it has a terminal.
    #[serde(default)]
    pub terminal: bool,
    /// Its exit status, once it exited.
    #[serde(default)]
    pub exit_status: Option<i32>,
    /// When it exited, ns since the Unix epoch.
    #[serde(default)]
    pub exited_at: Option<u64>,
}

/// A container as persisted in `ROOT/SANDBOX/containers/ID/container.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerRecord {
    /// The record format ([`RECORD_VERSION`] when written by this runvm).
    #[serde(default = "record_version")]
    pub version: u32,
    /// The container id; must match its folder.
    pub id: ContainerId,
    /// Its sandbox; must match the sandbox folder.
    pub sandbox_id: SandboxId,
    /// The lifecycle state.
    pub state: State,
    /// The OCI bundle folder.
    #[serde(default)]
    pub bundle: PathBuf,
    /// The root file system on the host.
    #[serde(default)]
    pub rootfs: PathBuf,
    /// The OCI runtime spec, as JSON.
    #[serde(default)]
    pub spec: serde_json::Value,
    /// The container's annotations.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// The init process (exec id "").
    #[serde(default)]
    pub init: ProcessRecord,
    /// Exec'd processes by exec id.
    #[serde(default)]
    pub execs: BTreeMap<String, ProcessRecord>,
    /// When the container was created, ns since the Unix epoch.
    #[serde(default)]
    pub created_at: u64,
    /// Mounts the host made for this container (bind mounts in the shared folder), to unmount
    /// on delete or cleanup.
    #[serde(default)]
    pub mounts: Vec<PathBuf>,
}

impl ContainerRecord {
    /// A new container in state `ready`, created now.
    pub fn new(
        id: ContainerId,
        sandbox_id: SandboxId,
        bundle: PathBuf,
        rootfs: PathBuf,
        spec: serde_json::Value,
    ) -> ContainerRecord {
        ContainerRecord {
            version: RECORD_VERSION,
            id,
            sandbox_id,
            state: State::Ready,
            bundle,
            rootfs,
            spec,
            annotations: BTreeMap::new(),
            init: ProcessRecord::default(),
            execs: BTreeMap::new(),
            created_at: unix_now_ns(),
            mounts: Vec::new(),
        }
    }

    /// Moves to `to` if that is legal; the record is unchanged otherwise.
    pub fn transition(&mut self, to: State) -> Result<(), InvalidTransition> {
        self.state = self.state.transition(to)?;
        Ok(())
    }
}

/// Reads a [`Config`] written by any runvm version: keys unknown here are dropped (with a
/// warning) before the strict parse, which still refuses values of the wrong type.
fn lenient_config<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Config, D::Error> {
    use serde::de::Error;
    let mut value = serde_json::Value::deserialize(deserializer)?;
    let known = serde_json::to_value(Config::default()).map_err(D::Error::custom)?;
    retain_known_keys(&mut value, &known, "config");
    serde_json::from_value(value).map_err(D::Error::custom)
}

fn retain_known_keys(value: &mut serde_json::Value, known: &serde_json::Value, at: &str) {
    let (serde_json::Value::Object(map), serde_json::Value::Object(known)) = (value, known) else {
        return;
    };
    map.retain(|key, _| {
        let keep = known.contains_key(key);
        if !keep {
            tracing::warn!(key = %format!("{at}.{key}"), "ignoring a key this runvm does not know");
        }
        keep
    });
    for (key, inner) in map.iter_mut() {
        if let Some(known_inner) = known.get(key) {
            retain_known_keys(inner, known_inner, &format!("{at}.{key}"));
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
