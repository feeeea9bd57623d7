//! containerd 1.6 (Debian's) runs busybox through `containerd-shim-runvm-v2`, driven by `ctr`.
//! Each test starts its own containerd with a private config, state root and runvm state root,
//! and checks afterwards that no shim, QEMU or helper process and no runvm state is left.
//! These tests boot real VMs (about 5 s each under TCG): they run one at a time.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static SERIAL: Mutex<()> = Mutex::new(());

const IMAGE: &str = "docker.io/library/busybox:latest";
const RUNTIME: &str = "io.containerd.runvm.v2";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A private containerd whose PATH has the shim, with runvm's state under the same folder.
struct Env {
    dir: tempfile::TempDir,
    socket: String,
}

impl Env {
    fn start() -> Env {
        let dir = tempfile::Builder::new()
            .prefix("runvm-shim-")
            .tempdir()
            .unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("bin")).unwrap();
        std::os::unix::fs::symlink(
            env!("CARGO_BIN_EXE_containerd-shim-runvm-v2"),
            d.join("bin/containerd-shim-runvm-v2"),
        )
        .unwrap();
        let config = d.join("runvm.toml");
        std::fs::write(
            &config,
            format!("[runtime]\nroot = \"{}\"\n", d.join("runvm").display()),
        )
        .unwrap();
        let image = d.join("busybox.tar");
        run_ok(Command::new(workspace().join("scripts/busybox-image.sh")).arg(&image));
        let path = format!(
            "{}:{}",
            d.join("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let out = run_ok(
            Command::new(workspace().join("scripts/containerd-env.sh"))
                .arg("start")
                .arg(d.join("ctd"))
                .env("PATH", path)
                .env("RUNVM_CONFIG", &config)
                .env("RUNVM_LOG", "debug"),
        );
        let socket = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let env = Env { dir, socket };
        let import = env.ctr(&[
            "images",
            "import",
            "--base-name",
            "docker.io/library/busybox",
        ]);
        run_ok(Command::new("ctr").args(import).arg(&image));
        env
    }

