//! The zygote protocol on the host: a real zygote process (this test binary re-executed into
//! `zygote_process_entry`) with a fake handler in place of libcontainer.

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use super::*;

/// Set in the re-executed test binary that serves as the zygote.
const TEST_ZYGOTE_ENV: &str = "RUNVM_TEST_ZYGOTE";

fn test_zygote() -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "container::zygote::tests::zygote_process_entry",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(TEST_ZYGOTE_ENV, "1");
    cmd
}

/// Not a test of its own: the body of the re-executed zygote.
#[test]
fn zygote_process_entry() {
    if std::env::var_os(TEST_ZYGOTE_ENV).is_none() {
        return;
    }
    let fd: RawFd = std::env::var(ZYGOTE_FD_ENV).unwrap().parse().unwrap();
    // SAFETY: the test passed this fd to this process alone.
    let control = unsafe { OwnedFd::from_raw_fd(fd) };
    super::super::zygote_main::serve(control, fake_handler)
}

/// The worker's fake libcontainer: what it does depends on the container id.
fn fake_handler(request: Request, result_fd: RawFd) -> ! {
    let Request::Start { id, .. } = request else {
        std::process::exit(90);
    };
    let reply = match id.as_str() {
        "echo" => {
            let mut out = std::io::stdout();
            let _ = writeln!(out, "hello from {}", std::process::id());
            let _ = out.flush();
            format!("{{\"ok\":{{\"pid\":{}}}}}", std::process::id())
        }
        "fds" => {
            // Every fd but 0/1/2 and the result pipe must be close-on-exec.
            let leaked: Vec<String> = std::fs::read_dir("/proc/self/fd")
                .unwrap()
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<RawFd>().ok())
                .filter(|fd| *fd > 2 && *fd != result_fd)
                // SAFETY: F_GETFD only reads the flags (an fd closed since, e.g. the one of
                // read_dir, gives -1).
                .filter(|fd| unsafe { libc::fcntl(*fd, libc::F_GETFD) } == 0)
                .map(|fd| fd.to_string())
                .collect();
            if leaked.is_empty() {
                "{\"ok\":{\"pid\":null}}".to_string()
            } else {
                format!(
                    "{{\"error\":{{\"kind\":\"internal\",\"message\":\"{}\"}}}}",
                    leaked.join(",")
                )
            }
        }
        "slow" => {
            std::thread::sleep(Duration::from_millis(300));
            format!("{{\"ok\":{{\"pid\":{}}}}}", std::process::id())
        }
        "crash" => std::process::exit(3),
        _ => std::process::exit(91),
    };
    // SAFETY: the result fd was handed to this worker alone.
    let mut f = unsafe { std::fs::File::from_raw_fd(result_fd) };
    let _ = writeln!(f, "{reply}");
    std::process::exit(0)
}

struct Outcome {
    started: i32,
    reply: String,
    stdout: String,
    status: Option<i32>,
}

/// This process's fds above 2 without close-on-exec (inherited from its parent).
fn inherited_fds() -> Vec<RawFd> {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<RawFd>().ok())
        .filter(|fd| *fd > 2)
        // SAFETY: F_GETFD only reads the flags.
        .filter(|fd| unsafe { libc::fcntl(*fd, libc::F_GETFD) } == 0)
        .collect()
}

fn null() -> OwnedFd {
    std::fs::File::open("/dev/null").unwrap().into()
}

