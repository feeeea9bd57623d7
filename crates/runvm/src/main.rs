//! `runvm`: the command line of runvm, compatible with runc's. Each command is a thin layer over
//! `runvm-sandbox`.

mod args;
mod argv;
mod commands;
mod factory;
mod logging;
mod monitor;
mod network;
mod oci;
mod ops;
mod ps;
mod standin;
mod traces;

use std::process::ExitCode;

use clap::Parser;

pub use args::{Cli, Command};

/// runc's version lines: its own version, the commit, the OCI runtime spec version.
pub fn version_text() -> String {
    format!(
        "runvm version {}\ncommit: {}\nspec: {}",
        env!("CARGO_PKG_VERSION"),
        env!("RUNVM_COMMIT"),
        runvm_sandbox::standalone::OCI_VERSION
    )
}

fn main() -> ExitCode {
    let argv = argv::normalize(std::env::args_os().collect());
    // runc's `-v`/`--version` (urfave/cli's global flag), with clap's `-V` too.
    if argv::asks_version(&argv) {
        println!("{}", version_text());
        return ExitCode::SUCCESS;
    }
    let cli = Cli::parse_from(argv);
    let level = if cli.global.debug {
        "debug"
    } else {
        cli.global.log_level.as_str()
    };
    let quiet = matches!(
        cli.command,
        Command::Standin { .. } | Command::Teardown { .. }
    );
    let config = commands::load_config(&cli.global);
    let traces = match &config {
        Ok(c) => traces::exporter(c, &cli.command),
        Err(_) => Ok(None),
    };
    logging::init(
        cli.global.log.as_deref(),
        cli.global.log_format,
        level,
        quiet,
        traces.as_ref().ok().copied().flatten(),
    );
    if let Err(e) = traces {
        tracing::warn!(error = %e, "traces are not exported");
    }
    match commands::run(cli, config) {
        Ok(code) => code,
        Err(e) => {
            logging::error(&format!("{e:#}"));
            eprintln!("runvm: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
