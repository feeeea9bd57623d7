//! A private containerd for `ctr run --rm` through runvm's shim and runc's shim: its config,
//! root, state and socket in the benchmark's folder (scripts/containerd-env.sh, as the shim's
//! tests), runvm's shim on its PATH, runvm's state root in the same folder, busybox imported.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use super::procs::timed;
use crate::cmd;

/// The image `ctr run` starts.
pub const IMAGE: &str = "docker.io/library/busybox:latest";
/// runvm's shim.
pub const RUNVM_SHIM: &str = "io.containerd.runvm.v2";
/// runc's shim.
pub const RUNC_SHIM: &str = "io.containerd.runc.v2";

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../scripts")
        .join(name)
}

/// A running private containerd, stopped on drop.
#[derive(Debug)]
pub struct Containerd {
    dir: PathBuf,
    socket: String,
    logs: PathBuf,
}

impl Containerd {
    /// Starts containerd in `dir` with `shim` on its PATH and runvm's configuration `config`.
    pub fn start(dir: &Path, shim: &Path, config: &Path) -> Result<Containerd> {
        let bin = dir.join("bin");
        let logs = dir.join("logs");
        for d in [&bin, &logs] {
            std::fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
        }
        std::os::unix::fs::symlink(shim, bin.join("containerd-shim-runvm-v2"))
            .context("link the shim into containerd's PATH")?;
        let tar = dir.join("busybox.tar");
        cmd::output(Command::new(script("busybox-image.sh")).arg(&tar))?;
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let ctd = dir.join("ctd");
        // The guard exists before the start, so a half-started containerd is stopped too.
        let mut env = Containerd {
            dir: ctd.clone(),
            socket: String::new(),
            logs,
        };
        let socket = cmd::stdout(
            Command::new(script("containerd-env.sh"))
                .arg("start")
                .arg(&ctd)
                .env("PATH", path)
                .env("RUNVM_CONFIG", config)
                .env_remove("RUST_LOG"),
        )?;
        env.socket = socket.trim().to_string();
        cmd::output(
            Command::new("ctr")
                .args(["-a", &env.socket, "images", "import", "--base-name"])
                .arg("docker.io/library/busybox")
                .arg(&tar),
        )?;
        Ok(env)
    }

    /// `ctr run --rm` of busybox `true` through `runtime` as `id`: the time until it exits.
    pub fn run_true(&self, runtime: &str, id: &str) -> Result<Duration> {
        let took = timed(
            Command::new("ctr").args([
                "-a",
                &self.socket,
                "run",
                "--rm",
                "--runtime",
                runtime,
                IMAGE,
                id,
                "true",
            ]),
            &self.logs,
            id,
        );
        if took.is_err() {
            // A failed `--rm` may leave the task and the container.
            for args in [
                &["task", "kill", "-s", "SIGKILL", id][..],
                &["task", "rm", "-f", id][..],
                &["containers", "rm", id][..],
            ] {
                let _ = Command::new("ctr")
                    .args(["-a", &self.socket])
                    .args(args)
                    .output();
            }
        }
        took
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = Command::new(script("containerd-env.sh"))
            .arg("stop")
            .arg(&self.dir)
            .output();
    }
}
