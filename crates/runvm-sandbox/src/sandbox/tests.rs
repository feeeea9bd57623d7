//! Unit tests of the sandbox model against the mock hypervisor and the mock agent.

use std::sync::{Arc, Mutex};

use runvm_hypervisor::mock::{MockHypervisor, MockLog};
use runvm_hypervisor::{Accelerator, SharedDir, VsockBackend};

use super::*;
use crate::agent::{MockAgentConnector, MockAgentState, ProcessRef, RpcCode, StdioSpec};
use crate::config::VsockMode;
use crate::container::bundle;
use crate::container::share::is_mounted;
use crate::id::ContainerId;
use crate::state::StdioRecord;

pub(super) struct Fixture {
    pub(super) root: tempfile::TempDir,
    pub(super) config: Config,
    pub(super) settings: SandboxSettings,
    pub(super) vm: Arc<Mutex<MockLog>>,
    pub(super) connector: MockAgentConnector,
    hv: Option<MockHypervisor>,
}

pub(super) fn fixture(boot_timeout: Duration) -> Fixture {
    let root = tempfile::tempdir().unwrap();
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
        boot_timeout,
        stop_timeout: Duration::from_secs(1),
        ready_signal: false,
        netns: None,
        network_model: Default::default(),
        host_cgroup: None,
    };
    let mut config = Config::default();
    config.runtime.root = root.path().to_path_buf();
    let hv = MockHypervisor::new(dir.join("vm/vsock.hv"));
    Fixture {
        vm: hv.log(),
        hv: Some(hv),
        connector: MockAgentConnector::new(),
        root,
        config,
        settings,
    }
}

impl Fixture {
    pub(super) fn store(&self) -> Store {
        Store::new(self.root.path().to_path_buf())
    }

    pub(super) fn agent(&self) -> Arc<Mutex<MockAgentState>> {
        self.connector.state()
    }

    pub(super) async fn create(&mut self) -> Result<(Sandbox, BootReport), SandboxError> {
        Sandbox::create(
            self.store(),
            SandboxId::parse("sb1").unwrap(),
            &self.config,
            self.settings.clone(),
            BTreeMap::from([("team".to_string(), "a".to_string())]),
            Box::new(self.hv.take().unwrap()),
            Arc::new(self.connector.clone()),
        )
        .await
    }

    /// A second handle on the same sandbox, as another process would get it.
    pub(super) fn fetch(&self, paused: bool) -> Sandbox {
        let vm = Arc::clone(&self.vm);
        let socket = self.root.path().join("sb1/vm/vsock.hv");
        Sandbox::fetch(
            self.store(),
            &SandboxId::parse("sb1").unwrap(),
            move |_record| Ok(Box::new(MockHypervisor::attached(socket, vm, paused))),
            Arc::new(self.connector.clone()),
        )
        .unwrap()
    }

    fn bundle(&self, name: &str, args: &[&str]) -> PathBuf {
        let dir = self.root.path().join("bundles").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        bundle::busybox_bundle(&dir, &bundle::default_spec(args, false)).unwrap();
        dir
    }
}

#[tokio::test]
async fn each_vm_process_is_in_the_record_on_disk_before_start_goes_on() {
    let mut f = fixture(Duration::from_secs(5));
    let procs: Vec<runvm_hypervisor::SavedProcess> = [("virtiofsd", 101), ("qemu", 102)]
        .into_iter()
        .map(|(name, pid)| runvm_hypervisor::SavedProcess {
            name: name.into(),
            pid,
            start_time: 7,
        })
        .collect();
    {
        let mut log = f.vm.lock().unwrap();
        log.processes = procs.clone();
        log.probe = Some(f.root.path().join("sb1/sandbox.json"));
    }
    let (sb, _) = f.create().await.unwrap();
    let log = f.vm.lock().unwrap();
    assert_eq!(log.probed.len(), 2);
    for (n, on_disk) in log.probed.iter().enumerate() {
        let record: crate::state::SandboxRecord = serde_json::from_str(on_disk).unwrap();
        assert_eq!(record.vm.processes, procs[..=n], "after spawn {n}");
    }
    assert_eq!(sb.record().vm.processes, procs);
}

