//! A sandbox: one VM with the agent answering in it, holding containers.
//!
//! Every state change is persisted through the [`Store`] under the sandbox's exclusive lock, so
//! any process can pick a sandbox up again with [`Sandbox::fetch`] and go on driving it: the
//! VM is re-attached from its saved processes and the agent is reconnected on first use,
//! without touching the guest.

mod admission;
mod adopt;
mod containers;
mod factory;
mod monitor;
mod network;
mod portfwd;
mod provider;
mod purge;
mod resize;

pub(crate) use containers::record_exit_in;
pub use containers::{ContainerStatus, ExecRequest, NewContainer};
pub use factory::{
    create_qemu_sandbox, create_qemu_sandbox_for, create_qemu_sandbox_in, factory_vm_settings,
    open_sandbox, qemu_parts, qemu_settings, resolve_vsock, sandbox_settings,
    FACTORY_VM_HOTPLUG_PORTS, SHARED_FS_TAG,
};
pub use monitor::VmFailure;
pub use provider::{MockCreated, MockProvider, NewSandbox, QemuProvider, SandboxProvider};
pub use purge::{purge, purge_vm_home, PurgeReport};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use runvm_hypervisor::{Accelerator, Hypervisor, VmConfig, VmProcess};

use tracing::Instrument;

use crate::agent::{Agent, AgentConnector, AgentError, AgentVersion, GuestDetails};
use crate::config::Config;
use crate::error::SandboxError;
use crate::id::SandboxId;
use crate::state::{system_time_ns, unix_now_ns, SandboxRecord, State};
use crate::store::{SandboxLock, Store, StoreError};
use crate::timeline;

/// The exit status of processes ended by [`Sandbox::kill`], or by their VM's death: 128 +
/// SIGKILL.
pub const KILLED_EXIT_STATUS: i32 = 137;
/// Lines of guest console quoted in boot errors.
const CONSOLE_LINES: usize = 20;
/// Longest wait for the sandbox's lock.
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(30);

/// Timing of one boot, measured on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootTimings {
    /// From `create` until QEMU's monitor answered (helpers included).
    pub vm_started: Duration,
    /// From QEMU's start until the agent's first answer.
    pub agent_ready: Duration,
    /// From `create` until the agent's first answer.
    pub total: Duration,
}

/// What a successful boot reports.
#[derive(Debug, Clone)]
pub struct BootReport {
    /// The accelerator the VM runs under.
    pub accelerator: Accelerator,
    /// The agent's version report.
    pub agent: AgentVersion,
    /// The guest's report of itself.
    pub guest: GuestDetails,
    /// Host-side timing.
    pub timings: BootTimings,
}

/// Settings of one sandbox, taken from the configuration.
#[derive(Debug, Clone)]
pub struct SandboxSettings {
    /// The VM to boot (its `run_dir` and `shared_dir` lie in the sandbox folder).
    pub vm: VmConfig,
    /// How long the agent may take to answer.
    pub boot_timeout: Duration,
    /// How long the guest may take to power off.
    pub stop_timeout: Duration,
    /// Wait for the agent's readiness announcement before connecting (hybrid vsock only).
    pub ready_signal: bool,
    /// The pod's network namespace (the OCI spec's), which the VM joins; `None`: no network.
    pub netns: Option<PathBuf>,
    /// How the VM joins it.
    pub network_model: crate::network::NetworkModel,
    /// The host cgroup the VM's processes go into (`linux.cgroupsPath`), made before the VM
    /// starts and removed with the sandbox; `vm.cgroup_procs` names its `cgroup.procs` files.
    pub host_cgroup: Option<crate::host_cgroup::HostCgroupRequest>,
}

/// The VM backend and agent connector a new sandbox drives.
#[derive(Debug)]
pub struct VmParts {
    /// The hypervisor backend (not prepared yet).
    pub hypervisor: Box<dyn Hypervisor>,
    /// How the agent is reached.
    pub connector: Arc<dyn AgentConnector>,
}

