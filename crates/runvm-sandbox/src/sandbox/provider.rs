//! The seam through which front ends obtain sandboxes: [`SandboxProvider`] creates a new
//! sandbox or opens an existing one. [`QemuProvider`] is the real one (a VM from the factory or
//! a cold boot, decided by [`create_qemu_sandbox_for`]); [`MockProvider`] gives sandboxes over
//! [`MockHypervisor`] and the mock agent, for unit tests of the front ends without a VM.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use runvm_hypervisor::mock::{MockHypervisor, MockLog};
use runvm_hypervisor::{Accelerator, Hypervisor, SharedDir, VmConfig, VsockBackend};

use super::factory::{create_qemu_sandbox_for, open_sandbox, SHARED_FS_TAG};
use super::{BootReport, Sandbox, SandboxSettings};
use crate::agent::{MockAgentConnector, MockAgentState};
use crate::config::Config;
use crate::error::SandboxError;
use crate::id::SandboxId;
use crate::state::State;
use crate::store::Store;

/// What a new sandbox is made from (the arguments of [`create_qemu_sandbox_for`]).
#[derive(Debug, Clone)]
pub struct NewSandbox<'a> {
    /// The configuration (its `runtime.root` holds the sandbox's records).
    pub config: &'a Config,
    /// The sandbox id.
    pub id: SandboxId,
    /// The sandbox's annotations (its configuration and size, see [`crate::pod_config`]).
    pub annotations: BTreeMap<String, String>,
    /// The pod's network namespace, which the VM joins; `None`: no network.
    pub netns: Option<PathBuf>,
    /// The OCI spec of the container the VM is made for (its host cgroup and limits).
    pub spec: Option<&'a serde_json::Value>,
}

/// Where front ends (the shim, the CLI) get their sandboxes from.
#[async_trait]
pub trait SandboxProvider: Send + Sync + std::fmt::Debug {
    /// Makes sandbox `request.id` with its VM up and the agent answering (the sandbox is
    /// `ready`). On error nothing is left.
    async fn create(&self, request: NewSandbox<'_>) -> Result<(Sandbox, BootReport), SandboxError>;

    /// Picks up sandbox `id` from the records under `config.runtime.root`, re-attaching to its
    /// VM without touching the guest.
    fn open(&self, config: &Config, id: &SandboxId) -> Result<Sandbox, SandboxError>;
}

/// Sandboxes on QEMU: from the VM factory when one is configured and has a fitting VM, else
/// booted cold ([`create_qemu_sandbox_for`], [`open_sandbox`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct QemuProvider;

#[async_trait]
impl SandboxProvider for QemuProvider {
    async fn create(&self, request: NewSandbox<'_>) -> Result<(Sandbox, BootReport), SandboxError> {
        create_qemu_sandbox_for(
            request.config,
            request.id,
            request.annotations,
            request.netns,
            request.spec,
        )
        .await
    }

    fn open(&self, config: &Config, id: &SandboxId) -> Result<Sandbox, SandboxError> {
        open_sandbox(config, id)
    }
}

/// What a [`MockProvider`] was asked to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MockCreated {
    /// The sandbox id.
    pub id: SandboxId,
    /// Its annotations.
    pub annotations: BTreeMap<String, String>,
    /// The network namespace asked for (the mock VM joins none).
    pub netns: Option<PathBuf>,
    /// Whether a container spec came with it.
    pub with_spec: bool,
}

/// Sandboxes over [`MockHypervisor`] and [`crate::agent::MockAgent`], their records in the
/// configuration's `runtime.root` like real ones. All sandboxes share one mock agent state
/// (scripted and inspected through [`MockProvider::agent`]); each VM has its own
/// [`MockLog`] ([`MockProvider::vm`]). No network, no host cgroup: the netns and the spec are
/// only recorded ([`MockProvider::created`]).
#[derive(Debug, Default)]
pub struct MockProvider {
    connector: MockAgentConnector,
    vms: Mutex<HashMap<SandboxId, Arc<Mutex<MockLog>>>>,
    created: Mutex<Vec<MockCreated>>,
    fail_next_boot: Mutex<Option<String>>,
}

impl MockProvider {
    /// A provider whose agents answer everything and whose VMs boot.
    pub fn new() -> MockProvider {
        MockProvider::default()
    }