impl Fixture {
    /// A created sandbox running container `c1` (`sleep 100`).
    async fn running_sleeper(&mut self) -> Sandbox {
        let (mut sb, _) = self.create().await.unwrap();
        let bundle = self.bundle("c1", &["sleep", "100"]);
        sb.create_container(new_container("c1", bundle))
            .await
            .unwrap();
        sb.start_container(&cid("c1")).await.unwrap();
        sb
    }
}

pub(super) fn cid(s: &str) -> ContainerId {
    ContainerId::parse(s).unwrap()
}

pub(super) fn new_container(id: &str, bundle: PathBuf) -> NewContainer {
    NewContainer {
        id: cid(id),
        bundle: crate::container::spec::Bundle::load(&bundle, id).unwrap(),
        stdio: StdioSpec {
            stdout: true,
            stderr: true,
            ..Default::default()
        },
        stdio_paths: StdioRecord::default(),
        annotations: BTreeMap::new(),
    }
}

#[tokio::test]
async fn create_boots_the_vm_persists_a_ready_sandbox_and_reports() {
    let mut f = fixture(Duration::from_secs(5));
    let (mut sb, report) = f.create().await.unwrap();
    assert_eq!(report.agent.agent_version, "0.0.0-mock");
    assert_eq!(report.accelerator, Accelerator::Tcg);
    assert!(sb.dir().join("shared").is_dir());
    assert_eq!(sb.state().unwrap(), State::Ready);
    let on_disk = f.store().load_sandbox(sb.id()).unwrap();
    assert_eq!(on_disk.annotations["team"], "a");
    assert!(on_disk.agent_address.is_some());
    let phases: Vec<&str> = on_disk
        .timeline
        .iter()
        .map(|(p, _)| p.as_str())
        .filter(|p| *p != "config-loaded") // present if a test of this process loaded one
        .collect();
    assert_eq!(
        phases,
        [
            "created",
            "vm-started",
            "agent-ready",
            "guest:kernel-started",
            "guest:init-entered",
            "guest:modules-loaded",
            "guest:agent-listening"
        ]
    );
    // The mock guest answered 0.5 s after its agent listened (its clock at 1.0 s and 1.5 s).
    let at = |name: &str| on_disk.timeline.iter().find(|(p, _)| p == name).unwrap().1;
    let before_report = at("guest:agent-listening") + 500_000_000;
    assert!(before_report <= crate::state::unix_now_ns());
    sb.stop().await.unwrap();
    assert_eq!(f.agent().lock().unwrap().calls.last().unwrap(), "shutdown");
    assert_eq!(sb.state().unwrap(), State::Stopped);
    sb.delete(false).await.unwrap();
    assert!(
        !f.root.path().join("sb1").exists(),
        "sandbox folder removed"
    );
}

#[tokio::test]
async fn boot_retries_until_the_agent_listens() {
    let mut f = fixture(Duration::from_secs(5));
    f.agent().lock().unwrap().refuse_connects = 3;
    let (mut sb, _) = f.create().await.unwrap();
    assert_eq!(f.agent().lock().unwrap().connects, 4);
    sb.stop().await.unwrap();
}

#[tokio::test]
async fn silent_agent_times_out_with_console_and_leaves_nothing() {
    let mut f = fixture(Duration::from_millis(300));
    f.agent().lock().unwrap().never_answer = true;
    let err = f.create().await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, SandboxError::AgentTimeout { .. }), "{text}");
    assert!(
        text.contains("within 300 ms") && text.contains("mock console"),
        "{text}"
    );
    assert!(text.contains("connection refused (mock)"), "{text}");
    assert_eq!(f.vm.lock().unwrap().calls.last().unwrap(), "stop");
    assert!(!f.root.path().join("sb1").exists());
}

