//! Debian's cloud kernel: which package it is (apt-cache), fetching it (apt-get download) and
//! unpacking it (dpkg-deb).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::cmd;

/// The meta package that depends on the current cloud kernel image.
pub const META_PACKAGE: &str = "linux-image-cloud-amd64";

/// A kernel image package at an exact version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelPackage {
    pub name: String,
    pub version: String,
}

/// The kernel image package named by `apt-cache depends` output for the meta package.
pub fn parse_depends(text: &str) -> Option<String> {
    text.lines()
        .map(|line| line.trim_start().trim_start_matches('|'))
        .filter_map(|line| line.strip_prefix("Depends:"))
        .map(str::trim)
        .find(|name| name.starts_with("linux-image-") && *name != META_PACKAGE)
        .map(str::to_owned)
}

/// The candidate version in `apt-cache policy` output.
pub fn parse_candidate(text: &str) -> Option<String> {
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("Candidate:"))
        .map(str::trim)
        .find(|version| !version.is_empty() && *version != "(none)")
        .map(str::to_owned)
}

/// Asks apt which kernel image the cloud meta package depends on, and its candidate version.
pub fn resolve() -> Result<KernelPackage> {
    let hint = "are the apt package lists empty? Run `apt-get update` first";
    let depends = cmd::stdout(Command::new("apt-cache").args(["depends", META_PACKAGE]))
        .with_context(|| format!("cannot resolve {META_PACKAGE} ({hint})"))?;
    let name = parse_depends(&depends).with_context(|| {
        format!("`apt-cache depends {META_PACKAGE}` names no linux-image package ({hint})")
    })?;
    let policy = cmd::stdout(Command::new("apt-cache").args(["policy", &name]))?;
    let version = parse_candidate(&policy)
        .with_context(|| format!("apt has no candidate version of {name} ({hint})"))?;
    Ok(KernelPackage { name, version })
}

/// The file name prefix `apt-get download` gives `pkg` (an epoch's `:` is written `%3a`).
fn deb_prefix(pkg: &KernelPackage) -> String {
    format!("{}_{}_", pkg.name, pkg.version.replace(':', "%3a"))
}

/// The cached `.deb` of `pkg` in `cache`, if one is there.
fn cached_deb(cache: &Path, pkg: &KernelPackage) -> Result<Option<PathBuf>> {
    let prefix = deb_prefix(pkg);
    let mut found = Vec::new();
    for entry in fs::read_dir(cache).with_context(|| format!("cannot list {}", cache.display()))? {
        let entry = entry.with_context(|| format!("cannot list {}", cache.display()))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(&prefix) && name.ends_with(".deb") {
            found.push(entry.path());
        }
    }
    found.sort();
    Ok(found.into_iter().next())
}

/// The `.deb` of `pkg` in `cache`, downloaded with `apt-get download` unless already there.
/// Returns the path and whether it came from the cache.
pub fn fetch(cache: &Path, pkg: &KernelPackage) -> Result<(PathBuf, bool)> {
    if let Some(deb) = cached_deb(cache, pkg)? {
        return Ok((deb, true));
    }
    // Download into a scratch folder first so an interrupted download is never taken for a
    // cached package.
    let scratch = tempfile::Builder::new()
        .prefix(".download-")
        .tempdir_in(cache)
        .with_context(|| format!("cannot create a scratch folder in {}", cache.display()))?;
    cmd::output(
        Command::new("apt-get")
            .args(["download", &format!("{}={}", pkg.name, pkg.version)])
            .current_dir(scratch.path()),
    )?;
    let deb = cached_deb(scratch.path(), pkg)?.with_context(|| {
        format!(
            "`apt-get download` left no {}*.deb in {}",
            deb_prefix(pkg),
            scratch.path().display()
        )
    })?;
    let file_name = deb.file_name().context("downloaded file has no name")?;
    let target = cache.join(file_name);
    fs::rename(&deb, &target)
        .with_context(|| format!("cannot move {} to {}", deb.display(), target.display()))?;
    Ok((target, false))
}

