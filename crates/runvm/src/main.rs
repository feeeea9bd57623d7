//! `runvm`: the command line of runvm, compatible with runc's. Each command is a thin layer over
//! `runvm-sandbox`.

mod args;
mod argv;
mod commands;
mod logging;
mod network;
mod oci;
mod ops;
mod standin;

use std::process::ExitCode;

use clap::Parser;

pub use args::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse_from(argv::normalize(std::env::args_os().collect()));
    let level = if cli.global.debug {
        "debug"
    } else {
        cli.global.log_level.as_str()
    };
    let quiet = matches!(cli.command, Command::Standin { .. });
    logging::init(
        cli.global.log.as_deref(),
        cli.global.log_format,
        level,
        quiet,
    );
    match commands::run(cli) {
        Ok(code) => code,
        Err(e) => {
            logging::error(&format!("{e:#}"));
            eprintln!("runvm: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