#[tokio::test]
async fn vm_death_during_boot_is_reported_not_waited_out() {
    let mut f = fixture(Duration::from_secs(30));
    f.agent().lock().unwrap().never_answer = true;
    f.vm.lock().unwrap().vm_died = Some("guest panicked".into());
    let started = Instant::now();
    let err = f.create().await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(matches!(err, SandboxError::VmDied { .. }), "{err}");
    assert!(err.to_string().contains("guest panicked"));
    assert!(!f.root.path().join("sb1").exists());
}

#[tokio::test]
async fn failed_vm_start_cleans_up_and_keeps_the_cause() {
    let mut f = fixture(Duration::from_secs(5));
    f.vm.lock().unwrap().fail_start = Some("qemu: -device foo: not found".into());
    let err = f.create().await.unwrap_err().to_string();
    assert!(err.contains("-device foo"), "{err}");
    assert!(!f.root.path().join("sb1").exists());
    assert_eq!(f.agent().lock().unwrap().connects, 0);
}

#[tokio::test]
async fn existing_sandbox_is_not_touched() {
    let mut f = fixture(Duration::from_secs(5));
    std::fs::create_dir_all(f.root.path().join("sb1")).unwrap();
    std::fs::write(f.root.path().join("sb1/keep"), "x").unwrap();
    let err = f.create().await.unwrap_err();
    assert!(matches!(err, SandboxError::AlreadyExists { .. }), "{err}");
    assert!(f.root.path().join("sb1/keep").exists());
    assert!(f.vm.lock().unwrap().calls.is_empty());
}

#[tokio::test]
async fn container_lifecycle_is_persisted_and_shares_are_undone() {
    let mut f = fixture(Duration::from_secs(5));
    let (mut sb, _) = f.create().await.unwrap();
    let bundle = f.bundle("c1", &["sh", "-c", "exit 3"]);
    let status = sb
        .create_container(new_container("c1", bundle))
        .await
        .unwrap();
    assert_eq!(status.state, State::Ready);
    let rootfs_share = sb.dir().join("shared/c1/rootfs");
    assert!(is_mounted(&rootfs_share));
    {
        let agent = f.agent();
        let a = agent.lock().unwrap();
        let req = &a.containers["c1"].request;
        assert_eq!(req.spec["root"]["path"], "/run/runvm/shared/c1/rootfs");
        assert_eq!(req.storages[0].mount_point, "/run/runvm/shared");
    }
    sb.start_container(&cid("c1")).await.unwrap();
    assert_eq!(
        sb.state().unwrap(),
        State::Running,
        "first start runs the sandbox"
    );
    f.agent()
        .lock()
        .unwrap()
        .processes
        .get_mut(&ProcessRef::init("c1"))
        .unwrap()
        .exit_code = 3;
    let exit = sb.wait(&cid("c1"), "").await.unwrap();
    assert_eq!(exit.code, 3);
    let record = f.store().load_container(sb.id(), &cid("c1")).unwrap();
    assert_eq!(
        (record.state, record.init.exit_status),
        (State::Stopped, Some(3))
    );
    // A stopped container answers wait from its record.
    assert_eq!(sb.wait(&cid("c1"), "").await.unwrap().code, 3);
    sb.delete_container(&cid("c1"), false).await.unwrap();
    assert!(!is_mounted(&rootfs_share));
    assert!(sb.containers().unwrap().is_empty());
    sb.delete(true).await.unwrap();
}

