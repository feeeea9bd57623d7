//! Seed inputs for each target, made from real inputs: the spec `cargo xtask bundle` writes,
//! the sample configuration of docs/configuration.md, records as the store writes them, QMP
//! lines as QEMU 7.2 sends them (those of the QMP unit tests), and ttrpc frames as the host
//! and the agent send them. `fuzz/run.sh seeds` writes them; libFuzzer's merge keeps those that
//! add coverage.

use std::path::PathBuf;

use protobuf::Message;
use runvm_hypervisor::{
    Accelerator, AgentAddress, SavedProcess, SharedDir, VmConfig, VsockBackend,
};
use runvm_protocol::agent as pb;
use runvm_sandbox::config::Config;
use runvm_sandbox::container::bundle::default_spec;
use runvm_sandbox::state::{ContainerRecord, SandboxRecord};
use runvm_sandbox::{ContainerId, SandboxId};
use serde_json::json;

use crate::{ttrpc_frame, AGENT_SERVICE};

/// `(file name, contents)` of each seed of `target`.
pub fn for_target(target: &str) -> Vec<(String, Vec<u8>)> {
    let seeds: Vec<(&str, Vec<u8>)> = match target {
        "ids" => [
            "pod-1",
            "a",
            "A_b.c-9",
            &"x".repeat(128),
            "../etc",
            "a..b",
            "\"c-1\"",
        ]
        .iter()
        .enumerate()
        .map(|(i, s)| (["id"; 7][i], s.as_bytes().to_vec()))
        .collect(),
        "config" => vec![
            ("documented", documented_config().into_bytes()),
            ("defaults", Config::default().to_toml().into_bytes()),
        ],
        "bundle" => vec![
            (
                "runc-spec",
                default_spec(&["sh", "-c", "echo hi"], true)
                    .to_string()
                    .into_bytes(),
            ),
            (
                "pod-container",
                pod_container_spec().to_string().into_bytes(),
            ),
            ("joined", joined_spec().to_string().into_bytes()),
        ],
        "state" => vec![
            ("sandbox", pretty(&sample_sandbox())),
            ("container", pretty(&sample_container())),
        ],
        "qmp" => qmp_seeds(),
        "agent_reply" => agent_reply_seeds(),
        "agent_service" => agent_service_seeds(),
        other => panic!("no seeds for target {other}"),
    };
    seeds
        .into_iter()
        .enumerate()
        .map(|(i, (name, data))| (format!("seed-{i:02}-{name}"), data))
        .collect()
}

fn pretty<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec_pretty(value).expect("a record serializes")
}

/// The ```toml block of docs/configuration.md.
fn documented_config() -> String {
    let doc = include_str!("../../docs/configuration.md");
    let start = doc.find("```toml\n").map(|i| i + 8).unwrap_or(0);
    let len = doc[start..].find("```").unwrap_or(doc.len() - start);
    doc[start..start + len].to_string()
}

/// A CRI pod's container: bind mounts (one read-only, one private), the sandbox's namespaces
/// by path, configuration annotations, hooks and a seccomp profile.
fn pod_container_spec() -> serde_json::Value {
    let mut spec = default_spec(&["nginx", "-g", "daemon off;"], false);
    spec["mounts"].as_array_mut().expect("mounts").extend([
        json!({"destination": "/data", "type": "bind", "source": "data", "options": ["rbind", "ro"]}),
        json!({"destination": "/vol", "type": "bind", "source": "volume", "options": ["rbind", "rprivate"]}),
        json!({"destination": "/dev/shm", "type": "bind", "source": "/dev/shm", "options": ["rbind"]}),
    ]);
    spec["linux"]["namespaces"] = json!([
        {"type": "pid", "path": "/proc/7/ns/pid"}, {"type": "ipc", "path": "/proc/7/ns/ipc"},
        {"type": "uts", "path": "/proc/7/ns/uts"}, {"type": "network", "path": "/var/run/netns/cni-1"},
        {"type": "mount"}, {"type": "cgroup"}
    ]);
    spec["annotations"] = json!({
        "io.kubernetes.cri.container-type": "container",
        "io.kubernetes.cri.sandbox-id": "pod-1",
        "io.runvm.config.hypervisor.vcpus": "2",
        "io.runvm.config.hypervisor.memory_mib": "512",
        "io.kubernetes.cri.sandbox-cpu-period": "100000",
        "io.kubernetes.cri.sandbox-cpu-quota": "150000",
        "io.kubernetes.cri.sandbox-memory": "268435456"
    });
    spec["hooks"] = json!({
        "createRuntime": [{"path": "/usr/bin/true", "args": ["true"], "timeout": 5}],
        "createContainer": [{"path": "/bin/true"}],
        "poststop": [{"path": "/usr/bin/true", "env": ["A=b"]}]
    });
    spec["linux"]["seccomp"] = json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{"names": ["read", "write", "exit_group"], "action": "SCMP_ACT_ALLOW"}]
    });
    spec
}