    /// The mock agents' shared state, to script and inspect.
    pub fn agent(&self) -> Arc<Mutex<MockAgentState>> {
        self.connector.state()
    }

    /// The log of sandbox `id`'s mock VM, once created or opened.
    pub fn vm(&self, id: &SandboxId) -> Option<Arc<Mutex<MockLog>>> {
        self.vms_locked().get(id).cloned()
    }

    /// What was asked for so far, in order (failed creates included).
    pub fn created(&self) -> Vec<MockCreated> {
        self.created
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Makes the next VM fail to start, as QEMU exiting with `stderr`.
    pub fn fail_next_boot(&self, stderr: impl Into<String>) {
        *self
            .fail_next_boot
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(stderr.into());
    }

    fn vms_locked(&self) -> std::sync::MutexGuard<'_, HashMap<SandboxId, Arc<Mutex<MockLog>>>> {
        self.vms.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn agent_socket(config: &Config, id: &SandboxId) -> PathBuf {
        config.runtime.root.join(id.as_str()).join("vm/vsock.hv")
    }

    /// Settings of a mock sandbox: the configured size, its folders in the sandbox folder, no
    /// readiness listener (the mock agent never announces itself).
    fn settings(config: &Config, id: &SandboxId) -> SandboxSettings {
        let dir = config.runtime.root.join(id.as_str());
        SandboxSettings {
            vm: VmConfig {
                vcpus: config.hypervisor.vcpus,
                memory_mib: config.hypervisor.memory_mib,
                kernel: config.guest.kernel.clone(),
                initrd: config.guest.initrd.clone(),
                kernel_params: Vec::new(),
                accelerator: Accelerator::Tcg,
                shared_dir: Some(SharedDir {
                    path: dir.join("shared"),
                    tag: SHARED_FS_TAG.into(),
                }),
                vsock: VsockBackend::VhostUser,
                run_dir: dir.join("vm"),
                netns: None,
                net_devices: Vec::new(),
                hotplug_ports: 0,
                vhost_net: false,
                tcg_tb_size_mib: 0,
                cgroup_procs: Vec::new(),
                max_vcpus: 0,
                max_memory_mib: 0,
                hotplugged: Default::default(),
            },
            boot_timeout: config.agent.boot_timeout(),
            stop_timeout: Duration::from_secs(1),
            ready_signal: false,
            netns: None,
            network_model: config.network.model,
            host_cgroup: None,
        }
    }
}

#[async_trait]
impl SandboxProvider for MockProvider {
    async fn create(&self, request: NewSandbox<'_>) -> Result<(Sandbox, BootReport), SandboxError> {
        self.created
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(MockCreated {
                id: request.id.clone(),
                annotations: request.annotations.clone(),
                netns: request.netns.clone(),
                with_spec: request.spec.is_some(),
            });
        let config = request.config;
        let hv = MockHypervisor::new(Self::agent_socket(config, &request.id));
        let log = hv.log();
        if let Some(stderr) = self
            .fail_next_boot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            log.lock().unwrap_or_else(|p| p.into_inner()).fail_start = Some(stderr);
        }
        self.vms_locked().insert(request.id.clone(), log);
        let store = Store::open(config.runtime.root.clone())?;
        Sandbox::create(
            store,
            request.id.clone(),
            config,
            Self::settings(config, &request.id),
            request.annotations,
            Box::new(hv),
            Arc::new(self.connector.clone()),
        )
        .await
    }

