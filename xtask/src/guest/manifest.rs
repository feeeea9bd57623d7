//! `manifest.json`: what a guest image was built from, and whether it is still current.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Bumped whenever the image layout or the way it is built changes, to force a rebuild.
pub const FORMAT_VERSION: u32 = 2;

pub const MANIFEST: &str = "manifest.json";
pub const VMLINUZ: &str = "vmlinuz";
pub const INITRD: &str = "initrd.img";

/// Which kernel an image carries (`cargo xtask guest --kernel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum KernelKind {
    /// runvm's own kernel, built from Debian's kernel source with everything built in.
    Runvm,
    /// Debian's cloud kernel package, with the modules the guest needs in the initramfs.
    DebianCloud,
}

impl KernelKind {
    pub fn name(self) -> &'static str {
        match self {
            KernelKind::Runvm => "runvm",
            KernelKind::DebianCloud => "debian-cloud",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Which kernel: `runvm` (built from `kernel_package`, the source) or `debian-cloud`
    /// (`kernel_package` is the image package).
    pub kernel: KernelKind,
    pub kernel_package: String,
    pub kernel_package_version: String,
    pub kernel_release: String,
    /// The SHA-256 of runvm's configuration fragment (`guest/kernel/runvm.config`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_config_sha256: Option<String>,
    pub kernel_sha256: String,
    pub agent_version: String,
    pub agent_sha256: String,
    pub modules: Vec<String>,
    pub initrd_sha256: String,
    pub inputs_sha256: String,
    pub format_version: u32,
}

/// What an image is built from; when these are unchanged, so is the image.
#[derive(Debug, Clone)]
pub struct Inputs<'a> {
    pub kernel: KernelKind,
    /// For runvm's kernel, its build's cache key (source version, fragment, recipe).
    pub kernel_build_key: &'a str,
    pub kernel_package: &'a str,
    pub kernel_package_version: &'a str,
    pub agent_sha256: &'a str,
    pub module_roots: &'a [&'a str],
}

impl Inputs<'_> {
    pub fn sha256(&self) -> String {
        let text = format!(
            "format_version={FORMAT_VERSION}\nkernel={}\nkernel_build_key={}\n\
             kernel_package={}\nkernel_package_version={}\nagent_sha256={}\nmodule_roots={}\n",
            self.kernel.name(),
            self.kernel_build_key,
            self.kernel_package,
            self.kernel_package_version,
            self.agent_sha256,
            self.module_roots.join(","),
        );
        sha256_hex(text.as_bytes())
    }
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// The SHA-256 of a file's contents, read in chunks.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = Sha256::new();
    io::copy(&mut file, &mut hasher).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether the image in a folder can be reused.
#[derive(Debug, PartialEq, Eq)]
pub enum Freshness {
    UpToDate(Box<Manifest>),
    /// It must be (re)built, for this reason.
    Stale(String),
}

/// Checks `dir` for an image built from inputs hashing to `inputs_sha256` whose files still
/// have the recorded hashes.
pub fn freshness(dir: &Path, inputs_sha256: &str) -> Result<Freshness> {
    let path = dir.join(MANIFEST);
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            return Ok(Freshness::Stale(format!("no {MANIFEST} yet")))
        }
        Err(err) => return Err(err).with_context(|| format!("cannot read {}", path.display())),
    };
    let manifest: Manifest = match serde_json::from_str(&text) {
        Ok(manifest) => manifest,
        Err(err) => {
            return Ok(Freshness::Stale(format!(
                "{} is unreadable: {err}",
                path.display()
            )))
        }
    };
    if manifest.format_version != FORMAT_VERSION || manifest.inputs_sha256 != inputs_sha256 {
        return Ok(Freshness::Stale("inputs changed".to_owned()));
    }
    for (name, recorded) in [
        (VMLINUZ, &manifest.kernel_sha256),
        (INITRD, &manifest.initrd_sha256),
    ] {
        let file = dir.join(name);
        if !file.exists() {
            return Ok(Freshness::Stale(format!("{name} is missing")));
        }
        if &sha256_file(&file)? != recorded {
            return Ok(Freshness::Stale(format!(
                "{name} does not match {MANIFEST}"
            )));
        }
    }
    Ok(Freshness::UpToDate(Box::new(manifest)))
}

/// Writes `dir/name` atomically: a temporary file in `dir`, synced, then renamed over it.
pub fn write_atomic(dir: &Path, name: &str, data: &[u8]) -> Result<()> {
    let target = dir.join(name);
    let mut file = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a temporary file in {}", dir.display()))?;
    let shown = target.display().to_string();
    let context = || format!("cannot write {shown}");
    file.write_all(data).with_context(context)?;
    file.as_file()
        .set_permissions(fs::Permissions::from_mode(0o644))
        .with_context(context)?;
    file.as_file().sync_all().with_context(context)?;
    file.persist(&target)
        .with_context(|| format!("cannot rename into {}", target.display()))?;
    Ok(())
}