/// A container joining another runvm container's namespaces (`/proc/PID/ns/TYPE`).
fn joined_spec() -> serde_json::Value {
    let mut spec = default_spec(&["sleep", "10"], false);
    spec["linux"]["namespaces"] = json!([
        {"type": "pid", "path": "/proc/42/ns/pid"}, {"type": "network", "path": "/proc/42/ns/net"},
        {"type": "ipc", "path": "/proc/42/ns/ipc"}, {"type": "mount"}
    ]);
    spec
}

fn sample_sandbox() -> SandboxRecord {
    let id = SandboxId::parse("pod-1").expect("an id");
    let dir = PathBuf::from("/run/runvm/pod-1");
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
        max_vcpus: 0,
        max_memory_mib: 0,
        hotplugged: Default::default(),
    };
    let mut record = SandboxRecord::new(id, vm, Config::default());
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
    record.containers = vec![ContainerId::parse("c1").expect("an id")];
    record.memory_block_size = Some(128 << 20);
    record.mark("vm-started");
    record
}

fn sample_container() -> ContainerRecord {
    let mut record = ContainerRecord::new(
        ContainerId::parse("c1").expect("an id"),
        SandboxId::parse("pod-1").expect("an id"),
        "/tmp/bundle".into(),
        "/tmp/bundle/rootfs".into(),
        default_spec(&["sh"], false),
    );
    record.init.pid = Some(7);
    record.init.stdio.stdout = Some("/run/fifo/out".into());
    record.execs.insert("e1".into(), Default::default());
    record.mounts = vec!["/run/runvm/pod-1/shared/c1/rootfs".into()];
    record
}

const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 11, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7+deb12u13"}, "capabilities": ["oob"]}}"#;

/// The command bytes, then the greeting, the answer to `qmp_capabilities` (id 1) and `replies`
/// (ids 2, 3, ...), with an event before the first.
fn qmp_session(commands: [u8; 4], replies: &[serde_json::Value]) -> Vec<u8> {
    let mut out = commands.to_vec();
    let mut line = |v: String| {
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    };
    line(GREETING.into());
    line(json!({"return": {}, "id": 1}).to_string());
    line(json!({"event": "RESUME", "data": {}, "timestamp": {"seconds": 1_700_000_000, "microseconds": 123_456}}).to_string());
    for (i, reply) in replies.iter().enumerate() {
        let mut reply = reply.clone();
        reply["id"] = json!(i + 2);
        line(reply.to_string());
    }
    out
}

