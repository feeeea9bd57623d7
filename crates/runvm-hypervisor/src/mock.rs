//! A recording, scriptable hypervisor for unit tests of the layers above.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use crate::{
    AgentAddress, Capabilities, Hypervisor, HypervisorError, OnSpawn, Result, SavedProcess,
    VmConfig, VmProcess, VmSize,
};

/// The lifecycle state the mock tracks, to refuse calls out of order like a real backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MockState {
    /// Nothing done yet.
    New,
    /// `prepare` succeeded.
    Prepared,
    /// `start` succeeded.
    Running,
    /// `pause` succeeded.
    Paused,
    /// `stop` ran.
    Stopped,
}

impl MockState {
    fn name(self) -> &'static str {
        match self {
            MockState::New => "not prepared",
            MockState::Prepared => "prepared",
            MockState::Running => "running",
            MockState::Paused => "paused",
            MockState::Stopped => "stopped",
        }
    }
}

/// What the mock saw and what it is told to do. Shared, so a test keeps a handle after moving
/// the mock into the code under test.
#[derive(Debug, Default)]
pub struct MockLog {
    /// Calls in order: "prepare", "start", "stop", "pause", "resume", "check".
    pub calls: Vec<String>,
    /// The config given to `prepare`.
    pub config: Option<VmConfig>,
    /// When set, `start` fails with `QemuExited` carrying this stderr.
    pub fail_start: Option<String>,
    /// When set, `check` reports the VM exited with this stderr.
    pub vm_died: Option<String>,
    /// The processes `start` "spawns", one after the other, each told to its `on_spawn`.
    pub processes: Vec<SavedProcess>,
    /// What each call of `on_spawn` was told, in order.
    pub recorded: Vec<Vec<SavedProcess>>,
    /// A file read right after each `on_spawn` returned (e.g. the sandbox's record, to check
    /// that the process was on disk before `start` went on); its contents go to `probed`.
    pub probe: Option<PathBuf>,
    /// What `probe` held after each `on_spawn`.
    pub probed: Vec<String>,
    /// When set, `resize` fails with this reason, the VM unchanged.
    pub fail_resize: Option<String>,
}

/// A hypervisor that starts nothing and records every call.
#[derive(Debug)]
pub struct MockHypervisor {
    state: MockState,
    log: Arc<Mutex<MockLog>>,
    agent: AgentAddress,
    console: Vec<String>,
}

impl MockHypervisor {
    /// A mock whose agent address is a hybrid-vsock socket at `agent_socket`.
    pub fn new(agent_socket: impl Into<PathBuf>) -> Self {
        MockHypervisor {
            state: MockState::New,
            log: Arc::default(),
            agent: AgentAddress::HybridVsock {
                uds_path: agent_socket.into(),
                port: 1024,
            },
            console: vec!["mock console".into()],
        }
    }

    /// A mock standing for a VM that another process started (as `Qemu::attach` gives), sharing
    /// `log` with the mock that "started" it.
    pub fn attached(
        agent_socket: impl Into<PathBuf>,
        log: Arc<Mutex<MockLog>>,
        paused: bool,
    ) -> Self {
        let mut hv = MockHypervisor::new(agent_socket);
        hv.log = log;
        hv.state = if paused {
            MockState::Paused
        } else {
            MockState::Running
        };
        hv
    }

    /// The shared log of calls and the knobs.
    pub fn log(&self) -> Arc<Mutex<MockLog>> {
        Arc::clone(&self.log)
    }

    /// The current state.
    pub fn state(&self) -> MockState {
        self.state
    }

    fn record(&self, call: &str) {
        self.log
            .lock()
            .expect("mock log lock")
            .calls
            .push(call.to_string());
    }

    fn require(&self, operation: &'static str, ok: &[MockState]) -> Result<()> {
        if ok.contains(&self.state) {
            Ok(())
        } else {
            Err(HypervisorError::InvalidState {
                operation,
                state: self.state.name(),
            })
        }
    }
}

#[async_trait]
impl Hypervisor for MockHypervisor {
    async fn prepare(&mut self, config: VmConfig) -> Result<()> {
        self.record("prepare");
        self.require("prepare", &[MockState::New])?;
        self.log.lock().expect("mock log lock").config = Some(config);
        self.state = MockState::Prepared;
        Ok(())
    }

