//! runvm's own guest kernel: Debian's kernel source package (`linux-source-6.1`), configured
//! as `make tinyconfig` plus the fragment `guest/kernel/runvm.config` (everything built in, no
//! modules) and built once per machine: the result is cached under a key made of the source
//! package version, the fragment and the recipe version.

use std::collections::{BTreeMap, VecDeque};
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use super::manifest::{sha256_hex, write_atomic};
use crate::cmd;

/// The Debian package holding the kernel source tarball.
pub const SOURCE_PACKAGE: &str = "linux-source-6.1";
/// The tarball `SOURCE_PACKAGE` installs.
pub const SOURCE_TARBALL: &str = "/usr/src/linux-source-6.1.tar.xz";
/// The configuration fragment, relative to the workspace root (embedded at compile time).
pub const FRAGMENT_PATH: &str = "guest/kernel/runvm.config";
pub const FRAGMENT: &str = include_str!("../../../guest/kernel/runvm.config");
/// Bumped whenever the build steps change in a way that changes the kernel.
pub const RECIPE_VERSION: u32 = 1;

/// A built kernel, as cached.
#[derive(Debug, Clone)]
pub struct Built {
    /// The bzImage.
    pub vmlinuz: PathBuf,
    /// `make kernelrelease`, e.g. `6.1.192-runvm`.
    pub release: String,
    /// Whether it came from the cache.
    pub cached: bool,
}

/// The installed version of [`SOURCE_PACKAGE`].
pub fn source_version() -> Result<String> {
    let hint = format!("install it: apt-get install {SOURCE_PACKAGE} (or run scripts/setup.sh)");
    let status = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}\n${Version}\n", SOURCE_PACKAGE])
        .output()
        .context("cannot run dpkg-query")?;
    let text = String::from_utf8_lossy(&status.stdout);
    let mut lines = text.lines();
    let installed = lines.next().is_some_and(|s| s.ends_with(" installed"));
    match lines.next().map(str::trim) {
        Some(version) if installed && !version.is_empty() => Ok(version.to_owned()),
        _ => bail!("{SOURCE_PACKAGE} is not installed; {hint}"),
    }
}

/// The cache key of a build: what the kernel is made of.
pub fn cache_key(source_version: &str, fragment: &str) -> String {
    let text = format!(
        "recipe_version={RECIPE_VERSION}\nsource_package={SOURCE_PACKAGE}\n\
         source_version={source_version}\nfragment_sha256={}\n",
        sha256_hex(fragment.as_bytes())
    );
    sha256_hex(text.as_bytes())
}

/// The options a fragment sets: `CONFIG_X=value` and `# CONFIG_X is not set` (as `n`).
pub fn parse_fragment(text: &str) -> BTreeMap<String, String> {
    let mut options = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if let Some(name) = line
            .strip_prefix("# ")
            .and_then(|l| l.strip_suffix(" is not set"))
            .filter(|n| n.starts_with("CONFIG_"))
        {
            options.insert(name.to_owned(), "n".to_owned());
        } else if let Some((name, value)) = line.split_once('=') {
            if name.starts_with("CONFIG_") && !line.starts_with('#') {
                options.insert(name.to_owned(), value.to_owned());
            }
        }
    }
    options
}

/// The fragment's options that the final `.config` does not carry as asked (a dependency
/// missing, or an option that does not exist), as `CONFIG_X: wanted W, got G`.
pub fn unmet(fragment: &str, config: &str) -> Vec<String> {
    let got = parse_fragment(config);
    parse_fragment(fragment)
        .into_iter()
        .filter_map(|(name, want)| {
            let have = got.get(&name).map_or("n", String::as_str);
            (have != want).then(|| format!("{name}: wanted {want}, got {have}"))
        })
        .collect()
}

