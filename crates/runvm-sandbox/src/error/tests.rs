use std::io;

use runvm_hypervisor::qmp::QmpError;

use super::*;
use crate::agent::RpcCode;
use crate::container::spec::SpecError;
use crate::network::NetworkError;
use crate::store::LockMode;
use crate::{ContainerId, SandboxId};

fn sid() -> SandboxId {
    SandboxId::parse("sb1").unwrap()
}

fn io_error() -> io::Error {
    io::Error::from_raw_os_error(libc::EACCES)
}

fn rpc(code: RpcCode) -> AgentError {
    AgentError::Rpc {
        method: "CreateContainer",
        code,
        message: "refused".into(),
    }
}

/// One error of each variant of `SandboxError`, with the kind it must have.
fn sandbox_errors() -> Vec<(SandboxError, ErrorKind)> {
    vec![
        (
            SandboxId::parse("../x").unwrap_err().into(),
            ErrorKind::InvalidArgument,
        ),
        (
            ConfigError::Invalid {
                path: None,
                key: "agent.timeout_ms",
                value: "0".into(),
                valid: "more than 0",
            }
            .into(),
            ErrorKind::InvalidArgument,
        ),
        (
            SandboxError::AlreadyExists {
                id: "sb1".into(),
                path: "/run/runvm/sb1".into(),
            },
            ErrorKind::AlreadyExists,
        ),
        (
            SandboxError::MissingProgram {
                key: "hypervisor.virtiofsd",
                name: "virtiofsd".into(),
                hint: "run setup.sh",
            },
            ErrorKind::FailedPrecondition,
        ),
        (
            HypervisorError::InvalidConfig("0 vCPUs".into()).into(),
            ErrorKind::InvalidArgument,
        ),
        (
            SandboxError::VmDied {
                cause: HypervisorError::QemuExited {
                    status: "exit status: 1".into(),
                    stderr: "boom".into(),
                },
                console: vec!["panic".into()],
            },
            ErrorKind::Internal,
        ),
        (
            SandboxError::AgentTimeout {
                timeout: Duration::from_secs(10),
                last_error: "refused".into(),
                console: vec![],
            },
            ErrorKind::DeadlineExceeded,
        ),
        (rpc(RpcCode::NotFound).into(), ErrorKind::NotFound),
        (
            StoreError::ContainerExists {
                sandbox: sid(),
                id: ContainerId::parse("c1").unwrap(),
                path: "/run/runvm/sb1/c1".into(),
            }
            .into(),
            ErrorKind::AlreadyExists,
        ),
        (
            NetworkError::NoSuchDevice {
                device: "eth9".into(),
            }
            .into(),
            ErrorKind::NotFound,
        ),
        (
            SpecError::Bundle {
                path: "/b".into(),
                reason: "no config.json".into(),
            }
            .into(),
            ErrorKind::InvalidArgument,
        ),
        (
            ShareError {
                source_path: "/src".into(),
                target: "/shared/c1".into(),
                reason: "EPERM".into(),
            }
            .into(),
            ErrorKind::Internal,
        ),
        (
            SandboxError::Transition {
                what: "container c1".into(),
                source: State::Running.transition(State::Ready).unwrap_err(),
            },
            ErrorKind::FailedPrecondition,
        ),
        (
            SandboxError::WrongState {
                what: "container c1".into(),
                state: State::Stopped,
                operation: "exec in it",
                hint: "",
            },
            ErrorKind::FailedPrecondition,
        ),
        (
            SandboxError::ProcessNotFound {
                container: "c1".into(),
                exec_id: "e1".into(),
            },
            ErrorKind::NotFound,
        ),
        (
            SandboxError::ProcessExists {
                container: "c1".into(),
                exec_id: "e1".into(),
            },
            ErrorKind::AlreadyExists,
        ),
        (
            SandboxError::Io {
                action: "create",
                path: "/run/runvm/sb1".into(),
                source: io_error(),
            },
            ErrorKind::Internal,
        ),
    ]
}