    async fn start(&mut self, on_spawn: &mut OnSpawn<'_>) -> Result<()> {
        self.record("start");
        self.require("start", &[MockState::Prepared])?;
        let processes = self.log.lock().expect("mock log lock").processes.clone();
        for n in 1..=processes.len() {
            let so_far = &processes[..n];
            if let Err(source) = on_spawn(so_far) {
                self.state = MockState::Stopped;
                return Err(HypervisorError::RecordFailed {
                    program: "mock",
                    pid: so_far[n - 1].pid,
                    source,
                });
            }
            let mut log = self.log.lock().expect("mock log lock");
            log.recorded.push(so_far.to_vec());
            if let Some(probe) = log.probe.clone() {
                log.probed
                    .push(std::fs::read_to_string(probe).unwrap_or_default());
            }
        }
        if let Some(stderr) = self.log.lock().expect("mock log lock").fail_start.clone() {
            self.state = MockState::Stopped;
            return Err(HypervisorError::QemuExited {
                status: "exit status: 1".into(),
                stderr,
            });
        }
        self.state = MockState::Running;
        Ok(())
    }

    async fn stop(&mut self, _graceful_timeout: Duration) -> Result<()> {
        self.record("stop");
        self.state = MockState::Stopped;
        Ok(())
    }

    async fn pause(&mut self) -> Result<()> {
        self.record("pause");
        self.require("pause", &[MockState::Running])?;
        self.state = MockState::Paused;
        Ok(())
    }

    async fn resume(&mut self) -> Result<()> {
        self.record("resume");
        self.require("resume", &[MockState::Paused])?;
        self.state = MockState::Running;
        Ok(())
    }

    async fn check(&mut self) -> Result<()> {
        self.record("check");
        if let Some(stderr) = self.log.lock().expect("mock log lock").vm_died.clone() {
            return Err(HypervisorError::QemuExited {
                status: "signal: 9 (SIGKILL)".into(),
                stderr,
            });
        }
        Ok(())
    }

    async fn resize(&mut self, target: VmSize) -> Result<VmSize> {
        self.record(&format!("resize {} {}", target.vcpus, target.memory_mib));
        self.require("resize", &[MockState::Running])?;
        let mut log = self.log.lock().expect("mock log lock");
        let config = log.config.as_mut().ok_or(HypervisorError::InvalidState {
            operation: "resize",
            state: "not prepared",
        })?;
        let boot = VmSize {
            vcpus: config.vcpus,
            memory_mib: config.memory_mib,
        };
        crate::qemu::resize::check_target(boot, config.max_size(), target)?;
        if let Some(reason) = log.fail_resize.clone() {
            return Err(HypervisorError::Resize {
                vcpus: target.vcpus,
                memory_mib: target.memory_mib,
                reason,
            });
        }
        let Some(config) = log.config.as_mut() else {
            return Ok(target);
        };
        // As QEMU: vCPUs are only added, memory follows the target.
        while config.size().vcpus < target.vcpus {
            let id = format!("vcpu{}", config.size().vcpus);
            config.hotplugged.cpus.push(id);
        }
        config.hotplugged.memory_mib = crate::qemu::resize::requested_mib(
            boot.memory_mib,
            target.memory_mib,
            config.hotplug_memory_mib(),
        );
        Ok(config.size())
    }

    async fn add_net_device(&mut self, device: &crate::NetDevice) -> Result<()> {
        self.record(&format!("add_net_device {}", device.id));
        self.require("hot-add a network card", &[MockState::Running])?;
        let mut log = self.log.lock().expect("mock log lock");
        if let Some(config) = log.config.as_mut() {
            config.net_devices.push(device.clone());
        }
        Ok(())
    }

    async fn remove_net_device(&mut self, id: &str) -> Result<()> {
        self.record(&format!("remove_net_device {id}"));
        self.require("hot-remove a network card", &[MockState::Running])?;
        let mut log = self.log.lock().expect("mock log lock");
        if let Some(config) = log.config.as_mut() {
            config.net_devices.retain(|d| d.id != id);
        }
        Ok(())
    }

