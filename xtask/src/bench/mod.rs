//! Benchmarks. `bench all` (what `make bench` runs) measures runvm side by side with runc and
//! the floor (QEMU booting the same kernel into an init that powers off at once): cold start,
//! exec latency, memory per idle pod, stdout throughput and density. `bench boot` and
//! `bench run` time the library's boot and run paths alone.

mod boot;
mod cli;
mod containerd;
mod floor;
mod procs;
mod report;
mod stats;

pub use boot::{boot, run, BootBenchArgs, RunBenchArgs};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};
use runvm_hypervisor::HostCpu;
use runvm_sandbox::config::{resolve_program, Config};
use runvm_sandbox::container::bundle::{busybox_bundle, default_spec};

use cli::{Cli, Runtime};
use containerd::{Containerd, RUNC_SHIM, RUNVM_SHIM};
use floor::Floor;
use procs::{Memory, Sweep};
use report::{Metric, Results};

/// One benchmark of `bench all`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Bench {
    /// `runvm run` against `runc run` of busybox `true`.
    Cold,
    /// `ctr run --rm` through runvm's shim against runc's.
    Ctr,
    /// QEMU booting the kernel into an init that powers off at once.
    Floor,
    /// `exec true` into a running container.
    Exec,
    /// PSS of 1 and 10 idle pods.
    Memory,
    /// A container writing to stdout.
    Throughput,
    /// N idle pods started in parallel.
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
    /// gives it a private state root and longer boot timeouts (pods boot in parallel).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Seconds pods idle before their memory is read.
    #[arg(long, default_value_t = 3)]
    idle_secs: u64,
    /// MiB the throughput benchmark's container writes to stdout.
    #[arg(long, default_value_t = 256)]
    stdout_mib: u64,
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
    let base = Config::load(args.config.as_deref())?;
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
    let results = setup.measure(runvm.as_path());
    drop(setup);
    let left = sweep.sweep();
    drop(sweep);
    drop(dir);

    let out = &results.1;
    std::fs::create_dir_all(out).with_context(|| format!("create {}", out.display()))?;
    let results = results.0;
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