#[test]
fn each_sandbox_error_has_its_kind() {
    for (e, kind) in sandbox_errors() {
        assert_eq!(e.kind(), kind, "{e:?}");
        assert_eq!(e.is_not_found(), kind == ErrorKind::NotFound, "{e:?}");
    }
}

#[test]
fn each_store_error_has_its_kind() {
    let path = PathBuf::from("/run/runvm/sb1");
    let json = || serde_json::from_str::<serde_json::Value>("{").unwrap_err();
    let table = [
        (
            StoreError::SandboxNotFound {
                id: sid(),
                root: "/run/runvm".into(),
            },
            ErrorKind::NotFound,
        ),
        (
            StoreError::ContainerNotFound {
                sandbox: sid(),
                id: ContainerId::parse("c1").unwrap(),
                path: path.clone(),
            },
            ErrorKind::NotFound,
        ),
        (
            StoreError::SandboxExists {
                id: sid(),
                path: path.clone(),
            },
            ErrorKind::AlreadyExists,
        ),
        (
            StoreError::ContainerExists {
                sandbox: sid(),
                id: ContainerId::parse("c1").unwrap(),
                path: path.clone(),
            },
            ErrorKind::AlreadyExists,
        ),
        (
            StoreError::Corrupt {
                path: path.clone(),
                source: json(),
            },
            ErrorKind::Internal,
        ),
        (
            StoreError::Mismatch {
                path: path.clone(),
                field: "id",
                expected: "sb1".into(),
                found: "sb2".into(),
            },
            ErrorKind::Internal,
        ),
        (
            StoreError::NewerVersion {
                path: path.clone(),
                found: 9,
                supported: 1,
            },
            ErrorKind::FailedPrecondition,
        ),
        (
            StoreError::LockBusy {
                id: sid(),
                path: path.clone(),
                mode: LockMode::Exclusive,
            },
            ErrorKind::Unavailable,
        ),
        (
            StoreError::LockTimeout {
                id: sid(),
                path: path.clone(),
                mode: LockMode::Shared,
                timeout: Duration::from_secs(5),
            },
            ErrorKind::DeadlineExceeded,
        ),
        (
            StoreError::LockNotHeld {
                operation: "save",
                id: sid(),
                path: path.clone(),
                problem: "it is shared".into(),
            },
            ErrorKind::Internal,
        ),
        (
            StoreError::MountsRemain {
                dir: path.clone(),
                mounts: vec![path.join("shared/c1")],
            },
            ErrorKind::FailedPrecondition,
        ),
        (
            StoreError::Io {
                action: "read",
                path: path.clone(),
                source: io_error(),
            },
            ErrorKind::Internal,
        ),
        (
            StoreError::Encode {
                path,
                source: json(),
            },
            ErrorKind::Internal,
        ),
    ];
    for (e, kind) in table {
        assert_eq!(e.kind(), kind, "{e:?}");
        assert_eq!(SandboxError::from(e).kind(), kind);
    }
}

#[test]
fn each_agent_error_has_its_kind() {
    let table = [
        (
            AgentError::Connect {
                address: "vsock.hv".into(),
                reason: "refused".into(),
            },
            ErrorKind::Unavailable,
        ),
        (
            AgentError::Timeout {
                method: "Check",
                timeout: Duration::from_secs(1),
            },
            ErrorKind::DeadlineExceeded,
        ),
        (rpc(RpcCode::InvalidArgument), ErrorKind::InvalidArgument),
        (rpc(RpcCode::AlreadyExists), ErrorKind::AlreadyExists),
        (
            rpc(RpcCode::FailedPrecondition),
            ErrorKind::FailedPrecondition,
        ),
        (rpc(RpcCode::Unimplemented), ErrorKind::Unimplemented),
        (rpc(RpcCode::Internal), ErrorKind::Internal),
        (rpc(RpcCode::Unavailable), ErrorKind::Unavailable),
        (
            AgentError::Transport {
                method: "Check",
                reason: "closed".into(),
            },
            ErrorKind::Unavailable,
        ),
        (
            AgentError::InvalidReply {
                method: "Version",
                reason: "too long".into(),
            },
            ErrorKind::Internal,
        ),
    ];
    for (e, kind) in table {
        assert_eq!(e.kind(), kind, "{e:?}");
    }
    assert!(rpc(RpcCode::Unimplemented).is_unimplemented());
    assert!(!rpc(RpcCode::NotFound).is_unimplemented());
}

