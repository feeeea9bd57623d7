//! The test client of `containers.rs`: an agent API client over hybrid vsock, busybox rootfs
//! and runc-like OCI specs, and one method per RPC that unwraps what a scenario expects.

use std::path::{Path, PathBuf};

use runvm_protocol::agent;
use runvm_protocol::agent_ttrpc::AgentServiceClient;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use ttrpc::Code;

/// Debian busybox-static, copied into each rootfs.
pub const BUSYBOX: &str = "/bin/busybox";
/// Where the agent mounts the sandbox's shared folder.
pub const GUEST_SHARED: &str = "/run/runvm/shared";

/// A generous per-request timeout: TCG is slow.
pub fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(60_000_000_000)
}

/// The code and message of a failed RPC.
pub fn status(err: ttrpc::Error) -> (Code, String) {
    match err {
        ttrpc::Error::RpcStatus(s) => (s.code(), s.message().to_string()),
        other => panic!("expected an RPC status, got {other:?}"),
    }
}

pub fn stdio(stdin: bool, stdout: bool, stderr: bool, terminal: bool) -> agent::StdioConfig {
    agent::StdioConfig {
        stdin,
        stdout,
        stderr,
        terminal,
        ..Default::default()
    }
}

/// Opens a ttrpc client over hybrid vsock (`CONNECT 1024\n`, `OK ...\n`).
pub async fn connect(hv: &Path) -> AgentServiceClient {
    let mut stream = tokio::net::UnixStream::connect(hv).await.unwrap();
    stream
        .write_all(format!("CONNECT {}\n", runvm_protocol::AGENT_VSOCK_PORT).as_bytes())
        .await
        .unwrap();
    let mut line = Vec::new();
    loop {
        let mut b = [0u8; 1];
        assert_eq!(stream.read(&mut b).await.unwrap(), 1, "handshake closed");
        if b[0] == b'\n' {
            break;
        }
        line.push(b[0]);
        assert!(line.len() < 32);
    }
    assert!(
        line.starts_with(b"OK "),
        "{:?}",
        String::from_utf8_lossy(&line)
    );
    let socket = ttrpc::r#async::transport::Socket::new(stream);
    AgentServiceClient::new(ttrpc::r#async::Client::new(socket))
}

/// A busybox rootfs in the shared folder: `<shared>/<cid>/rootfs`.
pub fn make_rootfs(shared: &Path, cid: &str) -> PathBuf {
    let rootfs = shared.join(cid).join("rootfs");
    runvm_sandbox::container::bundle::busybox_rootfs(&rootfs).unwrap();
    rootfs
}

pub fn process(args: &[&str], terminal: bool) -> Value {
    json!({
        "terminal": terminal,
        "user": {"uid": 0, "gid": 0},
        "args": args,
        "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
        "cwd": "/",
        "capabilities": {
            "bounding": CAPS, "effective": CAPS, "permitted": CAPS
        },
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
        "noNewPrivileges": true
    })
}

const CAPS: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// A runc-like default spec running `args` in the rootfs of `cid`.
pub fn spec(cid: &str, args: &[&str], terminal: bool) -> Value {
    json!({
        "ociVersion": "1.0.2",
        "process": process(args, terminal),
        "root": {"path": format!("{GUEST_SHARED}/{cid}/rootfs"), "readonly": false},
        "hostname": cid,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]}
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
        }
    })
}

pub struct Guest {
    pub c: AgentServiceClient,
    pub shared: PathBuf,
}

impl Guest {
    pub async fn try_create(
        &self,
        cid: &str,
        spec: &Value,
        io: agent::StdioConfig,
    ) -> Result<(), (Code, String)> {
        let req = agent::CreateContainerRequest {
            container_id: cid.into(),
            oci_spec_json: serde_json::to_vec(spec).unwrap(),
            storages: vec![agent::Storage {
                source: "runvm".into(),
                fstype: "virtiofs".into(),
                mount_point: GUEST_SHARED.into(),
                ..Default::default()
            }],
            stdio: protobuf::MessageField::some(io),
            sandbox_id: "agent-it".into(),
            ..Default::default()
        };
        self.c
            .create_container(ctx(), &req)
            .await
            .map(|_| ())
            .map_err(status)
    }

    /// Makes the rootfs of `cid`, creates and starts it.
    pub async fn run(&self, cid: &str, args: &[&str], io: agent::StdioConfig) {
        make_rootfs(&self.shared, cid);
        let terminal = io.terminal;
        self.try_create(cid, &spec(cid, args, terminal), io)
            .await
            .unwrap_or_else(|e| panic!("create {cid}: {e:?}"));
        self.start(cid).await.unwrap();
    }

    pub async fn start(&self, cid: &str) -> Result<(), (Code, String)> {
        let req = agent::StartContainerRequest {
            container_id: cid.into(),
            ..Default::default()
        };
        self.c
            .start_container(ctx(), &req)
            .await
            .map(|_| ())
            .map_err(status)
    }

