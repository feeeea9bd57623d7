//! `cargo xtask guest`: the guest image (kernel, initramfs with modules and the agent as
//! `/init`, and a manifest), rebuilt only when one of its inputs changed.

mod agent;
pub(crate) mod cpio;
mod elf;
mod kernel;
mod manifest;
mod modules;

use std::fmt::Display;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use flate2::write::GzEncoder;
use flate2::Compression;

use manifest::{Freshness, Inputs, Manifest, INITRD, MANIFEST, VMLINUZ};

/// Where the image goes unless `--out` says otherwise.
pub const DEFAULT_OUT: &str = "/var/lib/runvm/guest";

/// Folders of the initramfs, with their permissions.
const DIRS: &[(&str, u32)] = &[
    ("dev", 0o755),
    ("etc", 0o755),
    ("lib", 0o755),
    ("lib/modules", 0o755),
    ("mnt", 0o755),
    ("proc", 0o555),
    ("run", 0o755),
    ("sys", 0o555),
    ("tmp", 0o1777),
];

#[derive(Debug, clap::Args)]
pub struct GuestArgs {
    /// Output folder for vmlinuz, initrd.img and manifest.json; downloaded kernel packages are
    /// cached in DIR/cache
    #[arg(long, value_name = "DIR", default_value = DEFAULT_OUT)]
    pub out: PathBuf,
    /// Rebuild the image even if manifest.json shows it is up to date
    #[arg(long)]
    pub force: bool,
}

fn step(message: impl Display) {
    eprintln!("==> {message}");
}

pub fn run(args: &GuestArgs) -> Result<()> {
    let out = &args.out;
    let cache = out.join("cache");
    fs::create_dir_all(&cache).with_context(|| format!("cannot create {}", cache.display()))?;

    step(format!(
        "resolving Debian's cloud kernel ({})",
        kernel::META_PACKAGE
    ));
    let pkg = kernel::resolve()?;

    step(format!(
        "building {} (static, {})",
        agent::PACKAGE,
        agent::TARGET
    ));
    let root = agent::workspace_root()?;
    let agent_path = agent::build(&root)?;
    let agent_bin =
        fs::read(&agent_path).with_context(|| format!("cannot read {}", agent_path.display()))?;
    agent::ensure_static(&agent_path, &agent_bin)?;
    let agent_sha256 = manifest::sha256_hex(&agent_bin);
    let agent_version = agent::version(&root)?;

    let inputs_sha256 = Inputs {
        kernel_package: &pkg.name,
        kernel_package_version: &pkg.version,
        agent_sha256: &agent_sha256,
        module_roots: modules::ROOTS,
    }
    .sha256();
    match manifest::freshness(out, &inputs_sha256)? {
        Freshness::UpToDate(manifest) if !args.force => {
            step(format!("guest image up to date in {}", out.display()));
            return summary(out, &manifest);
        }
        Freshness::UpToDate(_) => step("rebuilding the guest image (--force)"),
        Freshness::Stale(reason) => step(format!("building the guest image: {reason}")),
    }

    step(format!(
        "fetching and unpacking {} {}",
        pkg.name, pkg.version
    ));
    let (deb, cached) = kernel::fetch(&cache, &pkg)?;
    kernel::verify_deb(&deb, &pkg)?;
    let scratch = tempfile::Builder::new()
        .prefix(".unpack-")
        .tempdir_in(&cache)
        .with_context(|| format!("cannot create a scratch folder in {}", cache.display()))?;
    let unpacked = kernel::unpack(&deb, scratch.path())?;
    let origin = if cached { "cached" } else { "downloaded" };
    eprintln!(
        "    {origin} {}, kernel release {}",
        deb.display(),
        unpacked.release
    );

    step(format!("resolving modules of {}", unpacked.release));
    let tree = modules::ModuleTree::scan(&unpacked.modules_dir)?;
    let order = modules::load_order(modules::ROOTS, |name| tree.lookup(name))?;
    if !order.builtin.is_empty() {
        eprintln!("    built into the kernel: {}", order.builtin.join(" "));
    }
    let mut module_files = Vec::new();
    for name in &order.modules {
        let path = tree.path(name)?;
        let data = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        module_files.push((name.clone(), data));
    }

    step("packing the initramfs");
    let initrd = pack_initrd(agent_bin, module_files, &unpacked.release)?;
    let kernel = fs::read(&unpacked.vmlinuz)
        .with_context(|| format!("cannot read {}", unpacked.vmlinuz.display()))?;

    step(format!(
        "writing {VMLINUZ}, {INITRD} and {MANIFEST} to {}",
        out.display()
    ));
    let manifest = Manifest {
        kernel_package: pkg.name,
        kernel_package_version: pkg.version,
        kernel_release: unpacked.release,
        kernel_sha256: manifest::sha256_hex(&kernel),
        agent_version,
        agent_sha256,
        modules: order.modules,
        initrd_sha256: manifest::sha256_hex(&initrd),
        inputs_sha256,
        format_version: manifest::FORMAT_VERSION,
    };
    let mut json = serde_json::to_vec_pretty(&manifest).context("cannot serialize the manifest")?;
    json.push(b'\n');
    manifest::write_atomic(out, VMLINUZ, &kernel)?;
    manifest::write_atomic(out, INITRD, &initrd)?;
    // Last, so that a manifest never describes files that are not there yet.
    manifest::write_atomic(out, MANIFEST, &json)?;
    manifest::sync_dir(out)?;
    summary(out, &manifest)
}

