//! Benchmarks. `bench all` (what `make bench` runs) measures runvm side by side with runc and
//! the floor (QEMU booting the same kernel into an init that powers off at once): cold start,
//! exec latency, memory per idle pod, stdout throughput and density. `bench boot` and
//! `bench run` time the library's boot and run paths alone.

mod boot;
mod cli;
mod containerd;
mod cri;
mod factory;
mod floor;
mod monitor;
mod procs;
mod report;
mod stats;
mod steps;
mod tracing;

pub use boot::{boot, run, BootBenchArgs, RunBenchArgs};

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use runvm_hypervisor::HostCpu;
use runvm_sandbox::config::{resolve_program, Config};
use runvm_sandbox::container::bundle::{busybox_bundle, default_spec};

use cli::{Cli, Runtime};
use procs::{Memory, Sweep};
use report::Metric;

/// One benchmark of `bench all`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Bench {
    /// `runvm run` against `runc run` of busybox `true`.
    Cold,
    /// `ctr run --rm` through runvm's shim against runc's.
    Ctr,
    /// The CRI path (the kubelet's): run a pod, start a container in it, stop the pod; runvm's
    /// and runc's runtime handlers.
    Cri,
    /// QEMU booting the kernel into an init that powers off at once.
    Floor,
    /// Warm starts from the VM factory's pool (`runvm run`, `ctr run --rm`) against runc's,
    /// the pool's fill and refill times, an idle VM's host CPU.
    Factory,
    /// Cold `runvm run` with traces off and on (exported over OTLP to a receiver in xtask),
    /// and the spans that came per traced run.
    Tracing,
    /// `exec true` into a running container.
    Exec,
    /// PSS of 1 and 10 idle pods.
    Memory,
    /// A container writing to stdout.
    Throughput,
    /// N idle pods started in parallel (and a `runvm monitor` scrape of them).
    Density,
}

/// Options of `bench all`.
#[derive(Debug, clap::Args)]
pub struct AllArgs {
    /// Runs of each timed benchmark (k).
    #[arg(short = 'k', long, default_value_t = 5)]
    count: u32,
    /// Idle pods started in parallel by the density benchmark (N).
    #[arg(short = 'n', long, default_value_t = 10)]
    pods: u32,
    /// The folder with the `runvm` and `containerd-shim-runvm-v2` binaries to measure.
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// runvm configuration file to start from [default: as runvm finds it]; the benchmark
    /// gives it a private state root and longer timeouts (pods boot in parallel), and
    /// passes it on as RUNVM_CONFIG.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Seconds pods idle before their memory is read.
    #[arg(long, default_value_t = 3)]
    idle_secs: u64,
    /// MiB the throughput benchmark's container writes to stdout.
    #[arg(long, default_value_t = 256)]
    stdout_mib: u64,
    /// The guest image to measure (its vmlinuz and initrd.img, for runvm's VMs and the floor)
    /// [default: the configuration's], e.g. one built with `cargo xtask guest --kernel
    /// debian-cloud --out DIR`.
    #[arg(long, value_name = "DIR")]
    guest_dir: Option<PathBuf>,
    /// Run only these benchmarks (comma-separated) [default: all].
    #[arg(long, value_delimiter = ',', value_enum)]
    only: Vec<Bench>,
    /// Where results.json and results.svg go.
    #[arg(long, default_value = "target/bench")]
    out_dir: PathBuf,
}

/// What every benchmark shares.
struct Setup {
    work: PathBuf,
    accel: String,
    base: Config,
    runvm: Cli,
    runc: Cli,
    shim: PathBuf,
    bundles: Bundles,
    args: AllArgs,
}

struct Bundles {
    truth: PathBuf,
    echo: PathBuf,
    sleeper: PathBuf,
    writer: PathBuf,
}

