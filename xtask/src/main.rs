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
    /// Build the guest image: runvm's kernel (or Debian's cloud kernel and its modules, with
    /// --kernel debian-cloud) and an initramfs with the static runvm-agent as /init.
    ///
    /// Writes DIR/vmlinuz, DIR/initrd.img and DIR/manifest.json. runvm's kernel is built once
    /// per machine from linux-source-6.1 and guest/kernel/runvm.config and cached (in
    /// DIR/cache, with downloaded kernel packages). Nothing is rewritten when the kernel, the
    /// agent binary and the module list are unchanged since the last build, unless --force is
    /// given.
    Guest(guest::GuestArgs),
    /// Benchmarks. `bench all` (what `make bench` runs): runvm side by side with runc and the
    /// floor (cold start, exec, memory per idle pod, stdout throughput, density), as a table,
    /// target/bench/results.json and results.svg. `bench boot`: median time from QEMU start to
    /// the agent's first answer over N boots, and the host memory (RSS, PSS) of QEMU and its
    /// helpers at idle.
    #[command(subcommand)]
    Bench(BenchTask),
    /// Write an OCI bundle with a busybox rootfs (from the host's busybox-static) and a
    /// default config.json running ARGS.
    Bundle(BundleArgs),
}

#[derive(Debug, clap::Args)]
struct BundleArgs {
    /// The bundle folder to write.
    #[arg(long)]
    out: std::path::PathBuf,
    /// Give the process a terminal.
    #[arg(long)]
    tty: bool,
    /// The process to run [default: sh].
    #[arg(last = true)]
    args: Vec<String>,
}

#[derive(Debug, Subcommand)]
enum BenchTask {
    /// runvm against runc and the floor, k runs each: cold start (`runvm run` / `runc run`,
    /// `ctr run --rm` through both shims, QEMU with an init that powers off at once), exec
    /// latency, PSS of 1 and 10 idle pods, stdout throughput, N pods started in parallel.
    All(bench::AllArgs),
    /// Boot sandboxes one after another; print a table and write JSON.
    Boot(bench::BootBenchArgs),
    /// Run a busybox container in a new sandbox N times: time from the start of `run` to the
    /// container's first output.
    Run(bench::RunBenchArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Guest(args) => guest::run(&args),
        Task::Bench(BenchTask::All(args)) => bench::all(args),
        Task::Bench(BenchTask::Boot(args)) => bench::boot(&args),
        Task::Bench(BenchTask::Run(args)) => bench::run(&args),
        Task::Bundle(b) => {
            let args: Vec<&str> = if b.args.is_empty() {
                vec!["sh"]
            } else {
                b.args.iter().map(String::as_str).collect()
            };
            let spec = runvm_sandbox::container::bundle::default_spec(&args, b.tty);
            std::fs::create_dir_all(&b.out)?;
            runvm_sandbox::container::bundle::busybox_bundle(&b.out, &spec)?;
            eprintln!("==> bundle written to {}", b.out.display());
            Ok(())
        }
    }
}
