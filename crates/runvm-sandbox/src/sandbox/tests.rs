//! Unit tests of the boot path against the mock hypervisor and mock agent.

use std::sync::{Arc, Mutex};

use runvm_hypervisor::mock::{MockHypervisor, MockLog};

use super::*;
use crate::agent::{MockAgentConnector, MockAgentState};

struct Fixture {
    _root: tempfile::TempDir,
    sandbox: Sandbox,
    vm: Arc<Mutex<MockLog>>,
    agent: Arc<Mutex<MockAgentState>>,
}

fn fixture(boot_timeout: Duration) -> Fixture {
    let root = tempfile::tempdir().unwrap();
    let id = SandboxId::parse("sb1").unwrap();
    let dir = root.path().join("sb1");
    let settings = SandboxSettings {
        vm: VmConfig {
            vcpus: 1,
            memory_mib: 256,
            kernel: "/k".into(),
            initrd: "/i".into(),
            kernel_params: vec![],
            accelerator: Accelerator::Tcg,
            shared_dir: Some(SharedDir {
                path: dir.join("shared"),
                tag: SHARED_FS_TAG.into(),
            }),
            vsock: VsockBackend::VhostUser,
            run_dir: dir.join("vm"),
        },
        boot_timeout,
        stop_timeout: Duration::from_secs(1),
    };
    let hv = MockHypervisor::new(dir.join("vm/vsock.hv"));
    let vm = hv.log();
    let connector = MockAgentConnector::new();
    let agent = connector.state();
    let sandbox = Sandbox::new(id, root.path(), settings, Box::new(hv), Box::new(connector));
    Fixture {
        _root: root,
        sandbox,
        vm,
        agent,
    }
}

#[tokio::test]
async fn boot_reports_version_and_stop_shuts_agent_then_vm_down() {
    let mut f = fixture(Duration::from_secs(5));
    let report = f.sandbox.start().await.unwrap();
    assert_eq!(report.agent.agent_version, "0.0.0-mock");
    assert_eq!(report.accelerator, Accelerator::Tcg);
    assert!(f.sandbox.dir().join("shared").is_dir());
    f.sandbox.stop().await.unwrap();
    assert_eq!(f.vm.lock().unwrap().calls.last().unwrap(), "stop");
    assert_eq!(f.agent.lock().unwrap().calls.last().unwrap(), "shutdown");
    assert!(!f.sandbox.dir().exists(), "sandbox folder removed");
}

#[tokio::test]
async fn boot_retries_until_the_agent_listens() {
    let mut f = fixture(Duration::from_secs(5));
    f.agent.lock().unwrap().refuse_connects = 3;
    f.sandbox.start().await.unwrap();
    assert_eq!(f.agent.lock().unwrap().connects, 4);
    f.sandbox.stop().await.unwrap();
}

#[tokio::test]
async fn silent_agent_times_out_with_console_and_leaves_nothing() {
    let mut f = fixture(Duration::from_millis(300));
    f.agent.lock().unwrap().never_answer = true;
    let err = f.sandbox.start().await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, SandboxError::AgentTimeout { .. }), "{text}");
    assert!(
        text.contains("within 300 ms") && text.contains("mock console"),
        "{text}"
    );
    assert!(text.contains("connection refused (mock)"), "{text}");
    assert_eq!(f.vm.lock().unwrap().calls.last().unwrap(), "stop");
    assert!(!f.sandbox.dir().exists());
}

#[tokio::test]
async fn vm_death_during_boot_is_reported_not_waited_out() {
    let mut f = fixture(Duration::from_secs(30));
    f.agent.lock().unwrap().never_answer = true;
    f.vm.lock().unwrap().vm_died = Some("guest panicked".into());
    let started = Instant::now();
    let err = f.sandbox.start().await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(matches!(err, SandboxError::VmDied { .. }), "{err}");
    assert!(err.to_string().contains("guest panicked"));
    assert!(!f.sandbox.dir().exists());
}

#[tokio::test]
async fn failed_vm_start_cleans_up_and_keeps_the_cause() {
    let mut f = fixture(Duration::from_secs(5));
    f.vm.lock().unwrap().fail_start = Some("qemu: -device foo: not found".into());
    let err = f.sandbox.start().await.unwrap_err().to_string();
    assert!(err.contains("-device foo"), "{err}");
    assert!(!f.sandbox.dir().exists());
    assert_eq!(f.agent.lock().unwrap().connects, 0);
}

#[tokio::test]
async fn existing_sandbox_folder_is_not_touched() {
    let mut f = fixture(Duration::from_secs(5));
    std::fs::create_dir_all(f.sandbox.dir()).unwrap();
    std::fs::write(f.sandbox.dir().join("keep"), "x").unwrap();
    let err = f.sandbox.start().await.unwrap_err();
    assert!(matches!(err, SandboxError::AlreadyExists { .. }), "{err}");
    assert!(f.sandbox.dir().join("keep").exists());
    assert!(f.vm.lock().unwrap().calls.is_empty());
}

#[test]
fn settings_put_vm_files_in_the_sandbox_folder() {
    let mut config = Config::default();
    config.runtime.root = "/run/test-root".into();
    config.hypervisor.accelerator = runvm_hypervisor::AccelMode::Tcg;
    config.hypervisor.vsock = VsockMode::VhostUser;
    let s = sandbox_settings(&config, &SandboxId::parse("p1").unwrap()).unwrap();
    assert_eq!(s.vm.run_dir, PathBuf::from("/run/test-root/p1/vm"));
    assert_eq!(
        s.vm.shared_dir.unwrap().path,
        PathBuf::from("/run/test-root/p1/shared")
    );
    assert_eq!(s.vm.accelerator, Accelerator::Tcg);
    assert_eq!(s.vm.vsock, VsockBackend::VhostUser);
}

#[test]
fn random_cids_skip_reserved_values() {
    for _ in 0..100 {
        assert!(random_cid() >= 3);
    }
}