/// The gzip-compressed newc initramfs: the agent as `/init`, the modules in
/// `/lib/modules/<name>.ko` with their load order in `/lib/modules/load-order`, and
/// `/etc/runvm-guest` naming the kernel release.
fn pack_initrd(agent: Vec<u8>, modules: Vec<(String, Vec<u8>)>, release: &str) -> Result<Vec<u8>> {
    let mut archive = cpio::Archive::new();
    for (dir, perm) in DIRS {
        archive.dir(dir, *perm)?;
    }
    archive.char_dev("dev/console", 0o600, 5, 1)?;
    archive.char_dev("dev/null", 0o666, 1, 3)?;
    archive.file("init", 0o755, agent)?;
    let mut load_order = String::new();
    for (name, data) in modules {
        archive.file(&format!("lib/modules/{name}.ko"), 0o644, data)?;
        load_order.push_str(&format!("{name}.ko\n"));
    }
    archive.file("lib/modules/load-order", 0o644, load_order.into_bytes())?;
    let info = format!("kernel_release={release}\n");
    archive.file("etc/runvm-guest", 0o644, info.into_bytes())?;

    let mut gzip = GzEncoder::new(Vec::new(), Compression::best());
    archive
        .write_to(&mut gzip)
        .context("cannot write the initramfs")?;
    gzip.finish().context("cannot compress the initramfs")
}

fn summary(out: &Path, manifest: &Manifest) -> Result<()> {
    let initrd = out.join(INITRD);
    let size = fs::metadata(&initrd)
        .with_context(|| format!("cannot stat {}", initrd.display()))?
        .len();
    println!("guest image in {}", out.display());
    println!(
        "  kernel:  {} ({} {})",
        manifest.kernel_release, manifest.kernel_package, manifest.kernel_package_version
    );
    println!(
        "  agent:   {} {}",
        manifest.agent_version,
        &manifest.agent_sha256[..12]
    );
    println!(
        "  modules: {} ({})",
        manifest.modules.len(),
        manifest.modules.join(" ")
    );
    println!(
        "  initrd:  {size} bytes ({:.1} MiB)",
        size as f64 / (1024.0 * 1024.0)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn initrd_holds_init_modules_load_order_and_device_nodes() {
        let modules = vec![
            ("virtio_ring".to_owned(), b"ring".to_vec()),
            ("virtio".to_owned(), b"virtio".to_vec()),
        ];
        let gz = pack_initrd(b"agent".to_vec(), modules, "6.1.0-56-cloud-amd64").unwrap();
        let mut archive = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut archive)
            .unwrap();
        let entries = cpio::tests::read_back(&archive);
        let find = |name: &str| entries.iter().find(|e| e.name == name).unwrap();
        assert_eq!(find("init").data, b"agent");
        assert_eq!(find("init").mode, 0o100_755);
        assert_eq!(find("lib/modules/virtio.ko").data, b"virtio");
        assert_eq!(
            find("lib/modules/load-order").data,
            b"virtio_ring.ko\nvirtio.ko\n"
        );
        assert_eq!(
            find("etc/runvm-guest").data,
            b"kernel_release=6.1.0-56-cloud-amd64\n"
        );
        assert_eq!(
            (find("dev/null").mode, find("dev/null").rdev),
            (0o020_666, (1, 3))
        );
        assert_eq!(
            (find("dev/console").mode, find("dev/console").rdev),
            (0o020_600, (5, 1))
        );
        for (dir, _) in DIRS {
            assert_eq!(find(dir).mode & 0o170_000, 0o040_000, "{dir}");
        }
        assert_eq!(entries.len(), DIRS.len() + 7);
    }

    #[test]
    fn initrd_is_byte_for_byte_reproducible() {
        let build = || pack_initrd(b"agent".to_vec(), vec![("m".into(), b"x".to_vec())], "r");
        assert_eq!(build().unwrap(), build().unwrap());
    }
}
