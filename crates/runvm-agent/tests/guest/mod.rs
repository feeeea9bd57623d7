//! The test client of `containers.rs`: an agent API client over hybrid vsock, busybox rootfs
//! and runc-like OCI specs, one method per RPC that unwraps what a scenario expects, and the
//! processes' stdio over their own vsock streams (`runvm_protocol::stdio`), opened as the host
//! opens them (`runvm_sandbox::process::Streams`): one connection to port 1027 per stream, its
//! header with a fresh token, then frames.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use runvm_protocol::agent;
use runvm_protocol::agent_ttrpc::AgentServiceClient;
use runvm_protocol::frame::{self, PREFIX};
use runvm_protocol::stdio::{Header, StreamKind, MAX_FRAME, STDIO_VSOCK_PORT, TOKEN_LEN};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
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

/// Opens a stream to guest port `port` over hybrid vsock (`CONNECT PORT\n`, `OK ...\n`).
async fn hybrid_connect(hv: &Path, port: u32) -> UnixStream {
    let mut stream = UnixStream::connect(hv).await.unwrap();
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
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
    stream
}

/// Opens a ttrpc client over hybrid vsock.
pub async fn connect(hv: &Path) -> AgentServiceClient {
    let stream = hybrid_connect(hv, runvm_protocol::AGENT_VSOCK_PORT).await;
    let socket = ttrpc::r#async::transport::Socket::new(stream);
    AgentServiceClient::new(ttrpc::r#async::Client::new(socket))
}

/// An output stream of a process, and whether its end frame came.
pub struct Output {
    stream: UnixStream,
    ended: bool,
}

/// The host's ends of one process's stdio streams; `None` for a stream not attached.
#[derive(Default)]
pub struct Streams {
    pub stdin: Option<UnixStream>,
    pub stdout: Option<Output>,
    pub stderr: Option<Output>,
}

/// A fresh random stream token (never all zero).
fn new_token() -> [u8; TOKEN_LEN] {
    let mut token = [0u8; TOKEN_LEN];
    while token == [0u8; TOKEN_LEN] {
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut token))
            .unwrap();
    }
    token
}

/// Reads an output stream's frames to its end frame (a frame over [`MAX_FRAME`] or the
/// stream's end without the end frame fails the test).
pub async fn read_to_end(out: &mut Output) -> Vec<u8> {
    let mut buf = vec![0u8; MAX_FRAME];
    let mut got = Vec::new();
    if out.ended {
        // Nothing follows the end frame (the agent holds the stream until the host closes it).
        let more = tokio::time::timeout(Duration::from_millis(300), out.stream.read(&mut buf));
        assert!(more.await.is_err(), "data after the end frame");
        return got;
    }
    while let Some(n) = frame::read_frame(&mut out.stream, &mut buf).await.unwrap() {
        got.extend_from_slice(&buf[..n]);
    }
    out.ended = true;
    got
}