    fn ctr<'a>(&'a self, args: &[&'a str]) -> Vec<&'a str> {
        let mut v = vec!["-a", self.socket.as_str()];
        v.extend_from_slice(args);
        v
    }

    fn run(&self, args: &[&str]) -> Output {
        let out = Command::new("ctr")
            .args(self.ctr(args))
            .output()
            .expect("running ctr");
        eprintln!(
            "ctr {args:?}: {}\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Processes whose command line names this environment's folder (shims, QEMU, helpers).
    fn leftovers(&self) -> Vec<String> {
        let me = self.dir.path().to_string_lossy().to_string();
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(&me) && !cmd.starts_with("containerd ") {
                found.push(cmd);
            }
        }
        found
    }

    /// Nothing of runvm is left: no process, no sandbox folder.
    fn assert_clean(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let procs = self.leftovers();
            let state: Vec<_> = std::fs::read_dir(self.dir.path().join("runvm"))
                .map(|d| d.flatten().map(|e| e.file_name()).collect())
                .unwrap_or_default();
            if procs.is_empty() && state.is_empty() {
                return;
            }
            if Instant::now() > deadline {
                panic!("left behind: processes {procs:#?}, state {state:?}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = Command::new(workspace().join("scripts/containerd-env.sh"))
            .arg("stop")
            .arg(self.dir.path().join("ctd"))
            .status();
        // A failed test may leave its shim and VM: end them so later tests are not burdened.
        let me = self.dir.path().to_string_lossy().to_string();
        let _ = Command::new("pkill").args(["-KILL", "-f", &me]).status();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut points: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(4))
            .filter(|m| m.starts_with(&me))
            .collect();
        points.sort_unstable_by(|a, b| b.cmp(a));
        for m in points {
            let _ = Command::new("umount").args(["-l", m]).status();
        }
        if std::thread::panicking() {
            let log = self.dir.path().join("ctd/containerd.log");
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<_> = text.lines().rev().take(60).collect();
            eprintln!("--- containerd log (last lines) ---");
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("spawning a helper");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn ctr_run_prints_and_propagates_exit_codes() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let env = Env::start();
    let out = env.run(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        IMAGE,
        "t1",
        "echo",
        "hi",
    ]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n");
    env.assert_clean();

    let out = env.run(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        IMAGE,
        "t2",
        "sh",
        "-c",
        "exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3));
    env.assert_clean();
}

#[test]
fn ctr_task_exec_pause_resume_metrics_kill() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let env = Env::start();
    env.run_sleeper("t3");

    let out = env.run(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        "t3",
        "sh",
        "-c",
        "echo from-exec; exit 4",
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "from-exec\n");
    assert_eq!(out.status.code(), Some(4));

    assert!(env.run(&["task", "pause", "t3"]).status.success());
    let ls = env.run(&["task", "ls"]);
    assert!(String::from_utf8_lossy(&ls.stdout).contains("PAUSED"));
    assert!(env.run(&["task", "resume", "t3"]).status.success());
    let ls = env.run(&["task", "ls"]);
    assert!(String::from_utf8_lossy(&ls.stdout).contains("RUNNING"));

    let metrics = env.run(&["task", "metrics", "t3"]);
    assert!(metrics.status.success());
    let text = String::from_utf8_lossy(&metrics.stdout);
    assert!(
        text.contains("cpu.usage_usec") && text.contains("memory.usage"),
        "{text}"
    );

    env.kill_and_remove("t3");
}

impl Env {
    /// The pid of the first process whose command line starts with `prefix` and names this
    /// environment's folder.
    fn pid_of(&self, prefix: &str, also: &str) -> u32 {
        let me = self.dir.path().to_string_lossy().to_string();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let cmd = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(prefix) && cmd.contains(&me) && cmd.contains(also) {
                return pid;
            }
        }
        panic!("no process {prefix} {also} in {me}");
    }
}

impl Env {
    /// `ctr run -d` of `sleep 1000` as task `id`.
    fn run_sleeper(&self, id: &str) {
        let out = self.run(&[
            "run",
            "-d",
            "--runtime",
            RUNTIME,
            IMAGE,
            id,
            "sleep",
            "1000",
        ]);
        assert!(out.status.success());
    }

    /// Polls `ctr task ls` for up to 20 s until `done` holds for its output.
    fn wait_task_list(&self, what: &str, done: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = String::from_utf8_lossy(&self.run(&["task", "ls"]).stdout).to_string();
            if done(&text) {
                return;
            }
            assert!(Instant::now() < deadline, "{what}: {text}");
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// SIGKILL to task `id`, then its removal once stopped, and nothing left.
    fn kill_and_remove(&self, id: &str) {
        assert!(self
            .run(&["task", "kill", "-s", "SIGKILL", id])
            .status
            .success());
        self.wait_task_list(&format!("{id} did not stop after SIGKILL"), |t| {
            t.contains("STOPPED")
        });
        assert!(self.run(&["task", "rm", id]).status.success());
        assert!(self.run(&["containers", "rm", id]).status.success());
        self.assert_clean();
    }
}

fn kill9(pid: u32) {
    run_ok(Command::new("kill").args(["-KILL", &pid.to_string()]));
}

#[test]
fn qemu_killed_stops_the_task_and_leaves_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let env = Env::start();
    env.run_sleeper("t7");
    kill9(env.pid_of("qemu-system", "-name runvm"));
    // The task exits (an exit event reaches containerd), or containerd has already cleaned up
    // after the shim, which exits once its VM is gone.
    env.wait_task_list("t7 still running after QEMU died", |t| {
        t.contains("STOPPED") || !t.contains("t7")
    });
    env.assert_clean();
    let _ = env.run(&["task", "rm", "t7"]);
    assert!(env.run(&["containers", "rm", "t7"]).status.success());
    env.assert_clean();
}

#[test]
fn shim_killed_then_containerd_cleanup_leaves_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let env = Env::start();
    env.run_sleeper("t8");
    kill9(env.pid_of("containerd-shim-runvm-v2", "-id t8"));
    // containerd notices the shim is gone and runs `containerd-shim-runvm-v2 delete`, which
    // must take the VM, its helpers, mounts and files with it.
    env.assert_clean();
    assert!(env.run(&["containers", "rm", "t8"]).status.success());
}

/// The shim's own answers to bad requests, asked over its ttrpc socket directly (containerd
/// would refuse some of these before they reach the shim).
#[test]
fn bad_requests_get_the_right_ttrpc_codes_and_start_nothing() {
    use containerd_shim::protos::api::{CreateTaskRequest, KillRequest, StartRequest};
    use containerd_shim::protos::shim_async::{Client, TaskClient};
    use containerd_shim::protos::ttrpc::{context, Code, Error};

    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let env = Env::start();
    env.run_sleeper("t9");
    let task_dir = env
        .dir
        .path()
        .join("ctd/state/io.containerd.runtime.v2.task/default/t9");
    let address = std::fs::read_to_string(task_dir.join("address")).expect("shim address");
    let bad_bundle = env.dir.path().join("bad-bundle");
    std::fs::create_dir_all(bad_bundle.join("rootfs")).unwrap();
    std::fs::write(
        bad_bundle.join("config.json"),
        // It names t9's pod, so the shim routes it there and then finds the spec invalid.
        r#"{"ociVersion":"1.0.2","process":{"args":"sh","cwd":"/"},"root":{"path":"rootfs"},
            "annotations":{"io.kubernetes.cri.container-type":"container",
                           "io.kubernetes.cri.sandbox-id":"t9"}}"#,
    )
    .unwrap();
    let qemus_before = env
        .leftovers()
        .iter()
        .filter(|c| c.contains("qemu-system"))
        .count();

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let codes = runtime.block_on(async {
        let client = TaskClient::new(Client::connect(address.trim()).await.expect("connect"));
        let ctx = || context::with_timeout(30_000_000_000);
        let code = |r: Result<(), Error>| match r {
            Err(Error::RpcStatus(s)) => (s.code(), s.message().to_string()),
            Ok(_) => (Code::OK, String::new()),
            Err(other) => (Code::UNKNOWN, other.to_string()),
        };
        let dup = CreateTaskRequest {
            id: "t9".into(),
            bundle: task_dir.display().to_string(),
            ..Default::default()
        };
        let bad = CreateTaskRequest {
            id: "bad".into(),
            bundle: bad_bundle.display().to_string(),
            ..Default::default()
        };
        let start = StartRequest {
            id: "nope".into(),
            ..Default::default()
        };
        let kill = KillRequest {
            id: "t9".into(),
            exec_id: "no-such-exec".into(),
            signal: 15,
            ..Default::default()
        };
        vec![
            (
                "duplicate create",
                code(client.create(ctx(), &dup).await.map(|_| ())),
            ),
            (
                "invalid config.json",
                code(client.create(ctx(), &bad).await.map(|_| ())),
            ),
            (
                "start unknown",
                code(client.start(ctx(), &start).await.map(|_| ())),
            ),
            (
                "kill unknown exec",
                code(client.kill(ctx(), &kill).await.map(|_| ())),
            ),
        ]
    });
    eprintln!("{codes:#?}");
    assert_eq!(codes[0].1 .0, Code::ALREADY_EXISTS, "{codes:?}");
    assert_eq!(codes[1].1 .0, Code::INVALID_ARGUMENT, "{codes:?}");
    assert!(codes[1].1 .1.contains("process.args"), "{codes:?}");
    assert_eq!(codes[2].1 .0, Code::NOT_FOUND, "{codes:?}");
    assert_eq!(codes[3].1 .0, Code::NOT_FOUND, "{codes:?}");
    let qemus_after = env
        .leftovers()
        .iter()
        .filter(|c| c.contains("qemu-system"))
        .count();
    assert_eq!(qemus_before, qemus_after, "a bad request started a VM");

    env.kill_and_remove("t9");
}