/// Where a new sandbox's VM comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmSource {
    /// Booted for the sandbox; `note` goes into its timeline (why not from the factory).
    Boot {
        /// A timeline phase to record first.
        note: Option<&'static str>,
    },
    /// Taken from the VM factory when it has one made from configuration `key`.
    Factory {
        /// [`crate::factory::vm_key`] of the sandbox's configuration.
        key: String,
        /// The pod's size, which the VM (booted at the configured size) is hot-plugged to.
        pod_size: runvm_hypervisor::VmSize,
    },
}

/// The state of a sandbox and its containers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxStatus {
    /// The id.
    pub id: SandboxId,
    /// The lifecycle state.
    pub state: State,
    /// Annotations.
    pub annotations: BTreeMap<String, String>,
    /// Containers in creation order.
    pub containers: Vec<ContainerStatus>,
    /// The VM's host processes.
    pub processes: Vec<VmProcess>,
}

/// One sandbox VM, its persisted record and the connection to its agent.
#[derive(Debug)]
pub struct Sandbox {
    store: Store,
    record: SandboxRecord,
    boot_timeout: Duration,
    stop_timeout: Duration,
    hypervisor: Box<dyn Hypervisor>,
    connector: Arc<dyn AgentConnector>,
    agent: Option<Arc<dyn Agent>>,
    ready_signal: bool,
    netns: Option<(PathBuf, crate::network::NetworkModel)>,
    /// How many VMs of the root may boot at once (`runtime.max_parallel_boots`).
    parallel_boots: u32,
}

impl Sandbox {
    /// Makes sandbox `id` and boots its VM: the record is stored first (so no other process can
    /// take the id), then the VM starts and the agent is waited for. The sandbox is `ready`.
    /// On error nothing is left: no process, no mount, no folder.
    pub async fn create(
        store: Store,
        id: SandboxId,
        config: &Config,
        settings: SandboxSettings,
        annotations: BTreeMap<String, String>,
        hypervisor: Box<dyn Hypervisor>,
        connector: Arc<dyn AgentConnector>,
    ) -> Result<(Sandbox, BootReport), SandboxError> {
        let parts = VmParts {
            hypervisor,
            connector,
        };
        let source = VmSource::Boot { note: None };
        Sandbox::create_from(store, id, config, settings, annotations, parts, source).await
    }

