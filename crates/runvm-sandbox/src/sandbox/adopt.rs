//! Adopting a VM from the factory ([`crate::factory`]) instead of booting one: the sandbox's
//! record names the VM first (from then on the sandbox owns it), then the VM is made the pod's:
//! its processes join the pod's host cgroup, the pod's cards are hot-added (taps opened in the
//! pod's namespace, handed to QEMU as descriptors), and the guest configures them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use runvm_hypervisor::VmSize;

use super::{BootReport, BootTimings, Sandbox};
use crate::agent::{Agent, AgentError};
use crate::error::SandboxError;
use crate::factory::client::Handout;
use crate::store::SandboxLock;

/// How long the adopted VM's agent may take to answer its first check.
const AGENT_CHECK_TIMEOUT: Duration = Duration::from_secs(5);

impl Sandbox {
    /// Makes the VM of `handout` this sandbox's (see the module documentation). On error the
    /// record names the VM, so the caller's clean-up ends it.
    #[tracing::instrument(name = "sandbox.adopt", skip_all)]
    pub(super) async fn adopt(
        &mut self,
        lock: &SandboxLock,
        handout: Handout,
        pod_size: VmSize,
    ) -> Result<BootReport, SandboxError> {
        let t0 = Instant::now();
        let pooled = handout.record().clone();
        let vm = handout.vm().clone();
        // The paths the VM lives at are the ones computed from the root and its id, or the
        // hand-out is refused (a record never decides what is removed).
        let home = self.store.vm_home(&vm);
        let shared = pooled.vm.config.shared_dir.as_ref().map(|s| s.path.clone());
        if pooled.id != vm
            || pooled.vm.config.run_dir != home.join("vm")
            || shared != Some(home.join("shared"))
        {
            return Err(SandboxError::Io {
                action: "adopt the factory VM (its record names other folders than its own)",
                path: home,
                source: std::io::ErrorKind::InvalidData.into(),
            });
        }
        let mut saved = pooled.vm.clone();
        // The sandbox's own choices for the VM: its host cgroup and the pod's namespace.
        saved.config.cgroup_procs = self.record.vm.config.cgroup_procs.clone();
        if let Some((netns, _)) = &self.netns {
            saved.config.netns = Some(netns.clone());
        }
        self.record.vm = saved.clone();
        self.record.agent_address = pooled.agent_address.clone();
        self.record.memory_block_size = pooled.memory_block_size;
        // Named in the VM's folder first: found from there if this record becomes unreadable.
        crate::factory::mark_adopter(&self.store, &vm, self.id()).map_err(|source| {
            SandboxError::Io {
                action: "name the adopting sandbox in",
                path: self.store.vm_home(&vm),
                source,
            }
        })?;
        self.record.factory_vm = Some(vm.clone());
        self.record.mark("factory-vm-taken");
        self.store.save_sandbox(lock, &self.record)?;
        if let Err(e) = handout.adopted().await {
            // The record decides: the factory finds it when it sweeps.
            tracing::warn!(vm = %vm, error = %crate::ErrorChain(&e), "telling the factory the VM was adopted");
        }
        tracing::info!(vm = %vm, "adopted a VM of the factory");
        self.hypervisor.adopt(saved)?;
        self.join_host_cgroup()?;
        self.restore_priority();
        self.adopt_network(lock).await?;
        let agent = self.checked_agent().await?;
        super::sync_guest_clock(agent.as_ref()).await;
        let version = agent.version().await?;
        let guest = agent.guest_details().await?;
        self.configure_guest_network(agent.as_ref()).await?;
        crate::guest_telemetry::watch(self.record.id.as_str(), &agent);
        self.agent = Some(agent);
        self.grow_to_pod(lock, pod_size).await?;
        self.record.vm = self.hypervisor.save()?;
        self.record.mark("agent-ready");
        self.store.save_sandbox(lock, &self.record)?;
        let total = t0.elapsed();
        tracing::info!(ms = total.as_millis() as u64, "factory VM ready");
        Ok(BootReport {
            accelerator: self.record.vm.config.accelerator,
            agent: version,
            guest,
            timings: BootTimings {
                vm_started: Duration::ZERO,
                agent_ready: total,
                total,
            },
        })
    }

