//! Support of the tests that drive the `runvm` binary as runc's callers do.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A private state root and bundles under one temporary folder.
pub struct Host {
    pub dir: tempfile::TempDir,
    pub root: PathBuf,
}

impl Host {
    pub fn new() -> Host {
        let dir = tempfile::Builder::new()
            .prefix("runvm-cli-")
            .tempdir()
            .unwrap();
        let root = dir.path().join("state");
        Host { dir, root }
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_runvm"));
        cmd.env_remove("RUNVM_CONFIG")
            .env_remove("RUST_LOG")
            .arg("--root")
            .arg(&self.root);
        if let Some(config) = self.guest_override() {
            cmd.arg("--config").arg(config);
        }
        cmd.args(args);
        cmd
    }

    /// As [`Host::cmd`], with a configuration file of `toml` (plus the `RUNVM_TEST_GUEST`
    /// guest image, if set).
    pub fn cmd_configured(&self, toml: &str, args: &[&str]) -> Command {
        let mut text = toml.to_string();
        if let Some(guest) = std::env::var_os("RUNVM_TEST_GUEST").map(PathBuf::from) {
            text.push_str(&format!(
                "\n[guest]\nkernel = {:?}\ninitrd = {:?}\n",
                guest.join("vmlinuz"),
                guest.join("initrd.img")
            ));
        }
        let config = self.dir.path().join("configured.toml");
        std::fs::write(&config, text).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_runvm"));
        cmd.env_remove("RUNVM_CONFIG")
            .env_remove("RUST_LOG")
            .arg("--root")
            .arg(&self.root)
            .arg("--config")
            .arg(&config)
            .args(args);
        cmd
    }

    /// With `RUNVM_TEST_GUEST=DIR`, a configuration whose guest image is DIR's (a guest built
    /// with `cargo xtask guest --out DIR`, to test an agent without replacing the machine's).
    fn guest_override(&self) -> Option<PathBuf> {
        let guest = PathBuf::from(std::env::var_os("RUNVM_TEST_GUEST")?);
        let config = self.dir.path().join("guest-override.toml");
        if !config.exists() {
            let text = format!(
                "[guest]\nkernel = {:?}\ninitrd = {:?}\n",
                guest.join("vmlinuz"),
                guest.join("initrd.img")
            );
            std::fs::write(&config, text).unwrap();
        }
        Some(config)
    }

