//! `runvm factory init|status|destroy`: a thin layer over `runvm_sandbox::factory`.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use runvm_sandbox::config::Config;
use runvm_sandbox::factory::{self, client, daemon, FactoryError, FactoryStatus};

use crate::args::{FactoryCommand, Format, Global};
use crate::oci::block_on;

/// How long `destroy` waits for a running daemon to stop before killing it.
const STOP_WAIT: Duration = Duration::from_secs(60);

pub fn run(g: &Global, config: &Config, command: FactoryCommand) -> Result<ExitCode> {
    match command {
        FactoryCommand::Init { foreground: true } => {
            if let Err(e) = daemon::lower_priority() {
                tracing::warn!(error = %e, "cannot lower the factory's CPU priority");
            }
            block_on(async {
                daemon::serve(config.clone(), |socket| {
                    tracing::info!(socket = %socket.display(), "factory listening");
                })
                .await?;
                Ok(())
            })?;
            Ok(ExitCode::SUCCESS)
        }
        FactoryCommand::Init { foreground: false } => init(g, config),
        FactoryCommand::Status { format } => {
            let status = block_on(status(config))?;
            match format {
                Format::Json => println!("{}", serde_json::to_string_pretty(&status)?),
                Format::Table => print_status(config, &status),
            }
            Ok(ExitCode::SUCCESS)
        }
        FactoryCommand::Destroy => block_on(destroy(config)),
    }
}

/// The running daemon's status, or what is on disk without one.
async fn status(config: &Config) -> Result<FactoryStatus> {
    let root = &config.runtime.root;
    match client::status(root).await {
        Ok(Some(status)) => return Ok(status),
        Ok(None) => {}
        // A daemon that died while it answered is as good as none.
        Err(_) if !daemon::daemon_running(&factory::factory_dir(root)) => {}
        Err(e) => return Err(e.into()),
    }
    let records = factory::pool_store(root)
        .list_sandboxes()
        .map(|l| l.len())
        .unwrap_or(0);
    Ok(FactoryStatus {
        cache: config.factory.cache,
        source: factory::source(config),
        records: u32::try_from(records).unwrap_or(u32::MAX),
        ..FactoryStatus::default()
    })
}

fn print_status(config: &Config, s: &FactoryStatus) {
    let root = config.runtime.root.display();
    match (s.running, s.pid) {
        (true, Some(pid)) => println!("factory     running (pid {pid}) for {root}"),
        (true, None) => println!("factory     running for {root}"),
        (false, _) => println!("factory     not running for {root}"),
    }
    println!("template    off (not supported: docs/factory.md)");
    println!(
        "cache       {} VMs configured, {} ready{}",
        s.cache,
        s.ready,
        if s.booting { ", one booting" } else { "" }
    );
    println!(
        "hand-outs   {} hits, {} misses, {} failed boots",
        s.hits, s.misses, s.boot_failures
    );
    let ms = |v: Option<u64>| v.map_or_else(|| "-".to_string(), |v| format!("{v} ms"));
    println!(
        "timing      last boot {}, last refill {}",
        ms(s.last_boot_ms),
        ms(s.last_refill_ms)
    );
    println!(
        "source      kernel {}, initramfs {}, qemu {} (key {})",
        s.source.kernel.display(),
        s.source.initrd.display(),
        s.source.qemu.display(),
        s.source.key
    );
    if !s.running && s.records > 0 {
        println!(
            "leftovers   {} pool VM records (`runvm factory destroy` cleans them)",
            s.records
        );
    }
}