/// The kernel built from the installed source and the fragment: from `cache` when it holds
/// this build (unless `force`), else built in a scratch tree under `cache` and stored there.
pub fn kernel(cache: &Path, source_version: &str, force: bool) -> Result<Built> {
    let key = cache_key(source_version, FRAGMENT);
    let entry = cache.join(format!("runvm-kernel-{}", &key[..16]));
    let vmlinuz = entry.join("vmlinuz");
    let release_file = entry.join("release");
    if !force && vmlinuz.is_file() {
        if let Ok(release) = fs::read_to_string(&release_file) {
            return Ok(Built {
                vmlinuz,
                release: release.trim().to_owned(),
                cached: true,
            });
        }
    }
    let tree = cache.join("runvm-kernel-build");
    if tree.exists() {
        fs::remove_dir_all(&tree)
            .with_context(|| format!("cannot remove the old build tree {}", tree.display()))?;
    }
    fs::create_dir_all(&tree).with_context(|| format!("cannot create {}", tree.display()))?;
    let started = Instant::now();
    eprintln!("    unpacking {SOURCE_TARBALL}");
    cmd::output(
        Command::new("tar")
            .args(["-xJf", SOURCE_TARBALL, "--strip-components=1", "-C"])
            .arg(&tree),
    )
    .with_context(|| format!("cannot unpack {SOURCE_TARBALL} (is {SOURCE_PACKAGE} installed?)"))?;

    let make = |args: &[&str]| {
        let mut c = Command::new("make");
        c.arg("ARCH=x86_64").args(args).current_dir(&tree);
        c
    };
    eprintln!("    configuring: tinyconfig + {FRAGMENT_PATH} + olddefconfig");
    cmd::output(&mut make(&["tinyconfig"]))?;
    let fragment_file = tree.join("runvm.config");
    fs::write(&fragment_file, FRAGMENT)
        .with_context(|| format!("cannot write {}", fragment_file.display()))?;
    cmd::output(
        Command::new("scripts/kconfig/merge_config.sh")
            .args(["-m", ".config", "runvm.config"])
            .env("ARCH", "x86_64")
            .current_dir(&tree),
    )?;
    cmd::output(&mut make(&["olddefconfig"]))?;
    let config_path = tree.join(".config");
    let config = fs::read_to_string(&config_path)
        .with_context(|| format!("cannot read {}", config_path.display()))?;
    let missing = unmet(FRAGMENT, &config);
    if !missing.is_empty() {
        bail!(
            "the kernel configuration does not carry these options of {FRAGMENT_PATH} (a \
             dependency is missing or the option does not exist in {SOURCE_PACKAGE} \
             {source_version}):\n  {}",
            missing.join("\n  ")
        );
    }

    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    eprintln!("    compiling with make -j{jobs} bzImage");
    make_with_progress(make(&["-j", &jobs.to_string(), "bzImage"]), started)?;
    let release = cmd::stdout(&mut make(&["-s", "kernelrelease"]))?
        .trim()
        .to_owned();
    let image = fs::read(tree.join("arch/x86/boot/bzImage")).context("cannot read the bzImage")?;

    fs::create_dir_all(&entry).with_context(|| format!("cannot create {}", entry.display()))?;
    write_atomic(&entry, "config", config.as_bytes())?;
    write_atomic(&entry, "release", format!("{release}\n").as_bytes())?;
    // Last: the image's presence marks a complete entry.
    write_atomic(&entry, "vmlinuz", &image)?;
    eprintln!("    removing the build tree {}", tree.display());
    fs::remove_dir_all(&tree)
        .with_context(|| format!("cannot remove the build tree {}", tree.display()))?;
    eprintln!(
        "    built kernel {release} in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(Built {
        vmlinuz,
        release,
        cached: false,
    })
}

/// How many compiled objects between two progress lines.
const PROGRESS_EVERY: usize = 100;

/// Runs the kernel's `make`, printing a progress line every [`PROGRESS_EVERY`] objects (its
/// stderr, warnings and errors, passes through); a failure quotes the last lines of its output.
fn make_with_progress(mut make: Command, started: Instant) -> Result<()> {
    let what = cmd::describe(&make);
    let mut child = make
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run `{what}`"))?;
    let stdout = child
        .stdout
        .take()
        .with_context(|| format!("no stdout pipe for `{what}`"))?;
    let mut tail = VecDeque::with_capacity(20);
    let mut objects = 0;
    for line in BufReader::new(stdout).lines() {
        let line = line.with_context(|| format!("cannot read the output of `{what}`"))?;
        if line.trim_start().starts_with("CC ") || line.trim_start().starts_with("AS ") {
            objects += 1;
            if objects % PROGRESS_EVERY == 0 {
                eprintln!(
                    "    {objects} objects compiled ({:.0} s)",
                    started.elapsed().as_secs_f64()
                );
            }
        }
        if tail.len() == 20 {
            tail.pop_front();
        }
        tail.push_back(line);
    }
    let status = child
        .wait()
        .with_context(|| format!("cannot wait for `{what}`"))?;
    if !status.success() {
        let tail: Vec<String> = tail.into();
        bail!(
            "`{what}` failed ({status}); see its errors above; its output ended with:\n{}",
            tail.join("\n")
        );
    }
    eprintln!("    {objects} objects compiled");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fragment_options_are_parsed_with_not_set_as_n() {
        let text = "# a comment\nCONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=\"x y\"\n\
                    CONFIG_D=256\n#CONFIG_E=y\nnot an option\n";
        let options = parse_fragment(text);
        let pairs: Vec<(&str, &str)> = options
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("CONFIG_A", "y"),
                ("CONFIG_B", "n"),
                ("CONFIG_C", "\"x y\""),
                ("CONFIG_D", "256")
            ]
        );
    }

    #[test]
    fn unmet_options_are_the_ones_the_config_does_not_carry() {
        let fragment = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=y\nCONFIG_D=n\n";
        let config = "CONFIG_A=y\n# CONFIG_B is not set\n# CONFIG_C is not set\n";
        assert_eq!(unmet(fragment, config), ["CONFIG_C: wanted y, got n"]);
    }

    #[test]
    fn the_repo_fragment_builds_everything_in() {
        let options = parse_fragment(FRAGMENT);
        assert_eq!(options.get("CONFIG_MODULES").map(String::as_str), Some("n"));
        for name in [
            "CONFIG_VIRTIO_PCI",
            "CONFIG_VIRTIO_FS",
            "CONFIG_VIRTIO_VSOCKETS",
        ] {
            assert_eq!(options.get(name).map(String::as_str), Some("y"), "{name}");
        }
    }

    #[test]
    fn cache_key_changes_with_source_version_and_fragment() {
        let a = cache_key("6.1.192-3", "CONFIG_A=y\n");
        assert_eq!(a, cache_key("6.1.192-3", "CONFIG_A=y\n"));
        assert_ne!(a, cache_key("6.1.193-1", "CONFIG_A=y\n"));
        assert_ne!(a, cache_key("6.1.192-3", "CONFIG_A=n\n"));
    }
}
