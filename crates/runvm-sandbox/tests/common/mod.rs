//! Shared support of the integration tests that run containers in real VMs.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use runvm_sandbox::agent::StdioSpec;
use runvm_sandbox::config::Config;
use runvm_sandbox::container::bundle::busybox_bundle;
use runvm_sandbox::process::Streams;
use runvm_sandbox::sandbox::{ExecRequest, NewContainer};
use runvm_sandbox::state::StdioRecord;
use runvm_sandbox::{ContainerId, Sandbox};
use serde_json::Value;

pub struct Host {
    pub dir: tempfile::TempDir,
    pub config: Config,
}

impl Host {
    pub fn new() -> Host {
        let dir = tempfile::Builder::new()
            .prefix("runvm-ct-")
            .tempdir()
            .unwrap();
        let mut config = Config::default();
        config.runtime.root = dir.path().join("state");
        Host { dir, config }
    }

    pub fn bundle(&self, name: &str, spec: &Value) -> PathBuf {
        let b = self.dir.path().join("bundles").join(name);
        std::fs::create_dir_all(&b).unwrap();
        busybox_bundle(&b, spec).unwrap();
        b
    }

    pub fn assert_nothing_left(&self) {
        let marker = self.dir.path().display().to_string();
        let mut left = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if pid != std::process::id() && cmdline.contains(&marker) {
                left.push(format!("{pid}: {cmdline}"));
            }
        }
        assert!(left.is_empty(), "processes left behind: {left:#?}");
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let leaked: Vec<&str> = mounts.lines().filter(|l| l.contains(&marker)).collect();
        assert!(leaked.is_empty(), "mounts left behind: {leaked:#?}");
        let state: Vec<_> = std::fs::read_dir(&self.config.runtime.root)
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(state.is_empty(), "state left behind: {state:?}");
    }
}

pub fn cid(s: &str) -> ContainerId {
    ContainerId::parse(s).unwrap()
}

pub fn stdio(stdin: bool, terminal: bool) -> StdioSpec {
    StdioSpec {
        stdin,
        stdout: true,
        stderr: !terminal,
        terminal,
        stream_token: None,
    }
}

/// Creates container `id`; returns its init's stdio streams (dropping them closes its output:
/// its writes then fail).
#[must_use = "the init's output fails once its streams are dropped"]
pub async fn create(sb: &mut Sandbox, id: &str, bundle: PathBuf, mut stdio: StdioSpec) -> Streams {
    let streams = sb.open_streams(&mut stdio).await.unwrap();
    sb.create_container(NewContainer {
        id: cid(id),
        bundle: runvm_sandbox::container::spec::Bundle::load(&bundle, id).unwrap(),
        stdio,
        stdio_paths: StdioRecord::default(),
        annotations: BTreeMap::new(),
    })
    .await
    .unwrap_or_else(|e| panic!("create {id}: {e}"));
    streams
}

/// Starts exec `req` in container `id`; returns its stdio streams.
pub async fn exec(sb: &mut Sandbox, id: &str, mut req: ExecRequest) -> Streams {
    let streams = sb.open_streams(&mut req.stdio).await.unwrap();
    let exec_id = req.exec_id.clone();
    sb.exec(&cid(id), req)
        .await
        .unwrap_or_else(|e| panic!("exec {exec_id} in {id}: {e}"));
    streams
}

/// Output of a process until its streams end: (stdout, stderr).
pub async fn outputs(streams: Streams) -> (Vec<u8>, Vec<u8>) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    runvm_sandbox::process::relay(streams, tokio::io::empty(), &mut out, &mut err)
        .await
        .unwrap();
    (out, err)
}

pub fn exec_req(exec_id: &str, args: &[&str], terminal: bool) -> ExecRequest {
    ExecRequest {
        exec_id: exec_id.into(),
        process: serde_json::json!({
            "args": args, "cwd": "/", "terminal": terminal,
            "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}
        }),
        stdio: stdio(false, terminal),
        stdio_paths: StdioRecord::default(),
    }
}
