//! `cargo xtask bench boot` (sandboxes booted one after another through the library: how long
//! the agent took to answer, and the host memory of the VM's processes at idle) and `bench run`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use runvm_sandbox::config::Config;
use runvm_sandbox::sandbox::create_qemu_sandbox;
use runvm_sandbox::SandboxId;
use serde::Serialize;

use super::stats::{median, parse_smaps_rollup};

/// Options of `bench boot`.
#[derive(Debug, clap::Args)]
pub struct BootBenchArgs {
    /// Number of boots.
    #[arg(long, default_value_t = 5)]
    count: u32,
    /// runvm configuration file [default: as runvm finds it].
    #[arg(long)]
    config: Option<PathBuf>,
    /// Seconds the last VM idles before its memory is read.
    #[arg(long, default_value_t = 3)]
    idle_secs: u64,
    /// Where to write the results as JSON.
    #[arg(long, default_value = "target/bench/boot.json")]
    out: PathBuf,
}

#[derive(Debug, Serialize)]
struct Boot {
    /// From QEMU's start to the agent's first answer, ms.
    qemu_to_agent_ms: f64,
    /// From the start call (helpers included) to the agent's first answer, ms.
    total_ms: f64,
    /// Guest clock when init ran, ms.
    guest_init_ms: f64,
    /// Guest clock when the agent listened, ms.
    guest_listening_ms: f64,
}

#[derive(Debug, Serialize)]
struct ProcessMemory {
    name: String,
    rss_kib: u64,
    pss_kib: u64,
}

#[derive(Debug, Serialize)]
struct Results {
    accelerator: String,
    boots: Vec<Boot>,
    median_qemu_to_agent_ms: f64,
    median_total_ms: f64,
    idle_memory: Vec<ProcessMemory>,
}

pub fn boot(args: &BootBenchArgs) -> Result<()> {
    anyhow::ensure!(
        args.count >= 1,
        "--count {} is invalid; valid: 1 or more",
        args.count
    );
    let config = Config::load(args.config.as_deref())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut boots = Vec::new();
    let mut memory = Vec::new();
    let mut accelerator = String::new();
    for i in 0..args.count {
        let id = SandboxId::parse(&format!("bench-{}-{i}", std::process::id()))?;
        eprintln!("==> boot {}/{}", i + 1, args.count);
        runtime.block_on(async {
            let (mut sb, report) = create_qemu_sandbox(&config, id, Default::default()).await?;
            accelerator = report.accelerator.to_string();
            let b = report.guest.boot_times;
            boots.push(Boot {
                qemu_to_agent_ms: report.timings.agent_ready.as_secs_f64() * 1e3,
                total_ms: report.timings.total.as_secs_f64() * 1e3,
                guest_init_ms: b.init_entered_us as f64 / 1e3,
                guest_listening_ms: b.agent_listening_us as f64 / 1e3,
            });
            if i + 1 == args.count {
                tokio::time::sleep(Duration::from_secs(args.idle_secs)).await;
                for p in sb.pids() {
                    let path = format!("/proc/{}/smaps_rollup", p.pid);
                    let text = std::fs::read_to_string(&path).with_context(|| path.clone())?;
                    let (rss_kib, pss_kib) = parse_smaps_rollup(&text);
                    memory.push(ProcessMemory {
                        name: p.name,
                        rss_kib,
                        pss_kib,
                    });
                }
            }
            sb.stop().await?;
            sb.delete(false).await?;
            anyhow::Ok(())
        })?;
    }
    let results = Results {
        accelerator,
        median_qemu_to_agent_ms: median(boots.iter().map(|b| b.qemu_to_agent_ms).collect()),
        median_total_ms: median(boots.iter().map(|b| b.total_ms).collect()),
        boots,
        idle_memory: memory,
    };
    print_table(&results);
    write_json(&args.out, &results)
}