/// `bench all`.
pub fn all(args: AllArgs) -> Result<()> {
    ensure!(
        args.count >= 1,
        "--count {} is invalid; valid: 1 or more",
        args.count
    );
    ensure!(
        args.pods >= 1,
        "--pods {} is invalid; valid: 1 or more",
        args.pods
    );
    let mut base = Config::load(args.config.as_deref())?;
    if let Some(dir) = &args.guest_dir {
        base.guest.kernel = dir.join("vmlinuz");
        base.guest.initrd = dir.join("initrd.img");
        for f in [&base.guest.kernel, &base.guest.initrd] {
            ensure!(
                f.is_file(),
                "--guest-dir {}: {} is missing (build it with `cargo xtask guest --out DIR`)",
                dir.display(),
                f.display()
            );
        }
    }
    let accel = base
        .hypervisor
        .accelerator
        .resolve(&HostCpu::detect())?
        .to_string();
    let bin = |name: &str| -> Result<PathBuf> {
        let p = args.bin_dir.join(name);
        ensure!(
            p.is_file(),
            "{} is missing: build it first (`cargo build --release -p runvm -p runvm-shim`, or \
             `make bench`), or point --bin-dir at its folder",
            p.display()
        );
        Ok(std::fs::canonicalize(&p)?)
    };
    let runvm = bin("runvm")?;
    let shim = bin("containerd-shim-runvm-v2")?;
    let runc = resolve_program("runc").context("runc is not installed (apt-get install runc)")?;

    let dir = tempfile::Builder::new().prefix("runvm-bench-").tempdir()?;
    // Dropped before `dir`: ends whatever a failed step left, then the folder goes.
    let sweep = Sweep {
        marker: dir.path().to_path_buf(),
    };
    let work = dir.path().to_path_buf();
    let config = work.join("runvm.toml");
    write_config(&base, &work.join("state"), &config)?;
    let bundles = Bundles {
        truth: bundle(&work, "true", &["true"])?,
        echo: bundle(&work, "echo", &["echo", "workload ran"])?,
        sleeper: bundle(&work, "sleep", &["sleep", "1000000"])?,
        writer: bundle(
            &work,
            "dd",
            &[
                "dd",
                "if=/dev/zero",
                "bs=1M",
                &format!("count={}", args.stdout_mib),
            ],
        )?,
    };
    let logs = work.join("logs");
    std::fs::create_dir_all(&logs)?;
    let setup = Setup {
        accel: accel.clone(),
        runvm: Cli {
            runtime: Runtime::Runvm,
            program: runvm.clone(),
            root: work.join("state"),
            config: config.clone(),
            logs: logs.clone(),
        },
        runc: Cli {
            runtime: Runtime::Runc,
            program: runc,
            root: work.join("runc"),
            config,
            logs,
        },
        work,
        base,
        shim,
        bundles,
        args,
    };
    let (results, out) = setup.measure(runvm.as_path());
    drop(setup);
    let left = sweep.sweep();
    drop(sweep);
    std::fs::create_dir_all(&out).with_context(|| format!("create {}", out.display()))?;
    let kept = keep_error_logs(dir.path(), &out.join("logs"));
    drop(dir);
    if kept > 0 {
        eprintln!(
            "==> {kept} commands wrote to stderr: see {}",
            out.join("logs").display()
        );
    }
    println!("{}", report::table(&results));
    if !left.is_empty() {
        eprintln!(
            "==> warning: {} processes were left and ended: {:?}",
            left.len(),
            left.iter().map(|p| &p.cmdline).collect::<Vec<_>>()
        );
    }
    report::write_json(&out.join("results.json"), &results)?;
    std::fs::write(out.join("results.svg"), report::svg(&results))?;
    eprintln!(
        "==> results written to {} and {}",
        out.join("results.json").display(),
        out.join("results.svg").display()
    );
    Ok(())
}

/// runvm's configuration file `base` (the file it was loaded from, if any, so that only keys
/// set there and below are written: binaries built from another tree refuse unknown keys) with
/// state root `root` and longer timeouts (ten VMs booting at once on two CPUs under TCG take a
/// while: boot 180 s, agent requests 60 s, helpers' start 60 s), written to `path`.
pub(super) fn write_config(base: &Config, root: &Path, path: &Path) -> Result<()> {
    let mut doc: toml::Table = match &base.source {
        Some(file) => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("read {}", file.display()))?;
            text.parse()
                .with_context(|| format!("parse {}", file.display()))?
        }
        None => toml::Table::new(),
    };
    let mut set = |section: &str, key: &str, value: toml::Value| {
        if let toml::Value::Table(t) = doc
            .entry(section)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        {
            t.insert(key.into(), value);
        }
    };
    let root = root.to_str().context("the state root is not UTF-8")?;
    set("runtime", "root", root.into());
    for (key, path) in [
        ("kernel", &base.guest.kernel),
        ("initrd", &base.guest.initrd),
    ] {
        let path = path
            .to_str()
            .context("the guest image's path is not UTF-8")?;
        set("guest", key, path.into());
    }
    let int = |ms: u64| toml::Value::Integer(i64::try_from(ms).unwrap_or(i64::MAX));
    set(
        "agent",
        "boot_timeout_ms",
        int(base.agent.boot_timeout_ms.max(180_000)),
    );
    // CreateContainer of one of ten VMs booting at once on two CPUs under TCG can take more
    // than the default 10 s.
    let request = base.agent.request_timeout_ms.max(60_000);
    set("agent", "request_timeout_ms", int(request));
    let start = base.hypervisor.start_timeout_ms.max(60_000);
    set("hypervisor", "start_timeout_ms", int(start));
    std::fs::write(path, toml::to_string(&doc)?)
        .with_context(|| format!("write {}", path.display()))
}

