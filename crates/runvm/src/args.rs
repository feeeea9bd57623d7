//! The command line: runc's commands and flags (GNU style; single-dash long flags as urfave/cli
//! accepts them are rewritten first by [`crate::argv::normalize`]), plus runvm's own.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// runvm runs containers in lightweight virtual machines (one QEMU VM per container or pod),
/// with the command line of runc.
#[derive(Debug, Parser)]
#[command(name = "runvm", about, long_about = None)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,

    #[command(subcommand)]
    pub command: Command,
}

/// Flags of every command.
#[derive(Debug, Clone, Args)]
pub struct Global {
    /// Configuration file [default: $RUNVM_CONFIG, else /etc/runvm/config.toml if present,
    /// else built-in defaults].
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// Root folder of runvm's state (overrides runtime.root) [default: /run/runvm].
    #[arg(long, global = true, value_name = "PATH")]
    pub root: Option<PathBuf>,

    /// Log file: runvm's log goes there instead of stderr, and errors go there too.
    #[arg(long, global = true, value_name = "PATH")]
    pub log: Option<PathBuf>,

    /// Format of the --log file: text (logrus style) or json (one object a line, with level,
    /// msg and time, as containerd's runc shim reads it).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Log at debug level.
    #[arg(long, global = true)]
    pub debug: bool,

    /// Log level: error, warn, info, debug, trace (RUST_LOG overrides).
    #[arg(long, global = true, default_value = "warn", value_name = "LEVEL")]
    pub log_level: String,

    /// Accepted for runc compatibility and ignored: cgroups are managed in the guest.
    #[arg(long, global = true)]
    pub systemd_cgroup: bool,

    /// Accepted for runc compatibility and ignored: runvm has no checkpoint/restore.
    #[arg(long, global = true, value_name = "PATH", hide = true)]
    pub criu: Option<PathBuf>,

    /// Accepted for runc compatibility and ignored (`spec --rootless` too): a VM's spec is
    /// the same either way.
    #[arg(long, global = true, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true", hide = true)]
    pub rootless: Option<String>,
}

/// The --log file's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// `time="..." level=error msg="..."`.
    Text,
    /// `{"level":"error","msg":"...","time":"..."}`.
    Json,
}

/// Table or JSON output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// A table for people.
    Table,
    /// JSON for programs.
    Json,
}

/// Where a new process's stdio and pid go.
#[derive(Debug, Clone, Args)]
pub struct ProcessIo {
    /// Write the pid of the process that stands for the container's process (see `runvm
    /// state`) to this file.
    #[arg(long, value_name = "PATH")]
    pub pid_file: Option<PathBuf>,

    /// A unix socket to send the master of the process's pseudo-terminal to (SCM_RIGHTS), for a
    /// process with a terminal.
    #[arg(long, value_name = "PATH")]
    pub console_socket: Option<PathBuf>,
}

/// Options of `create` and `run`.
#[derive(Debug, Clone, Args)]
pub struct CreateArgs {
    /// The OCI bundle: a folder with config.json and the root file system.
    #[arg(short, long, default_value = ".", value_name = "DIR")]
    pub bundle: PathBuf,

    #[command(flatten)]
    pub io: ProcessIo,

    /// Accepted and ignored: the container's root is set up in the guest (always without
    /// pivot_root, whose root is the initramfs).
    #[arg(long)]
    pub no_pivot: bool,

    /// Accepted and ignored: the guest kernel's keyrings belong to the VM alone.
    #[arg(long)]
    pub no_new_keyring: bool,

    /// Accepted and ignored: extra file descriptors cannot cross into the VM.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub preserve_fds: u32,

