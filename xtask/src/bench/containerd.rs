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
    /// The CNI bridge (CRI), deleted with it.
    bridge: Option<String>,
}

impl Containerd {
    /// Starts containerd in `dir` with `shim` on its PATH and runvm's configuration `config`.
    pub fn start(dir: &Path, shim: &Path, config: &Path) -> Result<Containerd> {
        Containerd::start_with(dir, shim, config, None)
    }

    /// As [`Containerd::start`], with its CRI plugin configured as a kubelet's node would have
    /// it: runtime handlers `runvm` and `runc`, a pause image and busybox in the `k8s.io`
    /// namespace, and a CNI bridge network `bridge` with addresses from `subnet`.
    pub fn start_cri(
        dir: &Path,
        shim: &Path,
        config: &Path,
        bridge: &str,
        subnet: &str,
    ) -> Result<Containerd> {
        Containerd::start_with(dir, shim, config, Some((bridge, subnet)))
    }

    /// The socket of its CRI (and containerd) API.
    pub fn socket(&self) -> &str {
        &self.socket
    }

    fn start_with(
        dir: &Path,
        shim: &Path,
        config: &Path,
        cri: Option<(&str, &str)>,
    ) -> Result<Containerd> {
        let bin = dir.join("bin");
        let logs = dir.join("logs");
        for d in [&bin, &logs] {
            std::fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
        }
        std::os::unix::fs::symlink(shim, bin.join("containerd-shim-runvm-v2"))
            .context("link the shim into containerd's PATH")?;
        let tar = dir.join("busybox.tar");
        cmd::output(Command::new(script("busybox-image.sh")).arg(&tar))?;
        let mut images = vec![(tar, "docker.io/library/busybox")];
        let ctd = dir.join("ctd");
        if let Some((bridge, subnet)) = cri {
            let pause = dir.join("pause.tar");
            cmd::output(
                Command::new(script("busybox-image.sh"))
                    .arg(&pause)
                    .args(["sleep", "2147483647"]),
            )?;
            images.push((pause, "docker.io/library/pause"));
            write_cri_config(&ctd, bridge, subnet)?;
        }
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        // The guard exists before the start, so a half-started containerd is stopped too.
        let mut env = Containerd {
            dir: ctd.clone(),
            socket: String::new(),
            logs,
            bridge: cri.map(|(bridge, _)| bridge.to_string()),
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
        let namespace = if cri.is_some() { "k8s.io" } else { "default" };
        for (tar, name) in images {
            cmd::output(
                Command::new("ctr")
                    .args(["-a", &env.socket, "-n", namespace, "images", "import"])
                    .args(["--base-name", name])
                    .arg(&tar),
            )?;
        }
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

/// The CRI plugin's part of containerd's config (containerd-env.sh appends `runtimes.toml`)
/// and a CNI bridge network whose address bookkeeping stays in `ctd`.
fn write_cri_config(ctd: &Path, bridge: &str, subnet: &str) -> Result<()> {
    let conf = ctd.join("cni/conf");
    std::fs::create_dir_all(&conf).with_context(|| format!("create {}", conf.display()))?;
    let runtimes = format!(
        r#"[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "docker.io/library/pause:latest"
  # A host whose root may not lower OOM scores (no CAP_SYS_RESOURCE, as in some CI
  # containers): containerd caps what it asks for at its own score, else runc fails.
  restrict_oom_score_adj = true
[plugins."io.containerd.grpc.v1.cri".containerd]
  default_runtime_name = "runc"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runvm]
  runtime_type = "{RUNVM_SHIM}"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "{RUNC_SHIM}"
"#
    );
    std::fs::write(ctd.join("runtimes.toml"), runtimes).context("write runtimes.toml")?;
    let network = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "runvm-bench",
        "plugins": [
            {
                "type": "bridge",
                "bridge": bridge,
                "isGateway": true,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": subnet}]],
                    "dataDir": ctd.join("cni/ipam"),
                },
            },
            {"type": "loopback"},
        ],
    });
    std::fs::write(
        conf.join("10-runvm-bench.conflist"),
        serde_json::to_vec_pretty(&network)?,
    )
    .context("write the CNI network")?;
    Ok(())
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = std::fs::copy(self.dir.join("containerd.log"), "/tmp/ctd-debug.log");
        let _ = Command::new(script("containerd-env.sh"))
            .arg("stop")
            .arg(&self.dir)
            .output();
        if let Some(bridge) = &self.bridge {
            let _ = Command::new("ip").args(["link", "del", bridge]).output();
        }
    }
}