    /// As [`create`](Sandbox::create), the VM coming from `source`: booted, or taken from the
    /// VM factory ([`crate::factory`]; a miss boots, saying why in the timeline). A factory VM
    /// that cannot be adopted is ended with the sandbox and reported as
    /// [`SandboxError::FactoryVm`], after which the caller may create the sandbox again.
    #[tracing::instrument(name = "sandbox.create", skip_all, fields(sandbox = %id))]
    pub async fn create_from(
        store: Store,
        id: SandboxId,
        config: &Config,
        settings: SandboxSettings,
        annotations: BTreeMap<String, String>,
        parts: VmParts,
        source: VmSource,
    ) -> Result<(Sandbox, BootReport), SandboxError> {
        let mut record = SandboxRecord::new(id, settings.vm.clone(), config.clone());
        record.annotations = annotations;
        record.host_cgroup = settings.host_cgroup.as_ref().map(|r| r.record.clone());
        if let Some(loaded) = timeline::config_loaded_at().filter(|t| *t <= record.created_at) {
            record.timeline.insert(0, ("config-loaded".into(), loaded));
        }
        let lock = store.create_sandbox(&record).map_err(|e| match e {
            StoreError::SandboxExists { id, path } => SandboxError::AlreadyExists {
                id: id.to_string(),
                path,
            },
            other => other.into(),
        })?;
        // Recorded above, made before any process of the VM exists.
        if let Some(request) = &settings.host_cgroup {
            if let Err(e) = crate::host_cgroup::create(request) {
                if let Err(rm) = store.remove_sandbox(lock) {
                    tracing::warn!(error = %rm, "removing the sandbox after a failed cgroup");
                }
                return Err(e.into());
            }
        }
        let mut sandbox = Sandbox {
            store,
            record,
            boot_timeout: settings.boot_timeout,
            stop_timeout: settings.stop_timeout,
            hypervisor: parts.hypervisor,
            connector: parts.connector,
            agent: None,
            ready_signal: settings.ready_signal,
            netns: settings.netns.map(|p| (p, settings.network_model)),
            parallel_boots: config.runtime.parallel_boots(),
        };
        let made = match source {
            VmSource::Boot { note } => {
                if let Some(note) = note {
                    sandbox.record.mark(note);
                }
                sandbox.boot(&lock).await
            }
            VmSource::Factory { key, pod_size } => {
                let taken =
                    crate::factory::client::take(sandbox.store.root(), sandbox.id(), &key).await;
                match taken {
                    Ok(handout) => sandbox.adopt(&lock, handout, pod_size).await,
                    Err(miss) => {
                        tracing::info!(%miss, "booting a VM of its own");
                        sandbox.record.mark(&miss.phase());
                        sandbox.boot(&lock).await
                    }
                }
            }
        };
        match made {
            Ok(report) => Ok((sandbox, report)),
            Err(e) => {
                sandbox.agent = None;
                if let Err(stop) = sandbox.hypervisor.stop(Duration::ZERO).await {
                    tracing::warn!(error = %stop, "stopping the VM after a failed boot");
                }
                if let Err(net) = sandbox.teardown_network_now().await {
                    tracing::warn!(error = %net, "removing the pod network after a failed boot");
                }
                if let Some(cgroup) = &sandbox.record.host_cgroup {
                    if let Err(rm) = crate::host_cgroup::remove(cgroup) {
                        tracing::warn!(error = %rm, "removing the host cgroup after a failed boot");
                    }
                }
                let adopted = sandbox.record.factory_vm.clone();
                if let Some(vm) = &adopted {
                    // Whatever of the adopted VM is left (the stop above ends what it holds).
                    let config = sandbox.record.config.clone();
                    if let Err(rm) = purge::purge_vm_home(&sandbox.store, vm, &config).await {
                        tracing::warn!(error = %rm, "removing the factory VM after a failed adoption");
                    }
                }
                let removed = sandbox.store.remove_sandbox(lock);
                if let Err(rm) = &removed {
                    tracing::warn!(error = %rm, "removing the sandbox after a failed boot");
                }
                match adopted {
                    // Only a sandbox that is gone again may be created anew with a VM of its own.
                    Some(vm) if removed.is_ok() => Err(SandboxError::FactoryVm {
                        vm,
                        source: Box::new(e),
                    }),
                    _ => Err(e),
                }
            }
        }
    }

