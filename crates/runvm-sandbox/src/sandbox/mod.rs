//! A sandbox: one VM with the agent answering in it.
//!
//! This is the boot and shutdown path; containers, persisted state and locks come on top of it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use runvm_hypervisor::qemu::{Qemu, QemuSettings};
use runvm_hypervisor::{
    Accelerator, HostCpu, Hypervisor, HypervisorError, SharedDir, VmConfig, VmProcess, VsockBackend,
};

use crate::agent::{Agent, AgentConnector, AgentError, AgentVersion, GuestDetails};
use crate::config::{resolve_program, Config, VsockMode};
use crate::error::SandboxError;
use crate::id::SandboxId;

/// The virtio-fs tag of the sandbox's shared folder.
pub const SHARED_FS_TAG: &str = "runvm";
/// Lines of guest console quoted in boot errors.
const CONSOLE_LINES: usize = 20;

/// Timing of one boot, measured on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootTimings {
    /// From `start` until QEMU's monitor answered (helpers included).
    pub vm_started: Duration,
    /// From QEMU's start until the agent's first answer.
    pub agent_ready: Duration,
    /// From `start` until the agent's first answer.
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
}

/// One sandbox VM and the connection to its agent.
#[derive(Debug)]
pub struct Sandbox {
    id: SandboxId,
    dir: PathBuf,
    settings: SandboxSettings,
    hypervisor: Box<dyn Hypervisor>,
    connector: Box<dyn AgentConnector>,
    agent: Option<Box<dyn Agent>>,
    created_dir: bool,
}

impl Sandbox {
    /// A sandbox `id` with its folder `root/id`, not started. Nothing is created yet.
    pub fn new(
        id: SandboxId,
        root: &Path,
        settings: SandboxSettings,
        hypervisor: Box<dyn Hypervisor>,
        connector: Box<dyn AgentConnector>,
    ) -> Sandbox {
        Sandbox {
            dir: root.join(id.as_str()),
            id,
            settings,
            hypervisor,
            connector,
            agent: None,
            created_dir: false,
        }
    }

    /// The sandbox id.
    pub fn id(&self) -> &SandboxId {
        &self.id
    }

    /// The sandbox's folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The host processes of the VM.
    pub fn pids(&self) -> Vec<VmProcess> {
        self.hypervisor.pids()
    }

    /// The connected agent, once started.
    pub fn agent(&self) -> Option<&dyn Agent> {
        self.agent.as_deref()
    }

    /// Boots the VM and waits for the agent. On error nothing is left: no process, no folder.
    #[tracing::instrument(skip(self), fields(sandbox = %self.id))]
    pub async fn start(&mut self) -> Result<BootReport, SandboxError> {
        if self.dir.exists() {
            return Err(SandboxError::AlreadyExists {
                id: self.id.to_string(),
                path: self.dir.clone(),
            });
        }
        let result = self.boot().await;
        if result.is_err() {
            self.cleanup(Duration::ZERO).await;
        }
        result
    }

    async fn boot(&mut self) -> Result<BootReport, SandboxError> {
        let t0 = Instant::now();
        let io = |action, path: &Path| {
            let path = path.to_path_buf();
            move |source| SandboxError::Io {
                action,
                path,
                source,
            }
        };
        std::fs::create_dir_all(&self.dir).map_err(io("create sandbox folder", &self.dir))?;
        self.created_dir = true;
        if let Some(share) = &self.settings.vm.shared_dir {
            std::fs::create_dir_all(&share.path)
                .map_err(io("create shared folder", &share.path))?;
        }
        self.hypervisor.prepare(self.settings.vm.clone()).await?;
        self.hypervisor.start().await?;
        let vm_started = t0.elapsed();
        tracing::info!(ms = vm_started.as_millis() as u64, "VM started");
        let agent = self.wait_for_agent().await?;
        let total = t0.elapsed();
        tracing::info!(ms = total.as_millis() as u64, "agent answered");
        let version = agent.version().await?;
        let guest = agent.guest_details().await?;
        self.agent = Some(agent);
        Ok(BootReport {
            accelerator: self.settings.vm.accelerator,
            agent: version,
            guest,
            timings: BootTimings {
                vm_started,
                agent_ready: total.saturating_sub(vm_started),
                total,
            },
        })
    }