/// Checks that `deb` is `pkg` (its control file's Package and Version).
pub fn verify_deb(deb: &Path, pkg: &KernelPackage) -> Result<()> {
    let control = cmd::stdout(
        Command::new("dpkg-deb")
            .arg("-f")
            .arg(deb)
            .args(["Package", "Version"]),
    )?;
    let field = |key: &str| {
        control
            .lines()
            .find_map(|line| line.strip_prefix(key)?.strip_prefix(':'))
            .map(str::trim)
            .unwrap_or_default()
    };
    let found = KernelPackage {
        name: field("Package").to_owned(),
        version: field("Version").to_owned(),
    };
    if &found != pkg {
        bail!(
            "{} holds {} {}, not {} {}; delete it and run again",
            deb.display(),
            found.name,
            found.version,
            pkg.name,
            pkg.version
        );
    }
    Ok(())
}

/// An unpacked kernel image package.
#[derive(Debug)]
pub struct Unpacked {
    /// The kernel release, e.g. `6.1.0-56-cloud-amd64`.
    pub release: String,
    /// `boot/vmlinuz-<release>`.
    pub vmlinuz: PathBuf,
    /// `lib/modules/<release>`.
    pub modules_dir: PathBuf,
}

/// Unpacks `deb` into `dest` with `dpkg-deb -x` and finds the kernel release in it.
pub fn unpack(deb: &Path, dest: &Path) -> Result<Unpacked> {
    cmd::output(Command::new("dpkg-deb").arg("-x").arg(deb).arg(dest))?;
    let modules_root = dest.join("lib/modules");
    let mut releases = Vec::new();
    for entry in fs::read_dir(&modules_root)
        .with_context(|| format!("{} has no lib/modules folder", deb.display()))?
    {
        let entry = entry.with_context(|| format!("cannot list {}", modules_root.display()))?;
        releases.push(entry.file_name().to_string_lossy().into_owned());
    }
    let release = match releases.as_slice() {
        [release] => release.clone(),
        _ => bail!(
            "expected one kernel release in {} of {}, found {releases:?}",
            "lib/modules",
            deb.display()
        ),
    };
    let vmlinuz = dest.join("boot").join(format!("vmlinuz-{release}"));
    if !vmlinuz.is_file() {
        bail!("{} has no boot/vmlinuz-{release}", deb.display());
    }
    Ok(Unpacked {
        modules_dir: modules_root.join(&release),
        release,
        vmlinuz,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEPENDS: &str = "\
linux-image-cloud-amd64
  Depends: linux-image-6.1.0-56-cloud-amd64
";

    #[test]
    fn depends_names_the_versioned_image_package() {
        assert_eq!(
            parse_depends(DEPENDS).as_deref(),
            Some("linux-image-6.1.0-56-cloud-amd64")
        );
    }

    #[test]
    fn depends_skips_other_packages_and_handles_alternatives() {
        let text = "linux-image-cloud-amd64\n  PreDepends: dpkg\n  Depends: initramfs-tools\n \
                    |Depends: linux-image-6.1.0-57-cloud-amd64\n  Depends: <linux-image-x>\n";
        assert_eq!(
            parse_depends(text).as_deref(),
            Some("linux-image-6.1.0-57-cloud-amd64")
        );
    }

    #[test]
    fn depends_of_empty_output_is_none() {
        assert_eq!(parse_depends(""), None);
        assert_eq!(parse_depends("linux-image-cloud-amd64\n"), None);
    }

    #[test]
    fn candidate_version_is_read_from_policy() {
        let policy =
            "linux-image-6.1.0-56-cloud-amd64:\n  Installed: (none)\n  Candidate: 6.1.192-2\n  \
                      Version table:\n     6.1.192-2 500\n";
        assert_eq!(parse_candidate(policy).as_deref(), Some("6.1.192-2"));
        assert_eq!(
            parse_candidate("x:\n  Installed: (none)\n  Candidate: (none)\n"),
            None
        );
        assert_eq!(parse_candidate(""), None);
    }

    #[test]
    fn cached_deb_matches_name_and_version_with_escaped_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let pkg = KernelPackage {
            name: "linux-image-x".into(),
            version: "1:6.1-2".into(),
        };
        fs::write(dir.path().join("linux-image-x_6.1-2_amd64.deb"), "").unwrap();
        assert_eq!(cached_deb(dir.path(), &pkg).unwrap(), None);
        fs::write(dir.path().join("linux-image-x_1%3a6.1-2_amd64.deb"), "").unwrap();
        let found = cached_deb(dir.path(), &pkg).unwrap().unwrap();
        assert!(found.ends_with("linux-image-x_1%3a6.1-2_amd64.deb"));
    }
}
