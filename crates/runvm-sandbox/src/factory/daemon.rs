//! The factory daemon: keeps `factory.cache` VMs booted and hands them out.
//!
//! One daemon per state root, holding `ROOT/~factory/daemon.lock`. It boots the pool's VMs one
//! at a time (each takes a boot slot like any sandbox), checks the ready ones every few seconds
//! (a dead one is ended and replaced), and serves its socket: `status`, `take` (then
//! `adopted`), `stop`. On `stop`, SIGTERM or SIGINT it ends its VMs, sweeps, and exits.

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{watch, Notify};

use super::{
    factory_dir, source, sweep, FactoryError, FactorySource, FactoryStatus, Owner, Reply, Request,
    HANDED_TO_ANNOTATION, KEY_ANNOTATION, LOCK_FILE, SOCKET_FILE, VMS_DIR,
};
use crate::config::Config;
use crate::error::SandboxError;
use crate::id::SandboxId;
use crate::sandbox::{factory_vm_settings, qemu_parts, Sandbox, VmSource};
use crate::store::Store;

/// The nice value the daemon (and so every VM it boots) runs at: refilling the pool yields
/// the CPU to the pods starting; a VM gets the normal priority back when it is adopted.
pub const POOL_NICE: i32 = 10;

/// Lowers the calling thread's CPU priority to [`POOL_NICE`]; threads and processes it
/// creates afterwards inherit it. Call before the daemon's runtime starts.
pub fn lower_priority() -> std::io::Result<()> {
    // SAFETY: setpriority(2) on the calling thread (who = 0) with a plain value.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, POOL_NICE) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// How often the ready VMs are checked.
const HEALTH_INTERVAL: Duration = Duration::from_secs(5);
/// How long a sandbox may take between a hand-out and its `adopted`.
const ADOPT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a connection may stay silent before the daemon closes it.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest pause after failed boots.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Counters of the pool.
#[derive(Debug, Default)]
struct Stats {
    hits: u64,
    misses: u64,
    boot_failures: u64,
    booting: bool,
    last_boot_ms: Option<u64>,
    last_refill_ms: Option<u64>,
    /// Since when the pool is short of VMs after a hand-out.
    short_since: Option<Instant>,
}

/// The daemon's shared state.
struct Pool {
    config: Config,
    /// What new VMs are made from; re-read when a sandbox asks with another key (a guest
    /// image rebuilt, QEMU upgraded): VMs made from the old are then ended and replaced.
    source: Mutex<FactorySource>,
    /// The sandboxes' store (the state root), where VM folders lie.
    sandboxes: Store,
    /// The pool's own store.
    store: Store,
    ready: tokio::sync::Mutex<VecDeque<Sandbox>>,
    stats: Mutex<Stats>,
    wake: Notify,
    stop: watch::Sender<bool>,
    stopping: AtomicBool,
}

/// The daemon's lock: held while it runs, with its pid in the file.
#[derive(Debug)]
pub struct DaemonLock {
    _file: nix::fcntl::Flock<File>,
}

impl DaemonLock {
    /// Takes the lock of factory folder `dir` when the folder exists (`factory destroy`
    /// cleaning up); refused while a daemon holds it.
    pub fn acquire_if_present(dir: &Path) -> Result<Option<DaemonLock>, FactoryError> {
        if !dir.is_dir() {
            return Ok(None);
        }
        DaemonLock::acquire(dir).map(Some)
    }

    fn acquire(dir: &Path) -> Result<DaemonLock, FactoryError> {
        let path = dir.join(LOCK_FILE);
        let io = |action| {
            let path = path.clone();
            move |source| FactoryError::Io {
                action,
                path,
                source,
            }
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io("open the factory's lock"))?;
        let mut file =
            match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
                Ok(locked) => locked,
                Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                    return Err(FactoryError::Running {
                        root: dir.parent().map(Path::to_path_buf).unwrap_or_default(),
                        pid: daemon_pid(dir).unwrap_or(0),
                    })
                }
                Err((_, errno)) => {
                    return Err(io("lock")(std::io::Error::from_raw_os_error(errno as i32)))
                }
            };
        file.set_len(0).map_err(io("write the factory's pid to"))?;
        file.write_all(format!("{}\n", std::process::id()).as_bytes())
            .map_err(io("write the factory's pid to"))?;
        Ok(DaemonLock { _file: file })
    }
}