    fn save(&self) -> Result<crate::VmState> {
        let config = self
            .log
            .lock()
            .expect("mock log lock")
            .config
            .clone()
            .ok_or(HypervisorError::InvalidState {
                operation: "save",
                state: self.state.name(),
            })?;
        let processes = self.log.lock().expect("mock log lock").processes.clone();
        Ok(crate::VmState {
            config,
            processes,
            paused: self.state == MockState::Paused,
        })
    }

    fn detach(&mut self) {
        self.record("detach");
        self.state = MockState::Stopped;
    }

    fn adopt(&mut self, saved: crate::VmState) -> Result<()> {
        self.require("adopt", &[MockState::New])?;
        self.record("adopt");
        let mut log = self.log.lock().expect("mock log lock");
        log.config = Some(saved.config);
        log.processes = saved.processes;
        drop(log);
        self.state = if saved.paused {
            MockState::Paused
        } else {
            MockState::Running
        };
        Ok(())
    }

    fn agent_address(&self) -> Result<AgentAddress> {
        Ok(self.agent.clone())
    }

    fn pids(&self) -> Vec<VmProcess> {
        Vec::new()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            pause: true,
            shared_fs: true,
            block_hotplug: false,
        }
    }

    fn console_tail(&self, lines: usize) -> Vec<String> {
        let skip = self.console.len().saturating_sub(lines);
        self.console[skip..].to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Accelerator, VsockBackend};

    fn config() -> VmConfig {
        VmConfig {
            vcpus: 1,
            memory_mib: 256,
            kernel: "/k".into(),
            initrd: "/i".into(),
            kernel_params: vec![],
            accelerator: Accelerator::Tcg,
            shared_dir: None,
            vsock: VsockBackend::VhostUser,
            run_dir: "/tmp/x".into(),
            netns: None,
            net_devices: Vec::new(),
            hotplug_ports: 0,
            vhost_net: false,
            tcg_tb_size_mib: 0,
            cgroup_procs: Vec::new(),
            max_vcpus: 0,
            max_memory_mib: 0,
            hotplugged: Default::default(),
        }
    }

    #[tokio::test]
    async fn mock_refuses_out_of_order_calls_and_records_them() {
        let mut hv = MockHypervisor::new("/tmp/agent.sock");
        let err = hv
            .start(&mut crate::ignore_spawns)
            .await
            .unwrap_err()
            .to_string();
        assert_eq!(err, "cannot start: the VM is not prepared");
        hv.prepare(config()).await.unwrap();
        hv.start(&mut crate::ignore_spawns).await.unwrap();
        assert!(hv.resume().await.is_err());
        hv.pause().await.unwrap();
        hv.resume().await.unwrap();
        hv.stop(Duration::from_secs(1)).await.unwrap();
        let log = hv.log();
        let log = log.lock().unwrap();
        assert_eq!(
            log.calls,
            ["start", "prepare", "start", "resume", "pause", "resume", "stop"]
        );
        assert_eq!(log.config.as_ref().unwrap().memory_mib, 256);
    }

    #[tokio::test]
    async fn mock_start_failure_is_scriptable() {
        let mut hv = MockHypervisor::new("/tmp/agent.sock");
        hv.log().lock().unwrap().fail_start = Some("bad option".into());
        hv.prepare(config()).await.unwrap();
        let err = hv
            .start(&mut crate::ignore_spawns)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("bad option"), "{err}");
        assert_eq!(hv.state(), MockState::Stopped);
    }

    #[tokio::test]
    async fn a_spawn_that_cannot_be_recorded_fails_the_start() {
        let mut hv = MockHypervisor::new("/tmp/agent.sock");
        hv.log().lock().unwrap().processes = vec![SavedProcess {
            name: "qemu".into(),
            pid: 42,
            start_time: 1,
        }];
        hv.prepare(config()).await.unwrap();
        let mut refuse = |_: &[SavedProcess]| -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync>> {
            Err("disk full".into())
        };
        let err = hv.start(&mut refuse).await.unwrap_err();
        assert!(
            matches!(err, HypervisorError::RecordFailed { pid: 42, .. }),
            "{err}"
        );
        assert_eq!(hv.state(), MockState::Stopped);
    }
}
