//! The real agent binary re-executed as the zygote (`runvm-agent __zygote`, as the agent does
//! after its first zygote died), spoken to on the wire: orders with their fds, events, the
//! worker's libcontainer answer on the result pipe. No VM needed.

use std::io::{IoSlice, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};

use nix::sys::socket::{
    recv, sendmsg, socketpair, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType,
};
use serde_json::{json, Value};

fn start_zygote() -> (Child, OwnedFd) {
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .unwrap();
    let raw = theirs.as_raw_fd();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_runvm-agent"));
    cmd.arg("__zygote")
        .env("RUNVM_ZYGOTE_FD", raw.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    // SAFETY: only fcntl, async-signal-safe, between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(raw, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap();
    drop(theirs);
    (child, ours)
}

fn send(sock: &OwnedFd, order: &Value, fds: &[i32]) {
    let text = serde_json::to_vec(order).unwrap();
    let cmsg = [ControlMessage::ScmRights(fds)];
    sendmsg::<()>(
        sock.as_raw_fd(),
        &[IoSlice::new(&text)],
        if fds.is_empty() { &[] } else { &cmsg },
        MsgFlags::empty(),
        None,
    )
    .unwrap();
}

fn event(sock: &OwnedFd) -> Value {
    let mut buf = vec![0u8; 65536];
    let n = recv(sock.as_raw_fd(), &mut buf, MsgFlags::empty()).unwrap();
    serde_json::from_slice(&buf[..n]).unwrap()
}

fn null() -> OwnedFd {
    std::fs::File::open("/dev/null").unwrap().into()
}

#[test]
fn the_agent_binary_as_zygote_runs_libcontainer_in_a_worker_and_reports_its_exit() {
    let state = tempfile::tempdir().unwrap();
    let (mut zygote, sock) = start_zygote();
    let (result_r, result_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    let stdio = [null(), null(), null()];
    let order =
        json!({"id": 5, "request": {"op": "delete", "id": "missing", "root": state.path()}});
    send(
        &sock,
        &order,
        &[
            stdio[0].as_raw_fd(),
            stdio[1].as_raw_fd(),
            stdio[2].as_raw_fd(),
            result_w.as_raw_fd(),
        ],
    );
    drop(result_w);
    let started = event(&sock);
    let pid = started["started"]["pid"].as_i64().unwrap();
    assert_eq!(started["started"]["id"], 5, "{started}");
    assert_ne!(pid, i64::from(zygote.id()));
    // The worker answers as the helper does: libcontainer finds no such container.
    let mut reply = String::new();
    std::fs::File::from(result_r)
        .read_to_string(&mut reply)
        .unwrap();
    let reply: Value = serde_json::from_str(reply.trim()).unwrap();
    assert!(reply["error"]["message"].is_string(), "{reply}");
    assert_eq!(
        event(&sock),
        json!({"exited": {"id": 5, "status": 0}}),
        "the zygote reaps its worker and reports it"
    );

    // An order without its four fds is refused, and the zygote carries on.
    send(&sock, &order, &[]);
    let refused = event(&sock);
    assert_eq!(refused["failed"]["id"], 5, "{refused}");

    // Closing the agent's end ends the zygote.
    drop(sock);
    let status = zygote.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}