#[tokio::test]
async fn illegal_container_changes_are_refused_with_both_states() {
    let mut f = fixture(Duration::from_secs(5));
    let (mut sb, _) = f.create().await.unwrap();
    let bundle = f.bundle("c1", &["sleep", "100"]);
    sb.create_container(new_container("c1", bundle.clone()))
        .await
        .unwrap();
    let e = sb
        .resume_container(&cid("c1"))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("container c1 is ready"), "{e}");
    sb.start_container(&cid("c1")).await.unwrap();
    let e = sb.start_container(&cid("c1")).await.unwrap_err();
    assert_eq!(e.kind(), crate::ErrorKind::FailedPrecondition);
    let e = crate::ErrorChain(&e).to_string();
    assert!(e.contains("cannot go from running to running"), "{e}");
    let e = sb
        .delete_container(&cid("c1"), false)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("stop it first, or force"), "{e}");
    let e = sb
        .create_container(new_container("c1", bundle))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("exists already"), "{e}");
    sb.signal(&cid("c1"), "", 15, false).await.unwrap();
    assert_eq!(sb.wait(&cid("c1"), "").await.unwrap().code, 143);
    let e = sb
        .exec(
            &cid("c1"),
            ExecRequest {
                exec_id: "e1".into(),
                process: serde_json::json!({"args": ["true"], "cwd": "/"}),
                stdio: StdioSpec::default(),
                stdio_paths: StdioRecord::default(),
            },
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("container c1 is stopped: cannot exec"), "{e}");
    let e = sb.delete(false).await.unwrap_err().to_string();
    assert!(e.contains("sandbox sb1 is running: cannot delete"), "{e}");
    sb.delete(true).await.unwrap();
    assert!(!f.root.path().join("sb1").exists());
}

#[tokio::test]
async fn bad_bundle_leaves_nothing_stored_mounted_or_in_the_guest() {
    let mut f = fixture(Duration::from_secs(5));
    let (mut sb, _) = f.create().await.unwrap();
    let bundle = f.bundle("c1", &["true"]);
    let mut spec = bundle::default_spec(&["true"], false);
    spec.as_object_mut().unwrap().remove("process");
    std::fs::write(bundle.join("config.json"), spec.to_string()).unwrap();
    // Refused when the bundle is read, before anything reaches the sandbox.
    let e = crate::container::spec::Bundle::load(&bundle, "c1").unwrap_err();
    assert!(e.to_string().contains("process: missing"), "{e}");
    // The agent refusing (e.g. an unknown user) undoes the shares too.
    std::fs::write(
        bundle.join("config.json"),
        bundle::default_spec(&["true"], false).to_string(),
    )
    .unwrap();
    f.agent().lock().unwrap().fail_create = Some((
        RpcCode::InvalidArgument,
        "user \"nobody2\" not found".into(),
    ));
    let e = sb
        .create_container(new_container("c1", bundle))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("nobody2"), "{e}");
    assert!(!is_mounted(&sb.dir().join("shared/c1/rootfs")));
    assert!(f.store().list_containers(sb.id()).unwrap().is_empty());
    assert!(f.agent().lock().unwrap().containers.is_empty());
    sb.delete(true).await.unwrap();
}

#[tokio::test]
async fn another_process_picks_the_sandbox_up_from_disk() {
    let mut f = fixture(Duration::from_secs(5));
    let (mut sb, _) = f.create().await.unwrap();
    let bundle = f.bundle("c1", &["sleep", "100"]);
    sb.create_container(new_container("c1", bundle))
        .await
        .unwrap();
    sb.set_annotation("owner", Some("tests")).unwrap();
    sb.detach();
    assert!(!f.vm.lock().unwrap().calls.contains(&"stop".to_string()));

    let mut again = f.fetch(false);
    assert_eq!(again.state().unwrap(), State::Ready);
    assert_eq!(again.annotations().unwrap()["owner"], "tests");
    again.start_container(&cid("c1")).await.unwrap();
    let connects = f.agent().lock().unwrap().connects;
    assert!(connects >= 2, "the agent was reconnected ({connects})");
    again.pause().await.unwrap();
    let st = again.status().unwrap();
    assert_eq!(st.state, State::Paused);
    assert_eq!(st.containers[0].state, State::Paused);
    let e = again.pause().await.unwrap_err().to_string();
    assert!(e.contains("sandbox sb1 is paused: cannot pause"), "{e}");
    drop(again);

    let mut third = f.fetch(true);
    third.resume().await.unwrap();
    assert_eq!(third.status().unwrap().containers[0].state, State::Running);
    third.delete(true).await.unwrap();
    assert!(!f.root.path().join("sb1").exists());
}

