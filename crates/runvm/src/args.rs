//! The command line: runc's commands and flags (GNU style; single-dash long flags as urfave/cli
//! accepts them are rewritten first by [`crate::argv::normalize`]), plus runvm's own.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// runvm runs containers in lightweight virtual machines (one QEMU VM per container or pod),
/// with the command line of runc.
#[derive(Debug, Parser)]
#[command(name = "runvm", version, about, long_about = None)]
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
        /// Accepted for runc compatibility and ignored (runc passes them to ps(1)).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
        ps_args: Vec<String>,
    },
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
        /// Time between stats events (e.g. 5s, 500ms).
        #[arg(long, default_value = "5s", value_name = "DURATION")]
        interval: String,
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
    /// The stand-in process (internal: started by create, run and exec).
    #[command(name = "__standin", hide = true)]
    Standin {
        /// The exec id ("" for the init process).
        #[arg(long, default_value = "")]
        exec: String,
        /// The process has a terminal.
        #[arg(long)]
        terminal: bool,
        /// The container id.
        id: String,
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
    /// Set an environment variable (NAME=VALUE), repeatable.
    #[arg(short, long, value_name = "NAME=VALUE")]
    pub env: Vec<String>,
    /// Working directory in the container.
    #[arg(long, value_name = "DIR")]
    pub cwd: Option<String>,
    /// User as UID[:GID].
    #[arg(short, long, value_name = "UID[:GID]")]
    pub user: Option<String>,
    /// Additional group ids, repeatable.
    #[arg(short = 'g', long, value_name = "GID")]
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
    #[arg(long, value_name = "N")]
    pub blkio_weight: Option<u16>,
    /// CPU CFS period, µs.
    #[arg(long, value_name = "US")]
    pub cpu_period: Option<u64>,
    /// CPU CFS quota, µs (-1 for none).
    #[arg(long, value_name = "US", allow_hyphen_values = true)]
    pub cpu_quota: Option<i64>,
    /// CPU shares (relative weight).
    #[arg(long, alias = "cpu-shares", value_name = "N")]
    pub cpu_share: Option<u64>,
    /// CPU realtime period, µs.
    #[arg(long, value_name = "US")]
    pub cpu_rt_period: Option<u64>,
    /// CPU realtime runtime, µs.
    #[arg(long, value_name = "US")]
    pub cpu_rt_runtime: Option<i64>,
    /// CPUs allowed (0-3, 0,1).
    #[arg(long, value_name = "LIST")]
    pub cpuset_cpus: Option<String>,
    /// Memory nodes allowed.
    #[arg(long, value_name = "LIST")]
    pub cpuset_mems: Option<String>,
    /// Memory limit (bytes, or with k, m, g suffix; -1 for none).
    #[arg(long, value_name = "BYTES", allow_hyphen_values = true)]
    pub memory: Option<String>,
    /// Memory soft limit.
    #[arg(long, value_name = "BYTES", allow_hyphen_values = true)]
    pub memory_reservation: Option<String>,
    /// Memory plus swap limit.
    #[arg(long, value_name = "BYTES", allow_hyphen_values = true)]
    pub memory_swap: Option<String>,
    /// Accepted and ignored: kernel memory limits are gone from cgroup v2.
    #[arg(long, value_name = "BYTES")]
    pub kernel_memory: Option<String>,
    /// Accepted and ignored: kernel memory limits are gone from cgroup v2.
    #[arg(long, value_name = "BYTES")]
    pub kernel_memory_tcp: Option<String>,
    /// Maximum number of tasks (-1 for none).
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
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