fn qmp_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let ok = json!({"return": {}});
    vec![
        (
            "status",
            qmp_session(
                [0, 1, 2, 0],
                &[
                    json!({"return": {"status": "running", "singlestep": false, "running": true}}),
                    ok.clone(),
                    ok.clone(),
                    json!({"return": {"status": "paused", "running": false}}),
                ],
            ),
        ),
        (
            "error",
            qmp_session(
                [1, 4, 0, 0],
                &[
                    json!({"error": {"class": "GenericError", "desc": "not now"}}),
                    ok.clone(),
                ],
            ),
        ),
        (
            "cpus",
            qmp_session(
                [5, 6, 7, 12],
                &[
                    json!({"return": [{"type": "qemu64-x86_64-cpu", "vcpus-count": 1, "props": {"socket-id": 1, "core-id": 0, "thread-id": 0}}, {"type": "qemu64-x86_64-cpu", "vcpus-count": 1, "qom-path": "/machine/unattached/device[0]", "props": {"socket-id": 0, "core-id": 0, "thread-id": 0}}]}),
                    json!({"return": 268435456u64}),
                    json!({"return": "pc-q35-7.2-machine"}),
                    json!({"return": {"qemu": {"major": 7, "minor": 2, "micro": 11}, "package": ""}}),
                ],
            ),
        ),
        ("device-del", {
            let mut s = qmp_session([8, 9, 10, 11], std::slice::from_ref(&ok));
            s.extend_from_slice(json!({"event": "DEVICE_DELETED", "data": {"device": "cpu1", "path": "/machine/peripheral/cpu1"}, "timestamp": {"seconds": 1, "microseconds": 2}}).to_string().as_bytes());
            s.extend_from_slice(b"\n{\"return\": {}, \"id\": 3}\n{\"return\": {}, \"id\": 4}\n{\"return\": {}, \"id\": 5}\n");
            s
        }),
        (
            "late-reply",
            qmp_session(
                [0, 0, 3, 0],
                &[
                    json!({"return": {}, "id": 99}),
                    json!({"return": {"status": "running"}}),
                ],
            ),
        ),
    ]
}

fn bytes<M: Message>(m: &M) -> Vec<u8> {
    m.write_to_bytes().expect("a message encodes")
}

/// A ttrpc response frame: status OK and `payload`, or the error `code`.
fn response(stream_id: u32, payload: Vec<u8>, code: Option<ttrpc::Code>) -> Vec<u8> {
    let mut r = ttrpc::Response::new();
    match code {
        Some(code) => {
            r.status =
                protobuf::MessageField::some(ttrpc::get_status(code, "no such container \"c1\""))
        }
        None => {
            r.status = protobuf::MessageField::some(ttrpc::get_status(ttrpc::Code::OK, ""));
            r.payload = payload;
        }
    }
    ttrpc_frame(stream_id, 2, &bytes(&r))
}

/// What the agent answers to the host's call `which` (the target's numbering).
fn reply_to(which: u8) -> Vec<u8> {
    let interface = pb::Interface {
        name: "eth0".into(),
        hw_addr: "02:00:00:00:00:01".into(),
        mtu: 1500,
        up: true,
        addresses: vec![pb::IPAddress {
            address: "10.0.0.2".into(),
            prefix_len: 24,
            ..Default::default()
        }],
        ..Default::default()
    };
    let route = pb::Route {
        destination: "0.0.0.0/0".into(),
        gateway: "10.0.0.1".into(),
        device: "eth0".into(),
        ..Default::default()
    };
    match which {
        0 => bytes(&pb::CheckResponse {
            status: pb::check_response::ServingStatus::SERVING.into(),
            ..Default::default()
        }),
        1 => bytes(&pb::VersionResponse {
            agent_version: "0.1.0".into(),
            kernel_release: "6.1.0-28-amd64".into(),
            api_version: 1,
            ..Default::default()
        }),
        2 => bytes(&pb::GuestDetailsResponse {
            mem_block_size_bytes: 128 << 20,
            cpu_count: 2,
            mem_total_bytes: 1 << 30,
            mem_available_bytes: 1 << 29,
            boot_times: protobuf::MessageField::some(pb::BootTimes {
                init_entered_us: 1,
                modules_loaded_us: 2,
                agent_listening_us: 3,
                now_us: 4,
                ..Default::default()
            }),
            ..Default::default()
        }),
        3 => bytes(&pb::OnlineCPUMemResponse {
            online_cpus: 2,
            onlined_memory_blocks: 1,
            mem_total_bytes: 1 << 30,
            ..Default::default()
        }),
        4 => bytes(&pb::StatsContainerResponse {
            cpu: protobuf::MessageField::some(pb::CpuStats {
                usage_total_ns: 5,
                ..Default::default()
            }),
            memory: protobuf::MessageField::some(pb::MemoryStats {
                usage_bytes: 4096,
                ..Default::default()
            }),
            network: vec![pb::NetworkStats {
                name: "eth0".into(),
                rx_bytes: 10,
                ..Default::default()
            }],
            ..Default::default()
        }),
        5 => bytes(&pb::ListProcessesResponse {
            processes: vec![pb::ProcessInfo {
                pid: 1,
                cmd: "sleep 10".into(),
                tty: "pts/0".into(),
                ..Default::default()
            }],
            ..Default::default()
        }),
        6 | 8 => bytes(&pb::WaitProcessResponse {
            status: 143,
            exited_at_unix_ns: 1,
            ..Default::default()
        }),
        10 => bytes(&pb::OOMEvent {
            container_id: "c1".into(),
            ..Default::default()
        }),
        11 => bytes(&interface),
        12 => bytes(&pb::Interfaces {
            interfaces: vec![interface],
            ..Default::default()
        }),
        13 | 14 => bytes(&pb::Routes {
            routes: vec![route],
            ..Default::default()
        }),
        _ => bytes(&pb::Empty::new()),
    }
}

