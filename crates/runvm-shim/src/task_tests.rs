//! Unit tests of the task service over `MockProvider`: sandboxes on the mock hypervisor and
//! the mock agent, no VM, no containerd. The same requests as `tests/ctr.rs` and
//! `tests/cri.rs` send, checked at the service's edge: answers, ttrpc codes, events.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use containerd_shim::api::{
    CreateTaskRequest, DeleteRequest, ExecProcessRequest, KillRequest, PidsRequest, StartRequest,
    StateRequest, StatsRequest, WaitRequest,
};
use containerd_shim::protos::events::task::{TaskCreate, TaskDelete, TaskExit, TaskOOM, TaskStart};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::protos::ttrpc::Code;
use containerd_shim::protos::types::task::Status;
use containerd_shim::ExitSignal;
use runvm_sandbox::agent::{MockAgentState, ProcessRef};
use runvm_sandbox::config::Config;
use runvm_sandbox::container::bundle::{busybox_bundle, default_spec};
use runvm_sandbox::sandbox::MockProvider;
use runvm_sandbox::SandboxId;
use tokio::sync::mpsc::UnboundedReceiver;

use super::TaskService;
use crate::error::ShimError;
use crate::events::{Event, Events};
use crate::pod::{CONTAINER_TYPE, SANDBOX_ID};
use crate::service::{Inner, ShimExit};

/// A task service over a mock provider, its events captured.
struct Harness {
    svc: TaskService,
    provider: Arc<MockProvider>,
    events: UnboundedReceiver<Event>,
    dir: tempfile::TempDir,
}

fn harness() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.runtime.root = dir.path().join("state");
    let provider = Arc::new(MockProvider::new());
    let (events, rx) = Events::discard();
    let inner = Inner::new(
        config,
        None,
        Arc::clone(&provider) as _,
        events,
        ShimExit(Arc::new(ExitSignal::default())),
    );
    Harness {
        svc: TaskService {
            inner: Arc::new(inner),
        },
        provider,
        events: rx,
        dir,
    }
}

impl Harness {
    /// A busybox bundle for `id` running `args`, with `annotations` in its spec.
    fn bundle(&self, id: &str, args: &[&str], annotations: &[(&str, &str)]) -> String {
        let path = self.dir.path().join("bundles").join(id);
        std::fs::create_dir_all(&path).unwrap();
        let mut spec = default_spec(args, false);
        let map: BTreeMap<String, String> = annotations
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        spec["annotations"] = serde_json::to_value(map).unwrap();
        busybox_bundle(&path, &spec).unwrap();
        path.display().to_string()
    }

    async fn create(&self, id: &str, bundle: String) -> Result<u32, ShimError> {
        let req = CreateTaskRequest {
            id: id.into(),
            bundle,
            ..Default::default()
        };
        self.svc.inner.create(&req).await
    }

    /// Container `id` in its own VM (a standalone container, as `ctr run` makes).
    async fn create_own(&self, id: &str, args: &[&str]) -> u32 {
        let bundle = self.bundle(id, args, &[]);
        self.create(id, bundle).await.unwrap()
    }

    /// A pod: its sandbox container `pod` and container `ctr` in the pod's VM.
    async fn create_pod(&self, pod: &str, ctr: &str) {
        let sandbox = self.bundle(
            pod,
            &["sh"],
            &[(CONTAINER_TYPE, "sandbox"), (SANDBOX_ID, pod)],
        );
        self.create(pod, sandbox).await.unwrap();
        let member = self.bundle(
            ctr,
            &["sh"],
            &[(CONTAINER_TYPE, "container"), (SANDBOX_ID, pod)],
        );
        self.create(ctr, member).await.unwrap();
    }

    fn agent(&self) -> Arc<Mutex<MockAgentState>> {
        self.provider.agent()
    }