/// Starts the daemon in its own session, its output in the factory's log, and waits until
/// its pool is full.
fn init(g: &Global, config: &Config) -> Result<ExitCode> {
    if config.factory.cache == 0 {
        return Err(FactoryError::NotConfigured {
            config: config
                .source
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "the built-in defaults".into()),
        }
        .into());
    }
    let root = &config.runtime.root;
    let dir = factory::factory_dir(root);
    if daemon::daemon_running(&dir) {
        return Err(FactoryError::Running {
            root: root.clone(),
            pid: daemon::daemon_pid(&dir).unwrap_or(0),
        }
        .into());
    }
    runvm_sandbox::store::Store::open(root.clone())?;
    daemon::create_private_dir(&dir)?;
    let log_path = dir.join(factory::LOG_FILE);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    let exe = std::env::current_exe().context("cannot find the runvm binary")?;
    let mut cmd = std::process::Command::new(exe);
    if let Some(file) = &config.source {
        cmd.arg("--config").arg(file);
    }
    cmd.arg("--root").arg(root);
    cmd.args(["--log-level", if g.debug { "debug" } else { "info" }]);
    cmd.args(["factory", "init", "--foreground"]);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log));
    // SAFETY: the closure runs in the child between fork and exec and calls only setsid(2),
    // which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid()?;
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("cannot start the factory daemon")?;
    // Each VM boots in turn; allow each its boot timeout and then some.
    let wait = config.agent.boot_timeout() * config.factory.cache + Duration::from_secs(30);
    let started = Instant::now();
    let status = block_on(async {
        loop {
            if let Some(exit) = child.try_wait()? {
                return Err(not_started(
                    format!("the daemon exited ({exit})"),
                    &log_path,
                ));
            }
            if let Ok(Some(status)) = client::status(root).await {
                if status.ready >= status.cache {
                    return Ok(status);
                }
                if started.elapsed() > wait {
                    return Err(not_started(
                        format!(
                            "{} of {} VMs ready after {} s ({} failed boots)",
                            status.ready,
                            status.cache,
                            wait.as_secs(),
                            status.boot_failures
                        ),
                        &log_path,
                    ));
                }
            } else if started.elapsed() > wait {
                return Err(not_started("its socket never answered".into(), &log_path));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })?;
    print_status(config, &status);
    Ok(ExitCode::SUCCESS)
}

fn not_started(reason: String, log: &Path) -> anyhow::Error {
    let tail: Vec<String> = std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .rev()
        .take(10)
        .map(str::to_owned)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    anyhow::Error::new(FactoryError::NotStarted {
        reason,
        log: log.to_path_buf(),
    })
    .context(format!("last lines of the log:\n{}", tail.join("\n")))
}

/// Stops the daemon (killing it if it does not stop), ends the pool's VMs, and removes the
/// factory's folder.
async fn destroy(config: &Config) -> Result<ExitCode> {
    let root = &config.runtime.root;
    let dir = factory::factory_dir(root);
    if daemon::daemon_running(&dir) {
        let asked = client::stop(root).await.unwrap_or(false);
        let deadline = Instant::now() + if asked { STOP_WAIT } else { Duration::ZERO };
        while daemon::daemon_running(&dir) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if daemon::daemon_running(&dir) {
            if let Some(pid) = daemon::daemon_pid(&dir) {
                tracing::warn!(pid, "the factory did not stop; killing it");
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap_or(0)),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while daemon::daemon_running(&dir) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    // Held while the leftovers go, so that no `init` starts meanwhile.
    let _lock = daemon::DaemonLock::acquire_if_present(&dir)?;
    let report = factory::sweep(config).await?;
    if !report.undecided.is_empty() {
        for (vm, why) in &report.undecided {
            eprintln!("runvm: pool VM {vm} kept: cannot tell whether a sandbox owns it: {why}");
        }
        anyhow::bail!(
            "{} pool VMs could not be resolved; run `runvm factory destroy` again",
            report.undecided.len()
        );
    }
    if dir.exists() {
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    println!(
        "factory destroyed: {} pool VMs ended, {} left to the sandboxes that adopted them, {} stray VM folders removed",
        report.ended.len(),
        report.left_to_sandboxes.len(),
        report.orphans.len()
    );
    Ok(ExitCode::SUCCESS)
}
