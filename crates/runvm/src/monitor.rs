//! `runvm monitor`: serves Prometheus metrics of every sandbox under the state roots until
//! SIGTERM or SIGINT. The work is runvm-monitor's; this parses, binds and waits.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use runvm_monitor::collect::Sources;
use runvm_monitor::procfs::ProcFs;
use runvm_monitor::Monitor;
use runvm_sandbox::agent::TtrpcConnector;
use runvm_sandbox::config::Config;
use runvm_sandbox::store::{check_root, Store};

/// `runvm monitor`'s flags.
#[derive(Debug, Clone, Args)]
pub struct MonitorArgs {
    /// Where to serve /metrics: IP:PORT, [IPv6]:PORT, localhost:PORT or :PORT (every
    /// interface); port 0 picks a free one (printed on stdout).
    #[arg(long, value_name = "ADDR")]
    pub listen: String,
    /// Another state root to watch besides --root (runtime.root); repeatable.
    #[arg(long, value_name = "PATH")]
    pub extra_root: Vec<PathBuf>,
    /// The longest an agent may take to connect and answer, ms; a sandbox whose agent takes
    /// longer is shown without the guest's view and counted in
    /// runvm_monitor_scrape_errors_total{stage="agent"}.
    #[arg(long, default_value_t = 1000, value_name = "MS",
          value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub agent_timeout_ms: u64,
    /// How long a process's PSS reading is reused, seconds: reading it makes the kernel walk
    /// the process's page tables (about 2 ms for an idle QEMU), so readings are spread over
    /// this age; 0 reads it at every scrape. RSS, CPU, threads and descriptors are read at
    /// every scrape.
    #[arg(long, default_value_t = 60, value_name = "SECS",
          value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub pss_max_age_secs: u64,
}

pub fn run(config: &Config, args: &MonitorArgs) -> Result<ExitCode> {
    // The address first: a bad or taken one is refused before anything else.
    let listener = runvm_monitor::server::bind(&args.listen)?;
    let address = listener.local_addr()?;
    let mut roots = vec![config.runtime.root.clone()];
    for root in &args.extra_root {
        let root = std::path::absolute(root)?;
        check_root(&root)?;
        if !roots.contains(&root) {
            roots.push(root);
        }
    }
    let timeout = Duration::from_millis(args.agent_timeout_ms);
    let sources = Sources {
        stores: roots.iter().cloned().map(Store::new).collect(),
        procfs: ProcFs::default(),
        connector: Arc::new(TtrpcConnector::new(timeout)),
        agent_timeout: timeout,
        pss_max_age: Duration::from_secs(args.pss_max_age_secs),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let roots: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
    println!(
        "runvm monitor: serving http://{address}/metrics for the sandboxes of {}",
        roots.join(", ")
    );
    runtime.block_on(async {
        let monitor = Arc::new(Monitor::new(sources));
        runvm_monitor::server::serve(listener, monitor, stop_signal()).await
    })?;
    Ok(ExitCode::SUCCESS)
}

/// SIGTERM (systemd's stop) or SIGINT.
async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            tracing::warn!("cannot watch SIGTERM and SIGINT: stop the monitor with SIGKILL");
            std::future::pending::<()>().await;
        }
    }
}