    fn open(&self, config: &Config, id: &SandboxId) -> Result<Sandbox, SandboxError> {
        let log = Arc::clone(self.vms_locked().entry(id.clone()).or_default());
        let socket = Self::agent_socket(config, id);
        Sandbox::fetch(
            Store::new(config.runtime.root.clone()),
            id,
            move |record| {
                // As `open_sandbox`: a stopped sandbox's VM is not attached to.
                let hv = if record.state == State::Stopped {
                    MockHypervisor::new(socket)
                } else {
                    MockHypervisor::attached(socket, log, record.state == State::Paused)
                };
                Ok(Box::new(hv) as Box<dyn Hypervisor>)
            },
            Arc::new(self.connector.clone()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(root: &std::path::Path) -> Config {
        let mut config = Config::default();
        config.runtime.root = root.to_path_buf();
        config
    }

    fn request<'a>(config: &'a Config, id: &str) -> NewSandbox<'a> {
        NewSandbox {
            config,
            id: SandboxId::parse(id).unwrap(),
            annotations: BTreeMap::from([("team".into(), "a".into())]),
            netns: Some("/run/netns/pod".into()),
            spec: None,
        }
    }

    #[tokio::test]
    async fn a_mock_sandbox_is_recorded_in_the_root_and_opens_again() {
        let root = tempfile::tempdir().unwrap();
        let config = config(root.path());
        let provider: Arc<dyn SandboxProvider> = Arc::new(MockProvider::new());
        let (sb, report) = provider.create(request(&config, "sb1")).await.unwrap();
        assert_eq!(report.agent.agent_version, "0.0.0-mock");
        assert!(root.path().join("sb1/sandbox.json").is_file());
        sb.detach();
        let mut again = provider
            .open(&config, &SandboxId::parse("sb1").unwrap())
            .unwrap();
        assert_eq!(again.state().unwrap(), State::Ready);
        assert_eq!(again.annotations().unwrap()["team"], "a");
        // The VM is attached to: stopping it goes through the same mock VM.
        again.delete(true).await.unwrap();
        assert!(!root.path().join("sb1").exists());
    }

    #[tokio::test]
    async fn a_second_create_of_one_id_is_refused_and_the_first_stays() {
        let root = tempfile::tempdir().unwrap();
        let config = config(root.path());
        let provider = MockProvider::new();
        let (mut sb, _) = provider.create(request(&config, "sb1")).await.unwrap();
        let err = provider.create(request(&config, "sb1")).await.unwrap_err();
        assert!(matches!(err, SandboxError::AlreadyExists { .. }), "{err}");
        assert_eq!(sb.state().unwrap(), State::Ready);
        assert_eq!(provider.created().len(), 2);
        assert_eq!(
            provider.created()[0].netns,
            Some(PathBuf::from("/run/netns/pod"))
        );
        sb.delete(true).await.unwrap();
    }

    #[tokio::test]
    async fn a_failed_mock_boot_leaves_nothing_and_the_next_one_boots() {
        let root = tempfile::tempdir().unwrap();
        let config = config(root.path());
        let provider = MockProvider::new();
        provider.fail_next_boot("qemu: no such device");
        let err = provider
            .create(request(&config, "sb1"))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("no such device"), "{err}");
        assert!(!root.path().join("sb1").exists());
        let (mut sb, _) = provider.create(request(&config, "sb1")).await.unwrap();
        sb.delete(true).await.unwrap();
    }

    #[tokio::test]
    async fn the_clis_create_and_open_take_their_sandbox_from_the_provider() {
        use crate::standalone;
        let root = tempfile::tempdir().unwrap();
        let config = config(&root.path().join("state"));
        let bundle = root.path().join("bundle");
        std::fs::create_dir_all(&bundle).unwrap();
        let spec = crate::container::bundle::default_spec(&["sh"], false);
        crate::container::bundle::busybox_bundle(&bundle, &spec).unwrap();
        let id = crate::ContainerId::parse("c1").unwrap();
        let loaded = standalone::check_bundle(&config, &bundle, &id).unwrap();
        let provider = MockProvider::new();
        let (sb, _streams) = standalone::create_with(&provider, &config, &id, loaded)
            .await
            .unwrap();
        assert_eq!(provider.created()[0].id.as_str(), "c1");
        assert!(provider.created()[0].with_spec);
        assert!(provider
            .agent()
            .lock()
            .unwrap()
            .containers
            .contains_key("c1"));
        sb.detach();
        let (attached, state) = standalone::open_with(&provider, &config, &id).unwrap();
        assert_eq!(state.id, "c1");
        drop(attached);
        let mut sb = provider
            .open(&config, &SandboxId::parse("c1").unwrap())
            .unwrap();
        sb.delete(true).await.unwrap();
    }

    #[test]
    fn opening_an_unknown_sandbox_is_not_found() {
        let root = tempfile::tempdir().unwrap();
        let config = config(root.path());
        let err = MockProvider::new()
            .open(&config, &SandboxId::parse("nope").unwrap())
            .unwrap_err();
        assert!(err.is_not_found(), "{err}");
    }
}
