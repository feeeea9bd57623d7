//! Containers in the guest: the registry the container and process RPCs work on.
//!
//! libcontainer (youki) does the creating, starting, exec'ing and deleting, in a
//! single-threaded process: a worker forked by the zygote (`zygote.rs`), else the agent
//! re-executed as the helper (`helper.rs`); the agent keeps the stdio, waits for exits
//! (through the reaper), and reads and writes the cgroup files itself for kill, stats and OOM.
//!
//! Guest layout: libcontainer state in [`STATE_ROOT`], one bundle (config.json, exec process
//! files) per container in [`BUNDLES`], cgroups under `/sys/fs/cgroup/runvm/<id>`.

pub mod executor;
mod helper;
pub mod helper_main;
pub mod hook_root;
mod lifecycle;
mod oom;
mod process;
mod spec;
pub(crate) mod stats;
mod stdio;
mod storage;
pub mod streams;
pub mod zygote;
pub mod zygote_main;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

pub use helper::HIDDEN_ARG;
pub use process::Process;

use crate::error::{validate_id, AgentError, Result};
use crate::reaper::Reaper;

/// libcontainer's state root in the guest.
pub const STATE_ROOT: &str = "/run/runvm/containers";
/// Bundles (config.json and exec process files) in the guest.
pub const BUNDLES: &str = "/run/runvm/bundles";
/// Console sockets (short paths: a unix socket path holds 108 bytes).
pub const CONSOLES: &str = "/run/runvm/console";
/// The cgroup2 mount.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// Finished exec'd processes (exited, output sent to the end) kept per container for late
/// WaitProcess calls; older ones are forgotten.
const FINISHED_EXECS_KEPT: usize = 32;

/// Where a container stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Created, its init waiting for StartContainer.
    Created,
    Running,
    Paused,
    /// Its init has exited.
    Stopped,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Stopped => "stopped",
        })
    }
}

/// One container.
#[derive(Debug)]
pub struct Container {
    pub id: String,
    pub bundle: PathBuf,
    pub cgroup_dir: PathBuf,
    pub init: Arc<Process>,
    /// Storage mount points this container holds.
    pub storages: Vec<PathBuf>,
    state: Mutex<Status>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
    /// Serialises start, exec, pause, resume, update and remove.
    op: tokio::sync::Mutex<()>,
    removed: AtomicBool,
    /// memory.events oom_kill count already reported.
    oom_seen: AtomicU64,
}

impl Container {
    fn new(id: String, bundle: PathBuf, init: Process, storages: Vec<PathBuf>) -> Container {
        let cgroup_dir = Path::new(CGROUP_ROOT).join(
            spec::cgroup_path(&id)
                .strip_prefix("/")
                .unwrap_or(Path::new(&id)),
        );
        Container {
            oom_seen: AtomicU64::new(stats::oom_kills(&cgroup_dir)),
            id,
            bundle,
            cgroup_dir,
            init: Arc::new(init),
            storages,
            state: Mutex::new(Status::Created),
            execs: Mutex::new(HashMap::new()),
            op: tokio::sync::Mutex::new(()),
            removed: AtomicBool::new(false),
        }
    }

    /// The container's status; `Stopped` once its init has exited.
    pub fn status(&self) -> Status {
        if self.init.exited().is_some() {
            return Status::Stopped;
        }
        *self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_status(&self, status: Status) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = status;
    }