    /// The container id (also its sandbox's).
    pub id: String,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Checks that this host can run sandboxes: one line per requirement, the accelerator that
    /// will be used, and what to do about anything missing. Exits 1 when no sandbox can run.
    Check,
    /// Prints the effective configuration as TOML.
    Env,
    /// The pod network of a container's VM: add or remove an interface of the pod's network
    /// namespace, reconfigure one, list interfaces, list or replace routes. JSON in and out.
    #[command(subcommand)]
    Network(NetworkCommand),
    /// The VM factory: VMs booted before anyone asks, handed to new sandboxes
    /// (`[factory] cache = N`; docs/factory.md).
    #[command(subcommand)]
    Factory(FactoryCommand),
    /// Boots a sandbox VM, reports the accelerator, the agent's version and the time until the
    /// agent answered, then shuts it down.
    Boot {
        /// Sandbox id [default: boot-<pid>].
        #[arg(long)]
        id: Option<String>,
    },
    /// Creates a container in a new VM; it waits for `start`. Its stdio are runvm's (or, with
    /// --console-socket, a terminal). A host process stands for it: the pid `state` reports.
    Create(CreateArgs),
    /// Starts a created container.
    Start {
        /// The container id.
        id: String,
    },
    /// Creates and starts a container. In the foreground (default) stdio is relayed, signals
    /// are passed on, and runvm exits with the container's exit code after removing it.
    Run {
        #[command(flatten)]
        create: CreateArgs,
        /// Detach: return once the container runs, leaving it for `kill` and `delete`.
        #[arg(short, long)]
        detach: bool,
        /// In the foreground: keep the container (stopped) after it exits, for `state` and
        /// `delete`, instead of removing it.
        #[arg(long)]
        keep: bool,
    },
    /// Prints the OCI state of a container as JSON.
    State {
        /// The container id.
        id: String,
    },
    /// Sends a signal to the container's init process (or with --all to all its processes).
    Kill {
        /// Send the signal to every process of the container.
        #[arg(short, long)]
        all: bool,
        /// The container id.
        id: String,
        /// The signal, by name (KILL, SIGKILL) or number.
        #[arg(default_value = "SIGTERM")]
        signal: String,
    },
    /// Deletes a container and its VM.
    Delete {
        /// Kill a running container first (without it, only stopped containers go).
        #[arg(short, long)]
        force: bool,
        /// The container id.
        id: String,
    },
    /// Runs a new process in a running container.
    Exec(Box<ExecArgs>),
    /// Lists the processes running in a container (guest pids).
    Ps {
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Format::Table)]
        format: Format,
        /// The container id.
        id: String,
        /// Accepted for runc compatibility and ignored (runc passes them to ps(1); the guest
        /// has no ps).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
        ps_args: Vec<String>,
    },
    /// Prints runvm's version, its commit and the OCI runtime spec version (as `--version`).
    #[command(hide = true)]
    Version,
    /// Freezes every process of a container.
    Pause {
        /// The container id.
        id: String,
    },
    /// Thaws a paused container.
    Resume {
        /// The container id.
        id: String,
    },
    /// Lists the containers under the root.
    #[command(alias = "ls")]
    List {
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Format::Table)]
        format: Format,
        /// Print the ids only.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Prints a container's resource usage as events: one with --stats, else every --interval.
    /// With --timeline, prints the start timeline of its sandbox instead.
    Events {
        /// Print one stats event and exit.
        #[arg(long)]
        stats: bool,
        /// Time between stats events (e.g. 5s, 500ms), 1ms to 24h.
        #[arg(long, default_value = "5s", value_name = "DURATION", value_parser = parse_interval)]
        interval: Duration,
        /// Print when each start phase ended, host and guest (config loaded, helpers, QEMU,
        /// guest kernel, init, agent, container created, process started, first output) as a
        /// text waterfall, and exit. Works for stopped containers too.
        #[arg(long, conflicts_with = "stats")]
        timeline: bool,
        /// With --timeline: also draw the waterfall as SVG into FILE.
        #[arg(long, requires = "timeline", value_name = "FILE")]
        svg: Option<PathBuf>,
        /// The container id.
        id: String,
    },
    /// Changes a container's resource limits.
    Update(Box<UpdateArgs>),
    /// Writes a default config.json (runc's, running sh) into the bundle folder.
    Spec {
        /// The bundle folder.
        #[arg(short, long, default_value = ".", value_name = "DIR")]
        bundle: PathBuf,
    },
    /// Prints what runvm supports, as runc's features JSON.
    Features,
    /// Serves Prometheus metrics of every sandbox (host cost, guest view, boot phases) on
    /// /metrics until stopped; see docs/observability.md.
    Monitor(crate::monitor::MonitorArgs),
    /// The stand-in process (internal: started by create, run and exec).
    #[command(name = "__standin", hide = true)]
    Standin {
        /// The exec id ("" for the init process).
        #[arg(long, default_value = "")]
        exec: String,
        /// The process has a terminal.
        #[arg(long)]
        terminal: bool,
        /// The init's stdio stream sockets the caller opened, at fds 3 (stdin), 4 (stdout)
        /// and 5 (stderr): `i`, `o`, `e` where present, `-` where not (e.g. `io-`).
        #[arg(long, value_name = "SPEC")]
        streams: Option<String>,
        /// Start the exec itself: its request (JSON) is read from fd 3, and one line, `OK` or
        /// `ERR message`, written to fd 4 once it started or failed.
        #[arg(long)]
        exec_request: bool,
        /// The container id.
        id: String,
    },
    /// Stops an exited container's VM (internal: started by its stand-in).
    #[command(name = "__teardown", hide = true)]
    Teardown {
        /// The sandbox id.
        sandbox: String,
    },
}