#[test]
fn each_rpc_code_has_its_kind() {
    use ErrorKind as K;
    let table = [
        (RpcCode::Cancelled, K::Unavailable),
        (RpcCode::Unknown, K::Internal),
        (RpcCode::InvalidArgument, K::InvalidArgument),
        (RpcCode::DeadlineExceeded, K::DeadlineExceeded),
        (RpcCode::NotFound, K::NotFound),
        (RpcCode::AlreadyExists, K::AlreadyExists),
        (RpcCode::PermissionDenied, K::Internal),
        (RpcCode::ResourceExhausted, K::Unavailable),
        (RpcCode::FailedPrecondition, K::FailedPrecondition),
        (RpcCode::Aborted, K::Unavailable),
        (RpcCode::OutOfRange, K::InvalidArgument),
        (RpcCode::Unimplemented, K::Unimplemented),
        (RpcCode::Internal, K::Internal),
        (RpcCode::Unavailable, K::Unavailable),
        (RpcCode::DataLoss, K::Internal),
        (RpcCode::Unauthenticated, K::Internal),
    ];
    for (code, kind) in table {
        assert_eq!(code.kind(), kind, "{code}");
    }
}

#[test]
fn each_network_error_has_its_kind() {
    let table = [
        (
            NetworkError::Netns {
                path: "/var/run/netns/x".into(),
                source: io_error(),
            },
            ErrorKind::Internal,
        ),
        (
            NetworkError::Netlink {
                action: "add a qdisc".into(),
                reason: "EEXIST".into(),
            },
            ErrorKind::Internal,
        ),
        (
            NetworkError::Tap {
                name: "tap0_runvm".into(),
                source: io_error(),
            },
            ErrorKind::Internal,
        ),
        (
            NetworkError::NoSuchDevice {
                device: "eth9".into(),
            },
            ErrorKind::NotFound,
        ),
        (
            NetworkError::Invalid("two cards with one MAC".into()),
            ErrorKind::InvalidArgument,
        ),
    ];
    for (e, kind) in table {
        assert_eq!(e.kind(), kind, "{e:?}");
    }
}

