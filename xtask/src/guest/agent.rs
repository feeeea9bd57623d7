//! The guest agent: building it as a static binary and reading its version.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::elf::Elf;
use crate::cmd;

pub const PACKAGE: &str = "runvm-agent";
/// The only target installed here; `+crt-static` makes its binaries static (no musl needed).
pub const TARGET: &str = "x86_64-unknown-linux-gnu";
/// Where Debian's libseccomp-dev puts libseccomp.a.
const LIBSECCOMP_LIB_PATH: &str = "/usr/lib/x86_64-linux-gnu";

/// The workspace root: the parent of this crate's folder.
pub fn workspace_root() -> Result<PathBuf> {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_owned)
        .context("xtask's manifest folder has no parent")
}

/// Builds the agent with the `guest` profile (release, optimised for size, stripped),
/// statically linked; returns the binary's path.
pub fn build(root: &Path) -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    cmd::run_streamed(
        Command::new(cargo)
            .args([
                "build",
                "--profile",
                "guest",
                "--package",
                PACKAGE,
                "--target",
                TARGET,
            ])
            .current_dir(root)
            // This takes precedence over RUSTFLAGS when set (as in some cargo contexts).
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            // libcontainer's seccomp support links libseccomp: statically here (Debian's
            // libseccomp-dev ships libseccomp.a), since the guest has no shared libraries.
            .env("LIBSECCOMP_LINK_TYPE", "static")
            .env("LIBSECCOMP_LIB_PATH", LIBSECCOMP_LIB_PATH),
    )?;
    let target_dir = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => root.join(dir),
        None => root.join("target"),
    };
    Ok(target_dir.join(TARGET).join("guest").join(PACKAGE))
}

/// Fails unless `binary` is an ELF file without a program interpreter (statically linked).
pub fn ensure_static(binary: &Path, data: &[u8]) -> Result<()> {
    let elf = Elf::parse(data).with_context(|| format!("cannot parse {}", binary.display()))?;
    if elf
        .has_interpreter()
        .with_context(|| format!("cannot parse {}", binary.display()))?
    {
        bail!(
            "{} is dynamically linked (it has a PT_INTERP program header); the guest has no \
             dynamic loader",
            binary.display()
        );
    }
    Ok(())
}

/// The agent's version: its own `[package] version`, or the workspace's when it inherits it.
pub fn version(root: &Path) -> Result<String> {
    let manifest_path = root.join("crates").join(PACKAGE).join("Cargo.toml");
    let manifest = fs::read_to_string(&manifest_path)
        .with_context(|| format!("cannot read {}", manifest_path.display()))?;
    if let Some(version) = toml_value(&manifest, "package", "version").and_then(quoted) {
        return Ok(version.to_owned());
    }
    let workspace_path = root.join("Cargo.toml");
    let workspace = fs::read_to_string(&workspace_path)
        .with_context(|| format!("cannot read {}", workspace_path.display()))?;
    toml_value(&workspace, "workspace.package", "version")
        .and_then(quoted)
        .map(str::to_owned)
        .with_context(|| {
            format!(
                "neither {} nor {} ([workspace.package]) sets a version",
                manifest_path.display(),
                workspace_path.display()
            )
        })
}

/// The raw value of `key = value` in `[section]` of a TOML text (a one-line subset of TOML that
/// Cargo manifests' versions use).
fn toml_value<'a>(text: &'a str, section: &str, key: &str) -> Option<&'a str> {
    let mut current = "";
    for line in text.lines().map(str::trim) {
        if let Some(header) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = header.trim();
        } else if current == section {
            let Some((k, v)) = line.split_once('=') else {
                continue;
            };
            if k.trim() == key {
                return Some(v.trim());
            }
        }
    }
    None
}

/// The contents of a basic `"..."` TOML string, ignoring a trailing comment.
fn quoted(value: &str) -> Option<&str> {
    let rest = value.strip_prefix('"')?;
    let (inner, _) = rest.split_once('"')?;
    Some(inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_is_read_from_the_package_or_the_workspace() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let crate_dir = root.join("crates").join(PACKAGE);
        fs::create_dir_all(&crate_dir).unwrap();
        fs::write(
            root.join("Cargo.toml"),
            "[workspace]\nmembers = []\n\n[workspace.package]\nversion = \"1.2.3\" # comment\n\
             edition = \"2021\"\n\n[workspace.dependencies]\nfoo = { version = \"9\" }\n",
        )
        .unwrap();
        let manifest = crate_dir.join("Cargo.toml");
        fs::write(&manifest, "[package]\nname = \"runvm-agent\"\nversion.workspace = true\n\n[dependencies]\nversion = \"7\"\n").unwrap();
        assert_eq!(version(root).unwrap(), "1.2.3");
        fs::write(
            &manifest,
            "[package]\nname = \"runvm-agent\"\nversion = \"0.4.0\"\n",
        )
        .unwrap();
        assert_eq!(version(root).unwrap(), "0.4.0");
    }

    #[test]
    fn the_real_workspace_has_an_agent_version() {
        let version = version(&workspace_root().unwrap()).unwrap();
        assert!(version.split('.').count() >= 3, "{version}");
    }

    #[test]
    fn dynamic_binary_is_refused() {
        let exe = std::env::current_exe().unwrap();
        let err = ensure_static(&exe, &fs::read(&exe).unwrap()).unwrap_err();
        assert!(err.to_string().contains("dynamically linked"), "{err}");
        let fixed = super::super::elf::synthetic::elf(&[], false);
        ensure_static(Path::new("static"), &fixed).unwrap();
    }
}
