//! Sizing the running VM to its containers (see [`crate::sizing`]): on container create,
//! update and delete, the VM's vCPUs and memory are hot-plugged to the base plus the
//! containers' limits, and the agent onlines what was added. The size reached is recorded in
//! `sandbox.json` (the VM config's `hotplugged`), where another process finds it.

use std::time::Duration;

use runvm_hypervisor::VmSize;

use super::Sandbox;
use crate::error::SandboxError;
use crate::id::ContainerId;
use crate::pod_config::Workload;
use crate::sizing::{self, ContainerNeed};
use crate::state::State;
use crate::store::SandboxLock;

/// How long the agent waits for hot-added vCPUs to show in the guest.
const ONLINE_WAIT: Duration = Duration::from_secs(20);

/// A change to the sandbox's containers that a resize accounts for.
#[derive(Debug, Clone, Copy)]
pub(super) enum Change<'a> {
    /// The containers as recorded.
    None,
    /// Container `id` (new or updated) with this workload.
    Set(&'a ContainerId, Workload),
}

impl Sandbox {
    /// The workloads of the sandbox's containers that are not stopped (a stopped one's
    /// resources are not kept, as in Kata), with `change` applied.
    fn container_needs(&self, change: Change<'_>) -> Result<Vec<ContainerNeed>, SandboxError> {
        let mut out = Vec::new();
        for id in &self.record.containers {
            if let Change::Set(changed, _) = change {
                if changed == id {
                    continue;
                }
            }
            let c = self.container(id)?;
            if c.state == State::Stopped {
                continue;
            }
            out.push(ContainerNeed {
                id: id.to_string(),
                workload: sizing::spec_workload(&c.spec),
            });
        }
        if let Change::Set(id, workload) = change {
            out.push(ContainerNeed {
                id: id.to_string(),
                workload,
            });
        }
        Ok(out)
    }

    /// The size the VM should have after `change`, or `None` when it has no hotplug (booted
    /// without room above its boot size, or not running). A need past the VM's maxima is
    /// refused naming the value and the configuration key; nothing is changed.
    pub(super) fn plan_size(&self, change: Change<'_>) -> Result<Option<VmSize>, SandboxError> {
        let vm = &self.record.vm.config;
        // A factory VM's boot size is the factory's; the pod's own size is its floor.
        let floor = self.record.pod_size.unwrap_or(VmSize {
            vcpus: 0,
            memory_mib: 0,
        });
        let boot = VmSize {
            vcpus: vm.vcpus.max(floor.vcpus),
            memory_mib: vm.memory_mib.max(floor.memory_mib),
        };
        let max = vm.max_size();
        if max == boot || !matches!(self.record.state, State::Ready | State::Running) {
            return Ok(None);
        }
        let h = &self.record.config.hypervisor;
        let base = VmSize {
            vcpus: h.vcpus,
            memory_mib: h.memory_mib,
        };
        let needs = self.container_needs(change)?;
        Ok(Some(sizing::target(base, boot, max, &needs)?))
    }

    /// Resizes the VM to `target` (from [`plan_size`](Self::plan_size)), records the size
    /// reached under `lock`, and has the agent online what was added.
    pub(super) async fn apply_size(
        &mut self,
        lock: &SandboxLock,
        target: VmSize,
    ) -> Result<VmSize, SandboxError> {
        let before = self.record.vm.config.size();
        let resized = self.hypervisor.resize(target).await;
        // Whatever was done is recorded, even when the resize failed part-way.
        let mut record = self.store.load_sandbox(&self.record.id)?;
        record.vm = self.hypervisor.save()?;
        self.store.save_sandbox(lock, &record)?;
        self.record = record;
        let reached = resized?;
        tracing::info!(
            vcpus = reached.vcpus,
            memory_mib = reached.memory_mib,
            from_vcpus = before.vcpus,
            from_memory_mib = before.memory_mib,
            "VM resized"
        );
        if reached.vcpus != before.vcpus || reached.memory_mib > before.memory_mib {
            let agent = self.agent().await?;
            let onlined = agent.online_cpu_mem(reached.vcpus, ONLINE_WAIT).await?;
            tracing::debug!(?onlined, "guest onlined the hot-plugged resources");
        }
        Ok(reached)
    }

    /// Sizes the VM to its recorded containers again, after a failure or a removal; a failure
    /// is logged (the containers' own limits still hold in the guest).
    pub(super) async fn resize_best_effort(&mut self, lock: &SandboxLock) {
        let resized = match self.plan_size(Change::None) {
            Ok(Some(target)) => self.apply_size(lock, target).await.map(|_| ()),
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        };
        if let Err(e) = resized {
            tracing::warn!(error = %e, "resizing the VM to its containers");
        }
    }

    /// The VM's size now (boot size plus what was hot-plugged), as recorded.
    pub fn vm_size(&self) -> VmSize {
        self.record.vm.config.size()
    }
}