/// The pid a daemon wrote in its lock file under factory folder `dir`.
pub fn daemon_pid(dir: &Path) -> Option<u32> {
    std::fs::read_to_string(dir.join(LOCK_FILE))
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// Whether a daemon holds the lock of factory folder `dir`.
pub fn daemon_running(dir: &Path) -> bool {
    let Ok(file) = File::open(dir.join(LOCK_FILE)) else {
        return false;
    };
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockSharedNonblock) {
        Ok(_) => false,
        Err((_, errno)) => errno == nix::errno::Errno::EWOULDBLOCK,
    }
}

/// Runs the daemon for `config`'s state root until stopped (`stop`, SIGTERM, SIGINT). `ready`
/// is called once the socket listens.
pub async fn serve(config: Config, ready: impl FnOnce(&Path)) -> Result<(), FactoryError> {
    if config.factory.cache == 0 {
        return Err(FactoryError::NotConfigured {
            config: config
                .source
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "the built-in defaults".into()),
        });
    }
    let root = config.runtime.root.clone();
    let sandboxes = Store::open(root.clone())?;
    let dir = factory_dir(&root);
    create_private_dir(&dir)?;
    let _lock = DaemonLock::acquire(&dir)?;
    let swept = sweep(&config).await?;
    tracing::info!(?swept, "factory starting");
    let store = Store::open(dir.join(VMS_DIR))?;
    let socket = dir.join(SOCKET_FILE);
    let listener = bind(&socket)?;
    let (stop, mut stopped) = watch::channel(false);
    let pool = Arc::new(Pool {
        source: Mutex::new(source(&config)),
        config,
        sandboxes,
        store,
        ready: tokio::sync::Mutex::new(VecDeque::new()),
        stats: Mutex::new(Stats::default()),
        wake: Notify::new(),
        stop,
        stopping: AtomicBool::new(false),
    });
    ready(&socket);
    let refill = tokio::spawn(Arc::clone(&pool).refill());
    let mut handlers = tokio::task::JoinSet::new();
    let signal = |kind| {
        tokio::signal::unix::signal(kind).map_err(|source| FactoryError::Io {
            action: "handle signals for",
            path: socket.clone(),
            source,
        })
    };
    let mut term = signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = signal(tokio::signal::unix::SignalKind::interrupt())?;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    handlers.spawn(Arc::clone(&pool).handle(stream));
                }
                Err(e) => tracing::warn!(error = %e, "accepting a factory connection"),
            },
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = stopped.changed() => break,
        }
    }
    tracing::info!("factory stopping");
    pool.stopping.store(true, Ordering::SeqCst);
    let _ = pool.stop.send(true);
    drop(listener);
    let _ = std::fs::remove_file(&socket);
    let _ = refill.await;
    // Hand-outs in flight finish (each ends within ADOPT_TIMEOUT, plus the owner check).
    let drained = tokio::time::timeout(
        ADOPT_TIMEOUT + IDLE_TIMEOUT + Duration::from_secs(35),
        async { while handlers.join_next().await.is_some() {} },
    )
    .await;
    if drained.is_err() {
        tracing::warn!("connections still open at shutdown; closing them");
        handlers.abort_all();
    }
    let vms: Vec<Sandbox> = pool.ready.lock().await.drain(..).collect();
    for sb in vms {
        pool.end(sb).await;
    }
    let swept = sweep(&pool.config).await?;
    tracing::info!(?swept, "factory stopped");
    Ok(())
}

/// Makes factory folder `dir` (0700) unless it exists.
pub fn create_private_dir(dir: &Path) -> Result<(), FactoryError> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(FactoryError::Io {
            action: "create the factory's folder",
            path: dir.to_path_buf(),
            source,
        }),
    }
}

fn bind(socket: &PathBuf) -> Result<UnixListener, FactoryError> {
    let io = |action| {
        move |source| FactoryError::Io {
            action,
            path: socket.clone(),
            source,
        }
    };
    // The lock is ours: a socket file left there is a dead daemon's.
    match std::fs::remove_file(socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("remove the old socket")(e)),
    }
    let listener = UnixListener::bind(socket).map_err(io("listen on"))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .map_err(io("restrict"))?;
    Ok(listener)
}