    fn execs(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Process>>> {
        self.execs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the container's operation lock; fails if it was removed meanwhile.
    async fn lock_op(&self) -> Result<tokio::sync::MutexGuard<'_, ()>> {
        let guard = self.op.lock().await;
        if self.removed.load(Ordering::Acquire) {
            return Err(AgentError::not_found(format!(
                "container {:?} was removed",
                self.id
            )));
        }
        Ok(guard)
    }

    /// The init (empty `exec_id`) or an exec'd process.
    pub fn process(&self, exec_id: &str) -> Result<Arc<Process>> {
        if exec_id.is_empty() {
            return Ok(Arc::clone(&self.init));
        }
        validate_id("exec id", exec_id)?;
        self.execs().get(exec_id).cloned().ok_or_else(|| {
            AgentError::not_found(format!(
                "exec {exec_id:?} not found in container {:?}",
                self.id
            ))
        })
    }

    /// Pids in the container's cgroup (including its sub-cgroups).
    pub fn pids(&self) -> Vec<i32> {
        let mut pids = Vec::new();
        collect_pids(&self.cgroup_dir, &mut pids, 0);
        pids
    }

    /// Forgets the oldest finished exec'd processes beyond [`FINISHED_EXECS_KEPT`].
    fn prune_execs(&self) {
        let mut execs = self.execs();
        let mut finished: Vec<(i64, String)> = execs
            .iter()
            .filter(|(_, p)| p.finished())
            .map(|(id, p)| (p.exited().map(|e| e.at_unix_ns).unwrap_or(0), id.clone()))
            .collect();
        if finished.len() <= FINISHED_EXECS_KEPT {
            return;
        }
        finished.sort();
        let excess = finished.len() - FINISHED_EXECS_KEPT;
        for (_, id) in finished.into_iter().take(excess) {
            execs.remove(&id);
        }
    }
}

fn collect_pids(dir: &Path, out: &mut Vec<i32>, depth: usize) {
    if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        out.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    }
    if depth > 8 {
        return;
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                collect_pids(&e.path(), out, depth + 1);
            }
        }
    }
}

/// A slot of the registry: being created (the id is taken) or ready.
#[derive(Debug)]
enum Slot {
    Creating,
    Ready(Arc<Container>),
}

/// The containers of this guest.
#[derive(Debug)]
pub struct Containers {
    map: Mutex<HashMap<String, Slot>>,
    reaper: Arc<Reaper>,
    storages: storage::Storages,
    oom: oom::OomEvents,
    streams: Arc<streams::StreamRegistry>,
}

impl Containers {
    pub fn new(reaper: Arc<Reaper>, streams: Arc<streams::StreamRegistry>) -> Arc<Containers> {
        let containers = Arc::new(Containers {
            map: Mutex::new(HashMap::new()),
            reaper,
            streams,
            storages: storage::Storages::default(),
            oom: oom::OomEvents::new(),
        });
        oom::spawn_monitor(Arc::downgrade(&containers));
        containers
    }

    /// The host's stdio streams for a new process whose stdio config names a stream token;
    /// `None` without a token (then no stream is requested: [`streams::check_config`]).
    async fn claim_streams(
        &self,
        cfg: &runvm_protocol::agent::StdioConfig,
    ) -> Result<Option<streams::Claimed>> {
        if cfg.stream_token.is_empty() {
            return Ok(None);
        }
        let wanted = streams::wanted(cfg.stdin, cfg.stdout, cfg.stderr, cfg.terminal);
        self.streams
            .claim(&cfg.stream_token, &wanted, streams::CLAIM_TIMEOUT)
            .await
            .map(Some)
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The container `id` (validated); NOT_FOUND if unknown or still being created.
    pub fn get(&self, id: &str) -> Result<Arc<Container>> {
        validate_id("container id", id)?;
        match self.map().get(id) {
            Some(Slot::Ready(c)) => Ok(Arc::clone(c)),
            Some(Slot::Creating) => Err(AgentError::not_found(format!(
                "container {id:?} is still being created"
            ))),
            None => Err(AgentError::not_found(format!("container {id:?} not found"))),
        }
    }

    /// Every ready container.
    fn all(&self) -> Vec<Arc<Container>> {
        self.map()
            .values()
            .filter_map(|s| match s {
                Slot::Ready(c) => Some(Arc::clone(c)),
                Slot::Creating => None,
            })
            .collect()
    }

    /// The id and cgroup folder of every ready container (GetGuestMetrics).
    pub fn cgroups(&self) -> Vec<(String, PathBuf)> {
        self.all()
            .iter()
            .map(|c| (c.id.clone(), c.cgroup_dir.clone()))
            .collect()
    }

    /// Takes id `id` for a container being created; released by the guard unless filled.
    fn reserve(self: &Arc<Self>, id: &str) -> Result<Reservation> {
        let mut map = self.map();
        if map.contains_key(id) {
            return Err(AgentError::exists(format!(
                "container {id:?} already exists"
            )));
        }
        map.insert(id.to_string(), Slot::Creating);
        Ok(Reservation {
            containers: Arc::clone(self),
            id: id.to_string(),
            filled: false,
        })
    }
}

/// An id being created; dropped without [`Reservation::fill`], it frees the id.
struct Reservation {
    containers: Arc<Containers>,
    id: String,
    filled: bool,
}

impl Reservation {
    fn fill(mut self, container: Arc<Container>) {
        self.containers
            .map()
            .insert(self.id.clone(), Slot::Ready(container));
        self.filled = true;
        // The OOM monitor sleeps while there is no container.
        self.containers.oom.wake();
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.filled {
            self.containers.map().remove(&self.id);
        }
    }
}

/// Runs `f` as its own task, so that it completes even if the RPC that asked for it is
/// cancelled (the host timed out): a half-done create or remove would leak state.
async fn detached<T, F>(what: &str, f: F) -> Result<T>
where
    F: std::future::Future<Output = Result<T>> + Send + 'static,
    T: Send + 'static,
{
    tokio::spawn(f)
        .await
        .map_err(|e| AgentError::internal(format!("{what} failed: {e}")))?
}

/// Runs blocking file-system work off the async threads.
async fn blocking<T, F>(what: &str, f: F) -> Result<T>
where
    F: FnOnce() -> Result<T> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AgentError::internal(format!("{what} failed: {e}")))?
}

