//! The VM factory's rows: warm starts (a VM from the pool) through `runvm run` and `ctr run
//! --rm`, next to runc's; the pool's fill and refill times; and the host CPU an idle VM costs.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use super::cli::Cli;
use super::containerd::{Containerd, RUNC_SHIM, RUNVM_SHIM};
use super::procs::{self, timed};
use super::report::Metric;
use super::{edit_config, ratio, times, write_config, Setup};

const WARM: &str = "warm start (VM factory)";
const IDLE_CPU: &str = "host CPU of an idle VM";
/// VMs the benchmark's factory keeps ready.
const CACHE: u32 = 2;
/// How long the idle VMs' CPU is sampled.
const IDLE_SAMPLE: Duration = Duration::from_secs(30);

/// `runvm factory status --format json`.
fn status(cli: &Cli) -> Result<serde_json::Value> {
    let out = cli
        .cmd(&["factory", "status", "--format", "json"])
        .output()
        .context("run runvm factory status")?;
    if !out.status.success() {
        bail!(
            "runvm factory status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Waits until the pool is full again; its last refill time, ms.
fn wait_full(cli: &Cli) -> Result<Option<f64>> {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let s = status(cli)?;
        if !s["running"].as_bool().unwrap_or(false) {
            bail!("the factory is not running: {s}");
        }
        if s["ready"].as_u64() >= s["cache"].as_u64() {
            return Ok(s["last_refill_ms"].as_f64());
        }
        if Instant::now() > deadline {
            bail!("the pool did not refill within 180 s: {s}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// CPU time (user + system) of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// The CPU the processes naming `marker` (the pool's VMs) use over [`IDLE_SAMPLE`], as % of
/// one core per VM.
fn idle_cpu(marker: &Path, vms: u32) -> Result<Vec<f64>> {
    let pids: Vec<u32> = procs::naming(marker).iter().map(|p| p.pid).collect();
    if pids.is_empty() {
        bail!("no VM process names {}", marker.display());
    }
    let sum = || pids.iter().filter_map(|p| cpu_ticks(*p)).sum::<u64>();
    let before = sum();
    let t0 = Instant::now();
    std::thread::sleep(IDLE_SAMPLE);
    let ticks = sum().saturating_sub(before) as f64;
    // /proc counts in USER_HZ, 100 on Linux (x86 and arm64 alike).
    let hz = 100.0;
    let secs = t0.elapsed().as_secs_f64();
    Ok(vec![100.0 * ticks / hz / secs / f64::from(vms)])
}

impl Setup {
    /// Starts a factory of [`CACHE`] VMs and measures warm starts against runc's.
    pub(super) fn factory(&self) -> Vec<Metric> {
        let k = self.k();
        eprintln!("==> VM factory (cache {CACHE}): warm runvm run and ctr run --rm, {k} each");
        let dir = self.work.join("factory");
        let made = (|| -> Result<Cli> {
            std::fs::create_dir_all(&dir)?;
            let config = dir.join("runvm.toml");
            write_config(&self.base, &dir.join("state"), &config)?;
            edit_config(&config, |doc| {
                let mut factory = toml::Table::new();
                factory.insert("cache".into(), toml::Value::Integer(i64::from(CACHE)));
                doc.insert("factory".into(), toml::Value::Table(factory));
            })?;
            let mut cli = self.runvm.within(&dir)?;
            cli.config = config;
            Ok(cli)
        })();
        let cli = match made {
            Ok(c) => c,
            Err(e) => return vec![Metric::new(WARM, "factory", "ms", self.accel(), Err(e))],
        };
        let fill = times(1, |_| {
            let took = timed(
                &mut cli.cmd(&["factory", "init"]),
                &cli.logs,
                "factory-init",
            )?;
            wait_full(&cli)?;
            Ok(took)
        });
        let idle = match &fill {
            Ok(_) => idle_cpu(&dir.join("state/.vmhome~"), CACHE),
            Err(e) => Err(anyhow!("{e:#}")),
        };
        let mut refills = Vec::new();
        let mut warm_run = |i: u32| -> Result<Duration> {
            if let Some(ms) = wait_full(&cli)? {
                refills.push(ms);
            }
            cli.run(&self.bundles.truth, &format!("warm{i}"))
        };
        let vm = match &fill {
            Ok(_) => times(k, &mut warm_run),
            Err(e) => Err(anyhow!("{e:#}")),
        };
        let rc = times(k, |i| {
            self.runc.run(&self.bundles.truth, &format!("runc-warm{i}"))
        });
        let ctd = Containerd::start(&dir.join("ctd"), &self.shim, &cli.config);
        let (ctr_vm, ctr_rc) = match (&ctd, &fill) {
            (Ok(c), Ok(_)) => (
                times(k, |i| {
                    if let Some(ms) = wait_full(&cli)? {
                        refills.push(ms);
                    }
                    c.run_true(RUNVM_SHIM, &format!("warm-ctr{i}"))
                }),
                times(k, |i| c.run_true(RUNC_SHIM, &format!("warm-ctr-runc{i}"))),
            ),
            (Err(e), _) | (_, Err(e)) => (Err(anyhow!("{e:#}")), Err(anyhow!("{e:#}"))),
        };
        drop(ctd);
        let hits = status(&cli)
            .map(|s| format!("{} hits, {} misses", s["hits"], s["misses"]))
            .unwrap_or_default();
        let destroyed = Command::new(&cli.program)
            .args(["--root"])
            .arg(&cli.root)
            .env("RUNVM_CONFIG", &cli.config)
            .args(["factory", "destroy"])
            .output();
        if let Err(e) = destroyed {
            eprintln!("==> warning: runvm factory destroy: {e}");
        }
        let mut run = Metric::new(WARM, "runvm run (factory VM)", "ms", self.accel(), vm);
        let runc = Metric::new(WARM, "runc run", "ms", "host", rc);
        if let Some(r) = ratio(&run, &runc) {
            run.note = Some(format!("{r:.1}x runc; `true`; {hits}"));
        }
        let mut ctr = Metric::new(
            WARM,
            "ctr run --rm: runvm shim (factory VM)",
            "ms",
            self.accel(),
            ctr_vm,
        );
        let ctr_runc = Metric::new(WARM, "ctr run --rm: runc shim", "ms", "host", ctr_rc);
        if let Some(r) = ratio(&ctr, &ctr_runc) {
            ctr.note = Some(format!("{r:.1}x runc"));
        }
        let refill = if refills.is_empty() {
            Err(anyhow!("no refill was measured"))
        } else {
            Ok(refills)
        };
        vec![
            run,
            runc,
            ctr,
            ctr_runc,
            Metric::new(WARM, "pool fill: factory init", "ms", self.accel(), fill)
                .with_note(format!("{CACHE} VMs booted one after another")),
            Metric::new(
                WARM,
                "pool refill after a hand-out",
                "ms",
                self.accel(),
                refill,
            )
            .with_note("from the hand-out until the pool is full again"),
            Metric::new(IDLE_CPU, "runvm (pool VM)", "% core", self.accel(), idle).with_note(
                format!("QEMU and helpers, over {} s", IDLE_SAMPLE.as_secs()),
            ),
        ]
    }
}