    /// Runs runvm and collects its output (for commands that leave no process behind).
    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args)
            .stdin(Stdio::null())
            .output()
            .expect("run runvm")
    }

    /// `runvm ps ID`'s table once it shows `command` (or after 10 s): as with runc, `start` and
    /// `exec -d` return once the process was told to go, and it may still be on its way to exec
    /// its program (shown as `[exe]`) for a moment.
    pub fn ps_table_showing(&self, id: &str, command: &str) -> String {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let table = text(&self.run(&["ps", id]).stdout);
            if table.contains(command) || std::time::Instant::now() > deadline {
                return table;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// Runs runvm with stdout and stderr into files (a stand-in keeps them open): returns the
    /// exit code and the files.
    pub fn run_to_files(&self, args: &[&str], name: &str) -> (Option<i32>, PathBuf, PathBuf) {
        let out = self.dir.path().join(format!("{name}.out"));
        let err = self.dir.path().join(format!("{name}.err"));
        let status = self
            .cmd(args)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .status()
            .unwrap();
        (status.code(), out, err)
    }

    pub fn bundle(&self, name: &str, spec: &Value) -> PathBuf {
        let b = self.dir.path().join("bundles").join(name);
        std::fs::create_dir_all(&b).unwrap();
        runvm_sandbox::container::bundle::busybox_bundle(&b, spec).unwrap();
        b
    }

    pub fn state(&self, id: &str) -> Value {
        let out = self.run(&["state", id]);
        assert!(out.status.success(), "state {id}: {}", text(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Waits until container `id` shows `status`.
    pub fn wait_status(&self, id: &str, status: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = self.state(id);
            if s["status"] == status {
                return s;
            }
            assert!(Instant::now() < deadline, "{id} never became {status}: {s}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// No process names the folder, nothing is mounted under it, the state root is empty.
    pub fn assert_nothing_left(&self) {
        assert_nothing_left(self.dir.path(), &self.root);
    }
}

/// A live process found by its command line.
#[derive(Debug)]
pub struct Proc {
    pub pid: u32,
    pub cmdline: Vec<String>,
}

/// The processes (not this one) one of whose arguments contains `needle`.
pub fn processes_with(needle: &str) -> Vec<Proc> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        let raw = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline: Vec<String> = raw
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if cmdline.iter().any(|a| a.contains(needle)) {
            found.push(Proc { pid, cmdline });
        }
    }
    found
}

pub fn assert_nothing_left(marker: &Path, root: &Path) {
    let marker = marker.display().to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left: Vec<String> = processes_with(&marker)
            .into_iter()
            .map(|p| format!("{}: {}", p.pid, p.cmdline.join(" ")))
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "processes left behind: {left:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let leaked: Vec<&str> = mounts.lines().filter(|l| l.contains(&marker)).collect();
    assert!(leaked.is_empty(), "mounts left behind: {leaked:#?}");
    let state: Vec<_> = std::fs::read_dir(root)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(state.is_empty(), "state left behind: {state:?}");
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Asserts a failure with `message` on stderr.
pub fn assert_fails(out: &Output, message: &str) {
    let err = text(&out.stderr);
    assert!(!out.status.success(), "expected failure with {message:?}");
    assert!(err.contains(message), "expected {message:?} in: {err}");
}

/// runc's default spec running `args`, without a terminal.
pub fn spec(args: &[&str]) -> Value {
    runvm_sandbox::container::bundle::default_spec(args, false)
}

/// Waits until the file holds `needle`; returns its text.
pub fn wait_for_output(file: &Path, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = std::fs::read_to_string(file).unwrap_or_default();
        if out.contains(needle) {
            return out;
        }
        assert!(Instant::now() < deadline, "no {needle:?} in: {out}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `runvm exec ID sh -c SCRIPT`: (exit code, stdout, stderr).
pub fn exec_sh(host: &Host, id: &str, script: &str) -> (Option<i32>, String, String) {
    let out = host.run(&["exec", id, "/bin/sh", "-c", script]);
    (out.status.code(), text(&out.stdout), text(&out.stderr))
}

/// `runvm run -d`; the stand-in's pid (from --pid-file: the container may be gone already).
pub fn run_detached(host: &Host, id: &str, args: &[&str]) -> u32 {
    let b = host.bundle(id, &spec(args));
    let pid_file = host.dir.path().join(format!("{id}.pid"));
    let (code, _, err) = host.run_to_files(
        &[
            "run",
            "-d",
            "--pid-file",
            pid_file.to_str().unwrap(),
            "--bundle",
            b.to_str().unwrap(),
            id,
        ],
        id,
    );
    assert_eq!(code, Some(0), "{}", std::fs::read_to_string(err).unwrap());
    std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Receives the terminal master runvm sends over a console socket (SCM_RIGHTS, as runc).
pub fn receive_master(listener: &std::os::unix::net::UnixListener) -> std::os::fd::OwnedFd {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    use std::os::fd::{AsRawFd, FromRawFd};
    let (stream, _) = listener.accept().unwrap();
    let mut buf = [0u8; 256];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::empty(),
    )
    .unwrap();
    for c in msg.cmsgs().unwrap() {
        if let ControlMessageOwned::ScmRights(fds) = c {
            // SAFETY: the fd was just received over SCM_RIGHTS and is owned by nobody else.
            return unsafe { std::os::fd::OwnedFd::from_raw_fd(fds[0]) };
        }
    }
    panic!("no file descriptor received");
}