/// Changes the configuration file at `path` (as [`write_config`] wrote it) with `edit`.
pub(super) fn edit_config(path: &Path, edit: impl FnOnce(&mut toml::Table)) -> Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let mut doc: toml::Table = text
        .parse()
        .with_context(|| format!("parse {}", path.display()))?;
    edit(&mut doc);
    std::fs::write(path, toml::to_string(&doc)?)
        .with_context(|| format!("write {}", path.display()))
}

/// Copies the non-empty stderr files of the benchmarked commands (`WORK/logs/NAME.err`,
/// `WORK/STEP/logs/NAME.err`, `WORK/STEP/NAME.err`) to `to` as `STEP-NAME.err`, replacing what
/// an earlier run left there; returns how many.
fn keep_error_logs(work: &Path, to: &Path) -> usize {
    let _ = std::fs::remove_dir_all(to);
    let mut folders = vec![("main".to_string(), work.join("logs"))];
    for step in std::fs::read_dir(work).into_iter().flatten().flatten() {
        let name = step.file_name().to_string_lossy().to_string();
        if name == "logs" {
            continue;
        }
        folders.push((name.clone(), step.path()));
        folders.push((name, step.path().join("logs")));
    }
    let mut kept = 0;
    for (step, folder) in folders {
        for file in std::fs::read_dir(folder).into_iter().flatten().flatten() {
            let name = file.file_name().to_string_lossy().to_string();
            let non_empty = file.metadata().is_ok_and(|m| m.is_file() && m.len() > 0);
            if name.ends_with(".err") && non_empty && std::fs::create_dir_all(to).is_ok() {
                let target = to.join(format!("{step}-{name}"));
                if std::fs::copy(file.path(), target).is_ok() {
                    kept += 1;
                }
            }
        }
    }
    kept
}

fn bundle(work: &Path, name: &str, args: &[&str]) -> Result<PathBuf> {
    let dir = work.join("bundles").join(name);
    std::fs::create_dir_all(&dir)?;
    busybox_bundle(&dir, &default_spec(args, false))?;
    Ok(dir)
}

/// `k` samples of `f`, in ms; the first failure fails them all.
fn times(k: u32, mut f: impl FnMut(u32) -> Result<Duration>) -> Result<Vec<f64>> {
    (0..k)
        .map(|i| f(i).map(|d| d.as_secs_f64() * 1e3))
        .collect()
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The PSS per kind of process, for a note.
fn breakdown(m: &Memory, per: u32) -> String {
    m.pss_by_kind_kib
        .iter()
        .map(|(k, v)| format!("{k} {:.1}", mib(*v) / f64::from(per)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Ratio of two rows' medians, for a note.
fn ratio(a: &Metric, b: &Metric) -> Option<f64> {
    match (a.stats, b.stats) {
        (Some(a), Some(b)) if b.median > 0.0 => Some(a.median / b.median),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_config_keeps_the_file_and_sets_root_and_timeouts_only() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("base.toml");
        std::fs::write(&file, "[hypervisor]\naccelerator = \"tcg\"\nvcpus = 2\n").unwrap();
        let base = Config::load(Some(&file)).unwrap();
        let out = dir.path().join("out.toml");
        write_config(&base, Path::new("/b/state"), &out).unwrap();
        let doc: toml::Table = std::fs::read_to_string(&out).unwrap().parse().unwrap();
        assert_eq!(doc["hypervisor"]["accelerator"].as_str(), Some("tcg"));
        assert_eq!(doc["hypervisor"]["vcpus"].as_integer(), Some(2));
        assert_eq!(doc["runtime"]["root"].as_str(), Some("/b/state"));
        assert_eq!(doc["agent"]["boot_timeout_ms"].as_integer(), Some(180_000));
        assert_eq!(
            doc["agent"]["request_timeout_ms"].as_integer(),
            Some(60_000)
        );
        let keys: Vec<&String> = doc["hypervisor"].as_table().unwrap().keys().collect();
        assert_eq!(keys, ["accelerator", "start_timeout_ms", "vcpus"]);
        let reread = Config::load(Some(&out)).unwrap();
        assert_eq!(reread.runtime.root, Path::new("/b/state"));
    }
}