/// A fresh pool VM id: `vm-` and 12 random hex digits.
fn new_vm_id() -> Result<SandboxId, SandboxError> {
    let mut buf = [0u8; 6];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut buf))
        .map_err(|source| SandboxError::Io {
            action: "read",
            path: PathBuf::from("/dev/urandom"),
            source,
        })?;
    let hex: String = buf.iter().map(|b| format!("{b:02x}")).collect();
    Ok(SandboxId::parse(&format!("vm-{hex}"))?)
}

impl Pool {
    fn stats(&self) -> std::sync::MutexGuard<'_, Stats> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn status(&self) -> FactoryStatus {
        let ready = self.ready.lock().await.len();
        let records = self.store.list_sandboxes().map(|l| l.len()).unwrap_or(0);
        let stats = self.stats();
        FactoryStatus {
            running: true,
            pid: Some(std::process::id()),
            cache: self.config.factory.cache,
            ready: u32::try_from(ready).unwrap_or(u32::MAX),
            booting: stats.booting,
            hits: stats.hits,
            misses: stats.misses,
            boot_failures: stats.boot_failures,
            last_boot_ms: stats.last_boot_ms,
            last_refill_ms: stats.last_refill_ms,
            source: self.source().clone(),
            records: u32::try_from(records).unwrap_or(u32::MAX),
        }
    }

    /// Boots one pool VM.
    async fn boot_one(&self) -> Result<Sandbox, SandboxError> {
        let vm = new_vm_id()?;
        let settings = factory_vm_settings(&self.config, &vm)?;
        let key = self.source().key.clone();
        let annotations = BTreeMap::from([(KEY_ANNOTATION.to_string(), key)]);
        let made = Sandbox::create_from(
            self.store.clone(),
            vm.clone(),
            &self.config,
            settings,
            annotations,
            qemu_parts(&self.config)?,
            VmSource::Boot { note: None },
        )
        .await;
        if made.is_err() {
            // Whatever still runs from its folder goes with it.
            if let Err(e) = crate::sandbox::purge_vm_home(&self.sandboxes, &vm, &self.config).await
            {
                tracing::warn!(vm = %vm, error = %e, "removing a failed pool VM's folder");
            }
        }
        made.map(|(sb, _)| sb)
    }

    /// Keeps the pool full and its VMs alive until the daemon stops.
    async fn refill(self: Arc<Self>) {
        let mut stopped = self.stop.subscribe();
        let mut failures = 0u32;
        loop {
            if self.stopping.load(Ordering::SeqCst) {
                return;
            }
            let short = self.ready.lock().await.len() < self.config.factory.cache as usize;
            if short {
                self.stats().booting = true;
                let t0 = Instant::now();
                let booted = tokio::select! {
                    booted = self.boot_one() => booted,
                    _ = stopped.changed() => return,
                };
                self.stats().booting = false;
                match booted {
                    Ok(sb) => {
                        failures = 0;
                        tracing::info!(vm = %sb.id(), ms = t0.elapsed().as_millis() as u64, "pool VM ready");
                        let mut ready = self.ready.lock().await;
                        ready.push_back(sb);
                        let full = ready.len() >= self.config.factory.cache as usize;
                        drop(ready);
                        let mut stats = self.stats();
                        stats.last_boot_ms = Some(t0.elapsed().as_millis() as u64);
                        if full {
                            if let Some(since) = stats.short_since.take() {
                                stats.last_refill_ms = Some(since.elapsed().as_millis() as u64);
                            }
                        }
                    }
                    Err(e) => {
                        failures += 1;
                        self.stats().boot_failures += 1;
                        let pause = Duration::from_secs(1u64 << failures.min(6)).min(MAX_BACKOFF);
                        tracing::warn!(error = %crate::ErrorChain(&e), retry_in_s = pause.as_secs(), "a pool VM failed to boot");
                        tokio::select! {
                            () = tokio::time::sleep(pause) => {}
                            _ = stopped.changed() => return,
                        }
                    }
                }
                continue;
            }
            tokio::select! {
                () = self.wake.notified() => {}
                () = tokio::time::sleep(HEALTH_INTERVAL) => self.check_ready().await,
                _ = stopped.changed() => return,
            }
        }
    }

    /// Ends the ready VMs that died.
    async fn check_ready(&self) {
        let mut ready = self.ready.lock().await;
        let mut alive = VecDeque::with_capacity(ready.len());
        let mut dead = Vec::new();
        while let Some(mut sb) = ready.pop_front() {
            match sb.check_vm().await {
                Ok(()) => alive.push_back(sb),
                Err(e) => {
                    tracing::warn!(vm = %sb.id(), error = %e, "a pool VM died");
                    dead.push(sb);
                }
            }
        }
        *ready = alive;
        drop(ready);
        for sb in dead {
            self.end(sb).await;
        }
    }

    /// Ends pool VM `sb`: its processes, its record, its folder.
    async fn end(&self, mut sb: Sandbox) {
        let vm = sb.id().clone();
        if let Err(e) = sb.kill().await {
            tracing::warn!(vm = %vm, error = %e, "ending a pool VM");
        }
        if let Err(e) = sb.delete(true).await {
            tracing::warn!(vm = %vm, error = %e, "removing a pool VM's record");
        }
        self.end_by_id(&vm).await;
    }

    /// Ends pool VM `vm` from what is on disk (its record, its folder).
    async fn end_by_id(&self, vm: &SandboxId) {
        match crate::sandbox::purge(&self.store, vm, &self.config).await {
            Ok(_) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => tracing::warn!(vm = %vm, error = %e, "purging a pool VM"),
        }
        if let Err(e) = crate::sandbox::purge_vm_home(&self.sandboxes, vm, &self.config).await {
            tracing::warn!(vm = %vm, error = %e, "removing a pool VM's folder");
        }
    }

    /// Serves one connection.
    async fn handle(self: Arc<Self>, stream: UnixStream) {
        let mut conn = BufReader::new(stream);
        loop {
            let request = match read_request(&mut conn, Some(IDLE_TIMEOUT)).await {
                Some(Ok(r)) => r,
                Some(Err(problem)) => {
                    tracing::warn!(%problem, "a bad factory request");
                    return;
                }
                None => return,
            };
            match request {
                Request::Status => {
                    let status = self.status().await;
                    if !reply(&mut conn, &Reply::Status(Box::new(status))).await {
                        return;
                    }
                }
                Request::Take { sandbox, key } => {
                    self.hand_out(&mut conn, sandbox, key).await;
                    return;
                }
                Request::Adopted => {
                    let _ = reply(
                        &mut conn,
                        &Reply::Miss {
                            reason: "error: `adopted` without a VM handed out".into(),
                        },
                    )
                    .await;
                    return;
                }
                Request::Stop => {
                    let _ = reply(&mut conn, &Reply::Ok).await;
                    self.stopping.store(true, Ordering::SeqCst);
                    let _ = self.stop.send(true);
                    return;
                }
            }
        }
    }

    fn source(&self) -> std::sync::MutexGuard<'_, FactorySource> {
        self.source.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The first ready VM made from `key`; ready VMs made from another (booted while the
    /// source changed) are ended.
    async fn take_ready(&self, key: &str) -> Option<Sandbox> {
        loop {
            let sb = self.ready.lock().await.pop_front()?;
            if sb
                .record()
                .annotations
                .get(KEY_ANNOTATION)
                .map(String::as_str)
                == Some(key)
            {
                return Some(sb);
            }
            tracing::info!(vm = %sb.id(), "ending a pool VM made from an older source");
            self.end(sb).await;
        }
    }

    fn miss(&self) {
        self.stats().misses += 1;
    }

    /// Hands a ready VM to `sandbox`, then waits for its `adopted`.
    async fn hand_out(&self, conn: &mut BufReader<UnixStream>, sandbox: SandboxId, key: String) {
        let current = self.source().key.clone();
        if key != current {
            // The files the key covers may have changed since the pool was made.
            let fresh = source(&self.config);
            if fresh.key != key {
                self.miss();
                let reason = format!(
                    "another-configuration: the factory makes VMs from {} and this sandbox's \
                     configuration gives {key}; start a factory with the same configuration",
                    fresh.key
                );
                let _ = reply(conn, &Reply::Miss { reason }).await;
                return;
            }
            tracing::info!(old = %current, new = %fresh.key, "the guest image or QEMU changed; replacing the pool's VMs");
            *self.source.lock().unwrap_or_else(|e| e.into_inner()) = fresh;
            let stale: Vec<Sandbox> = self.ready.lock().await.drain(..).collect();
            for sb in stale {
                self.end(sb).await;
            }
            self.wake.notify_one();
            self.miss();
            let reason = "stale: the pool's VMs were made from an older guest image or QEMU; \
                          it is refilling"
                .to_string();
            let _ = reply(conn, &Reply::Miss { reason }).await;
            return;
        }
        if self.stopping.load(Ordering::SeqCst) {
            self.miss();
            let _ = reply(
                conn,
                &Reply::Miss {
                    reason: "stopping".into(),
                },
            )
            .await;
            return;
        }
        let taken = self.take_ready(&key).await;
        let Some(mut sb) = taken else {
            self.miss();
            let reason = format!(
                "empty: all {} VMs are taken; the pool is refilling",
                self.config.factory.cache
            );
            let _ = reply(conn, &Reply::Miss { reason }).await;
            return;
        };
        {
            let mut stats = self.stats();
            stats.short_since.get_or_insert_with(Instant::now);
        }
        self.wake.notify_one();
        let vm = sb.id().clone();
        if let Err(e) = sb.set_annotation(HANDED_TO_ANNOTATION, Some(sandbox.as_str())) {
            tracing::warn!(vm = %vm, error = %e, "marking a pool VM handed out");
            self.miss();
            self.end(sb).await;
            let _ = reply(
                conn,
                &Reply::Miss {
                    reason: "error: the pool's record".into(),
                },
            )
            .await;
            return;
        }
        let record = Box::new(sb.record().clone());
        // From here the VM is driven from the records only: whoever owns it by the rule ends
        // it, and this process must not kill it by dropping its handle.
        sb.detach();
        let sent = reply(
            conn,
            &Reply::Vm {
                id: vm.clone(),
                record,
            },
        )
        .await;
        let answer = if sent {
            read_request(conn, Some(ADOPT_TIMEOUT)).await
        } else {
            None
        };
        if let Some(Ok(Request::Adopted)) = answer {
            self.forget(&vm);
            self.stats().hits += 1;
            let _ = reply(conn, &Reply::Ok).await;
            tracing::info!(vm = %vm, sandbox = %sandbox, "VM handed out");
            return;
        }
        // No `adopted`: the sandbox's record decides (its creator may still hold its lock).
        let sandboxes = self.sandboxes.clone();
        let (vm2, who) = (vm.clone(), sandbox.to_string());
        let owner = tokio::task::spawn_blocking(move || super::owner(&sandboxes, &vm2, Some(&who)))
            .await
            .unwrap_or_else(|e| Owner::Unknown(e.to_string()));
        match owner {
            Owner::Sandbox(_) => {
                self.forget(&vm);
                self.stats().hits += 1;
            }
            Owner::Pool => {
                tracing::info!(vm = %vm, sandbox = %sandbox, "a hand-out was not adopted; ending the VM");
                self.miss();
                self.end_by_id(&vm).await;
            }
            Owner::Unknown(why) => {
                tracing::warn!(vm = %vm, %why, "cannot tell who owns a handed-out VM; left for the next sweep");
            }
        }
    }

    /// Drops the pool record of a VM a sandbox owns now (its folder stays: the sandbox's).
    fn forget(&self, vm: &SandboxId) {
        let removed = self
            .store
            .lock_exclusive_timeout(vm, crate::sandbox::LOCK_TIMEOUT)
            .and_then(|lock| self.store.remove_sandbox(lock));
        if let Err(e) = removed {
            tracing::warn!(vm = %vm, error = %e, "dropping the pool record of an adopted VM");
        }
    }
}

/// Reads one request line; `None` at the end of the connection (or after `timeout`).
async fn read_request(
    conn: &mut BufReader<UnixStream>,
    timeout: Option<Duration>,
) -> Option<Result<Request, String>> {
    let mut line = String::new();
    let read = conn.read_line(&mut line);
    let n = match timeout {
        Some(t) => tokio::time::timeout(t, read).await.ok()?,
        None => read.await,
    };
    match n {
        Ok(0) | Err(_) => None,
        Ok(_) => Some(serde_json::from_str(&line).map_err(|e| e.to_string())),
    }
}

/// Writes one reply line; `false` when the peer is gone.
async fn reply(conn: &mut BufReader<UnixStream>, reply: &Reply) -> bool {
    let Ok(mut line) = serde_json::to_vec(reply) else {
        return false;
    };
    line.push(b'\n');
    conn.get_mut().write_all(&line).await.is_ok()
}
