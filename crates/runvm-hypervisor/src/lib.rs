//! The hypervisor seam of runvm.
//!
//! The sandbox library drives a VM only through the [`Hypervisor`] trait, written from its side:
//! prepare, start, stop, pause, resume, where the agent is reached, which host processes make the
//! VM up. Two implementations: [`qemu::Qemu`] (QEMU plus its helpers virtiofsd and
//! vhost-device-vsock) and [`mock::MockHypervisor`] for unit tests.
//!
//! ```
//! use runvm_hypervisor::{Accelerator, AccelMode, HostCpu};
//! let host = HostCpu { kvm_device_opens: true, has_vmx_or_svm: false };
//! assert_eq!(AccelMode::Auto.resolve(&host).unwrap(), Accelerator::Tcg);
//! ```

pub mod accel;
mod error;
pub mod mock;
pub mod qemu;
pub mod qmp;
mod vm;

pub use accel::{AccelMode, Accelerator, HostCpu};
pub use error::HypervisorError;
pub use vm::{
    AgentAddress, Capabilities, Hotplugged, NetDevice, SavedProcess, SharedDir, VirtiofsCache,
    VmConfig, VmProcess, VmSize, VmState, VsockBackend,
};

use std::fmt::Debug;
use std::time::Duration;

use async_trait::async_trait;

/// Result of hypervisor operations.
pub type Result<T> = std::result::Result<T, HypervisorError>;

/// Told every process of the VM started so far, each time one was spawned and before `start`
/// goes on: the caller records them, so that no process of the VM can outlive a creator that
/// dies (SIGKILL) unrecorded. An error stops the start, and what was started with it.
pub type OnSpawn<'a> = dyn FnMut(&[SavedProcess]) -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync>>
    + Send
    + 'a;

/// What the sandbox needs from a VM monitor. One value drives one VM for its whole life.
///
/// Lifecycle: `prepare` (checks, no process started) → `start` → (`pause` ⇄ `resume`) → `stop`.
/// `stop` is also legal after a failed `start`, and must then clean up whatever was started.
#[async_trait]
pub trait Hypervisor: Send + Sync + Debug {
    /// Validates `config` and prepares the VM's run folder. Starts nothing.
    async fn prepare(&mut self, config: VmConfig) -> Result<()>;

    /// Starts the helpers and the VM; returns once the VM runs (its monitor answered).
    /// `on_spawn` is told the VM's processes right after each is spawned.
    /// On error, everything started so far has been stopped and removed.
    async fn start(&mut self, on_spawn: &mut OnSpawn<'_>) -> Result<()>;

    /// Stops the VM: gracefully first (the guest is asked to power off and given
    /// `graceful_timeout`), then forcefully. Stops the helpers and removes every socket and file
    /// the hypervisor made. Idempotent.
    async fn stop(&mut self, graceful_timeout: Duration) -> Result<()>;

    /// Pauses the VM's vCPUs.
    async fn pause(&mut self) -> Result<()>;

    /// Resumes the VM's vCPUs.
    async fn resume(&mut self) -> Result<()>;

    /// Reports an error if the VM or one of its helpers has exited since `start`. Also keeps
    /// the VM's logs (guest console, helpers' output) within `log_max_bytes` each, dropping
    /// their oldest part: whoever watches the VM calls this regularly.
    async fn check(&mut self) -> Result<()>;

    /// What another process needs to take over this running VM (see `Qemu::attach`).
    fn save(&self) -> Result<VmState>;

    /// Lets go of the VM without stopping it, so that another process can take it over; this
    /// value then owns nothing (dropping it stops nothing).
    fn detach(&mut self);

    /// Takes over the running VM `saved` describes, which another process started and let go
    /// of ([`detach`](Self::detach)), as `Qemu::attach` does: the VM factory's hand-over. Only
    /// legal before [`prepare`](Self::prepare); this value then owns the VM.
    fn adopt(&mut self, saved: VmState) -> Result<()>;

    /// Where the host reaches the guest agent.
    fn agent_address(&self) -> Result<AgentAddress>;

    /// The host processes that make up the VM (QEMU and its helpers).
    fn pids(&self) -> Vec<VmProcess>;

    /// What this hypervisor can do.
    fn capabilities(&self) -> Capabilities;

    /// The last `lines` lines the guest wrote to its serial console.
    fn console_tail(&self, lines: usize) -> Vec<String>;

    /// Hot-adds a network card to the running VM (QEMU opens `device.tap` in its network
    /// namespace). The card appears in the config [`save`](Self::save) returns.
    async fn add_net_device(&mut self, device: &NetDevice) -> Result<()> {
        Err(HypervisorError::Unsupported {
            operation: "hot-add a network card",
            id: device.id.clone(),
        })
    }

    /// Hot-removes the network card `id` and its netdev, waiting for the guest to let it go.
    async fn remove_net_device(&mut self, id: &str) -> Result<()> {
        Err(HypervisorError::Unsupported {
            operation: "hot-remove a network card",
            id: id.to_owned(),
        })
    }

    /// Resizes the running VM to `target`: hot-adds vCPUs (and removes hot-added ones where
    /// the backend can), sets the virtio-mem device's size and waits a bounded time for the
    /// guest to plug added memory. `target` must lie between the boot size and
    /// [`VmConfig::max_size`]; otherwise it is refused (`Resize`) with the VM unchanged. Returns
    /// the size reached, which the config [`save`](Self::save) returns records; the guest
    /// still has to online added vCPUs (the agent's `OnlineCPUMem`).
    async fn resize(&mut self, target: VmSize) -> Result<VmSize> {
        Err(HypervisorError::Resize {
            vcpus: target.vcpus,
            memory_mib: target.memory_mib,
            reason: "not supported by this hypervisor".into(),
        })
    }

    /// The last `lines` lines of each helper's log, prefixed with its name, for error reports.
    fn helper_log_tails(&self, lines: usize) -> Vec<String> {
        let _ = lines;
        Vec::new()
    }

    /// The CPU time the VM (QEMU) has used so far, where the backend can tell: how much work
    /// the guest got to do, whatever the host's load. `None` when unknown.
    fn cpu_time(&self) -> Option<Duration> {
        None
    }

    /// When each phase of the last [`Hypervisor::start`] ended, in order (e.g.
    /// `helpers-started`, `qemu-spawned`, `qmp-connected`), for the boot timeline.
    fn start_marks(&self) -> Vec<(&'static str, std::time::SystemTime)> {
        Vec::new()
    }
}

/// An `on_spawn` that records nothing, for callers that keep no state (tests, benchmarks).
pub fn ignore_spawns(
    _: &[SavedProcess],
) -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync>> {
    Ok(())
}

/// Waits in small steps until `cond` holds or `timeout` elapses; returns whether it held.
pub(crate) async fn poll_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
