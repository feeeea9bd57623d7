use std::collections::BTreeMap;
use std::path::PathBuf;

use runvm_hypervisor::{
    Accelerator, AgentAddress, SavedProcess, SharedDir, VmConfig, VsockBackend,
};

use super::*;

/// A sandbox record with every field set to something other than its default.
pub(crate) fn sample_sandbox(id: &str) -> SandboxRecord {
    let id = SandboxId::parse(id).unwrap();
    let dir = PathBuf::from("/run/runvm").join(id.as_str());
    let vm = VmConfig {
        vcpus: 2,
        memory_mib: 256,
        kernel: "/var/lib/runvm/guest/vmlinuz".into(),
        initrd: "/var/lib/runvm/guest/initrd.img".into(),
        kernel_params: vec!["quiet".into()],
        accelerator: Accelerator::Tcg,
        shared_dir: Some(SharedDir {
            path: dir.join("shared"),
            tag: "runvm".into(),
        }),
        vsock: VsockBackend::VhostUser,
        run_dir: dir.join("vm"),
        netns: None,
        net_devices: Vec::new(),
        hotplug_ports: 0,
        vhost_net: false,
        tcg_tb_size_mib: 0,
        cgroup_procs: Vec::new(),
    };
    let mut config = Config::default();
    config.hypervisor.vcpus = 2;
    let mut record = SandboxRecord::new(id, vm, config);
    record.agent_address = Some(AgentAddress::HybridVsock {
        uds_path: dir.join("vm/vsock.hv"),
        port: 1024,
    });
    record.vm.processes = vec![SavedProcess {
        name: "qemu".into(),
        pid: 4242,
        start_time: 123_456,
    }];
    record
        .annotations
        .insert("io.kubernetes.cri.sandbox-name".into(), "web".into());
    record.containers = vec![
        ContainerId::parse("c2").unwrap(),
        ContainerId::parse("c1").unwrap(),
    ];
    record.memory_block_size = Some(128 << 20);
    record.mark("vm-started");
    record
}

/// A container record with every field set to something other than its default.
pub(crate) fn sample_container(sandbox: &str, id: &str) -> ContainerRecord {
    let mut c = ContainerRecord::new(
        ContainerId::parse(id).unwrap(),
        SandboxId::parse(sandbox).unwrap(),
        "/bundles/c".into(),
        "/bundles/c/rootfs".into(),
        serde_json::json!({"ociVersion": "1.0.2", "process": {"args": ["sh"], "env": ["SECRET=1"]}}),
    );
    c.annotations.insert("a".into(), "b".into());
    c.init = ProcessRecord {
        exec_id: String::new(),
        pid: Some(7),
        stdio: StdioRecord {
            stdin: None,
            stdout: Some("/run/fifo/out".into()),
            stderr: Some("/run/fifo/err".into()),
        },
        terminal: false,
        exit_status: None,
        exited_at: None,
    };
    c.execs.insert(
        "e1".into(),
        ProcessRecord {
            exec_id: "e1".into(),
            pid: Some(9),
            terminal: true,
            exit_status: Some(3),
            exited_at: Some(99),
            ..ProcessRecord::default()
        },
    );
    c.mounts = vec![PathBuf::from("/run/runvm/p/shared/c/rootfs")];
    c
}

#[test]
fn exactly_the_seven_legal_transitions_are_accepted() {
    use State::*;
    let legal = [
        (Ready, Running),
        (Ready, Stopped),
        (Running, Paused),
        (Running, Stopped),
        (Paused, Running),
        (Paused, Stopped),
        (Stopped, Running),
    ];
    let mut refused = 0;
    for from in State::ALL {
        for to in State::ALL {
            let result = from.transition(to);
            if legal.contains(&(from, to)) {
                assert_eq!(result, Ok(to), "{from} -> {to}");
            } else {
                refused += 1;
                let err = result.unwrap_err();
                assert_eq!(err, InvalidTransition { from, to });
                let text = err.to_string();
                assert!(
                    text.starts_with(&format!("cannot go from {from} to {to}")),
                    "{text}"
                );
                for target in from.legal_targets() {
                    assert!(text.contains(target.as_str()), "{text} lacks {target}");
                }
            }
        }
    }
    assert_eq!(refused, 16 - legal.len());
}