/// runvm's configuration `base` with state root `root` and longer timeouts (ten VMs booting at
/// once on two CPUs under TCG take a while), written to `path`.
fn write_config(base: &Config, root: &Path, path: &Path) -> Result<()> {
    let mut c = base.clone();
    c.runtime.root = root.to_path_buf();
    c.agent.boot_timeout_ms = c.agent.boot_timeout_ms.max(180_000);
    c.hypervisor.start_timeout_ms = c.hypervisor.start_timeout_ms.max(60_000);
    std::fs::write(path, c.to_toml()).with_context(|| format!("write {}", path.display()))
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

impl Setup {
    fn wants(&self, b: Bench) -> bool {
        self.args.only.is_empty() || self.args.only.contains(&b)
    }

    /// Runs the chosen benchmarks; a failed one becomes a failed row.
    fn measure(&self, runvm: &Path) -> (Results, PathBuf) {
        let k = self.args.count;
        let mut metrics = Vec::new();
        let mut memory = BTreeMap::new();
        let accel = self.accel.as_str();
        const COLD: &str = "cold start to workload";
        if self.wants(Bench::Cold) {
            eprintln!("==> cold start: runvm run / runc run of busybox true, {k} each");
            let vm = self.runvm.within(&self.work.join("cold-runvm"));
            let vm = Metric::new(
                COLD,
                "runvm run",
                "ms",
                accel,
                vm.and_then(|c| times(k, |i| c.run(&self.bundles.truth, &format!("cold{i}")))),
            );
            let rc = Metric::new(
                COLD,
                "runc run",
                "ms",
                "host",
                times(k, |i| {
                    self.runc.run(&self.bundles.truth, &format!("runc-cold{i}"))
                }),
            );
            metrics.push(vm);
            metrics.push(rc);
        }
        if self.wants(Bench::Floor) {
            eprintln!("==> floor: QEMU, same kernel, init powers off at once, {k} runs");
            let (floor_accel, floor) = match Floor::prepare(&self.base, &self.work.join("floor")) {
                Ok(f) => (f.accelerator.to_string(), times(k, |i| f.run(i))),
                Err(e) => (self.accel.clone(), Err(e)),
            };
            let label = "floor: QEMU kernel→init→exit";
            let floor = Metric::new(COLD, label, "ms", &floor_accel, floor);
            if let Some(vm) = metrics
                .iter_mut()
                .find(|m| m.group == COLD && m.label == "runvm run")
            {
                if let Some(r) = ratio(vm, &floor) {
                    vm.note = Some(format!("{r:.2}x the floor"));
                }
            }
            metrics.push(floor);
        }
        if self.wants(Bench::Ctr) {
            eprintln!("==> ctr run --rm through runvm's shim and runc's shim, {k} each");
            const CTR: &str = "cold start: ctr run --rm";
            let ctd = self
                .shim_config()
                .and_then(|config| Containerd::start(&self.work.join("ctd"), &self.shim, &config));
            let (vm, rc) = match &ctd {
                Ok(c) => (
                    times(k, |i| c.run_true(RUNVM_SHIM, &format!("ctr-vm{i}"))),
                    times(k, |i| c.run_true(RUNC_SHIM, &format!("ctr-runc{i}"))),
                ),
                Err(e) => (
                    Err(anyhow!("containerd: {e:#}")),
                    Err(anyhow!("containerd: {e:#}")),
                ),
            };
            drop(ctd);
            metrics.push(Metric::new(CTR, "runvm shim", "ms", accel, vm));
            metrics.push(Metric::new(CTR, "runc shim", "ms", "host", rc));
        }
        if self.wants(Bench::Exec) {
            eprintln!("==> exec true into a running container, {k} each");
            const EXEC: &str = "exec latency";
            let vm = self.exec(&self.runvm.within(&self.work.join("exec")), k);
            let rc = self.exec(&Ok(self.runc.clone()), k);
            let mut vm = Metric::new(EXEC, "runvm exec", "ms", accel, vm);
            let rc = Metric::new(EXEC, "runc exec", "ms", "host", rc);
            if let Some(r) = ratio(&vm, &rc) {
                vm.note = Some(format!("{r:.1}x runc"));
            }
            metrics.push(vm);
            metrics.push(rc);
        }
        if self.wants(Bench::Throughput) {
            let mb = self.args.stdout_mib;
            eprintln!("==> stdout throughput: {mb} MiB through run, {k} each");
            const TP: &str = "stdout throughput";
            let expect = mb << 20;
            let vm = self.runvm.within(&self.work.join("tp")).and_then(|c| {
                (0..k)
                    .map(|i| c.stdout_throughput(&self.bundles.writer, &format!("tp{i}"), expect))
                    .collect()
            });
            let rc = (0..k)
                .map(|i| {
                    self.runc.stdout_throughput(
                        &self.bundles.writer,
                        &format!("runc-tp{i}"),
                        expect,
                    )
                })
                .collect();
            let label = format!("{mb} MiB");
            metrics.push(Metric::new(TP, "runvm run", "MB/s", accel, vm).with_note(label.clone()));
            metrics.push(Metric::new(TP, "runc run", "MB/s", "host", rc).with_note(label));
        }
        let mut ten = None;
        if self.wants(Bench::Density) {
            let n = self.args.pods;
            eprintln!("==> density: {n} idle pods started in parallel");
            const DENSITY: &str = "density";
            let r = self.idle_pods(n, "density");
            let (wall, pss) = match &r {
                Ok(p) => {
                    memory.insert(format!("{n} pods (density)"), p.memory.clone());
                    (
                        Ok(vec![p.wall.as_secs_f64()]),
                        Ok(vec![mib(p.memory.pss_kib)]),
                    )
                }
                Err(e) => (Err(anyhow!("{e:#}")), Err(anyhow!("{e:#}"))),
            };
            let mut wall = Metric::new(
                DENSITY,
                &format!("runvm: {n} pods, wall time until all run"),
                "s",
                accel,
                wall,
            );
            if let Ok(p) = &r {
                wall.note = p.retry_note();
            }
            metrics.push(wall);
            metrics.push(Metric::new(
                DENSITY,
                &format!("runvm: {n} pods, total PSS"),
                "MiB",
                accel,
                pss,
            ));
            if n == 10 {
                ten = Some(r);
            }
        }
        if self.wants(Bench::Memory) {
            eprintln!("==> memory: PSS of 1 and 10 idle pods");
            const MEM: &str = "host memory per idle pod (PSS)";
            for n in [1u32, 10] {
                let r = match (n, ten.take()) {
                    (10, Some(r)) => r,
                    (_, back) => {
                        ten = back;
                        self.idle_pods(n, &format!("mem{n}"))
                    }
                };
                let per = r
                    .as_ref()
                    .map(|p| vec![mib(p.memory.pss_kib) / f64::from(n)])
                    .map_err(|e| anyhow!("{e:#}"));
                let mut row = Metric::new(
                    MEM,
                    &format!("runvm: {n} pod{}, per pod", if n == 1 { "" } else { "s" }),
                    "MiB",
                    accel,
                    per,
                );
                if let Ok(p) = &r {
                    let m = &p.memory;
                    row.note = Some(format!(
                        "total {:.1} MiB; per pod: {}{}",
                        mib(m.pss_kib),
                        breakdown(m, n),
                        p.retry_note().map(|n| format!("; {n}")).unwrap_or_default()
                    ));
                    memory.insert(format!("{n} idle pods"), m.clone());
                }
                metrics.push(row);
            }
        }
        (
            Results {
                accelerator: self.accel.clone(),
                count: k,
                pods: self.args.pods,
                host: report::Host::detect(runvm),
                metrics,
                memory,
            },
            self.args.out_dir.clone(),
        )
    }

    /// runvm's configuration for the shim: its state root in the containerd folder.
    fn shim_config(&self) -> Result<PathBuf> {
        let path = self.work.join("shim-runvm.toml");
        write_config(&self.base, &self.work.join("shim-state"), &path)?;
        Ok(path)
    }

    /// `k` times `exec true` into a running sleeper of `cli`.
    fn exec(&self, cli: &Result<Cli>, k: u32) -> Result<Vec<f64>> {
        let cli = cli.as_ref().map_err(|e| anyhow!("{e:#}"))?;
        let id = match cli.runtime {
            Runtime::Runvm => "exec-vm",
            Runtime::Runc => "runc-exec",
        };
        let container = cli.run_detached(&self.bundles.sleeper, id)?;
        let samples = times(k, |i| cli.exec_true(&container.id, i));
        drop(container);
        samples
    }

    /// `n` idle sleepers started in parallel in their own root: the wall time until all run,
    /// and their memory after idling.
    fn idle_pods(&self, n: u32, name: &str) -> Result<IdlePods> {
        let cli = self.runvm.within(&self.work.join(name))?;
        let (wall, pods) = cli.start_pods(&self.bundles.sleeper, "p", n)?;
        std::thread::sleep(Duration::from_secs(self.args.idle_secs));
        let memory = pods.memory()?;
        ensure!(
            memory.processes >= n as usize,
            "found {} processes for {n} pods",
            memory.processes
        );
        Ok(IdlePods {
            wall,
            memory,
            retried: pods.retried.clone(),
        })
    }
}

/// What [`Setup::idle_pods`] found.
struct IdlePods {
    wall: Duration,
    memory: Memory,
    /// Pods that failed to start at first, with the error.
    retried: Vec<String>,
}

impl IdlePods {
    fn retry_note(&self) -> Option<String> {
        (!self.retried.is_empty()).then(|| {
            format!(
                "{} pod(s) failed to start at first and were started again: {}",
                self.retried.len(),
                self.retried.join("; ")
            )
        })
    }
}