async fn order(z: &Zygote, reaper: &Arc<Reaper>, id: &str) -> Result<Outcome, ZygoteError> {
    let (out_r, out_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    let (res_r, res_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    let stdio = ChildStdio {
        stdin: null(),
        stdout: out_w,
        stderr: null(),
    };
    let request = Request::Start {
        id: id.into(),
        root: PathBuf::from("/nonexistent"),
    };
    let started = z
        .start(reaper, &request, &stdio, &res_w, Instant::now())
        .await;
    drop(stdio);
    drop(res_w);
    let started = started?;
    let read_all = |fd: OwnedFd| {
        tokio::task::spawn_blocking(move || {
            let mut s = String::new();
            std::fs::File::from(fd).read_to_string(&mut s).unwrap();
            s
        })
    };
    let (reply, stdout) = (read_all(res_r), read_all(out_r));
    let status = tokio::time::timeout(Duration::from_secs(20), reaper::wait(started.exit))
        .await
        .expect("no exit reported")
        .map(|e| e.status);
    Ok(Outcome {
        started: started.pid,
        reply: reply.await.unwrap(),
        stdout: stdout.await.unwrap(),
        status,
    })
}

fn zygote() -> (Zygote, Arc<Reaper>) {
    (Zygote::new(Launcher::Command(test_zygote)), Reaper::new())
}

#[test]
fn orders_and_events_round_trip_as_json() {
    let o = Order {
        id: 7,
        request: Request::Start {
            id: "c".into(),
            root: "/r".into(),
        },
    };
    let text = serde_json::to_string(&o).unwrap();
    assert_eq!(serde_json::from_str::<Order>(&text).unwrap(), o);
    let e = Event::Exited { id: 7, status: 137 };
    let text = serde_json::to_string(&e).unwrap();
    assert_eq!(text, r#"{"exited":{"id":7,"status":137}}"#);
    assert_eq!(serde_json::from_str::<Event>(&text).unwrap(), e);
}

#[tokio::test]
async fn an_order_runs_in_a_forked_worker_with_the_stdio_it_was_given() {
    let (z, reaper) = zygote();
    let out = order(&z, &reaper, "echo").await.unwrap();
    let zygote_pid = z.pid().await.unwrap();
    assert_ne!(out.started, zygote_pid);
    assert_eq!(
        out.reply.trim(),
        format!("{{\"ok\":{{\"pid\":{}}}}}", out.started)
    );
    assert_eq!(out.stdout, format!("hello from {}\n", out.started));
    assert_eq!(out.status, Some(0));
    assert_eq!(
        super::super::helper::parse_reply(out.reply.as_bytes()),
        Ok(Some(out.started))
    );
}

#[tokio::test]
async fn a_worker_holds_no_descriptor_that_would_survive_exec_but_its_stdio_and_result() {
    let (z, reaper) = zygote();
    let out = order(&z, &reaper, "fds").await.unwrap();
    if out.reply.contains("\"ok\"") {
        return;
    }
    // Only fds this test process itself inherited without close-on-exec (from whoever
    // started it, as a shell does) may reach the worker: nothing the zygote opened.
    let reply: serde_json::Value = serde_json::from_str(&out.reply).unwrap();
    let leaked = reply["error"]["message"].as_str().unwrap().to_string();
    let ours = inherited_fds();
    let foreign: Vec<&str> = leaked
        .split(',')
        .filter(|fd| !ours.contains(&fd.parse::<RawFd>().unwrap()))
        .collect();
    assert!(foreign.is_empty(), "fds without close-on-exec: {foreign:?}");
}

#[tokio::test]
async fn a_worker_that_dies_without_answering_reports_its_exit_status() {
    let (z, reaper) = zygote();
    let out = order(&z, &reaper, "crash").await.unwrap();
    assert_eq!(out.reply, "");
    assert_eq!(out.status, Some(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_orders_each_get_their_own_worker_and_reply() {
    let (z, reaper) = zygote();
    let since = Instant::now();
    let ids = [
        "slow", "echo", "slow", "echo", "slow", "echo", "slow", "echo",
    ];
    let outs = futures_util::future::join_all(ids.iter().map(|id| order(&z, &reaper, id))).await;
    // The slow ones ran side by side, not one after the other.
    assert!(
        since.elapsed() < Duration::from_millis(1200),
        "{:?}",
        since.elapsed()
    );
    let mut pids = std::collections::HashSet::new();
    for out in outs {
        let out = out.unwrap();
        assert_eq!(
            out.reply.trim(),
            format!("{{\"ok\":{{\"pid\":{}}}}}", out.started)
        );
        assert_eq!(out.status, Some(0));
        assert!(pids.insert(out.started));
    }
}

#[tokio::test]
async fn a_dead_zygote_is_replaced_by_a_new_one() {
    let (z, reaper) = zygote();
    order(&z, &reaper, "echo").await.unwrap();
    let first = z.pid().await.unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(first), None);
    let out = order(&z, &reaper, "echo").await.unwrap();
    assert_eq!(out.status, Some(0));
    let second = z.pid().await.unwrap();
    assert_ne!(first, second);
}

#[tokio::test]
async fn a_zygote_that_cannot_start_or_dies_at_once_is_an_error_not_a_hang() {
    let reaper = Reaper::new();
    let z = Zygote::new(Launcher::Command(|| Command::new("/nonexistent/zygote")));
    let err = order(&z, &reaper, "echo").await.err().unwrap();
    assert!(matches!(err, ZygoteError::Launch(_)), "{err}");
    let z = Zygote::new(Launcher::Command(|| Command::new("true")));
    let since = Instant::now();
    let err = order(&z, &reaper, "echo").await.err().unwrap();
    assert!(
        matches!(err, ZygoteError::Send(_) | ZygoteError::Gone),
        "{err}"
    );
    assert!(since.elapsed() < START_TIMEOUT, "{:?}", since.elapsed());
}
