//! Shared support of the integration tests that run containers in real VMs.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use runvm_sandbox::agent::{ProcessRef, StdioSpec};
use runvm_sandbox::config::Config;
use runvm_sandbox::container::bundle::busybox_bundle;
use runvm_sandbox::container::io::{copy_output, OutputStream};
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
    }
}

pub async fn create(sb: &mut Sandbox, id: &str, bundle: PathBuf, stdio: StdioSpec) {
    sb.create_container(NewContainer {
        id: cid(id),
        bundle: runvm_sandbox::container::spec::Bundle::load(&bundle, id).unwrap(),
        stdio,
        stdio_paths: StdioRecord::default(),
        annotations: BTreeMap::new(),
    })
    .await
    .unwrap_or_else(|e| panic!("create {id}: {e}"));
}

/// Output of a process until EOF: (stdout, stderr).
pub async fn outputs(sb: &mut Sandbox, p: &ProcessRef, stderr: bool) -> (Vec<u8>, Vec<u8>) {
    let agent = sb.agent().await.unwrap();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let o = copy_output(&*agent, p, OutputStream::Stdout, &mut out);
    if stderr {
        let e = copy_output(&*agent, p, OutputStream::Stderr, &mut err);
        let (a, b) = tokio::join!(o, e);
        a.unwrap();
        b.unwrap();
    } else {
        o.await.unwrap();
    }
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