#[test]
fn illegal_transition_message_lists_the_legal_moves() {
    let err = State::Running.transition(State::Ready).unwrap_err();
    assert_eq!(
        err.to_string(),
        "cannot go from running to ready; from running the legal moves are to paused or stopped"
    );
}

#[test]
fn records_change_state_only_on_a_legal_move() {
    let mut r = sample_sandbox("p");
    r.transition(State::Running).unwrap();
    assert!(r.transition(State::Ready).is_err());
    assert_eq!(r.state, State::Running);
    let mut c = sample_container("p", "c");
    assert!(c.transition(State::Paused).is_err());
    assert_eq!(c.state, State::Ready);
}

#[test]
fn oci_status_and_serialized_names() {
    let pairs = [
        (State::Ready, "created", "\"ready\""),
        (State::Running, "running", "\"running\""),
        (State::Paused, "paused", "\"paused\""),
        (State::Stopped, "stopped", "\"stopped\""),
    ];
    for (state, oci, json) in pairs {
        assert_eq!(state.oci_status(), oci);
        assert_eq!(serde_json::to_string(&state).unwrap(), json);
        assert_eq!(serde_json::from_str::<State>(json).unwrap(), state);
    }
}

#[test]
fn records_round_trip_through_json() {
    let s = sample_sandbox("pod-1");
    let text = serde_json::to_string_pretty(&s).unwrap();
    assert_eq!(serde_json::from_str::<SandboxRecord>(&text).unwrap(), s);
    assert!(text.contains("\"start_time\": 123456"), "{text}");
    assert_eq!(
        s.qmp_socket(),
        PathBuf::from("/run/runvm/pod-1/vm/qmp.sock")
    );
    assert_eq!(s.accelerator(), Accelerator::Tcg);
    let c = sample_container("pod-1", "c1");
    let text = serde_json::to_string(&c).unwrap();
    assert_eq!(serde_json::from_str::<ContainerRecord>(&text).unwrap(), c);
}

#[test]
fn older_files_with_missing_fields_still_load() {
    let s = sample_sandbox("p");
    let minimal = serde_json::json!({
        "id": "p",
        "state": "running",
        "vm": serde_json::to_value(&s.vm).unwrap(),
    });
    let r: SandboxRecord = serde_json::from_value(minimal).unwrap();
    assert_eq!(r.version, RECORD_VERSION);
    assert_eq!(r.state, State::Running);
    assert_eq!(r.config, Config::default());
    assert!(r.containers.is_empty() && r.annotations.is_empty() && r.timeline.is_empty());

    let c: ContainerRecord =
        serde_json::from_str(r#"{"id": "c", "sandbox_id": "p", "state": "stopped"}"#).unwrap();
    assert_eq!(c.init, ProcessRecord::default());
    assert_eq!(c.execs, BTreeMap::new());
}

#[test]
fn newer_files_with_unknown_fields_still_load() {
    let s = sample_sandbox("p");
    let mut v = serde_json::to_value(&s).unwrap();
    v["future_field"] = serde_json::json!({"x": 1});
    // Config refuses unknown keys when read from TOML; a stored snapshot drops them instead.
    v["config"]["hypervisor"]["future_knob"] = serde_json::json!(true);
    v["config"]["future_section"] = serde_json::json!({});
    let back: SandboxRecord = serde_json::from_value(v).unwrap();
    assert_eq!(back, s);
}

#[test]
fn wrong_types_in_the_config_snapshot_are_still_errors() {
    let s = sample_sandbox("p");
    let mut v = serde_json::to_value(&s).unwrap();
    v["config"]["hypervisor"]["vcpus"] = serde_json::json!("two");
    let err = serde_json::from_value::<SandboxRecord>(v).unwrap_err();
    assert!(err.to_string().contains("invalid type"), "{err}");
}

#[test]
fn invalid_ids_in_records_are_refused() {
    let s = sample_sandbox("p");
    let mut v = serde_json::to_value(&s).unwrap();
    v["containers"] = serde_json::json!(["ok", "../../etc"]);
    assert!(serde_json::from_value::<SandboxRecord>(v).is_err());
}
