//! The commands. Logic lives in runvm-sandbox; this file parses, calls and prints.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use runvm_sandbox::config::Config;
use runvm_sandbox::{check, sandbox, ContainerId, SandboxId};

use crate::{Cli, Command};

pub fn run(cli: Cli) -> Result<ExitCode> {
    let mut config = Config::load(cli.config.as_deref())?;
    if let Some(root) = cli.root {
        config.runtime.root = root;
        config.validate()?;
    }
    match cli.command {
        Command::Check => Ok(check(&config)),
        Command::Env => {
            match &config.source {
                Some(p) => println!("# loaded from {}", p.display()),
                None => println!("# built-in defaults (no configuration file)"),
            }
            print!("{}", config.to_toml());
            Ok(ExitCode::SUCCESS)
        }
        Command::Boot { id } => boot(&config, id),
        Command::Run { bundle, id } => run_foreground(&config, &bundle, &id),
    }
}

fn check(config: &Config) -> ExitCode {
    let report = check::run(config);
    let width = report.items.iter().map(|i| i.name.len()).max().unwrap_or(0);
    for item in &report.items {
        let mark = if item.ok { "✓" } else { "✗" };
        println!("{mark} {:width$}  {}", item.name, item.detail);
        if let Some(fix) = &item.fix {
            let note = if item.required { "" } else { " (optional)" };
            println!("  {:width$}  → {fix}{note}", "");
        }
    }
    match &report.accelerator {
        Ok(a) => println!("accelerator: {a}"),
        Err(e) => println!("accelerator: none: {e}"),
    }
    if report.can_run() {
        println!("sandboxes can run on this host");
        ExitCode::SUCCESS
    } else {
        println!("sandboxes cannot run on this host: fix the required items marked ✗");
        ExitCode::FAILURE
    }
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn boot(config: &Config, id: Option<String>) -> Result<ExitCode> {
    let id = SandboxId::parse(&id.unwrap_or_else(|| format!("boot-{}", std::process::id())))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        eprintln!("==> booting sandbox {id} ...");
        let mut interrupt =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        // An interrupted boot drops the future: the half-made sandbox is undone by its guards
        // (QEMU's processes are killed on drop), and the state folder is removed below.
        let created = tokio::select! {
            r = sandbox::create_qemu_sandbox(config, id.clone(), Default::default()) => r,
            _ = interrupt.recv() => { cleanup_interrupted(config, &id); anyhow::bail!("interrupted; sandbox removed") }
            _ = terminate.recv() => { cleanup_interrupted(config, &id); anyhow::bail!("terminated; sandbox removed") }
        };
        let (mut sb, report) = created?;
        let g = &report.guest;
        let b = &g.boot_times;
        println!("accelerator:     {}", report.accelerator);
        println!(
            "agent:           runvm-agent {} (protocol {})",
            report.agent.agent_version, report.agent.api_version
        );
        println!("guest kernel:    {}", report.agent.kernel_release);
        println!(
            "guest:           {} vCPU, {} MiB RAM ({} MiB available)",
            g.cpu_count,
            g.mem_total_bytes >> 20,
            g.mem_available_bytes >> 20
        );
        println!("VM started in:   {}", secs(report.timings.vm_started));
        println!(
            "agent ready in:  {} after QEMU start ({} in all)",
            secs(report.timings.agent_ready),
            secs(report.timings.total)
        );
        println!(
            "guest timeline:  init {:.2} s, modules loaded {:.2} s, agent listening {:.2} s (guest clock)",
            b.init_entered_us as f64 / 1e6,
            b.modules_loaded_us as f64 / 1e6,
            b.agent_listening_us as f64 / 1e6
        );
        let processes: Vec<String> = sb.pids().iter().map(|p| format!("{} {}", p.name, p.pid)).collect();
        println!("host processes:  {}", processes.join(", "));
        eprintln!("==> shutting down sandbox {} ...", sb.id());
        sb.stop().await?;
        sb.delete(false).await?;
        println!("sandbox stopped");
        Ok(ExitCode::SUCCESS)
    })
}

/// Removes what an interrupted boot left in the state folder.
fn cleanup_interrupted(config: &Config, id: &SandboxId) {
    let dir = config.runtime.root.join(id.as_str());
    if let Err(e) = std::fs::remove_dir_all(&dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            eprintln!("runvm: cannot remove {}: {e}", dir.display());
        }
    }
}

fn run_foreground(config: &Config, bundle: &std::path::Path, id: &str) -> Result<ExitCode> {
    let id = ContainerId::parse(id)?;
    let bundle =
        std::path::absolute(bundle).with_context(|| format!("bundle path {}", bundle.display()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        for (kind, number) in [
            (SignalKind::interrupt(), libc::SIGINT),
            (SignalKind::terminate(), libc::SIGTERM),
            (SignalKind::hangup(), libc::SIGHUP),
            (SignalKind::quit(), libc::SIGQUIT),
            (SignalKind::user_defined1(), libc::SIGUSR1),
            (SignalKind::user_defined2(), libc::SIGUSR2),
        ] {
            let mut stream = signal(kind)?;
            let tx = tx.clone();
            tokio::spawn(async move {
                while stream.recv().await.is_some() {
                    if tx.send(number).await.is_err() {
                        break;
                    }
                }
            });
        }
        drop(tx);
        let outcome = runvm_sandbox::run::run_foreground(
            config,
            id,
            &bundle,
            tokio::io::stdin(),
            tokio::io::stdout(),
            tokio::io::stderr(),
            rx,
        )
        .await?;
        tracing::info!(
            first_output_ms = outcome.first_output.map(|d| d.as_millis() as u64),
            total_ms = outcome.total.as_millis() as u64,
            "container exited"
        );
        Ok(ExitCode::from(outcome.exit.code.clamp(0, 255) as u8))
    });
    // The stdin relay may sit in a blocking read of a terminal: do not wait for it.
    runtime.shutdown_background();
    result
}