fn agent_reply_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut seeds = Vec::new();
    for which in 0..24u8 {
        let mut s = vec![which; 4];
        for (i, stream) in [1u32, 3, 5, 7].into_iter().enumerate() {
            let code = (which == 4 && i == 1).then_some(ttrpc::Code::NOT_FOUND);
            s.extend(response(stream, reply_to(which), code));
        }
        seeds.push(("call", s));
    }
    seeds
}

/// A ttrpc request frame for `method` carrying `payload`.
fn request(stream_id: u32, method: &str, payload: Vec<u8>) -> Vec<u8> {
    let mut r = ttrpc::Request::new();
    r.service = AGENT_SERVICE.into();
    r.method = method.into();
    r.payload = payload;
    r.timeout_nano = 5_000_000_000;
    ttrpc_frame(stream_id, 1, &bytes(&r))
}

fn agent_service_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let spec = default_spec(&["sh"], false).to_string().into_bytes();
    let create = pb::CreateContainerRequest {
        container_id: "c1".into(),
        sandbox_id: "pod-1".into(),
        oci_spec_json: spec,
        stdio: protobuf::MessageField::some(pb::StdioConfig {
            stdout: true,
            stream_token: vec![7; 16],
            ..Default::default()
        }),
        storages: vec![pb::Storage {
            source: "runvm".into(),
            fstype: "virtiofs".into(),
            mount_point: "/run/runvm/shared".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let c1 = || pb::ContainerRequest {
        container_id: "c1".into(),
        ..Default::default()
    };
    let lifecycle = [
        request(1, "CreateContainer", bytes(&create)),
        request(
            3,
            "StartContainer",
            bytes(&pb::StartContainerRequest {
                container_id: "c1".into(),
                ..Default::default()
            }),
        ),
        request(
            5,
            "ExecProcess",
            bytes(&pb::ExecProcessRequest {
                container_id: "c1".into(),
                exec_id: "e1".into(),
                oci_process_json: br#"{"args":["ls"],"cwd":"/"}"#.to_vec(),
                ..Default::default()
            }),
        ),
        // Stdio asked for without a stream token: refused.
        request(
            7,
            "ExecProcess",
            bytes(&pb::ExecProcessRequest {
                container_id: "c1".into(),
                exec_id: "e2".into(),
                oci_process_json: br#"{"args":["cat"],"cwd":"/"}"#.to_vec(),
                stdio: protobuf::MessageField::some(pb::StdioConfig {
                    stdin: true,
                    stdout: true,
                    ..Default::default()
                }),
                ..Default::default()
            }),
        ),
        request(
            9,
            "WaitProcess",
            bytes(&pb::WaitProcessRequest {
                container_id: "c1".into(),
                exec_id: "e1".into(),
                ..Default::default()
            }),
        ),
        request(
            11,
            "WaitProcess",
            bytes(&pb::WaitProcessRequest {
                container_id: "c1".into(),
                ..Default::default()
            }),
        ),
        request(13, "PauseContainer", bytes(&c1())),
        request(15, "ResumeContainer", bytes(&c1())),
        request(17, "StatsContainer", bytes(&c1())),
        request(
            19,
            "ListProcesses",
            bytes(&pb::ListProcessesRequest {
                container_id: "c1".into(),
                ..Default::default()
            }),
        ),
        request(
            21,
            "SignalProcess",
            bytes(&pb::SignalProcessRequest {
                container_id: "c1".into(),
                signal: 15,
                ..Default::default()
            }),
        ),
        request(
            23,
            "TtyWinResize",
            bytes(&pb::TtyWinResizeRequest {
                container_id: "c1".into(),
                exec_id: "e1".into(),
                rows: 24,
                cols: 80,
                ..Default::default()
            }),
        ),
        // A method this agent no longer has (stdio moved to streams): UNIMPLEMENTED.
        request(
            25,
            "CloseStdin",
            bytes(&pb::WaitProcessRequest {
                container_id: "c1".into(),
                exec_id: "e1".into(),
                ..Default::default()
            }),
        ),
        request(
            27,
            "UpdateContainer",
            bytes(&pb::UpdateContainerRequest {
                container_id: "c1".into(),
                resources: protobuf::MessageField::some(pb::LinuxResources {
                    oci_resources_json: br#"{"cpu":{"shares":512}}"#.to_vec(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        ),
        request(
            29,
            "RemoveContainer",
            bytes(&pb::RemoveContainerRequest {
                container_id: "c1".into(),
                timeout_secs: 5,
                ..Default::default()
            }),
        ),
    ]
    .concat();
    let guest = [
        request(1, "Check", bytes(&pb::CheckRequest::new())),
        request(3, "Version", bytes(&pb::VersionRequest::new())),
        request(5, "GetGuestDetails", bytes(&pb::GuestDetailsRequest::new())),
        request(
            7,
            "OnlineCPUMem",
            bytes(&pb::OnlineCPUMemRequest {
                cpus: 2,
                timeout_ms: 100,
                ..Default::default()
            }),
        ),
        request(9, "GetOOMEvent", bytes(&pb::GetOOMEventRequest::new())),
        request(11, "NoSuchMethod", Vec::new()),
    ]
    .concat();
    let network = [
        request(
            1,
            "ListInterfaces",
            bytes(&pb::ListInterfacesRequest::new()),
        ),
        request(
            3,
            "UpdateInterface",
            bytes(&pb::UpdateInterfaceRequest {
                interface: protobuf::MessageField::some(pb::Interface {
                    name: "lo".into(),
                    hw_addr: "00:00:00:00:00:00".into(),
                    up: true,
                    addresses: vec![pb::IPAddress {
                        address: "127.0.0.2".into(),
                        prefix_len: 8,
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                ..Default::default()
            }),
        ),
        request(5, "ListRoutes", bytes(&pb::ListRoutesRequest::new())),
        request(
            7,
            "UpdateRoutes",
            bytes(&pb::UpdateRoutesRequest {
                routes: protobuf::MessageField::some(pb::Routes {
                    routes: vec![pb::Route {
                        destination: "127.0.0.0/8".into(),
                        device: "lo".into(),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                ..Default::default()
            }),
        ),
        request(
            9,
            "AddARPNeighbors",
            bytes(&pb::AddARPNeighborsRequest {
                neighbors: protobuf::MessageField::some(pb::ARPNeighbors {
                    neighbors: vec![pb::ARPNeighbor {
                        to_ip: protobuf::MessageField::some(pb::IPAddress {
                            address: "127.0.0.3".into(),
                            prefix_len: 32,
                            ..Default::default()
                        }),
                        device: "lo".into(),
                        ll_addr: "02:00:00:00:00:03".into(),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                ..Default::default()
            }),
        ),
    ]
    .concat();
    vec![
        ("lifecycle", lifecycle),
        ("guest", guest),
        ("network", network),
    ]
}
