//! Containers in a real VM through the sandbox library: one VM is shared by all the scenarios
//! (boots are expensive under TCG).
//!
//! Needs the host set-up, busybox-static and the guest image; `make test` provides them.

mod common;

use std::collections::BTreeMap;

use common::*;
use runvm_sandbox::container::bundle::default_spec;
use runvm_sandbox::sandbox::{create_qemu_sandbox, open_sandbox, NewContainer};
use runvm_sandbox::state::{State, StdioRecord};
use runvm_sandbox::SandboxId;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_in_one_vm() {
    let host = Host::new();
    let id = SandboxId::parse("ct").unwrap();
    let (mut sb, _) = create_qemu_sandbox(&host.config, id.clone(), BTreeMap::new())
        .await
        .expect("boot");

    // stdout, stderr and the exit code.
    let spec = default_spec(&["sh", "-c", "echo out; echo err >&2; exit 3"], false);
    let io = create(
        &mut sb,
        "echo",
        host.bundle("echo", &spec),
        stdio(false, false),
    )
    .await;
    sb.start_container(&cid("echo")).await.unwrap();
    let (out, err) = outputs(io).await;
    assert_eq!(String::from_utf8_lossy(&out), "out\n");
    assert_eq!(String::from_utf8_lossy(&err), "err\n");
    assert_eq!(sb.wait(&cid("echo"), "").await.unwrap().code, 3);
    assert_eq!(
        sb.container_status(&cid("echo")).unwrap().state,
        State::Stopped
    );
    sb.delete_container(&cid("echo"), false).await.unwrap();

    // 1 MiB through cat comes back byte-identical.
    let spec = default_spec(&["cat"], false);
    let io = create(
        &mut sb,
        "cat",
        host.bundle("cat", &spec),
        stdio(true, false),
    )
    .await;
    sb.start_container(&cid("cat")).await.unwrap();
    let data: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut back = Vec::new();
    let relayed = runvm_sandbox::process::relay(
        io,
        std::io::Cursor::new(data.clone()),
        &mut back,
        tokio::io::sink(),
    )
    .await
    .unwrap();
    assert_eq!(relayed.stdout, data.len() as u64);
    assert!(back == data, "cat returned different bytes");
    assert_eq!(sb.wait(&cid("cat"), "").await.unwrap().code, 0);
    sb.delete_container(&cid("cat"), false).await.unwrap();

    // Two long-running containers at once; exec, SIGTERM, stats, pause and resume.
    let mut inits = Vec::new();
    for name in ["a", "b"] {
        let spec = default_spec(&["sleep", "1000"], false);
        inits.push(create(&mut sb, name, host.bundle(name, &spec), stdio(false, false)).await);
        sb.start_container(&cid(name)).await.unwrap();
    }
    for name in ["a", "b"] {
        let io = exec(
            &mut sb,
            name,
            exec_req("hi", &["echo", &format!("hi from {name}")], false),
        )
        .await;
        let (out, _) = outputs(io).await;
        assert_eq!(String::from_utf8_lossy(&out), format!("hi from {name}\n"));
        assert_eq!(sb.wait(&cid(name), "hi").await.unwrap().code, 0);
        let ps = sb.processes(&cid(name)).await.unwrap();
        assert!(ps.iter().any(|p| p.cmd.contains("sleep")), "{ps:?}");
    }
    let _term = exec(&mut sb, "a", exec_req("term", &["sleep", "1000"], false)).await;
    sb.signal(&cid("a"), "term", 15, false).await.unwrap();
    assert_eq!(sb.wait(&cid("a"), "term").await.unwrap().code, 143);
    let stats = sb.stats(&cid("b")).await.unwrap();
    assert!(stats.memory.usage_bytes > 0, "{stats:?}");
    assert!(stats.cpu.usage_total_ns > 0, "{stats:?}");
    assert!(stats.pids_current >= 1, "{stats:?}");

    sb.pause().await.unwrap();
    let st = sb.status().unwrap();
    assert_eq!(st.state, State::Paused);
    assert!(st.containers.iter().all(|c| c.state == State::Paused));
    sb.resume().await.unwrap();
    assert!(sb
        .status()
        .unwrap()
        .containers
        .iter()
        .all(|c| c.state == State::Running));
    sb.pause_container(&cid("b")).await.unwrap();
    sb.resume_container(&cid("b")).await.unwrap();

    // A tty process sees its window size.
    let spec = default_spec(&["sh", "-c", "sleep 1; stty size"], true);
    let io = create(
        &mut sb,
        "tty",
        host.bundle("tty", &spec),
        stdio(false, true),
    )
    .await;
    let tty = sb.process(&cid("tty"), "", Some(io)).await.unwrap();
    tty.resize(40, 100).await.unwrap();
    sb.start_container(&cid("tty")).await.unwrap();
    let mut out = Vec::new();
    tty.relay(tokio::io::empty(), &mut out, tokio::io::sink())
        .await
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out).contains("40 100"),
        "{:?}",
        String::from_utf8_lossy(&out)
    );
    sb.wait(&cid("tty"), "").await.unwrap();

    // Bad input: nothing stored, nothing mounted.
    let mut no_cwd = default_spec(&["true"], false);
    no_cwd["process"]["cwd"] = Value::from("/no/such/dir");
    let bundle = host.bundle("nocwd", &no_cwd);
    let e = sb
        .create_container(NewContainer {
            id: cid("nocwd"),
            bundle: runvm_sandbox::container::spec::Bundle::load(&bundle, "nocwd").unwrap(),
            // No stdio: the agent refuses stdio without the host's streams, before the cwd.
            stdio: runvm_sandbox::agent::StdioSpec::default(),
            stdio_paths: StdioRecord::default(),
            annotations: BTreeMap::new(),
        })
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("/no/such/dir"), "{e}");
    assert!(!sb.containers().unwrap().contains(&cid("nocwd")));
    let e = sb
        .exec(&cid("tty"), exec_req("late", &["true"], false))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("container tty is stopped"), "{e}");

    // Another process takes over: detach, then drive the sandbox from its state on disk.
    sb.detach();
    let mut again = open_sandbox(&host.config, &id).unwrap();
    let io = exec(
        &mut again,
        "b",
        exec_req("again", &["echo", "still here"], false),
    )
    .await;
    let (out, _) = outputs(io).await;
    assert_eq!(String::from_utf8_lossy(&out), "still here\n");

    again.stop().await.unwrap();
    let st = again.status().unwrap();
    assert!(
        st.containers.iter().all(|c| c.state == State::Stopped),
        "{st:?}"
    );
    again.delete(false).await.unwrap();
    host.assert_nothing_left();
}
