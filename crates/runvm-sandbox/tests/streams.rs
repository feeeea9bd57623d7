//! Process stdio over the per-process vsock streams, in a real VM (one boot): a program writing
//! 256 MiB to stdout with stderr lines interleaved arrives byte-exact on both streams, each in
//! its order; a terminal carries input, output and the end of input (^D); the end of a
//! process's output is not its exit.
//!
//! Needs the host set-up, busybox-static, gcc with a static libc and the guest image; `make
//! test` provides them.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use common::*;
use runvm_sandbox::container::bundle::default_spec;
use runvm_sandbox::sandbox::create_qemu_sandbox;
use runvm_sandbox::SandboxId;
use tokio::io::AsyncWrite;

const MIB: u64 = 1 << 20;

/// Writes `MiB` (its argument) MiB to stdout in 64 KiB writes, byte i being `(i * 7 + i / 65521)
/// % 256`, and after every 16 MiB a line `mark N` to stderr; then `done` to stderr.
const FLOOD_C: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
static int write_all(int fd, const unsigned char *p, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0) return -1;
        p += w; n -= (size_t)w;
    }
    return 0;
}
int main(int argc, char **argv) {
    unsigned long long total = (argc > 1 ? strtoull(argv[1], 0, 10) : 1) << 20;
    static unsigned char buf[65536];
    char line[64];
    for (unsigned long long off = 0; off < total; off += sizeof buf) {
        for (size_t j = 0; j < sizeof buf; j++) {
            unsigned long long i = off + j;
            buf[j] = (unsigned char)((i * 7 + i / 65521) % 256);
        }
        if (write_all(1, buf, sizeof buf)) return 2;
        if ((off + sizeof buf) % (16 << 20) == 0) {
            int n = snprintf(line, sizeof line, "mark %llu\n", (off + sizeof buf) >> 24);
            if (write_all(2, (unsigned char *)line, (size_t)n)) return 3;
        }
    }
    if (write_all(2, (const unsigned char *)"done\n", 5)) return 4;
    return 0;
}
"#;

fn build_flood(rootfs: &Path, dir: &Path) {
    let src = dir.join("flood.c");
    std::fs::write(&src, FLOOD_C).unwrap();
    let out = std::process::Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(rootfs.join("bin/flood"))
        .arg(&src)
        .output()
        .expect("gcc (a static libc is needed)");
    assert!(
        out.status.success(),
        "gcc: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A writer that checks every byte against the flood pattern, keeping only counts.
#[derive(Default)]
struct PatternCheck {
    at: u64,
    first_bad: Option<u64>,
}

impl AsyncWrite for PatternCheck {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        for &b in buf {
            let i = self.at;
            if self.first_bad.is_none() && b != ((i * 7 + i / 65521) % 256) as u8 {
                self.first_bad = Some(i);
            }
            self.at += 1;
        }
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdio_streams_in_one_vm() {
    let host = Host::new();
    let id = SandboxId::parse("streams").unwrap();
    let (mut sb, _) = create_qemu_sandbox(&host.config, id, BTreeMap::new())
        .await
        .expect("boot");

    // 256 MiB on stdout, byte-exact, with stderr interleaved and in its own order.
    let spec = default_spec(&["sleep", "1000"], false);
    let bundle = host.bundle("flood", &spec);
    build_flood(&bundle.join("rootfs"), host.dir.path());
    let _init = create(&mut sb, "flood", bundle, stdio(false, false)).await;
    sb.start_container(&cid("flood")).await.unwrap();
    let io = exec(
        &mut sb,
        "flood",
        exec_req("f", &["/bin/flood", "256"], false),
    )
    .await;
    let mut check = PatternCheck::default();
    let mut err = Vec::new();
    let t = Instant::now();
    let relayed = runvm_sandbox::process::relay(io, tokio::io::empty(), &mut check, &mut err)
        .await
        .unwrap();
    let secs = t.elapsed().as_secs_f64();
    eprintln!(
        "256 MiB stdout in {secs:.2} s: {:.0} MB/s",
        (256 * MIB) as f64 / secs / 1e6
    );
    assert_eq!(relayed.stdout, 256 * MIB);
    assert_eq!(
        check.first_bad, None,
        "stdout differs from byte {:?}",
        check.first_bad
    );
    let marks: String = (1..=16).map(|n| format!("mark {n}\n")).collect();
    assert_eq!(String::from_utf8_lossy(&err), format!("{marks}done\n"));
    assert_eq!(sb.wait(&cid("flood"), "f").await.unwrap().code, 0);

    // A terminal: input reaches it, the end of input is ^D (cat sees EOF and exits), its
    // output (the echo and cat's copy) comes back on the one output stream.
    let mut req = exec_req("tty", &["cat"], true);
    req.stdio.stdin = true;
    let io = exec(&mut sb, "flood", req).await;
    assert!(io.stderr.is_none(), "a terminal has no stderr stream");
    let mut out = Vec::new();
    runvm_sandbox::process::relay(
        io,
        std::io::Cursor::new(b"hello tty\n".to_vec()),
        &mut out,
        tokio::io::sink(),
    )
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out);
    assert_eq!(text.matches("hello tty").count(), 2, "{text:?}");
    assert_eq!(sb.wait(&cid("flood"), "tty").await.unwrap().code, 0);

    // The end of the output is not the exit: output closed, then a second, then exit 5.
    let io = exec(
        &mut sb,
        "flood",
        exec_req(
            "late",
            &["sh", "-c", "echo bye; exec >&- 2>&-; sleep 2; exit 5"],
            false,
        ),
    )
    .await;
    let process = sb.process(&cid("flood"), "late", Some(io)).await.unwrap();
    let mut out = Vec::new();
    let t = Instant::now();
    process
        .relay(tokio::io::empty(), &mut out, tokio::io::sink())
        .await
        .unwrap();
    let output_ended = t.elapsed();
    assert_eq!(out, b"bye\n");
    assert_eq!(process.wait().await.unwrap().code, 5);
    let exited = t.elapsed();
    assert!(
        exited >= output_ended + Duration::from_secs(1),
        "output ended at {output_ended:?}, exit at {exited:?}"
    );
    let record = sb.container(&cid("flood")).unwrap();
    assert_eq!(record.execs["late"].exit_status, Some(5));

    sb.stop().await.unwrap();
    sb.delete(true).await.unwrap();
    host.assert_nothing_left();
}