#[test]
fn each_hypervisor_error_has_its_kind() {
    let table = [
        (
            HypervisorError::InvalidConfig("0 vCPUs".into()),
            ErrorKind::InvalidArgument,
        ),
        (
            HypervisorError::MissingFile {
                what: "guest kernel",
                path: "/var/lib/runvm/guest/vmlinuz".into(),
                hint: "run cargo xtask guest".into(),
            },
            ErrorKind::FailedPrecondition,
        ),
        (
            HypervisorError::Spawn {
                program: "qemu",
                path: "/usr/bin/qemu-system-x86_64".into(),
                source: io_error(),
                log: String::new(),
            },
            ErrorKind::Internal,
        ),
        (
            HypervisorError::Confinement {
                what: "hypervisor.user \"runvm-vmm\"".into(),
                reason: "no such user on this host".into(),
                hint: "create it".into(),
            },
            ErrorKind::FailedPrecondition,
        ),
        (
            HypervisorError::Spawn {
                program: "virtiofsd",
                path: "/opt/runvm/bin/virtiofsd".into(),
                source: io_error(),
                log: "runvm jail: mknod /dev/kvm failed: errno 1".into(),
            },
            ErrorKind::Internal,
        ),
        (
            HypervisorError::HelperFailed {
                program: "virtiofsd",
                status: "exit status: 1".into(),
                stderr: "no".into(),
            },
            ErrorKind::Internal,
        ),
        (
            HypervisorError::QemuExited {
                status: "signal 9".into(),
                stderr: String::new(),
            },
            ErrorKind::Internal,
        ),
        (
            HypervisorError::AcceleratorUnavailable("no /dev/kvm".into()),
            ErrorKind::FailedPrecondition,
        ),
        (
            HypervisorError::InvalidState {
                operation: "pause",
                state: "stopped",
            },
            ErrorKind::FailedPrecondition,
        ),
        (
            HypervisorError::Unsupported {
                operation: "hot-add",
                id: "net1".into(),
            },
            ErrorKind::Unimplemented,
        ),
        (
            HypervisorError::NetDevice {
                id: "net0".into(),
                reason: "the VM has a card with this id already".into(),
            },
            ErrorKind::FailedPrecondition,
        ),
        (
            HypervisorError::Netns {
                path: "/var/run/netns/x".into(),
                source: io_error(),
            },
            ErrorKind::Internal,
        ),
        (
            QmpError::Timeout {
                command: "query-status",
                timeout: Duration::from_secs(1),
            }
            .into(),
            ErrorKind::DeadlineExceeded,
        ),
        (
            QmpError::Closed { command: "stop" }.into(),
            ErrorKind::Internal,
        ),
        (
            HypervisorError::Io {
                action: "create",
                path: "/run/runvm/sb1/vm".into(),
                source: io_error(),
            },
            ErrorKind::Internal,
        ),
    ];
    for (e, kind) in table {
        assert_eq!(SandboxError::from(e).kind(), kind);
    }
}

/// The texts of an error and its causes, outermost first.
fn texts(e: &(dyn Error + 'static)) -> Vec<String> {
    let mut out = vec![e.to_string()];
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push(c.to_string());
        cause = c.source();
    }
    out
}

#[test]
fn no_message_repeats_its_source() {
    for (e, _) in sandbox_errors() {
        let texts = texts(&e);
        for pair in texts.windows(2) {
            assert!(
                !pair[0].contains(&pair[1]),
                "{:?} repeats its source {:?}",
                pair[0],
                pair[1]
            );
        }
    }
}

#[test]
fn the_chain_prints_each_cause_once() {
    let e = SandboxError::Transition {
        what: "container c1".into(),
        source: State::Running.transition(State::Running).unwrap_err(),
    };
    let text = ErrorChain(&e).to_string();
    assert!(
        text.starts_with("container c1: cannot go from running to running;"),
        "{text}"
    );
    assert_eq!(text.matches("cannot go from").count(), 1, "{text}");

    let e = SandboxError::from(HypervisorError::from(QmpError::Io {
        command: "stop",
        source: io::Error::new(io::ErrorKind::BrokenPipe, "pipe closed"),
    }));
    assert_eq!(
        ErrorChain(&e).to_string(),
        "QEMU monitor: I/O error on the QMP socket during stop: pipe closed"
    );

    // The VM's death is told before the console, with its causes, and is not a source.
    let e = SandboxError::VmDied {
        cause: HypervisorError::Spawn {
            program: "qemu",
            path: "/bin/qemu".into(),
            source: io::Error::new(io::ErrorKind::NotFound, "no such file"),
            log: String::new(),
        },
        console: vec!["last line".into()],
    };
    assert!(e.source().is_none());
    assert_eq!(
        ErrorChain(&e).to_string(),
        "the VM exited during boot: cannot start qemu (/bin/qemu): no such file\n\
         --- last lines of the guest console ---\nlast line"
    );
}