    pub async fn exec(
        &self,
        cid: &str,
        exec: &str,
        args: &[&str],
        io: agent::StdioConfig,
    ) -> Result<(), (Code, String)> {
        let req = agent::ExecProcessRequest {
            container_id: cid.into(),
            exec_id: exec.into(),
            oci_process_json: serde_json::to_vec(&process(args, io.terminal)).unwrap(),
            stdio: protobuf::MessageField::some(io),
            ..Default::default()
        };
        self.c
            .exec_process(ctx(), &req)
            .await
            .map(|_| ())
            .map_err(status)
    }

    /// Reads stdout (or stderr) of a process to EOF.
    pub async fn read_all(&self, cid: &str, exec: &str, stderr: bool) -> Vec<u8> {
        read_all(self.c.clone(), cid, exec, stderr, 64 * 1024).await
    }

    pub async fn wait(&self, cid: &str, exec: &str) -> i32 {
        let req = agent::WaitProcessRequest {
            container_id: cid.into(),
            exec_id: exec.into(),
            ..Default::default()
        };
        let resp = self.c.wait_process(ctx(), &req).await.unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as i64;
        // The guest clock may differ from the host's a little; it is the same day.
        assert!((resp.exited_at_unix_ns - now).abs() < 86_400_000_000_000);
        resp.status
    }

    pub async fn signal(&self, cid: &str, exec: &str, signal: u32, all: bool) {
        let req = agent::SignalProcessRequest {
            container_id: cid.into(),
            exec_id: exec.into(),
            signal,
            all,
            ..Default::default()
        };
        self.c.signal_process(ctx(), &req).await.unwrap();
    }

    pub async fn write(&self, cid: &str, exec: &str, data: &[u8]) {
        let req = agent::WriteStreamRequest {
            container_id: cid.into(),
            exec_id: exec.into(),
            data: data.to_vec(),
            ..Default::default()
        };
        let n = self.c.write_stdin(ctx(), &req).await.unwrap().len;
        assert_eq!(n as usize, data.len());
    }

    pub async fn close_stdin(&self, cid: &str, exec: &str) {
        let req = agent::CloseStdinRequest {
            container_id: cid.into(),
            exec_id: exec.into(),
            ..Default::default()
        };
        self.c.close_stdin(ctx(), &req).await.unwrap();
    }

    pub async fn resize(&self, cid: &str, exec: &str, rows: u32, cols: u32) {
        let req = agent::TtyWinResizeRequest {
            container_id: cid.into(),
            exec_id: exec.into(),
            rows,
            cols,
            ..Default::default()
        };
        self.c.tty_win_resize(ctx(), &req).await.unwrap();
    }

    pub async fn list(&self, cid: &str) -> Result<Vec<(i32, String)>, (Code, String)> {
        let req = agent::ListProcessesRequest {
            container_id: cid.into(),
            ..Default::default()
        };
        self.c
            .list_processes(ctx(), &req)
            .await
            .map(|r| r.processes.into_iter().map(|p| (p.pid, p.cmd)).collect())
            .map_err(status)
    }

    pub async fn stats(&self, cid: &str) -> agent::StatsContainerResponse {
        let req = agent::ContainerRequest {
            container_id: cid.into(),
            ..Default::default()
        };
        self.c.stats_container(ctx(), &req).await.unwrap()
    }

    pub async fn pause(&self, cid: &str, pause: bool) -> Result<(), (Code, String)> {
        let req = agent::ContainerRequest {
            container_id: cid.into(),
            ..Default::default()
        };
        let r = if pause {
            self.c.pause_container(ctx(), &req).await
        } else {
            self.c.resume_container(ctx(), &req).await
        };
        r.map(|_| ()).map_err(status)
    }

    pub async fn remove(&self, cid: &str, timeout_secs: u32) {
        let req = agent::RemoveContainerRequest {
            container_id: cid.into(),
            timeout_secs,
            ..Default::default()
        };
        self.c.remove_container(ctx(), &req).await.unwrap();
        let (code, msg) = self.list(cid).await.unwrap_err();
        assert_eq!(code, Code::NOT_FOUND, "{msg}");
    }
}

pub async fn read_all(
    c: AgentServiceClient,
    cid: &str,
    exec: &str,
    stderr: bool,
    len: u32,
) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let req = agent::ReadStreamRequest {
            container_id: cid.into(),
            exec_id: exec.into(),
            len,
            ..Default::default()
        };
        let resp = if stderr {
            c.read_stderr(ctx(), &req).await
        } else {
            c.read_stdout(ctx(), &req).await
        }
        .unwrap();
        assert!(resp.data.len() <= len as usize);
        if resp.eof {
            assert!(resp.data.is_empty());
            return out;
        }
        out.extend_from_slice(&resp.data);
    }
}

/// Processes whose command line names `marker`.
pub fn processes_naming(marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(marker) {
            found.push(format!("{pid}: {cmdline}"));
        }
    }
    found
}
