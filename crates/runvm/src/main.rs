//! `runvm`: the command line of runvm. Each command is a thin layer over `runvm-sandbox`.

mod commands;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// runvm runs containers in lightweight virtual machines, with the interface of runc.
#[derive(Debug, Parser)]
#[command(name = "runvm", version, about, long_about = None)]
struct Cli {
    /// Configuration file [default: $RUNVM_CONFIG, else /etc/runvm/config.toml if present,
    /// else built-in defaults].
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,

    /// Root folder of runvm's state (overrides runtime.root) [default: /run/runvm].
    #[arg(long, global = true, value_name = "PATH")]
    root: Option<PathBuf>,

    /// Log level on stderr: error, warn, info, debug, trace (RUST_LOG overrides).
    #[arg(long, global = true, default_value = "warn", value_name = "LEVEL")]
    log_level: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Checks that this host can run sandboxes: one line per requirement, the accelerator that
    /// will be used, and what to do about anything missing. Exits 1 when no sandbox can run.
    Check,
    /// Prints the effective configuration as TOML.
    Env,
    /// Boots a sandbox VM, reports the accelerator, the agent's version and the time until the
    /// agent answered, then shuts it down.
    Boot {
        /// Sandbox id [default: boot-<pid>].
        #[arg(long)]
        id: Option<String>,
    },
    /// Runs a container in a new sandbox VM in the foreground: stdio is relayed, signals are
    /// passed on, and runvm exits with the container's exit code once the VM is gone.
    Run {
        /// The OCI bundle: a folder with config.json and the rootfs.
        #[arg(short, long, default_value = ".", value_name = "DIR")]
        bundle: PathBuf,
        /// The container id (also the sandbox's).
        id: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log_level);
    match commands::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("runvm: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
