//! The commands. Logic lives in runvm-sandbox; this file parses, calls and prints.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use runvm_sandbox::config::Config;
use runvm_sandbox::{check, sandbox, SandboxId};

use crate::{oci, ops, standin, Cli, Command};

/// The configuration (`--config`, `$RUNVM_CONFIG` or the default file) with `--root` applied,
/// read and checked once, before logging starts (it says where traces go).
pub fn load_config(g: &crate::args::Global) -> Result<Config> {
    let mut config = Config::load(g.config.as_deref())?;
    if let Some(root) = &g.root {
        config.runtime.root = std::path::absolute(root)?;
        config.validate()?;
    }
    Ok(config)
}

pub fn run(cli: Cli, config: Result<Config>) -> Result<ExitCode> {
    let g = &cli.global;
    let config = config?;
    let c = &config;
    // Records under the root decide what runvm kills and removes: a root others can change
    // is refused before any command reads or writes there.
    tracing::debug!(command = ?cli.command, "runvm {}", env!("CARGO_PKG_VERSION"));
    if !matches!(
        cli.command,
        Command::Check | Command::Env | Command::Spec { .. } | Command::Features | Command::Version
    ) {
        runvm_sandbox::store::check_root(&config.runtime.root)?;
    }
    let _trace = crate::traces::start(&cli.command);
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
        Command::Boot { id } => boot(c, id),
        Command::Network(n) => crate::network::run(c, n),
        Command::Factory(f) => crate::factory::run(g, c, f),
        Command::Create(a) => oci::create(g, c, &a),
        Command::Start { id } => oci::start(c, &id),
        Command::Run {
            create,
            detach,
            keep,
        } => oci::run(g, c, &create, detach, keep),
        Command::State { id } => oci::state(c, &id),
        Command::Kill { all, id, signal } => oci::kill(c, &id, &signal, all),
        Command::Delete { force, id } => oci::delete(c, &id, force),
        Command::Exec(a) => ops::exec(g, c, &a),
        Command::Ps { format, id, .. } => oci::ps(c, &id, format),
        Command::Pause { id } => oci::pause(c, &id, true),
        Command::Resume { id } => oci::pause(c, &id, false),
        Command::List { format, quiet } => oci::list(c, format, quiet),
        Command::Events {
            timeline: true,
            svg,
            id,
            ..
        } => ops::timeline(c, &id, svg.as_deref()),
        Command::Events {
            stats,
            interval,
            id,
            ..
        } => ops::events(c, &id, stats, interval),
        Command::Update(a) => ops::update(c, &a),
        Command::Spec { bundle } => oci::spec(&bundle),
        Command::Features => ops::features(),
        Command::Monitor(a) => crate::monitor::run(c, &a),
        Command::Version => {
            println!("{}", crate::version_text());
            Ok(ExitCode::SUCCESS)
        }
        Command::Standin {
            exec,
            terminal,
            streams,
            exec_request,
            id,
        } => {
            let handoff = if exec_request {
                standin::Received::Exec
            } else {
                standin::Received::Streams(streams.unwrap_or_else(|| "---".into()))
            };
            standin::main(c, &id, &exec, terminal, handoff)
        }
        Command::Teardown { sandbox } => standin::teardown_main(c, &sandbox),
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
