//! Noticing that a sandbox's VM died, and cleaning up after it.

use std::time::Duration;

use super::{Sandbox, KILLED_EXIT_STATUS};
use crate::error::SandboxError;
use crate::state::State;

/// Consecutive failed health checks after which the agent counts as silent.
const SILENT_CHECKS: u32 = 3;

/// Why a sandbox's VM is considered dead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmFailure {
    /// QEMU or a helper exited.
    VmExited(String),
    /// The agent stopped answering health checks.
    AgentSilent(String),
}

impl std::fmt::Display for VmFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmFailure::VmExited(why) => write!(f, "the VM exited: {why}"),
            VmFailure::AgentSilent(why) => write!(f, "the agent stopped answering: {why}"),
        }
    }
}

impl Sandbox {
    /// Checks the VM's host processes only (QEMU and its helpers; no agent call), keeping its
    /// logs within their cap meanwhile. Cheap enough to run every half second.
    pub async fn check_vm(&mut self) -> Result<(), VmFailure> {
        self.hypervisor
            .check()
            .await
            .map_err(|e| VmFailure::VmExited(e.to_string()))
    }

    /// One health check, bounded by `timeout`: the VM's processes, then the agent.
    pub async fn health(&mut self, timeout: Duration) -> Result<(), VmFailure> {
        if let Err(e) = self.hypervisor.check().await {
            return Err(VmFailure::VmExited(e.to_string()));
        }
        if self.record.state == State::Paused {
            return Ok(()); // A paused guest cannot answer; its processes are checked above.
        }
        let agent = match tokio::time::timeout(timeout, self.agent()).await {
            Ok(Ok(agent)) => agent,
            Ok(Err(e)) => return Err(VmFailure::AgentSilent(e.to_string())),
            Err(_) => return Err(VmFailure::AgentSilent("connect timed out".into())),
        };
        match tokio::time::timeout(timeout, agent.check()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                self.agent = None;
                Err(VmFailure::AgentSilent(e.to_string()))
            }
            Err(_) => {
                self.agent = None;
                Err(VmFailure::AgentSilent(format!(
                    "no answer within {} ms",
                    timeout.as_millis()
                )))
            }
        }
    }

    /// Checks the VM every `interval` until it dies (the agent must fail 3 checks in a row),
    /// then cleans up after it ([`Sandbox::handle_vm_failure`]) and returns why. A dead VM is
    /// noticed within `interval` (QEMU exit) or 3 × `interval` (silent agent).
    pub async fn monitor(&mut self, interval: Duration) -> Result<VmFailure, SandboxError> {
        let mut silent = 0;
        loop {
            tokio::time::sleep(interval).await;
            self.reload()?;
            if self.record.state == State::Stopped {
                return Ok(VmFailure::VmExited("the sandbox was stopped".into()));
            }
            match self.health(interval).await {
                Ok(()) => silent = 0,
                Err(failure @ VmFailure::VmExited(_)) => {
                    self.handle_vm_failure(&failure).await?;
                    return Ok(failure);
                }
                Err(failure) => {
                    silent += 1;
                    if silent >= SILENT_CHECKS {
                        self.handle_vm_failure(&failure).await?;
                        return Ok(failure);
                    }
                }
            }
        }
    }

    /// After the VM died: every container's processes are reported exited (status 137, killed,
    /// where none was known: they died with the VM), the sandbox becomes stopped, and the VM's processes, sockets, the
    /// containers' mounts and the pod network runvm made (taps, qdiscs) are removed.
    pub async fn handle_vm_failure(&mut self, failure: &VmFailure) -> Result<(), SandboxError> {
        tracing::error!(sandbox = %self.record.id, %failure, "sandbox VM failed; cleaning up");
        self.agent = None;
        if let Err(e) = self.hypervisor.stop(Duration::ZERO).await {
            tracing::warn!(error = %e, "stopping what is left of the VM");
        }
        self.reload()?;
        self.mark_all_stopped(Some(KILLED_EXIT_STATUS))?;
        self.unshare_all()?;
        if let Err(e) = self.teardown_network().await {
            tracing::warn!(error = %e, "removing the pod network of the failed VM");
        }
        let why = failure.to_string();
        self.update(|r| {
            r.state = State::Stopped;
            r.mark(&format!("vm-failed: {why}"));
            Ok(())
        })
    }
}