    #[tracing::instrument(name = "sandbox.boot", skip_all)]
    async fn boot(&mut self, lock: &SandboxLock) -> Result<BootReport, SandboxError> {
        let t0 = Instant::now();
        if let Some(share) = &self.record.vm.config.shared_dir {
            std::fs::create_dir_all(&share.path).map_err(|source| SandboxError::Io {
                action: "create shared folder",
                path: share.path.clone(),
                source,
            })?;
        }
        self.setup_network(lock).await?;
        self.hypervisor
            .prepare(self.record.vm.config.clone())
            .await?;
        let ready = self.ready_listener()?;
        // Admission: at most `parallel_boots` VMs of this root boot at once; this one may wait.
        let slot = admission::acquire(
            std::path::Path::new(admission::BOOT_SLOTS_DIR),
            self.parallel_boots,
        )
        .await?;
        tracing::debug!(
            slot = slot.index,
            waited_ms = slot.waited.as_millis() as u64,
            "boot admitted"
        );
        if slot.waited > Duration::from_millis(10) {
            self.record.mark("boot-admitted");
        }
        // Each process of the VM goes into the record the moment it exists: a creator killed
        // at any point leaves a record that `purge` (delete --force) finds everything from.
        let store = &self.store;
        let record = &mut self.record;
        let mut on_spawn = |processes: &[runvm_hypervisor::SavedProcess]| {
            record.vm.processes = processes.to_vec();
            store
                .save_sandbox(lock, record)
                .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
        };
        self.hypervisor
            .start(&mut on_spawn)
            .instrument(tracing::info_span!("vm.start"))
            .await?;
        let vm_started = t0.elapsed();
        for (phase, at) in self.hypervisor.start_marks() {
            self.record
                .timeline
                .push((phase.to_string(), system_time_ns(at)));
        }
        self.record.mark("vm-started");
        tracing::info!(ms = vm_started.as_millis() as u64, "VM started");
        let agent = self.wait_for_agent(ready).await?;
        drop(slot);
        let total = t0.elapsed();
        self.record.mark("agent-ready");
        tracing::info!(ms = total.as_millis() as u64, "agent answered");
        let version = agent.version().await?;
        let asked = unix_now_ns();
        let guest = agent.guest_details().await?;
        self.record.timeline.extend(timeline::guest_phases(
            &guest.boot_times,
            asked,
            unix_now_ns(),
        ));
        sync_guest_clock(agent.as_ref()).await;
        self.configure_guest_network(agent.as_ref()).await?;
        crate::guest_telemetry::watch(self.record.id.as_str(), &agent);
        self.agent = Some(agent);
        self.record.vm = self.hypervisor.save()?;
        self.record.agent_address = Some(self.hypervisor.agent_address()?);
        self.record.memory_block_size = Some(guest.mem_block_size_bytes);
        self.store.save_sandbox(lock, &self.record)?;
        Ok(BootReport {
            accelerator: self.record.vm.config.accelerator,
            agent: version,
            guest,
            timings: BootTimings {
                vm_started,
                agent_ready: total.saturating_sub(vm_started),
                total,
            },
        })
    }

    /// With hybrid vsock, a unix listener where vhost-device-vsock delivers the agent's
    /// readiness announcement (guest-initiated connections to port P go to `<uds>_P`).
    fn ready_listener(&self) -> Result<Option<tokio::net::UnixListener>, SandboxError> {
        if !self.ready_signal {
            return Ok(None);
        }
        let runvm_hypervisor::AgentAddress::HybridVsock { uds_path, .. } =
            self.hypervisor.agent_address()?
        else {
            return Ok(None);
        };
        let path = PathBuf::from(format!(
            "{}_{}",
            uds_path.display(),
            runvm_protocol::READY_VSOCK_PORT
        ));
        let io = |source| SandboxError::Io {
            action: "listen for the agent's readiness on",
            path: path.clone(),
            source,
        };
        let listener = tokio::net::UnixListener::bind(&path).map_err(io)?;
        // vhost-device-vsock, confined to the VM's user, connects; the run folder it lies in
        // keeps everybody else out.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).map_err(io)?;
        Ok(Some(listener))
    }

