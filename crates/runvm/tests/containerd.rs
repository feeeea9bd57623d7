//! containerd's own runc shim (io.containerd.runc.v2) driving runvm as its runc binary.

mod common;

use std::path::Path;
use std::process::Command;

use common::text;

struct Containerd<'a> {
    dir: &'a Path,
}

impl Drop for Containerd<'_> {
    fn drop(&mut self) {
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../scripts/containerd-env.sh"
        );
        let _ = Command::new(script).arg("stop").arg(self.dir).status();
    }
}

#[test]
fn ctr_runs_a_container_with_runvm_as_runc() {
    let tmp = tempfile::Builder::new()
        .prefix("runvm-ctd-")
        .tempdir()
        .unwrap();
    let scripts = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts");
    let image = tmp.path().join("busybox.tar");
    let made = Command::new(format!("{scripts}/busybox-image.sh"))
        .arg(&image)
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", text(&made.stderr));
    let ctd = tmp.path().join("containerd");
    let started = Command::new(format!("{scripts}/containerd-env.sh"))
        .arg("start")
        .arg(&ctd)
        .output()
        .unwrap();
    let guard = Containerd { dir: &ctd };
    assert!(started.status.success(), "{}", text(&started.stderr));
    let socket = text(&started.stdout).trim().to_string();
    let ctr = |args: &[&str]| {
        Command::new("ctr")
            .arg("-a")
            .arg(&socket)
            .args(args)
            .output()
            .unwrap()
    };
    let import = ctr(&[
        "images",
        "import",
        "--base-name",
        "docker.io/library/busybox",
        image.to_str().unwrap(),
    ]);
    assert!(import.status.success(), "{}", text(&import.stderr));

    let runc_root = tmp.path().join("runvm-root");
    let out = ctr(&[
        "run",
        "--rm",
        "--runtime",
        "io.containerd.runc.v2",
        "--runc-binary",
        env!("CARGO_BIN_EXE_runvm"),
        "--runc-root",
        runc_root.to_str().unwrap(),
        "docker.io/library/busybox:latest",
        "t1",
        "sh",
        "-c",
        "echo hello from a vm; exit 7",
    ]);
    assert_eq!(
        out.status.code(),
        Some(7),
        "{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert_eq!(text(&out.stdout), "hello from a vm\n");
    drop(guard);
    // Nothing left: no VM process, no state of runvm's (the shim's namespace folder may stay).
    common::assert_nothing_left(tmp.path(), &runc_root.join("default"));
}