/// Options of `exec`.
#[derive(Debug, Clone, Args)]
pub struct ExecArgs {
    /// A JSON file with the OCI process to run (replaces the command and the flags below).
    #[arg(short, long, value_name = "PATH")]
    pub process: Option<PathBuf>,
    /// Give the process a terminal.
    #[arg(short, long)]
    pub tty: bool,
    /// Detach: return once the process runs.
    #[arg(short, long)]
    pub detach: bool,
    /// Allow exec in a paused container (refused without it, as by runc).
    #[arg(long)]
    pub ignore_paused: bool,
    /// Set an environment variable (NAME=VALUE), repeatable.
    #[arg(short, long, value_name = "NAME=VALUE")]
    pub env: Vec<String>,
    /// Working directory in the container.
    #[arg(long, value_name = "DIR")]
    pub cwd: Option<String>,
    /// User as UID[:GID] (ids 0 to 4294967294; GID 0 when not given).
    #[arg(short, long, value_name = "UID[:GID]", value_parser = parse_user)]
    pub user: Option<(u32, u32)>,
    /// Additional group ids, repeatable (0 to 4294967294).
    #[arg(short = 'g', long, value_name = "GID", value_parser = ranged::<u32>(0, MAX_ID))]
    pub additional_gids: Vec<u32>,
    /// Accepted and ignored: no AppArmor in the guest.
    #[arg(long, value_name = "PROFILE")]
    pub apparmor: Option<String>,
    /// Accepted and ignored: no SELinux in the guest.
    #[arg(long, value_name = "LABEL")]
    pub process_label: Option<String>,
    /// Accepted and ignored: extra file descriptors cannot cross into the VM.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub preserve_fds: u32,
    #[command(flatten)]
    pub io: ProcessIo,
    /// The container id.
    pub id: String,
    /// The command and its arguments (without --process).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

/// Options of `update`.
#[derive(Debug, Clone, Args)]
pub struct UpdateArgs {
    /// A JSON file with OCI linux.resources ("-" for stdin); the flags below are then ignored.
    #[arg(short, long, value_name = "PATH")]
    pub resources: Option<PathBuf>,
    /// Block IO weight (10 to 1000).
    #[arg(long, value_name = "N", value_parser = ranged::<u16>(10, 1000))]
    pub blkio_weight: Option<u16>,
    /// CPU CFS period, µs (1000 to 1000000: 1 ms to 1 s).
    #[arg(long, value_name = "US", value_parser = ranged::<u64>(1000, 1_000_000))]
    pub cpu_period: Option<u64>,
    /// CPU CFS quota, µs (-1 for none, else 1000 to 17592186044415, the kernel's limits).
    #[arg(long, value_name = "US", allow_hyphen_values = true, value_parser = none_or(1000, MAX_CPU_US))]
    pub cpu_quota: Option<i64>,
    /// CPU shares (relative weight, 2 to 262144).
    #[arg(long, alias = "cpu-shares", value_name = "N", value_parser = ranged::<u64>(2, 262_144))]
    pub cpu_share: Option<u64>,
    /// CPU realtime period, µs (1 to 17592186044415).
    #[arg(long, value_name = "US", value_parser = ranged::<u64>(1, MAX_CPU_US))]
    pub cpu_rt_period: Option<u64>,
    /// CPU realtime runtime, µs (-1 for none, else 0 to 17592186044415).
    #[arg(long, value_name = "US", allow_hyphen_values = true, value_parser = none_or(0, MAX_CPU_US))]
    pub cpu_rt_runtime: Option<i64>,
    /// CPUs allowed (0-3, 0,1).
    #[arg(long, value_name = "LIST")]
    pub cpuset_cpus: Option<String>,
    /// Memory nodes allowed.
    #[arg(long, value_name = "LIST")]
    pub cpuset_mems: Option<String>,
    /// Memory limit (bytes, or with k, m, g, t suffix; -1 for none).
    #[arg(long, value_name = "BYTES", allow_hyphen_values = true, value_parser = parse_bytes)]
    pub memory: Option<i64>,
    /// Memory soft limit.
    #[arg(long, value_name = "BYTES", allow_hyphen_values = true, value_parser = parse_bytes)]
    pub memory_reservation: Option<i64>,
    /// Memory plus swap limit.
    #[arg(long, value_name = "BYTES", allow_hyphen_values = true, value_parser = parse_bytes)]
    pub memory_swap: Option<i64>,
    /// Accepted and ignored: kernel memory limits are gone from cgroup v2.
    #[arg(long, value_name = "BYTES")]
    pub kernel_memory: Option<String>,
    /// Accepted and ignored: kernel memory limits are gone from cgroup v2.
    #[arg(long, value_name = "BYTES")]
    pub kernel_memory_tcp: Option<String>,
    /// Maximum number of tasks (-1 for none, else 0 to 4194304).
    #[arg(long, value_name = "N", allow_hyphen_values = true, value_parser = none_or(0, MAX_PIDS))]
    pub pids_limit: Option<i64>,
    /// Accepted and ignored: no Intel RDT in the guest.
    #[arg(long, value_name = "SCHEMA")]
    pub l3_cache_schema: Option<String>,
    /// Accepted and ignored: no Intel RDT in the guest.
    #[arg(long, value_name = "SCHEMA")]
    pub mem_bw_schema: Option<String>,
    /// The container id.
    pub id: String,
}

/// `runvm factory` verbs.
#[derive(Debug, Subcommand)]
pub enum FactoryCommand {
    /// Starts the factory of the state root: a daemon that keeps `factory.cache` VMs booted.
    /// Returns once they are ready (the daemon runs on, its log in ROOT/~factory/factory.log),
    /// or with --foreground serves until SIGTERM (for a systemd unit).
    Init {
        /// Serve in this process instead of starting a daemon.
        #[arg(long)]
        foreground: bool,
    },
    /// The factory: running or not, what its VMs are made from, VMs ready, hits and misses.
    Status {
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Stops the factory and ends the VMs it holds (VMs sandboxes adopted stay theirs); also
    /// cleans up after a factory that was killed. Leaves no factory process or file.
    Destroy,
}

/// `runvm network` verbs. JSON arguments are the JSON text, a file, or "-" for stdin.
#[derive(Debug, Subcommand)]
pub enum NetworkCommand {
    /// Joins a device of the pod's network namespace to the VM (hot-add) and configures it in
    /// the guest: {"device": "eth1", "name"?: "eth1", "addresses"?: ["10.1.0.2/24"], "mtu"?: 1500}.
    /// Prints the interface as the guest has it.
    Add {
        /// Container id.
        id: String,
        /// The request (JSON, a file, or "-").
        request: String,
    },
    /// Removes an interface (by its guest name or its pod device name) from the VM; its tap and
    /// qdiscs go.
    Remove {
        /// Container id.
        id: String,
        /// Interface name.
        name: String,
    },
    /// Reconfigures a guest interface, found by its "mac": {"name", "mac", "mtu", "addresses",
    /// "up"}. All or nothing. Prints the interface.
    Update {
        /// Container id.
        id: String,
        /// The interface (JSON, a file, or "-").
        interface: String,
    },
    /// Prints the guest's interfaces.
    List {
        /// Container id.
        id: String,
    },
    /// Prints the guest's routes; with --replace, makes the table exactly the given list (all or
    /// nothing) and prints it.
    Routes {
        /// Container id.
        id: String,
        /// The routes wanted: [{"destination"?: "10.1.0.0/16", "gateway"?: "10.0.0.1",
        /// "device": "eth0", "source"?, "scope"?}] (JSON, a file, or "-").
        #[arg(long, value_name = "JSON")]
        replace: Option<String>,
    },
}

// Flag values, parsed and bounded. Each error is shown by clap as "invalid value 'VALUE' for
// '--FLAG <NAME>': ...", so it names the flag and the value; the text here gives the range.

/// The largest user or group id: 2^32 - 1 is `(uid_t) -1`, "no id".
pub const MAX_ID: i64 = u32::MAX as i64 - 1;
/// The shortest `events --interval`.
pub const MIN_INTERVAL: Duration = Duration::from_millis(1);
/// The longest `events --interval`.
pub const MAX_INTERVAL: Duration = Duration::from_secs(24 * 3600);
/// The kernel's largest CPU bandwidth value, µs (`MAX_BW` in kernel/sched: 2^44 - 1).
pub const MAX_CPU_US: i64 = (1 << 44) - 1;
/// The kernel's largest pid count (`PID_MAX_LIMIT` on 64-bit).
pub const MAX_PIDS: i64 = 4_194_304;

/// A duration such as `5s`, `500ms`, `1.5m`, `1h`, or a number of seconds; finite and positive.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: f64 = number
        .parse()
        .map_err(|_| "not a duration: a number with a unit of ms, s, m or h".to_string())?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("unknown unit {unit:?}: units are ms, s, m, h")),
    };
    // Never NaN or negative from the digits above, but an overflow gives infinity, which
    // `Duration::from_secs_f64` would panic on.
    Duration::try_from_secs_f64(secs).map_err(|_| "out of range".to_string())
}

