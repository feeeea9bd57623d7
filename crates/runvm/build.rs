//! Records the commit runvm is built from, for `runvm --version` (`RUNVM_COMMIT` overrides).

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=RUNVM_COMMIT");
    let commit = std::env::var("RUNVM_COMMIT").ok().or_else(|| {
        let out = Command::new("git")
            .args(["describe", "--always", "--dirty", "--abbrev=12"])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
            .filter(|c| !c.is_empty())
    });
    println!(
        "cargo:rustc-env=RUNVM_COMMIT={}",
        commit.unwrap_or_else(|| "unknown".into())
    );
}
