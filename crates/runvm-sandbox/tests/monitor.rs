//! The monitor on a real VM: QEMU killed with SIGKILL is noticed, the containers exit, and
//! nothing is left. In its own test binary so that its boot does not overlap another.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use runvm_sandbox::container::bundle::default_spec;
use runvm_sandbox::sandbox::create_qemu_sandbox;
use runvm_sandbox::state::State;
use runvm_sandbox::SandboxId;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_killed_is_noticed_containers_exit_and_nothing_is_left() {
    let host = Host::new();
    let id = SandboxId::parse("mon").unwrap();
    let (mut sb, _) = create_qemu_sandbox(&host.config, id, BTreeMap::new())
        .await
        .expect("boot");
    let spec = default_spec(&["sleep", "1000"], false);
    let _io = create(&mut sb, "c1", host.bundle("c1", &spec), stdio(false, false)).await;
    sb.start_container(&cid("c1")).await.unwrap();
    let qemu = sb.pids().into_iter().find(|p| p.name == "qemu").unwrap();
    std::process::Command::new("kill")
        .args(["-KILL", &qemu.pid.to_string()])
        .status()
        .unwrap();
    let failure = tokio::time::timeout(
        Duration::from_secs(10),
        sb.monitor(Duration::from_millis(500)),
    )
    .await
    .expect("VM death noticed in time")
    .unwrap();
    assert!(failure.to_string().contains("the VM exited"), "{failure}");
    let st = sb.status().unwrap();
    assert_eq!(st.state, State::Stopped);
    assert_eq!(st.containers[0].state, State::Stopped);
    assert_eq!(st.containers[0].exit_status, Some(137));
    sb.delete(false).await.unwrap();
    host.assert_nothing_left();
}