/// `events --interval`: a duration from [`MIN_INTERVAL`] to [`MAX_INTERVAL`].
pub fn parse_interval(text: &str) -> Result<Duration, String> {
    const VALID: &str = "valid: 1ms to 24h";
    let d = parse_duration(text).map_err(|e| format!("{e}; {VALID}"))?;
    if !(MIN_INTERVAL..=MAX_INTERVAL).contains(&d) {
        return Err(format!("out of range; {VALID}"));
    }
    Ok(d)
}

/// Bytes as docker and runc take them: a number with an optional k, m, g, t suffix (powers of
/// 1024; `b`, `kb`, `kib` spellings too), or -1 for no limit; at most `i64::MAX`.
pub fn parse_bytes(text: &str) -> Result<i64, String> {
    const VALID: &str = "valid: -1 (no limit), or 0 to 9223372036854775807 bytes with an \
        optional k, m, g or t suffix";
    let t = text.trim().to_ascii_lowercase();
    if t == "-1" {
        return Ok(-1);
    }
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let shift = match unit.trim_end_matches('b').trim_end_matches('i') {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        _ => return Err(format!("not a size; {VALID}")),
    };
    let n: i64 = number
        .parse()
        .map_err(|_| format!("not a size, or too large; {VALID}"))?;
    n.checked_mul(1i64 << shift)
        .ok_or_else(|| format!("too large; {VALID}"))
}