/// Syncs a folder, making the renames in it durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOTS: &[&str] = &["virtio_pci", "overlay"];

    fn inputs(agent_sha256: &str) -> Inputs<'_> {
        Inputs {
            kernel: KernelKind::DebianCloud,
            kernel_build_key: "",
            kernel_package: "linux-image-6.1.0-56-cloud-amd64",
            kernel_package_version: "6.1.192-2",
            agent_sha256,
            module_roots: ROOTS,
        }
    }

    /// Writes an image as a build would, returning its inputs hash.
    fn write_image(dir: &Path) -> String {
        let inputs_sha256 = inputs("aa").sha256();
        write_atomic(dir, VMLINUZ, b"kernel").unwrap();
        write_atomic(dir, INITRD, b"initrd").unwrap();
        let manifest = Manifest {
            kernel: KernelKind::DebianCloud,
            kernel_package: "linux-image-6.1.0-56-cloud-amd64".into(),
            kernel_package_version: "6.1.192-2".into(),
            kernel_release: "6.1.0-56-cloud-amd64".into(),
            kernel_config_sha256: None,
            kernel_sha256: sha256_hex(b"kernel"),
            agent_version: "0.1.0".into(),
            agent_sha256: "aa".into(),
            modules: vec!["overlay".into()],
            initrd_sha256: sha256_hex(b"initrd"),
            inputs_sha256: inputs_sha256.clone(),
            format_version: FORMAT_VERSION,
        };
        let json = serde_json::to_vec_pretty(&manifest).unwrap();
        write_atomic(dir, MANIFEST, &json).unwrap();
        inputs_sha256
    }

    fn is_fresh(dir: &Path, inputs_sha256: &str) -> bool {
        matches!(
            freshness(dir, inputs_sha256).unwrap(),
            Freshness::UpToDate(_)
        )
    }

    #[test]
    fn unchanged_image_is_up_to_date() {
        let dir = tempfile::tempdir().unwrap();
        let sha = write_image(dir.path());
        let Freshness::UpToDate(manifest) = freshness(dir.path(), &sha).unwrap() else {
            panic!("not up to date");
        };
        assert_eq!(manifest.kernel_release, "6.1.0-56-cloud-amd64");
    }

    #[test]
    fn missing_manifest_means_a_build() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            freshness(dir.path(), "x").unwrap(),
            Freshness::Stale("no manifest.json yet".into())
        );
    }

    #[test]
    fn changed_inputs_mean_a_rebuild() {
        let dir = tempfile::tempdir().unwrap();
        write_image(dir.path());
        assert!(!is_fresh(dir.path(), &inputs("bb").sha256()));
        let mut other_kernel = inputs("aa");
        other_kernel.kernel_package_version = "6.1.193-1";
        assert!(!is_fresh(dir.path(), &other_kernel.sha256()));
        let mut other_kernel = inputs("aa");
        other_kernel.kernel = KernelKind::Runvm;
        assert!(!is_fresh(dir.path(), &other_kernel.sha256()));
        let mut other_build = inputs("aa");
        other_build.kernel_build_key = "k2";
        assert!(!is_fresh(dir.path(), &other_build.sha256()));
        let mut other_roots = inputs("aa");
        other_roots.module_roots = &["virtio_pci"];
        assert!(!is_fresh(dir.path(), &other_roots.sha256()));
    }

    #[test]
    fn modified_or_missing_output_means_a_rebuild() {
        let dir = tempfile::tempdir().unwrap();
        let sha = write_image(dir.path());
        fs::write(dir.path().join(INITRD), b"tampered").unwrap();
        assert!(!is_fresh(dir.path(), &sha));
        write_image(dir.path());
        fs::remove_file(dir.path().join(VMLINUZ)).unwrap();
        assert_eq!(
            freshness(dir.path(), &sha).unwrap(),
            Freshness::Stale("vmlinuz is missing".into())
        );
    }

    #[test]
    fn unreadable_manifest_means_a_rebuild() {
        let dir = tempfile::tempdir().unwrap();
        let sha = write_image(dir.path());
        fs::write(dir.path().join(MANIFEST), b"{not json").unwrap();
        assert!(!is_fresh(dir.path(), &sha));
    }

    #[test]
    fn atomic_write_replaces_the_file_and_leaves_no_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        write_atomic(dir.path(), "f", b"one").unwrap();
        write_atomic(dir.path(), "f", b"two").unwrap();
        assert_eq!(fs::read(dir.path().join("f")).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["f"]);
        let mode = fs::metadata(dir.path().join("f"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o644);
    }

    #[test]
    fn sha256_of_a_known_input() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