    /// Connects and health-checks the agent until it answers, the VM dies, or the boot timeout
    /// passes.
    async fn wait_for_agent(&mut self) -> Result<Box<dyn Agent>, SandboxError> {
        let address = self.hypervisor.agent_address()?;
        let timeout = self.settings.boot_timeout;
        let deadline = Instant::now() + timeout;
        let mut last_error: Option<AgentError> = None;
        loop {
            if let Err(e) = self.hypervisor.check().await {
                return Err(SandboxError::VmDied {
                    source: e,
                    console: self.hypervisor.console_tail(CONSOLE_LINES),
                });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(SandboxError::AgentTimeout {
                    timeout,
                    last_error: last_error.map(|e| e.to_string()).unwrap_or_default(),
                    console: self.hypervisor.console_tail(CONSOLE_LINES),
                });
            }
            let attempt = left.min(Duration::from_secs(1));
            match self.connector.connect(&address, attempt).await {
                Ok(agent) => match tokio::time::timeout(attempt, agent.check()).await {
                    Ok(Ok(())) => return Ok(agent),
                    Ok(Err(e)) => last_error = Some(e),
                    Err(_) => {}
                },
                Err(e) => last_error = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the sandbox: the agent powers the guest off, the VM and helpers are stopped (by
    /// force after the stop timeout), and the sandbox folder is removed.
    #[tracing::instrument(skip(self), fields(sandbox = %self.id))]
    pub async fn stop(&mut self) -> Result<(), SandboxError> {
        if let Some(agent) = self.agent.take() {
            if let Err(e) = agent.shutdown().await {
                tracing::warn!(error = %e, "agent shutdown failed; stopping the VM by force");
            }
        }
        let timeout = self.settings.stop_timeout;
        self.cleanup(timeout).await;
        Ok(())
    }

    async fn cleanup(&mut self, graceful: Duration) {
        self.agent = None;
        if let Err(e) = self.hypervisor.stop(graceful).await {
            tracing::warn!(error = %e, "stopping the VM failed");
        }
        if self.created_dir {
            if let Err(e) = std::fs::remove_dir_all(&self.dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(dir = %self.dir.display(), error = %e, "cannot remove sandbox folder");
                }
            }
            self.created_dir = false;
        }
    }
}

/// Resolves the configured binaries into QEMU backend settings.
pub fn qemu_settings(config: &Config) -> Result<QemuSettings, SandboxError> {
    let h = &config.hypervisor;
    let find = |key: &'static str, name: &str, hint: &'static str| {
        resolve_program(name).ok_or_else(|| SandboxError::MissingProgram {
            key,
            name: name.to_string(),
            hint,
        })
    };
    Ok(QemuSettings {
        qemu: find(
            "hypervisor.qemu",
            &h.qemu,
            "install it with `apt-get install qemu-system-x86` (or run scripts/setup.sh)",
        )?,
        virtiofsd: find(
            "hypervisor.virtiofsd",
            &h.virtiofsd,
            "build it with scripts/setup.sh (cargo install virtiofsd into /opt/runvm)",
        )?,
        vhost_device_vsock: match resolve_vsock(h.vsock) {
            VsockBackend::VhostUser => find(
                "hypervisor.vhost_device_vsock",
                &h.vhost_device_vsock,
                "build it with scripts/setup.sh (cargo install vhost-device-vsock into /opt/runvm)",
            )?,
            // Not run with the kernel's vhost-vsock; keep the configured name for messages.
            VsockBackend::Vhost { .. } => PathBuf::from(&h.vhost_device_vsock),
        },
        start_timeout: Duration::from_millis(h.start_timeout_ms),
    })
}

/// The vsock backend for `mode` on this host.
pub fn resolve_vsock(mode: VsockMode) -> VsockBackend {
    let vhost = || VsockBackend::Vhost {
        guest_cid: random_cid(),
    };
    match mode {
        VsockMode::Vhost => vhost(),
        VsockMode::VhostUser => VsockBackend::VhostUser,
        VsockMode::Auto if Path::new("/dev/vhost-vsock").exists() => vhost(),
        VsockMode::Auto => VsockBackend::VhostUser,
    }
}

/// A guest CID unlikely to collide with another VM's (3 and above; 0 to 2 are reserved).
fn random_cid() -> u32 {
    let mut buf = [0u8; 4];
    let random = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut buf))
        .map(|()| u32::from_ne_bytes(buf))
        .unwrap_or_else(|_| std::process::id().wrapping_mul(2_654_435_761));
    3 + random % (u32::MAX - 4)
}

/// Settings for sandbox `id` under the configured root, with the accelerator resolved on this
/// host.
pub fn sandbox_settings(config: &Config, id: &SandboxId) -> Result<SandboxSettings, SandboxError> {
    let accelerator = config
        .hypervisor
        .accelerator
        .resolve(&HostCpu::detect())
        .map_err(SandboxError::Hypervisor)?;
    let dir = config.runtime.root.join(id.as_str());
    Ok(SandboxSettings {
        vm: VmConfig {
            vcpus: config.hypervisor.vcpus,
            memory_mib: config.hypervisor.memory_mib,
            kernel: config.guest.kernel.clone(),
            initrd: config.guest.initrd.clone(),
            kernel_params: config.hypervisor.kernel_params.clone(),
            accelerator,
            shared_dir: Some(SharedDir {
                path: dir.join("shared"),
                tag: SHARED_FS_TAG.into(),
            }),
            vsock: resolve_vsock(config.hypervisor.vsock),
            run_dir: dir.join("vm"),
        },
        boot_timeout: config.agent.boot_timeout(),
        stop_timeout: Duration::from_millis(config.hypervisor.stop_timeout_ms),
    })
}

/// A sandbox on QEMU talking ttrpc, as configured.
pub fn qemu_sandbox(config: &Config, id: SandboxId) -> Result<Sandbox, SandboxError> {
    let settings = sandbox_settings(config, &id)?;
    let qemu = Qemu::new(qemu_settings(config)?);
    Ok(Sandbox::new(
        id,
        &config.runtime.root,
        settings,
        Box::new(qemu),
        Box::new(crate::agent::TtrpcConnector::new(
            config.agent.request_timeout(),
        )),
    ))
}

impl From<HypervisorError> for SandboxError {
    fn from(e: HypervisorError) -> Self {
        SandboxError::Hypervisor(e)
    }
}

#[cfg(test)]
mod tests;