fn print_table(r: &Results) {
    println!("boot benchmark (accelerator: {})", r.accelerator);
    println!("| boot | QEMU start → agent answer | start → agent answer | guest init | guest agent listening |");
    println!("|-----:|--------------------------:|---------------------:|-----------:|----------------------:|");
    for (i, b) in r.boots.iter().enumerate() {
        println!(
            "| {:>4} | {:>22.0} ms | {:>17.0} ms | {:>7.0} ms | {:>18.0} ms |",
            i + 1,
            b.qemu_to_agent_ms,
            b.total_ms,
            b.guest_init_ms,
            b.guest_listening_ms
        );
    }
    println!(
        "| median | {:>20.0} ms | {:>17.0} ms | | |",
        r.median_qemu_to_agent_ms, r.median_total_ms
    );
    println!();
    println!("host memory at idle (last boot)");
    println!("| process | RSS MiB | PSS MiB |");
    println!("|---------|--------:|--------:|");
    let (mut rss, mut pss) = (0, 0);
    for m in &r.idle_memory {
        println!(
            "| {} | {:.1} | {:.1} |",
            m.name,
            m.rss_kib as f64 / 1024.0,
            m.pss_kib as f64 / 1024.0
        );
        rss += m.rss_kib;
        pss += m.pss_kib;
    }
    println!(
        "| total | {:.1} | {:.1} |",
        rss as f64 / 1024.0,
        pss as f64 / 1024.0
    );
}

fn write_json(path: &Path, r: &Results) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    std::fs::write(path, serde_json::to_string_pretty(r)?)
        .with_context(|| format!("write {}", path.display()))?;
    eprintln!("==> results written to {}", path.display());
    Ok(())
}

/// Options of `bench run`.
#[derive(Debug, clap::Args)]
pub struct RunBenchArgs {
    /// Number of runs.
    #[arg(long, default_value_t = 5)]
    count: u32,
    /// runvm configuration file [default: as runvm finds it].
    #[arg(long)]
    config: Option<PathBuf>,
    /// Where to write the results as JSON.
    #[arg(long, default_value = "target/bench/run.json")]
    out: PathBuf,
}

#[derive(Debug, Serialize)]
struct Run {
    first_output_ms: f64,
    agent_ready_ms: f64,
    total_ms: f64,
    exit_code: i32,
}

#[derive(Debug, Serialize)]
struct RunResults {
    accelerator: String,
    runs: Vec<Run>,
    median_first_output_ms: f64,
    median_total_ms: f64,
}

pub fn run(args: &RunBenchArgs) -> Result<()> {
    use runvm_sandbox::container::bundle::{busybox_bundle, default_spec};
    anyhow::ensure!(
        args.count >= 1,
        "--count {} is invalid; valid: 1 or more",
        args.count
    );
    let config = Config::load(args.config.as_deref())?;
    let work = tempfile::tempdir()?;
    let bundle = work.path().join("bundle");
    std::fs::create_dir_all(&bundle)?;
    busybox_bundle(&bundle, &default_spec(&["echo", "hello from runvm"], false))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut runs = Vec::new();
    let mut accelerator = String::new();
    for i in 0..args.count {
        eprintln!("==> run {}/{}", i + 1, args.count);
        let id =
            runvm_sandbox::ContainerId::parse(&format!("bench-run-{}-{i}", std::process::id()))?;
        let (_tx, rx) = tokio::sync::mpsc::channel(1);
        let outcome = runtime.block_on(runvm_sandbox::run::run_foreground(
            &config,
            id,
            &bundle,
            tokio::io::empty(),
            tokio::io::sink(),
            tokio::io::sink(),
            rx,
        ))?;
        accelerator = outcome.boot.accelerator.to_string();
        runs.push(Run {
            first_output_ms: outcome.first_output.unwrap_or_default().as_secs_f64() * 1e3,
            agent_ready_ms: outcome.boot.timings.total.as_secs_f64() * 1e3,
            total_ms: outcome.total.as_secs_f64() * 1e3,
            exit_code: outcome.exit.code,
        });
    }
    let results = RunResults {
        accelerator,
        median_first_output_ms: median(runs.iter().map(|r| r.first_output_ms).collect()),
        median_total_ms: median(runs.iter().map(|r| r.total_ms).collect()),
        runs,
    };
    println!(
        "run benchmark: `echo` in a new sandbox (accelerator: {})",
        results.accelerator
    );
    println!(
        "| run | start → agent ready | start → first output | start → exit and cleanup | exit |"
    );
    println!(
        "|----:|--------------------:|---------------------:|-------------------------:|-----:|"
    );
    for (i, r) in results.runs.iter().enumerate() {
        println!(
            "| {:>3} | {:>16.0} ms | {:>17.0} ms | {:>21.0} ms | {:>4} |",
            i + 1,
            r.agent_ready_ms,
            r.first_output_ms,
            r.total_ms,
            r.exit_code
        );
    }
    println!(
        "| median | | {:>17.0} ms | {:>21.0} ms | |",
        results.median_first_output_ms, results.median_total_ms
    );
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&results)?)?;
    eprintln!("==> results written to {}", args.out.display());
    Ok(())
}
