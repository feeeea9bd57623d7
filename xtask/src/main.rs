//! runvm development tasks, run as `cargo xtask <task>` (an alias in `.cargo/config.toml`).

mod bench;
mod cmd;
mod guest;

use clap::{Parser, Subcommand};

/// runvm development tasks.
#[derive(Debug, Parser)]
#[command(name = "xtask", bin_name = "cargo xtask", version, about)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Build the guest image: Debian's cloud kernel, an initramfs with the virtio, vsock,
    /// virtiofs and overlay modules, and the static runvm-agent as /init.
    ///
    /// Writes DIR/vmlinuz, DIR/initrd.img and DIR/manifest.json (downloaded kernel packages
    /// are cached in DIR/cache). Nothing is rewritten when the kernel package, the agent binary
    /// and the module list are unchanged since the last build, unless --force is given.
    Guest(guest::GuestArgs),
    /// Benchmarks. `bench boot`: median time from QEMU start to the agent's first answer over
    /// N boots, and the host memory (RSS, PSS) of QEMU and its helpers at idle.
    #[command(subcommand)]
    Bench(BenchTask),
}

#[derive(Debug, Subcommand)]
enum BenchTask {
    /// Boot sandboxes one after another; print a table and write JSON.
    Boot(bench::BootBenchArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Guest(args) => guest::run(&args),
        Task::Bench(BenchTask::Boot(args)) => bench::boot(&args),
    }
}