impl Containers {
    /// GetOOMEvent: the id of the next container OOM-killed.
    pub async fn next_oom_event(&self) -> Option<String> {
        self.oom.next().await
    }
}

#[cfg(test)]
mod tests {
    use super::stdio::{OutputStream, ProcessIo};
    use super::*;
    use crate::reaper::Exit;

    fn quiet_io() -> ProcessIo {
        ProcessIo {
            stdin: None,
            stdout: OutputStream::closed(),
            stderr: OutputStream::closed(),
            tty: None,
        }
    }

    fn process(reaper: &Reaper, exec: &str, pid: i32, exited_at: Option<i64>) -> Arc<Process> {
        let watch = reaper.watch(pid, std::time::Instant::now());
        if let Some(at) = exited_at {
            reaper.deliver(
                pid,
                Exit {
                    status: 0,
                    at_unix_ns: at,
                },
            );
        }
        Arc::new(Process::new(exec.into(), pid, watch, quiet_io()))
    }

    #[tokio::test]
    async fn finished_execs_are_forgotten_oldest_first() {
        let reaper = Reaper::new();
        let init = process(&reaper, "", 1, None);
        let c = Container::new(
            "prune-test".into(),
            PathBuf::from("/nonexistent"),
            Arc::into_inner(init).unwrap(),
            Vec::new(),
        );
        let total = FINISHED_EXECS_KEPT as i32 + 5;
        for n in 0..total {
            let p = process(&reaper, &format!("e{n}"), 100 + n, Some(i64::from(n)));
            c.execs().insert(format!("e{n}"), p);
        }
        let running = process(&reaper, "running", 99, None);
        c.execs().insert("running".into(), running);
        assert_eq!(c.status(), Status::Created);
        c.prune_execs();
        let execs = c.execs();
        assert_eq!(execs.len(), FINISHED_EXECS_KEPT + 1);
        assert!(execs.contains_key("running"));
        assert!(!execs.contains_key("e0") && !execs.contains_key("e4"));
        assert!(execs.contains_key("e5") && execs.contains_key(&format!("e{}", total - 1)));
        drop(execs);
        assert!(c
            .process("e0")
            .is_err_and(|e| e.code == ttrpc::Code::NOT_FOUND));
        assert_eq!(c.process("e9").unwrap().exec_id, "e9");
        assert_eq!(c.process("").unwrap().pid, 1);
        assert!(c
            .process("../x")
            .is_err_and(|e| e.code == ttrpc::Code::INVALID_ARGUMENT));
    }
}