/// `exec --user`: `UID[:GID]`, ids from 0 to [`MAX_ID`]; the GID is 0 when not given.
pub fn parse_user(text: &str) -> Result<(u32, u32), String> {
    let (uid, gid) = text.split_once(':').unwrap_or((text, "0"));
    let id = |s: &str| {
        s.parse::<u32>()
            .ok()
            .filter(|&id| i64::from(id) <= MAX_ID)
            .ok_or_else(|| format!("expected UID[:GID], numbers from 0 to {MAX_ID}"))
    };
    Ok((id(uid)?, id(gid)?))
}

/// A whole number from `min` to `max`, as a `T`.
fn ranged<T: TryFrom<i64>>(
    min: i64,
    max: i64,
) -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync + 'static {
    move |text| {
        let valid = || format!("valid: {min} to {max}");
        let n: i64 = text
            .trim()
            .parse()
            .map_err(|_| format!("not a whole number, or too large; {}", valid()))?;
        if !(min..=max).contains(&n) {
            return Err(format!("out of range; {}", valid()));
        }
        T::try_from(n).map_err(|_| format!("out of range; {}", valid()))
    }
}

/// -1 (none), or a whole number from `min` to `max`.
fn none_or(
    min: i64,
    max: i64,
) -> impl Fn(&str) -> Result<i64, String> + Clone + Send + Sync + 'static {
    move |text| {
        let valid = || format!("valid: -1 (none), or {min} to {max}");
        let n: i64 = text
            .trim()
            .parse()
            .map_err(|_| format!("not a whole number, or too large; {}", valid()))?;
        if n == -1 || (min..=max).contains(&n) {
            Ok(n)
        } else {
            Err(format!("out of range; {}", valid()))
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, String> {
        let argv = std::iter::once("runvm").chain(args.iter().copied());
        Cli::try_parse_from(argv).map_err(|e| e.to_string())
    }

    /// The error names the flag and the value, and says what is valid.
    fn refused(args: &[&str], flag: &str, value: &str, valid: &str) {
        let err = match parse(args) {
            Ok(cli) => panic!("{args:?} was accepted: {:?}", cli.command),
            Err(e) => e,
        };
        assert!(err.contains(&format!("'{flag} <")), "{args:?}: {err}");
        assert!(err.contains(&format!("'{value}'")), "{args:?}: {err}");
        assert!(err.contains(valid), "{args:?}: {err}");
    }

    #[test]
    fn durations_and_sizes_parse_like_runc() {
        assert_eq!(parse_bytes("512m").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("1G").unwrap(), 1 << 30);
        assert_eq!(parse_bytes("2kib").unwrap(), 2048);
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        assert_eq!(parse_bytes("-1").unwrap(), -1);
        assert!(parse_bytes("12q").is_err());
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1.5m").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_interval("1ms").unwrap(), MIN_INTERVAL);
        assert_eq!(parse_interval("24h").unwrap(), MAX_INTERVAL);
        assert_eq!(parse_interval("2").unwrap(), Duration::from_secs(2));
    }

    #[test]
    fn absurd_intervals_are_refused_by_name() {
        let huge = "1".repeat(400);
        for value in [
            "1e20",
            "100000000000000000000s",
            "99999999999999999999999h",
            huge.as_str(),
            "0s",
            "0",
            "0.0000001ms",
            "25h",
            "-1s",
            "inf",
            "NaN",
            "",
            ".",
            "5x",
        ] {
            refused(
                &["events", &format!("--interval={value}"), "c1"],
                "--interval",
                value,
                "1ms to 24h",
            );
        }
        let Command::Events { interval, .. } = parse(&["events", "c1"]).unwrap().command else {
            panic!("not events");
        };
        assert_eq!(interval, Duration::from_secs(5));
    }

    #[test]
    fn absurd_update_values_are_refused_by_name() {
        let cases: &[(&str, &str, &str)] = &[
            ("--blkio-weight", "9", "10 to 1000"),
            ("--blkio-weight", "1001", "10 to 1000"),
            ("--blkio-weight", "70000", "10 to 1000"),
            ("--cpu-period", "999", "1000 to 1000000"),
            ("--cpu-period", "1000001", "1000 to 1000000"),
            ("--cpu-period", "-5", "1000 to 1000000"),
            ("--cpu-quota", "0", "1000 to 17592186044415"),
            ("--cpu-quota", "-2", "1000 to 17592186044415"),
            ("--cpu-quota", "17592186044416", "1000 to 17592186044415"),
            (
                "--cpu-quota",
                "99999999999999999999",
                "1000 to 17592186044415",
            ),
            ("--cpu-share", "1", "2 to 262144"),
            ("--cpu-share", "262145", "2 to 262144"),
            ("--cpu-rt-period", "0", "1 to 17592186044415"),
            ("--cpu-rt-runtime", "-7", "0 to 17592186044415"),
            ("--cpu-rt-runtime", "17592186044416", "0 to 17592186044415"),
            ("--memory", "-5", "-1 (no limit)"),
            ("--memory", "99999999999t", "-1 (no limit)"),
            ("--memory", "99999999999999999999", "-1 (no limit)"),
            ("--memory-reservation", "12q", "-1 (no limit)"),
            ("--memory-swap", "1e20", "-1 (no limit)"),
            ("--pids-limit", "-2", "0 to 4194304"),
            ("--pids-limit", "4194305", "0 to 4194304"),
        ];
        for (flag, value, valid) in cases {
            let arg = format!("{flag}={value}");
            refused(&["update", &arg, "c1"], flag, value, valid);
        }
        // Named by the flag's own name when given by its alias.
        refused(
            &["update", "--cpu-shares", "0", "c1"],
            "--cpu-share",
            "0",
            "2 to 262144",
        );
        // The ends of each range, and -1, are taken.
        let cli = parse(&[
            "update",
            "--blkio-weight",
            "1000",
            "--cpu-period",
            "1000",
            "--cpu-quota",
            "-1",
            "--cpu-share",
            "262144",
            "--cpu-rt-period",
            "1000000",
            "--cpu-rt-runtime",
            "0",
            "--memory",
            "-1",
            "--memory-swap",
            "1g",
            "--pids-limit",
            "4194304",
            "c1",
        ])
        .unwrap();
        let Command::Update(a) = cli.command else {
            panic!("not update");
        };
        assert_eq!(a.cpu_quota, Some(-1));
        assert_eq!(a.memory, Some(-1));
        assert_eq!(a.memory_swap, Some(1 << 30));
        assert_eq!(a.pids_limit, Some(4_194_304));
    }

    #[test]
    fn an_absurd_user_is_refused_by_name() {
        for user in [
            "4294967295",
            "0:4294967295",
            "99999999999",
            "-1",
            "root",
            "1:",
            "",
        ] {
            refused(
                &["exec", &format!("--user={user}"), "c1", "true"],
                "--user",
                user,
                "0 to 4294967294",
            );
        }
        let Command::Exec(a) = parse(&["exec", "-u", "7", "c1", "true"]).unwrap().command else {
            panic!("not exec");
        };
        assert_eq!(a.user, Some((7, 0)));
    }

    #[test]
    fn an_absurd_group_id_is_refused_by_name() {
        refused(
            &["exec", "--additional-gids", "4294967295", "c1", "true"],
            "--additional-gids",
            "4294967295",
            "0 to 4294967294",
        );
        refused(
            &["exec", "--additional-gids=-3", "c1", "true"],
            "--additional-gids",
            "-3",
            "0 to 4294967294",
        );
    }
}