    /// Hot-plugs the VM (booted at the configured size) up to the pod's own size, which
    /// then stays its floor ([`crate::state::SandboxRecord::pod_size`]).
    async fn grow_to_pod(&mut self, lock: &SandboxLock, pod: VmSize) -> Result<(), SandboxError> {
        let now = self.record.vm.config.size();
        if pod.vcpus <= now.vcpus && pod.memory_mib <= now.memory_mib {
            return Ok(());
        }
        self.record.pod_size = Some(pod);
        self.store.save_sandbox(lock, &self.record)?;
        let target = VmSize {
            vcpus: pod.vcpus.max(now.vcpus),
            memory_mib: pod.memory_mib.max(now.memory_mib),
        };
        self.apply_size(lock, target).await?;
        self.record.mark("factory-vm-sized");
        Ok(())
    }

    /// Moves the VM's processes (QEMU and its helpers, each with all its threads) into the
    /// sandbox's host cgroup, when it has one. Memory they charged before stays charged where
    /// it was (cgroup v2 does not move charges); what they allocate from now on is the pod's.
    fn join_host_cgroup(&self) -> Result<(), SandboxError> {
        let files = &self.record.vm.config.cgroup_procs;
        if files.is_empty() {
            // No cgroup of the pod's: the creator's, where a VM booted for it would be (not
            // the factory's, whose stop or limits must not reach a sandbox's VM).
            self.join_creators_cgroup();
            return Ok(());
        }
        for process in self.hypervisor.pids() {
            for file in files {
                std::fs::write(file, process.pid.to_string()).map_err(|source| {
                    SandboxError::Io {
                        action: "move the factory VM's processes into",
                        path: file.clone(),
                        source,
                    }
                })?;
            }
        }
        Ok(())
    }

    /// Gives every thread of the VM's processes the normal CPU priority again: the factory
    /// boots its VMs niced ([`crate::factory::daemon::POOL_NICE`]) so that refilling the pool
    /// does not slow the pods starting, and a pod's VM must not stay behind others'. Best
    /// effort: a thread that cannot be changed is logged.
    fn restore_priority(&self) {
        for process in self.hypervisor.pids() {
            let tasks = format!("/proc/{}/task", process.pid);
            let Ok(entries) = std::fs::read_dir(&tasks) else {
                continue;
            };
            for tid in entries
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
            {
                // SAFETY: setpriority(2) with plain integers; a thread that is gone fails with
                // ESRCH, which is ignored.
                let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, 0) };
                if r != 0 {
                    let e = std::io::Error::last_os_error();
                    if e.raw_os_error() != Some(libc::ESRCH) {
                        tracing::warn!(tid, error = %e, "restoring the priority of a VM thread");
                    }
                }
            }
        }
    }

    /// Moves the VM's processes into this process's own cgroup (each v1 hierarchy, or v2).
    /// Best effort: a hierarchy that refuses is logged.
    fn join_creators_cgroup(&self) {
        let text = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let root = std::path::Path::new(crate::host_cgroup::CGROUP_ROOT);
        let files: Vec<std::path::PathBuf> = text
            .lines()
            .filter_map(|line| {
                let mut parts = line.splitn(3, ':');
                let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
                let relative = path.trim_start_matches('/');
                let hierarchy = match controllers {
                    "" => root.to_path_buf(),
                    named => root.join(named.trim_start_matches("name=")),
                };
                let file = hierarchy.join(relative).join("cgroup.procs");
                file.exists().then_some(file)
            })
            .collect();
        for process in self.hypervisor.pids() {
            for file in &files {
                if let Err(e) = std::fs::write(file, process.pid.to_string()) {
                    tracing::warn!(file = %file.display(), pid = process.pid, error = %e, "moving a factory VM's process into its creator's cgroup");
                }
            }
        }
    }

    /// The agent of the adopted VM, once it answers a check.
    async fn checked_agent(&mut self) -> Result<Arc<dyn Agent>, SandboxError> {
        let agent = self.agent().await?;
        match tokio::time::timeout(AGENT_CHECK_TIMEOUT, agent.check()).await {
            Ok(Ok(())) => Ok(agent),
            Ok(Err(e)) => {
                self.agent = None;
                Err(e.into())
            }
            Err(_) => {
                self.agent = None;
                Err(AgentError::Timeout {
                    method: "Check",
                    timeout: AGENT_CHECK_TIMEOUT,
                }
                .into())
            }
        }
    }
}