/// Sends `data` as frames of at most [`MAX_FRAME`] bytes.
async fn send(stdin: &mut UnixStream, data: &[u8]) {
    let mut buf = vec![0u8; PREFIX + MAX_FRAME];
    for chunk in data.chunks(MAX_FRAME) {
        buf[PREFIX..PREFIX + chunk.len()].copy_from_slice(chunk);
        frame::write_frame(stdin, &mut buf, chunk.len())
            .await
            .unwrap();
    }
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

/// Which process: (container, exec id), empty for the init.
type Key = (String, String);

pub struct Guest {
    pub c: AgentServiceClient,
    pub shared: PathBuf,
    /// The hybrid vsock socket, for the stdio streams.
    hv: PathBuf,
    /// The stdio streams of the processes created, until their container is removed.
    streams: Mutex<HashMap<Key, Streams>>,
}

fn key(cid: &str, exec: &str) -> Key {
    (cid.to_string(), exec.to_string())
}

impl Guest {
    /// The client of the agent behind hybrid vsock socket `hv`; `shared` is the sandbox's
    /// shared folder on the host.
    pub async fn new(hv: &Path, shared: PathBuf) -> Guest {
        Guest {
            c: connect(hv).await,
            shared,
            hv: hv.to_path_buf(),
            streams: Mutex::new(HashMap::new()),
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Streams>> {
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens the streams `io` asks for (stderr not with a terminal) and puts their token in it,
    /// as the host does before a create or an exec; asking for none opens none and leaves the
    /// token empty.
    pub async fn open_streams(&self, io: &mut agent::StdioConfig) -> Streams {
        let wanted = [
            (io.stdin, StreamKind::Stdin),
            (io.stdout, StreamKind::Stdout),
            (io.stderr && !io.terminal, StreamKind::Stderr),
        ];
        if !wanted.iter().any(|(w, _)| *w) {
            return Streams::default();
        }
        let token = new_token();
        let mut streams = Streams::default();
        for (_, kind) in wanted.into_iter().filter(|(w, _)| *w) {
            let mut s = hybrid_connect(&self.hv, STDIO_VSOCK_PORT).await;
            s.write_all(&Header { token, kind }.encode()).await.unwrap();
            let output = |stream| {
                Some(Output {
                    stream,
                    ended: false,
                })
            };
            match kind {
                StreamKind::Stdin => streams.stdin = Some(s),
                StreamKind::Stdout => streams.stdout = output(s),
                StreamKind::Stderr => streams.stderr = output(s),
            }
        }
        io.stream_token = token.to_vec();
        streams
    }

    /// Takes an output stream of a process out of the guest (`None` if not attached or taken).
    pub fn take_output(&self, cid: &str, exec: &str, stderr: bool) -> Option<Output> {
        let mut map = self.map();
        let s = map.get_mut(&key(cid, exec))?;
        if stderr {
            s.stderr.take()
        } else {
            s.stdout.take()
        }
    }

    fn put_output(&self, cid: &str, exec: &str, stderr: bool, out: Output) {
        let mut map = self.map();
        let s = map.entry(key(cid, exec)).or_default();
        if stderr {
            s.stderr = Some(out);
        } else {
            s.stdout = Some(out);
        }
    }

    /// Creates `cid` with the stdio streams `io` asks for.
    pub async fn try_create(
        &self,
        cid: &str,
        spec: &Value,
        mut io: agent::StdioConfig,
    ) -> Result<(), (Code, String)> {
        let streams = self.open_streams(&mut io).await;
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
        self.c.create_container(ctx(), &req).await.map_err(status)?;
        self.map().insert(key(cid, ""), streams);
        Ok(())
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
        mut io: agent::StdioConfig,
    ) -> Result<(), (Code, String)> {
        let streams = self.open_streams(&mut io).await;
        let req = agent::ExecProcessRequest {
            container_id: cid.into(),
            exec_id: exec.into(),
            oci_process_json: serde_json::to_vec(&process(args, io.terminal)).unwrap(),
            stdio: protobuf::MessageField::some(io),
            ..Default::default()
        };
        self.c.exec_process(ctx(), &req).await.map_err(status)?;
        self.map().insert(key(cid, exec), streams);
        Ok(())
    }

    /// Reads stdout (or stderr) of a process to its end frame; a stream not attached carries
    /// nothing, and once ended nothing more comes.
    pub async fn read_all(&self, cid: &str, exec: &str, stderr: bool) -> Vec<u8> {
        let Some(mut out) = self.take_output(cid, exec, stderr) else {
            return Vec::new();
        };
        let got = read_to_end(&mut out).await;
        self.put_output(cid, exec, stderr, out);
        got
    }

    /// Reads stdout of a process until at least `n` bytes came (the stream stays open).
    pub async fn read_at_least(&self, cid: &str, exec: &str, n: usize) -> Vec<u8> {
        let mut out = self
            .take_output(cid, exec, false)
            .expect("stdout is attached");
        let mut buf = vec![0u8; MAX_FRAME];
        let mut got = Vec::new();
        while got.len() < n {
            let len = frame::read_frame(&mut out.stream, &mut buf)
                .await
                .unwrap()
                .expect("output before the end frame");
            got.extend_from_slice(&buf[..len]);
        }
        self.put_output(cid, exec, false, out);
        got
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

    fn take_stdin(&self, cid: &str, exec: &str) -> UnixStream {
        self.map()
            .get_mut(&key(cid, exec))
            .and_then(|s| s.stdin.take())
            .expect("stdin is attached")
    }

    fn put_stdin(&self, cid: &str, exec: &str, stdin: UnixStream) {
        self.map().entry(key(cid, exec)).or_default().stdin = Some(stdin);
    }

    /// Sends `data` to the process's stdin stream.
    pub async fn write(&self, cid: &str, exec: &str, data: &[u8]) {
        let mut stdin = self.take_stdin(cid, exec);
        send(&mut stdin, data).await;
        self.put_stdin(cid, exec, stdin);
    }

    /// Sends the end frame on the stdin stream: the process reads EOF.
    pub async fn close_stdin(&self, cid: &str, exec: &str) {
        let mut stdin = self.take_stdin(cid, exec);
        let mut end = [0u8; PREFIX];
        frame::write_frame(&mut stdin, &mut end, 0).await.unwrap();
        self.put_stdin(cid, exec, stdin);
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
        self.map().retain(|(c, _), _| c != cid);
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