    /// Scripts process `exec_id` of container `id`: it runs until signalled.
    fn runs_until_signalled(&self, id: &str, exec_id: &str) {
        let process = ProcessRef {
            container_id: id.into(),
            exec_id: exec_id.into(),
        };
        let agent = self.agent();
        let mut agent = agent.lock().unwrap();
        agent.processes.entry(process).or_default().until_signalled = true;
    }

    async fn start(&self, id: &str, exec_id: &str) -> Result<u32, ShimError> {
        self.svc
            .do_start(&StartRequest {
                id: id.into(),
                exec_id: exec_id.into(),
                ..Default::default()
            })
            .await
    }

    fn state(&self, id: &str, exec_id: &str) -> Result<(Status, u32), ShimError> {
        let s = self.svc.do_state(&StateRequest {
            id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        })?;
        Ok((s.status.enum_value_or_default(), s.exit_status))
    }

    async fn wait(&self, id: &str, exec_id: &str) -> u32 {
        let req = WaitRequest {
            id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        tokio::time::timeout(Duration::from_secs(10), self.svc.do_wait(&req))
            .await
            .expect("the process never exited")
            .unwrap()
            .exit_status
    }

    async fn kill(&self, id: &str, exec_id: &str, signal: u32) -> Result<(), ShimError> {
        self.svc
            .do_kill(&KillRequest {
                id: id.into(),
                exec_id: exec_id.into(),
                signal,
                ..Default::default()
            })
            .await
    }

    async fn delete(&self, id: &str, exec_id: &str) -> Result<u32, ShimError> {
        let r = self
            .svc
            .do_delete(&DeleteRequest {
                id: id.into(),
                exec_id: exec_id.into(),
                ..Default::default()
            })
            .await?;
        Ok(r.exit_status)
    }

    fn exec(&self, id: &str, exec_id: &str, args: &[&str]) -> Result<(), ShimError> {
        let process = serde_json::json!({"args": args, "cwd": "/", "user": {"uid": 0, "gid": 0}});
        self.svc.do_exec(&ExecProcessRequest {
            id: id.into(),
            exec_id: exec_id.into(),
            spec: MessageField::some(Any {
                type_url: "types.containerd.io/opencontainers/runtime-spec/1/Process".into(),
                value: serde_json::to_vec(&process).unwrap(),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    /// The events published so far.
    fn drain_events(&mut self) -> Vec<Event> {
        std::iter::from_fn(|| self.events.try_recv().ok()).collect()
    }

    fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.dir.path().join("state").join(id)
    }
}

impl Drop for Harness {
    /// A test that leaves its sandbox running (or fails half-way) leaves the bundles' bind
    /// mounts in the sandbox's shared folder: they go, so the temporary folder can.
    fn drop(&mut self) {
        let prefix = self.dir.path().display().to_string();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        for target in mounts.lines().filter_map(|l| l.split(' ').nth(4)) {
            if target.starts_with(&prefix) {
                let _ = nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }
}

fn topics(events: &[Event]) -> Vec<&'static str> {
    events.iter().map(Event::topic).collect()
}

/// The shim's own teardown runs behind the answer to Delete: wait for it.
async fn torn_down(h: &Harness) {
    h.svc.inner.finish_teardown().await;
}

#[tokio::test]
async fn a_pods_sandbox_container_makes_the_vm_and_its_containers_join_it() {
    let mut h = harness();
    h.create_pod("pod1", "c1").await;
    let created = h.provider.created();
    assert_eq!(created.len(), 1, "one VM for the pod: {created:?}");
    assert_eq!(created[0].id, SandboxId::parse("pod1").unwrap());
    assert!(
        created[0].with_spec,
        "the sandbox container's spec goes to the VM"
    );
    assert_eq!(created[0].annotations[CONTAINER_TYPE], "sandbox");
    let in_guest: Vec<String> = h
        .agent()
        .lock()
        .unwrap()
        .containers
        .keys()
        .cloned()
        .collect();
    assert_eq!(in_guest, ["c1", "pod1"]);
    let events = h.drain_events();
    assert_eq!(topics(&events), ["/tasks/create", "/tasks/create"]);
    let create = events[1].body::<TaskCreate>().unwrap();
    assert_eq!(create.container_id, "c1");
    assert!(create.bundle.ends_with("bundles/c1"), "{}", create.bundle);
}

#[tokio::test]
async fn start_runs_the_init_and_its_exit_status_reaches_wait_state_and_events() {
    let mut h = harness();
    h.create_own("t2", &["sh", "-c", "exit 3"]).await;
    assert_eq!(h.state("t2", "").unwrap(), (Status::CREATED, 0));
    h.agent()
        .lock()
        .unwrap()
        .processes
        .get_mut(&ProcessRef::init("t2"))
        .unwrap()
        .exit_code = 3;
    h.start("t2", "").await.unwrap();
    assert_eq!(h.wait("t2", "").await, 3);
    assert_eq!(h.state("t2", "").unwrap(), (Status::STOPPED, 3));
    let events = h.drain_events();
    assert_eq!(
        topics(&events),
        ["/tasks/create", "/tasks/start", "/tasks/exit"]
    );
    assert_eq!(events[1].body::<TaskStart>().unwrap().container_id, "t2");
    let exit = events[2].body::<TaskExit>().unwrap();
    assert_eq!((exit.id.as_str(), exit.exit_status), ("t2", 3));
    assert_eq!(h.delete("t2", "").await.unwrap(), 3);
    torn_down(&h).await;
}

#[tokio::test]
async fn the_init_runs_until_killed_and_exits_with_128_plus_the_signal() {
    let h = harness();
    h.create_own("t3", &["sleep", "100"]).await;
    h.runs_until_signalled("t3", "");
    h.start("t3", "").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(h.state("t3", "").unwrap().0, Status::RUNNING);
    h.kill("t3", "", 9).await.unwrap();
    assert_eq!(h.wait("t3", "").await, 137);
    let init = ProcessRef::init("t3");
    assert_eq!(h.agent().lock().unwrap().processes[&init].signals, [9]);
}

#[tokio::test]
async fn killing_a_finished_process_is_not_found_process_already_finished() {
    let h = harness();
    h.create_own("t4", &["true"]).await;
    h.start("t4", "").await.unwrap();
    h.wait("t4", "").await;
    let err = h.kill("t4", "", 15).await.unwrap_err();
    assert_eq!(err.code(), Code::NOT_FOUND, "{err}");
    assert!(
        err.to_string().contains("process already finished"),
        "{err}"
    );
}

#[tokio::test]
async fn an_exec_runs_in_the_running_container_with_its_own_exit_and_events() {
    let mut h = harness();
    h.create_own("t5", &["sleep", "100"]).await;
    h.runs_until_signalled("t5", "");
    h.start("t5", "").await.unwrap();
    h.exec("t5", "e1", &["sh", "-c", "exit 4"]).unwrap();
    assert_eq!(h.state("t5", "e1").unwrap(), (Status::CREATED, 0));
    h.agent()
        .lock()
        .unwrap()
        .processes
        .entry(ProcessRef {
            container_id: "t5".into(),
            exec_id: "e1".into(),
        })
        .or_default()
        .exit_code = 4;
    h.start("t5", "e1").await.unwrap();
    assert_eq!(h.wait("t5", "e1").await, 4);
    assert_eq!(
        h.state("t5", "").unwrap().0,
        Status::RUNNING,
        "the init runs on"
    );
    assert_eq!(h.delete("t5", "e1").await.unwrap(), 4);
    let err = h.state("t5", "e1").unwrap_err();
    assert_eq!(err.code(), Code::NOT_FOUND, "{err}");
    let events = h.drain_events();
    assert_eq!(
        topics(&events),
        [
            "/tasks/create",
            "/tasks/start",
            "/tasks/exec-added",
            "/tasks/exec-started",
            "/tasks/exit"
        ]
    );
    assert_eq!(events[4].body::<TaskExit>().unwrap().id, "e1");
}

#[tokio::test]
async fn an_exec_needs_a_running_container_and_a_new_id() {
    let h = harness();
    h.create_own("t6", &["sleep", "100"]).await;
    let err = h.exec("t6", "e1", &["true"]).unwrap_err();
    assert_eq!(err.code(), Code::FAILED_PRECONDITION, "{err}");
    h.runs_until_signalled("t6", "");
    h.start("t6", "").await.unwrap();
    h.exec("t6", "e1", &["true"]).unwrap();
    let err = h.exec("t6", "e1", &["true"]).unwrap_err();
    assert_eq!(err.code(), Code::ALREADY_EXISTS, "{err}");
    let err = h.exec("nope", "e2", &["true"]).unwrap_err();
    assert_eq!(err.code(), Code::NOT_FOUND, "{err}");
}

#[tokio::test]
async fn bad_requests_get_their_codes_and_make_no_vm() {
    let h = harness();
    h.create_own("t9", &["sleep", "100"]).await;
    // The same id again: AlreadyExists, the first container untouched.
    let bundle = h.bundle("t9-again", &["true"], &[]);
    let err = h.create("t9", bundle).await.unwrap_err();
    assert_eq!(err.code(), Code::ALREADY_EXISTS, "{err}");
    assert_eq!(h.state("t9", "").unwrap().0, Status::CREATED);
    // An invalid spec routed to t9's pod: InvalidArgument naming the field.
    let bad = h.dir.path().join("bad");
    std::fs::create_dir_all(bad.join("rootfs")).unwrap();
    std::fs::write(
        bad.join("config.json"),
        r#"{"ociVersion":"1.0.2","process":{"args":"sh","cwd":"/"},"root":{"path":"rootfs"},
            "annotations":{"io.kubernetes.cri.container-type":"container",
                           "io.kubernetes.cri.sandbox-id":"t9"}}"#,
    )
    .unwrap();
    let err = h
        .create("bad", bad.display().to_string())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::INVALID_ARGUMENT, "{err}");
    assert!(err.chain().contains("process.args"), "{}", err.chain());
    // Unknown container, unknown exec.
    let err = h.start("nope", "").await.unwrap_err();
    assert_eq!(err.code(), Code::NOT_FOUND, "{err}");
    let err = h.kill("t9", "no-such-exec", 15).await.unwrap_err();
    assert_eq!(err.code(), Code::NOT_FOUND, "{err}");
    let err = h.state("nope", "").unwrap_err();
    assert_eq!(err.code(), Code::NOT_FOUND, "{err}");
    // A relative bundle path.
    let err = h.create("rel", "bundles/rel".into()).await.unwrap_err();
    assert_eq!(err.code(), Code::INVALID_ARGUMENT, "{err}");
    assert_eq!(h.provider.created().len(), 1, "a bad request made a VM");
}

#[tokio::test]
async fn a_container_of_a_pod_this_shim_does_not_run_is_not_found() {
    let h = harness();
    let member = h.bundle(
        "c1",
        &["sh"],
        &[(CONTAINER_TYPE, "container"), (SANDBOX_ID, "pod9")],
    );
    let err = h.create("c1", member).await.unwrap_err();
    assert_eq!(err.code(), Code::NOT_FOUND, "{err}");
    assert!(h.provider.created().is_empty());
    // Nothing stays of it: the same id can be created once the pod runs.
    assert_eq!(h.state("c1", "").unwrap_err().code(), Code::NOT_FOUND);
}

#[tokio::test]
async fn a_vm_that_fails_to_boot_fails_the_create_and_leaves_no_container() {
    let h = harness();
    h.provider.fail_next_boot("qemu: -device foo: not found");
    let bundle = h.bundle("t1", &["true"], &[]);
    let err = h.create("t1", bundle.clone()).await.unwrap_err();
    assert!(err.chain().contains("-device foo"), "{}", err.chain());
    assert_eq!(h.state("t1", "").unwrap_err().code(), Code::NOT_FOUND);
    assert!(!h.sandbox_dir("t1").exists());
    // A second try boots.
    h.create("t1", bundle).await.unwrap();
}

#[tokio::test]
async fn a_running_container_is_not_deleted_and_after_its_exit_the_vm_goes() {
    let mut h = harness();
    h.create_own("t7", &["sleep", "100"]).await;
    h.runs_until_signalled("t7", "");
    h.start("t7", "").await.unwrap();
    let err = h.delete("t7", "").await.unwrap_err();
    assert_eq!(err.code(), Code::FAILED_PRECONDITION, "{err}");
    h.kill("t7", "", 15).await.unwrap();
    assert_eq!(h.wait("t7", "").await, 143);
    assert_eq!(h.delete("t7", "").await.unwrap(), 143);
    torn_down(&h).await;
    assert!(!h.sandbox_dir("t7").exists(), "the VM's records went");
    let vm = h.provider.vm(&SandboxId::parse("t7").unwrap()).unwrap();
    assert!(vm.lock().unwrap().calls.iter().any(|c| c == "stop"));
    assert_eq!(h.state("t7", "").unwrap_err().code(), Code::NOT_FOUND);
    let events = h.drain_events();
    let delete = events
        .iter()
        .find(|e| e.topic() == "/tasks/delete")
        .unwrap();
    assert_eq!(delete.body::<TaskDelete>().unwrap().exit_status, 143);
    // The sandbox is gone from the service too.
    let err = h.start("t7", "").await.unwrap_err();
    assert_eq!(err.code(), Code::NOT_FOUND, "{err}");
}

#[tokio::test]
async fn deleting_a_pods_container_keeps_the_pods_vm() {
    let h = harness();
    h.create_pod("pod1", "c1").await;
    assert_eq!(h.delete("c1", "").await.unwrap(), 0);
    assert!(!h.agent().lock().unwrap().containers.contains_key("c1"));
    assert!(h.agent().lock().unwrap().containers.contains_key("pod1"));
    assert!(h.sandbox_dir("pod1").join("sandbox.json").is_file());
    let vm = h.provider.vm(&SandboxId::parse("pod1").unwrap()).unwrap();
    assert!(!vm.lock().unwrap().calls.iter().any(|c| c == "stop"));
}

#[tokio::test]
async fn pids_and_stats_come_from_the_guest() {
    let h = harness();
    h.create_own("t8", &["sleep", "100"]).await;
    h.runs_until_signalled("t8", "");
    h.start("t8", "").await.unwrap();
    let pids = h
        .svc
        .do_pids(&PidsRequest {
            id: "t8".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(pids.processes.len(), 1);
    assert_eq!(pids.processes[0].pid, 1);
    let stats = h
        .svc
        .do_stats(&StatsRequest {
            id: "t8".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let any = stats.stats.as_ref().unwrap();
    assert!(
        any.type_url.ends_with("io.containerd.cgroups.v2.Metrics"),
        "{}",
        any.type_url
    );
    use containerd_shim::protos::cgroups_v2::metrics::Metrics;
    use containerd_shim::protos::protobuf::Message;
    let metrics = Metrics::parse_from_bytes(&any.value).unwrap();
    assert_eq!(metrics.memory.usage, 1 << 20);
    assert_eq!(metrics.cpu.usage_usec, 1000);
}

#[tokio::test]
async fn the_containers_output_reaches_its_log_file_before_the_exit() {
    let h = harness();
    let log = h.dir.path().join("t10.log");
    let bundle = h.bundle("t10", &["echo", "hi"], &[]);
    let req = CreateTaskRequest {
        id: "t10".into(),
        bundle,
        stdout: format!("file://{}", log.display()),
        ..Default::default()
    };
    h.svc.inner.create(&req).await.unwrap();
    h.agent()
        .lock()
        .unwrap()
        .processes
        .get_mut(&ProcessRef::init("t10"))
        .unwrap()
        .stdout = b"hi\n".to_vec();
    h.start("t10", "").await.unwrap();
    assert_eq!(h.wait("t10", "").await, 0);
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "hi\n");
}

#[tokio::test]
async fn a_vm_that_dies_ends_every_running_process_with_137() {
    let mut h = harness();
    h.create_own("t11", &["sleep", "100"]).await;
    h.runs_until_signalled("t11", "");
    h.start("t11", "").await.unwrap();
    let vm = h.provider.vm(&SandboxId::parse("t11").unwrap()).unwrap();
    vm.lock().unwrap().vm_died = Some("killed".into());
    // The monitor checks every second.
    assert_eq!(h.wait("t11", "").await, 137);
    let events = h.drain_events();
    let exit = events.iter().find(|e| e.topic() == "/tasks/exit").unwrap();
    assert_eq!(exit.body::<TaskExit>().unwrap().exit_status, 137);
}

#[tokio::test]
async fn pause_and_resume_show_in_state_in_the_guest_and_in_events() {
    let mut h = harness();
    h.create_own("t12", &["sleep", "100"]).await;
    h.runs_until_signalled("t12", "");
    h.start("t12", "").await.unwrap();
    h.svc.set_paused("t12", true).await.unwrap();
    assert_eq!(h.state("t12", "").unwrap().0, Status::PAUSED);
    assert!(h.agent().lock().unwrap().containers["t12"].paused);
    h.svc.set_paused("t12", false).await.unwrap();
    assert_eq!(h.state("t12", "").unwrap().0, Status::RUNNING);
    assert!(!h.agent().lock().unwrap().containers["t12"].paused);
    let err = h.svc.set_paused("nope", true).await.unwrap_err();
    assert_eq!(err.code(), Code::NOT_FOUND, "{err}");
    let events = h.drain_events();
    assert_eq!(topics(&events)[2..], ["/tasks/paused", "/tasks/resumed"]);
}

#[tokio::test]
async fn an_oom_kill_in_the_guest_is_published() {
    let mut h = harness();
    h.create_own("t13", &["sleep", "100"]).await;
    h.agent().lock().unwrap().oom_kills.push_back("t13".into());
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let oom = loop {
        let events = h.drain_events();
        if let Some(e) = events.iter().find(|e| e.topic() == "/tasks/oom") {
            break e.body::<TaskOOM>().unwrap().container_id.clone();
        }
        assert!(std::time::Instant::now() < deadline, "no /tasks/oom");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(oom, "t13");
}

#[tokio::test]
async fn a_second_start_and_deleting_a_running_exec_are_refused() {
    let h = harness();
    h.create_own("t14", &["sleep", "100"]).await;
    h.runs_until_signalled("t14", "");
    h.start("t14", "").await.unwrap();
    let err = h.start("t14", "").await.unwrap_err();
    assert_eq!(err.code(), Code::FAILED_PRECONDITION, "{err}");
    h.exec("t14", "e1", &["sleep", "100"]).unwrap();
    h.runs_until_signalled("t14", "e1");
    h.start("t14", "e1").await.unwrap();
    let err = h.start("t14", "e1").await.unwrap_err();
    assert_eq!(err.code(), Code::FAILED_PRECONDITION, "{err}");
    let err = h.delete("t14", "e1").await.unwrap_err();
    assert_eq!(err.code(), Code::FAILED_PRECONDITION, "{err}");
    h.kill("t14", "e1", 9).await.unwrap();
    assert_eq!(h.wait("t14", "e1").await, 137);
    assert_eq!(h.delete("t14", "e1").await.unwrap(), 137);
    assert_eq!(h.state("t14", "").unwrap().0, Status::RUNNING);
}
