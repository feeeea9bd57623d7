//! What runvm's fuzz targets share: the runtime, ttrpc framing, the agent's fake backend, the
//! network isolation of the agent target, and the seed inputs (`seeds`).

pub mod fake;
pub mod seeds;

use std::sync::OnceLock;

/// A single-threaded runtime whose clock only moves when every task waits: a timeout costs no
/// real time, so an input that makes the code under test wait runs as fast as any other.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("a tokio runtime")
    })
}

/// One ttrpc frame: the 10-byte header (length and stream id big-endian, type, flags), then
/// `payload`.
pub fn ttrpc_frame(stream_id: u32, kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(10 + payload.len());
    frame.extend_from_slice(
        &u32::try_from(payload.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    frame.extend_from_slice(&stream_id.to_be_bytes());
    frame.extend_from_slice(&[kind, 0]);
    frame.extend_from_slice(payload);
    frame
}

/// The agent's ttrpc service name.
pub const AGENT_SERVICE: &str = "runvm.agent.v1.AgentService";

/// Gives this process (the thread calling it, and the threads it starts later) a network
/// namespace of its own, so that the agent's network requests (UpdateInterface, UpdateRoutes,
/// AddARPNeighbors) change nothing of the host's. Must run before any other thread starts.
/// Panics if the kernel refuses: fuzzing them on the host's network is never an option.
pub fn isolate_network() {
    use nix::sched::{unshare, CloneFlags};
    let host = std::fs::read_link("/proc/self/ns/net").ok();
    if unshare(CloneFlags::CLONE_NEWNET).is_err() {
        // Not root: a user namespace of our own, where we may.
        unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| {
            panic!(
                "cannot unshare the network namespace ({e}): the agent_service target needs \
                 root or unprivileged user namespaces, so that the agent's network requests \
                 cannot touch the host's network"
            )
        });
    }
    let now = std::fs::read_link("/proc/self/ns/net").ok();
    assert!(
        now.is_some() && now != host,
        "the network namespace did not change ({host:?}); refusing to fuzz the agent's network requests"
    );
}

/// A scratch folder of this process, `TMPDIR/runvm-fuzz-NAME-PID` (made); those of earlier
/// processes that are gone are removed first (libFuzzer ends a run with `exit`, which leaves
/// them behind).
pub fn scratch_dir(name: &str) -> std::path::PathBuf {
    let tmp = std::env::temp_dir();
    let prefix = format!("runvm-fuzz-{name}-");
    for entry in std::fs::read_dir(&tmp).into_iter().flatten().flatten() {
        let file_name = entry.file_name();
        let pid = file_name.to_str().and_then(|n| n.strip_prefix(&prefix));
        if pid.is_some_and(|pid| !std::path::Path::new("/proc").join(pid).exists()) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    let dir = tmp.join(format!("{prefix}{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("make the scratch folder");
    dir
}

/// In a target's `init`: when `RUNVM_FUZZ_SEEDS` names a folder, writes `target`'s seed inputs
/// to `RUNVM_FUZZ_SEEDS/target/` and exits (`fuzz/run.sh seeds`).
pub fn write_seeds_and_exit_if_asked(target: &str) {
    let Some(dir) = std::env::var_os("RUNVM_FUZZ_SEEDS") else {
        return;
    };
    let dir = std::path::Path::new(&dir).join(target);
    std::fs::create_dir_all(&dir).expect("make the seed folder");
    let seeds = seeds::for_target(target);
    for (name, data) in &seeds {
        std::fs::write(dir.join(name), data).expect("write a seed");
    }
    eprintln!("{} seeds written to {}", seeds.len(), dir.display());
    std::process::exit(0);
}