    /// Waits for the agent's readiness announcement on `ready`, up to half the boot timeout
    /// (an agent that cannot announce is then found by polling), watching the VM meanwhile.
    async fn wait_ready(&mut self, ready: tokio::net::UnixListener) -> Result<(), SandboxError> {
        let until = Instant::now() + self.boot_timeout / 2;
        loop {
            tokio::select! {
                accepted = ready.accept() => {
                    if accepted.is_ok() {
                        tracing::debug!("agent announced it listens");
                    }
                    return Ok(());
                }
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
            if let Err(e) = self.hypervisor.check().await {
                return Err(SandboxError::VmDied {
                    cause: e,
                    console: self.hypervisor.console_tail(CONSOLE_LINES),
                });
            }
            if Instant::now() >= until {
                tracing::warn!("no readiness announcement from the agent; polling for it");
                return Ok(());
            }
        }
    }

    /// Connects and health-checks the agent until it answers, the VM dies, or the boot timeout
    /// passes. With `ready`, the first connection waits for the agent's announcement: connecting
    /// to a guest whose vsock is not up yet has been seen to wedge vhost-device-vsock.
    #[tracing::instrument(name = "agent.wait", skip_all)]
    async fn wait_for_agent(
        &mut self,
        ready: Option<tokio::net::UnixListener>,
    ) -> Result<Arc<dyn Agent>, SandboxError> {
        let address = self.hypervisor.agent_address()?;
        let timeout = self.boot_timeout;
        // Stretched while a busy host starves the VM (see `admission`).
        let deadline = admission::BootDeadline::new(timeout, self.hypervisor.cpu_time());
        if let Some(ready) = ready {
            self.wait_ready(ready).await?;
        }
        let mut last_error: Option<AgentError> = None;
        let mut attempts = 0u32;
        loop {
            if let Err(e) = self.hypervisor.check().await {
                return Err(SandboxError::VmDied {
                    cause: e,
                    console: self.hypervisor.console_tail(CONSOLE_LINES),
                });
            }
            if deadline.expired(self.hypervisor.cpu_time()) {
                let mut console = self.hypervisor.console_tail(CONSOLE_LINES);
                console.extend(self.hypervisor.helper_log_tails(5));
                return Err(SandboxError::AgentTimeout {
                    timeout,
                    last_error: format!(
                        "{attempts} attempts; last: {}",
                        last_error.map(|e| e.to_string()).unwrap_or_default()
                    ),
                    console,
                });
            }
            // A guest slowed by load may take seconds to accept; an absent listener is refused
            // at once, so a generous bound per attempt costs nothing while booting.
            let attempt = deadline
                .left()
                .clamp(Duration::from_millis(100), Duration::from_secs(5));
            attempts += 1;
            match self.connector.connect(&address, attempt).await {
                Ok(agent) => match tokio::time::timeout(attempt, agent.check()).await {
                    Ok(Ok(())) => return Ok(Arc::from(agent)),
                    Ok(Err(e)) => last_error = Some(e),
                    Err(_) => {
                        last_error = Some(AgentError::Timeout {
                            method: "Check",
                            timeout: attempt,
                        })
                    }
                },
                Err(e) => last_error = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Picks up sandbox `id` from the store: `hypervisor` builds the VM handle from the record
    /// (attaching to the running VM); the agent is connected on first use. The guest is not
    /// touched.
    pub fn fetch(
        store: Store,
        id: &SandboxId,
        hypervisor: impl FnOnce(&SandboxRecord) -> Result<Box<dyn Hypervisor>, SandboxError>,
        connector: Arc<dyn AgentConnector>,
    ) -> Result<Sandbox, SandboxError> {
        let record = {
            let _lock = store.lock_shared_timeout(id, LOCK_TIMEOUT)?;
            store.load_sandbox(id)?
        };
        let hypervisor = hypervisor(&record)?;
        Ok(Sandbox {
            boot_timeout: record.config.agent.boot_timeout(),
            stop_timeout: Duration::from_millis(record.config.hypervisor.stop_timeout_ms),
            store,
            record,
            hypervisor,
            connector,
            agent: None,
            ready_signal: false,
            netns: None,
            parallel_boots: 1,
        })
    }

    /// Lets go of the sandbox without stopping it, for another process to [`fetch`] it.
    ///
    /// [`fetch`]: Sandbox::fetch
    pub fn detach(mut self) {
        self.agent = None;
        self.hypervisor.detach();
    }

    /// The sandbox id.
    pub fn id(&self) -> &SandboxId {
        &self.record.id
    }

    /// The sandbox's folder.
    pub fn dir(&self) -> PathBuf {
        self.store.sandbox_dir(&self.record.id)
    }

    /// The persisted record as this process last saw it.
    pub fn record(&self) -> &SandboxRecord {
        &self.record
    }

    /// The current state (re-read from disk).
    pub fn state(&mut self) -> Result<State, SandboxError> {
        self.reload()?;
        Ok(self.record.state)
    }

    /// The host processes of the VM.
    pub fn pids(&self) -> Vec<VmProcess> {
        self.hypervisor.pids()
    }

    /// The agent, connected on first use.
    pub async fn agent(&mut self) -> Result<Arc<dyn Agent>, SandboxError> {
        if let Some(agent) = &self.agent {
            return Ok(Arc::clone(agent));
        }
        if !self.vm_up() {
            return Err(self.wrong_state("talk to the agent", " (its VM is not running)"));
        }
        let address = match &self.record.agent_address {
            Some(a) => a.clone(),
            None => self.hypervisor.agent_address()?,
        };
        let agent: Arc<dyn Agent> =
            Arc::from(self.connector.connect(&address, self.boot_timeout).await?);
        crate::guest_telemetry::watch(self.record.id.as_str(), &agent);
        self.agent = Some(Arc::clone(&agent));
        Ok(agent)
    }

    /// Marks the sandbox as being torn down by this process until the returned lock is
    /// dropped ([`Store::hold_teardown`](crate::store::Store::hold_teardown)): another
    /// process's clean-up waits for it rather than racing it.
    pub fn hold_teardown(&self) -> Result<crate::store::SandboxLock, SandboxError> {
        Ok(self.store.hold_teardown(&self.record.id)?)
    }

    /// Drops the agent connection, if any: the next call connects afresh (after the
    /// connection broke).
    pub fn forget_agent(&mut self) {
        self.agent = None;
    }

    fn vm_up(&self) -> bool {
        !matches!(self.record.state, State::Stopped)
    }

    pub(crate) fn what(&self) -> String {
        format!("sandbox {}", self.record.id)
    }

    pub(crate) fn wrong_state(&self, operation: &'static str, hint: &'static str) -> SandboxError {
        SandboxError::WrongState {
            what: self.what(),
            state: self.record.state,
            operation,
            hint,
        }
    }

    /// Re-reads the record (another process may have changed it).
    pub(crate) fn reload(&mut self) -> Result<(), SandboxError> {
        let _lock = self
            .store
            .lock_shared_timeout(&self.record.id, LOCK_TIMEOUT)?;
        self.record = self.store.load_sandbox(&self.record.id)?;
        Ok(())
    }

    /// Runs `change` on the freshest record under the exclusive lock and saves it.
    pub(crate) fn update<T>(
        &mut self,
        change: impl FnOnce(&mut SandboxRecord) -> Result<T, SandboxError>,
    ) -> Result<T, SandboxError> {
        let lock = self
            .store
            .lock_exclusive_timeout(&self.record.id, LOCK_TIMEOUT)?;
        let mut record = self.store.load_sandbox(&self.record.id)?;
        let out = change(&mut record)?;
        self.store.save_sandbox(&lock, &record)?;
        self.record = record;
        Ok(out)
    }

    fn transition(&mut self, to: State) -> Result<(), SandboxError> {
        let what = self.what();
        self.update(|r| {
            r.transition(to)
                .map_err(|source| SandboxError::Transition { what, source })?;
            r.mark(to.as_str());
            Ok(())
        })
    }

    /// Starts the sandbox: ready (or stopped with its VM up) to running, starting every
    /// container that is ready.
    #[tracing::instrument(name = "sandbox.start", skip(self), fields(sandbox = %self.record.id))]
    pub async fn start(&mut self) -> Result<(), SandboxError> {
        self.reload()?;
        self.transition(State::Running)?;
        for id in self.record.containers.clone() {
            if self.container_status(&id)?.state == State::Ready {
                self.start_container(&id).await?;
            }
        }
        Ok(())
    }

    /// Pauses the VM (QMP `stop`); its running containers are marked paused.
    #[tracing::instrument(name = "sandbox.pause", skip(self), fields(sandbox = %self.record.id))]
    pub async fn pause(&mut self) -> Result<(), SandboxError> {
        self.reload()?;
        if self.record.state != State::Running {
            return Err(self.wrong_state("pause", ""));
        }
        self.hypervisor.pause().await?;
        let vm = self.hypervisor.save()?;
        self.update(|r| {
            r.vm = vm;
            Ok(())
        })?;
        self.transition(State::Paused)?;
        self.set_running_containers(State::Running, State::Paused)
    }

    /// Resumes the VM; its paused containers run again.
    #[tracing::instrument(name = "sandbox.resume", skip(self), fields(sandbox = %self.record.id))]
    pub async fn resume(&mut self) -> Result<(), SandboxError> {
        self.reload()?;
        if self.record.state != State::Paused {
            return Err(self.wrong_state("resume", " (only a paused sandbox resumes)"));
        }
        self.hypervisor.resume().await?;
        let vm = self.hypervisor.save()?;
        self.update(|r| {
            r.vm = vm;
            Ok(())
        })?;
        self.transition(State::Running)?;
        self.set_running_containers(State::Paused, State::Running)
    }

    /// Stops the sandbox: every container is killed and marked stopped, the agent powers the
    /// guest off, the VM and its helpers stop (by force after the stop timeout). The record
    /// stays (state `stopped`) until [`delete`](Sandbox::delete).
    #[tracing::instrument(name = "sandbox.stop", skip(self), fields(sandbox = %self.record.id))]
    pub async fn stop(&mut self) -> Result<(), SandboxError> {
        self.reload()?;
        if self.record.state == State::Stopped {
            return Ok(());
        }
        if self.record.state == State::Paused {
            self.hypervisor.resume().await?;
        }
        if let Ok(agent) = self.agent().await {
            // Graceful first: each container gets SIGTERM and the stop timeout, all at once,
            // then SIGKILL (the agent's RemoveContainer does both).
            let grace = u32::try_from(self.stop_timeout.as_secs().max(1)).unwrap_or(u32::MAX);
            let mut live = Vec::new();
            for id in self.record.containers.clone() {
                let status = self.container_status(&id)?;
                if matches!(status.state, State::Running | State::Paused | State::Ready) {
                    if status.state == State::Paused {
                        let _ = agent.resume_container(id.as_str()).await;
                    }
                    live.push(id);
                }
            }
            let removals = live.into_iter().map(|id| {
                let agent = Arc::clone(&agent);
                async move {
                    if let Err(e) = agent.remove_container(id.as_str(), grace).await {
                        tracing::warn!(container = %id, error = %e, "removing the container in the guest");
                    }
                }
            });
            let handles: Vec<_> = removals.map(tokio::spawn).collect();
            for h in handles {
                let _ = h.await;
            }
            // What the guest logged until now reaches the host before it powers off.
            crate::guest_telemetry::drain(self.record.id.as_str()).await;
            if let Err(e) = agent.shutdown().await {
                tracing::warn!(error = %e, "agent shutdown failed; stopping the VM by force");
            }
        }
        self.agent = None;
        let timeout = self.stop_timeout;
        self.hypervisor.stop(timeout).await?;
        self.mark_all_stopped(None)?;
        self.unshare_all()?;
        self.teardown_network().await?;
        self.update(|r| {
            r.state = State::Stopped;
            r.mark("stopped");
            Ok(())
        })
    }

    /// Stops the sandbox at once, for cleaning up after a crashed caller: no grace for the
    /// containers or the guest. The VM is ended (QMP `quit`, then SIGKILL), every container is
    /// marked stopped with status 137 (killed) where none was known, the shares are unmounted.
    #[tracing::instrument(name = "sandbox.kill", skip(self), fields(sandbox = %self.record.id))]
    pub async fn kill(&mut self) -> Result<(), SandboxError> {
        self.reload()?;
        if self.record.state == State::Stopped {
            return Ok(());
        }
        self.agent = None;
        self.hypervisor.stop(Duration::ZERO).await?;
        self.mark_all_stopped(Some(KILLED_EXIT_STATUS))?;
        self.unshare_all()?;
        self.teardown_network().await?;
        self.update(|r| {
            r.state = State::Stopped;
            r.mark("killed");
            Ok(())
        })
    }

    /// Removes the sandbox: refused while it runs or is paused unless `force`, which stops it
    /// first. Every container record, mount and file goes.
    #[tracing::instrument(name = "sandbox.delete", skip(self), fields(sandbox = %self.record.id))]
    pub async fn delete(&mut self, force: bool) -> Result<(), SandboxError> {
        self.reload()?;
        if matches!(self.record.state, State::Running | State::Paused) && !force {
            return Err(self.wrong_state("delete", " (stop it first, or force)"));
        }
        if self.record.state != State::Stopped {
            self.stop().await?;
        }
        self.unshare_all()?;
        // A sandbox the monitor stopped (its VM died) still has its taps and qdiscs.
        self.teardown_network().await?;
        let containers: Vec<_> = self
            .record
            .containers
            .iter()
            .filter_map(|id| self.container(id).ok())
            .collect();
        let lock = self
            .store
            .lock_exclusive_timeout(&self.record.id, LOCK_TIMEOUT)?;
        // The VM is gone: its host cgroup and folder go before the record that names them.
        if let Some(cgroup) = &self.record.host_cgroup {
            crate::host_cgroup::remove(cgroup)?;
        }
        if let Some(vm) = &self.record.factory_vm {
            self.store.remove_vm_home(vm)?;
        }
        self.store.remove_sandbox(lock)?;
        for c in &containers {
            self.run_warn_hooks(crate::container::hooks::Stage::Poststop, c)
                .await;
        }
        Ok(())
    }

    /// The sandbox's annotations.
    pub fn annotations(&mut self) -> Result<BTreeMap<String, String>, SandboxError> {
        self.reload()?;
        Ok(self.record.annotations.clone())
    }

    /// Sets (or with `None` removes) an annotation; persisted at once.
    pub fn set_annotation(&mut self, key: &str, value: Option<&str>) -> Result<(), SandboxError> {
        self.update(|r| {
            match value {
                Some(v) => r.annotations.insert(key.to_string(), v.to_string()),
                None => r.annotations.remove(key),
            };
            Ok(())
        })
    }

    /// The sandbox's and its containers' states.
    pub fn status(&mut self) -> Result<SandboxStatus, SandboxError> {
        self.reload()?;
        let containers = self
            .record
            .containers
            .clone()
            .iter()
            .map(|id| self.container_status(id))
            .collect::<Result<_, _>>()?;
        Ok(SandboxStatus {
            id: self.record.id.clone(),
            state: self.record.state,
            annotations: self.record.annotations.clone(),
            containers,
            processes: self
                .record
                .vm
                .processes
                .iter()
                .map(|p| VmProcess {
                    name: p.name.clone(),
                    pid: p.pid,
                })
                .collect(),
        })
    }

    /// The shared folder of the sandbox.
    pub(crate) fn shared_dir(&self) -> Result<&Path, SandboxError> {
        self.record
            .vm
            .config
            .shared_dir
            .as_ref()
            .map(|s| s.path.as_path())
            .ok_or_else(|| {
                self.wrong_state("share files with the guest", " (it has no shared folder)")
            })
    }
}

/// Sets the guest's wall clock to the host's (the guest read only the RTC's whole seconds at
/// boot, and a factory VM may have waited long). A failure (an older agent) is logged: the
/// guest keeps its own clock.
pub(crate) async fn sync_guest_clock(agent: &dyn Agent) {
    if let Err(e) = agent.set_guest_time(std::time::SystemTime::now()).await {
        tracing::warn!(error = %e, "cannot set the guest's clock");
    }
}

/// The sandboxes in `store`.
pub fn list(store: &Store) -> Result<Vec<SandboxId>, SandboxError> {
    Ok(store.list_sandboxes()?)
}

#[cfg(test)]
mod resize_tests;
#[cfg(test)]
mod tests;
