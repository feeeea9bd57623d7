//! A private containerd for the shim's tests: its own config, root, state and socket, the shim
//! on its PATH, runvm's state root under the same folder, and a busybox image built offline.
//! `Env::start_cri` adds what the CRI plugin needs: a pause image, runvm as the `runvm`
//! runtime handler and a bridge CNI network of the test's own.
#![allow(dead_code)] // each test binary uses part of it

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub static SERIAL: Mutex<()> = Mutex::new(());

pub const IMAGE: &str = "docker.io/library/busybox:latest";
pub const RUNTIME: &str = "io.containerd.runvm.v2";

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A private containerd whose PATH has the shim, with runvm's state under the same folder.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub socket: String,
    /// The CNI bridge this environment's network creates on the host, removed on drop.
    bridge: Option<String>,
}

impl Env {
    /// containerd with runvm's shim, for `ctr`, and busybox in the `default` namespace.
    pub fn start() -> Env {
        Env::start_with(None, "")
    }

    /// As [`Env::start`], with `extra` appended to runvm's configuration file
    /// ([`Env::runvm_config`]).
    pub fn start_configured(extra: &str) -> Env {
        Env::start_with(None, extra)
    }

    /// runvm's configuration file, which the shim reads (`RUNVM_CONFIG`).
    pub fn runvm_config(&self) -> PathBuf {
        self.dir.path().join("runvm.toml")
    }

    /// containerd whose CRI plugin runs pods with runvm (runtime handler `runvm`), a pause image
    /// and busybox in the `k8s.io` namespace, and a bridge network (`bridge`, host-local
    /// addresses in `subnet`) configured for CNI.
    pub fn start_cri(bridge: &str, subnet: &str) -> Env {
        Env::start_with(Some((bridge, subnet)), "")
    }

    /// As [`Env::start_cri`], with `extra` appended to runvm's configuration file.
    pub fn start_cri_configured(bridge: &str, subnet: &str, extra: &str) -> Env {
        Env::start_with(Some((bridge, subnet)), extra)
    }

    fn start_with(cri: Option<(&str, &str)>, extra: &str) -> Env {
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
            // Room to hot-plug (tests/cri/hotplug.rs): up to 4 vCPUs and 2.5 GiB.
            format!(
                "[runtime]\nroot = \"{}\"\n[hypervisor]\nmax_vcpus = 4\nmax_memory_mib = 2560\n{extra}",
                d.join("runvm").display()
            ),
        )
        .unwrap();
        let busybox = d.join("busybox.tar");
        run_ok(Command::new(workspace().join("scripts/busybox-image.sh")).arg(&busybox));
        let mut images = vec![(busybox, "docker.io/library/busybox")];
        if let Some((bridge, subnet)) = cri {
            let pause = d.join("pause.tar");
            run_ok(
                Command::new(workspace().join("scripts/busybox-image.sh"))
                    .arg(&pause)
                    .args(["sleep", "2147483647"]),
            );
            images.push((pause, "docker.io/library/pause"));
            write_cri_config(&d.join("ctd"), bridge, subnet);
        }
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
        let env = Env {
            dir,
            socket,
            bridge: cri.map(|(bridge, _)| bridge.to_string()),
        };
        let namespace = if cri.is_some() { "k8s.io" } else { "default" };
        for (tar, name) in images {
            let import = env.ctr(&["-n", namespace, "images", "import", "--base-name", name]);
            run_ok(Command::new("ctr").args(import).arg(&tar));
        }
        env
    }

    pub fn ctr<'a>(&'a self, args: &[&'a str]) -> Vec<&'a str> {
        let mut v = vec!["-a", self.socket.as_str()];
        v.extend_from_slice(args);
        v
    }

    pub fn run(&self, args: &[&str]) -> Output {
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

    /// `ctr run --rm` of the busybox image under runvm: container `id` running `argv`.
    pub fn run_rm(&self, id: &str, argv: &[&str]) -> Output {
        let mut args = vec!["run", "--rm", "--runtime", RUNTIME, IMAGE, id];
        args.extend_from_slice(argv);
        self.run(&args)
    }

    /// Processes whose command line names this environment's folder (shims, QEMU, helpers).
    pub fn leftovers(&self) -> Vec<String> {
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
    pub fn assert_clean(&self) {
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

/// The CRI plugin's part of containerd's config (appended by containerd-env.sh) and a CNI
/// bridge network whose address bookkeeping stays in `ctd`.
fn write_cri_config(ctd: &Path, bridge: &str, subnet: &str) {
    std::fs::create_dir_all(ctd.join("cni/conf")).unwrap();
    std::fs::write(
        ctd.join("runtimes.toml"),
        format!(
            r#"[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "docker.io/library/pause:latest"
[plugins."io.containerd.grpc.v1.cri".containerd]
  default_runtime_name = "runvm"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runvm]
  runtime_type = "{RUNTIME}"
"#
        ),
    )
    .unwrap();
    let ipam_dir = ctd.join("cni/ipam");
    std::fs::write(
        ctd.join("cni/conf/10-runvm-test.conflist"),
        format!(
            r#"{{
  "cniVersion": "1.0.0",
  "name": "runvm-test",
  "plugins": [
    {{
      "type": "bridge",
      "bridge": "{bridge}",
      "isGateway": true,
      "ipMasq": false,
      "ipam": {{
        "type": "host-local",
        "ranges": [[{{ "subnet": "{subnet}" }}]],
        "dataDir": "{}"
      }}
    }},
    {{ "type": "loopback" }}
  ]
}}
"#,
            ipam_dir.display()
        ),
    )
    .unwrap();
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
        if let Some(bridge) = &self.bridge {
            let _ = Command::new("ip").args(["link", "del", bridge]).status();
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

pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("spawning a helper");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

impl Env {
    /// The pid of the first process whose command line starts with `prefix` and names this
    /// environment's folder.
    pub fn pid_of(&self, prefix: &str, also: &str) -> u32 {
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
    pub fn run_sleeper(&self, id: &str) {
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
    pub fn wait_task_list(&self, what: &str, done: impl Fn(&str) -> bool) {
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
    pub fn kill_and_remove(&self, id: &str) {
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

pub fn kill9(pid: u32) {
    run_ok(Command::new("kill").args(["-KILL", &pid.to_string()]));
}