#[tokio::test]
async fn vm_death_stops_containers_with_lost_status_and_cleans_up() {
    let mut f = fixture(Duration::from_secs(5));
    let mut sb = f.running_sleeper().await;
    f.vm.lock().unwrap().vm_died = Some("killed".into());
    let failure = tokio::time::timeout(
        Duration::from_secs(5),
        sb.monitor(Duration::from_millis(50)),
    )
    .await
    .expect("noticed within the bound")
    .unwrap();
    assert!(matches!(failure, VmFailure::VmExited(_)), "{failure}");
    let st = sb.status().unwrap();
    assert_eq!(st.state, State::Stopped);
    assert_eq!(st.containers[0].state, State::Stopped);
    assert_eq!(st.containers[0].exit_status, Some(137));
    assert!(!is_mounted(&sb.dir().join("shared/c1/rootfs")));
    assert_eq!(f.vm.lock().unwrap().calls.last().unwrap(), "stop");
    sb.delete(false).await.unwrap();
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

#[tokio::test]
async fn kill_ends_the_vm_without_grace_and_marks_containers_killed() {
    let mut f = fixture(Duration::from_secs(5));
    let mut sb = f.running_sleeper().await;
    sb.kill().await.unwrap();
    assert!(
        !f.agent()
            .lock()
            .unwrap()
            .calls
            .iter()
            .any(|c| c == "shutdown" || c == "remove_container"),
        "no graceful steps"
    );
    assert_eq!(f.vm.lock().unwrap().calls.last().unwrap(), "stop");
    let st = sb.status().unwrap();
    assert_eq!(st.state, State::Stopped);
    assert_eq!(st.containers[0].exit_status, Some(KILLED_EXIT_STATUS));
    assert!(!is_mounted(&sb.dir().join("shared/c1/rootfs")));
    sb.delete(false).await.unwrap();
    assert!(!f.root.path().join("sb1").exists());
}

/// What an exec's stand-in does (another process picking the sandbox up): streams, exec,
/// relay, wait — over one agent connection, one ExecProcess call, the exit recorded.
#[tokio::test]
async fn an_exec_uses_one_agent_connection_and_its_handle_records_the_exit() {
    let mut f = fixture(Duration::from_secs(5));
    let (mut sb, _) = f.create().await.unwrap();
    let bundle = f.bundle("c1", &["sleep", "100"]);
    sb.create_container(new_container("c1", bundle))
        .await
        .unwrap();
    sb.start_container(&cid("c1")).await.unwrap();
    sb.detach();
    let before = {
        let agent = f.agent();
        let mut a = agent.lock().unwrap();
        let p = a.processes.entry(ProcessRef::exec("c1", "e1")).or_default();
        p.stdout = b"from the exec\n".to_vec();
        p.exit_code = 7;
        a.calls.clear();
        a.connects
    };

    let mut standin = f.fetch(false);
    let mut stdio = StdioSpec::attached(false);
    let streams = standin.open_streams(&mut stdio).await.unwrap();
    standin
        .exec(
            &cid("c1"),
            crate::sandbox::ExecRequest {
                exec_id: "e1".into(),
                process: serde_json::json!({"args": ["true"], "cwd": "/"}),
                stdio,
                stdio_paths: StdioRecord::default(),
            },
        )
        .await
        .unwrap();
    let process = standin
        .process(&cid("c1"), "e1", Some(streams))
        .await
        .unwrap();
    let mut out = Vec::new();
    process
        .relay(tokio::io::empty(), &mut out, tokio::io::sink())
        .await
        .unwrap();
    assert_eq!(out, b"from the exec\n");
    assert_eq!(process.wait().await.unwrap().code, 7);

    let (connects, calls) = {
        let agent = f.agent();
        let a = agent.lock().unwrap();
        (a.connects, a.calls.clone())
    };
    assert_eq!(connects - before, 1, "one agent connection for the exec");
    let execs = calls.iter().filter(|c| *c == "exec_process").count();
    assert_eq!(execs, 1, "{calls:?}");
    let record = f.store().load_container(standin.id(), &cid("c1")).unwrap();
    assert_eq!(record.execs["e1"].exit_status, Some(7));
    standin.delete(true).await.unwrap();
}
