//! `cargo xtask guest`: the guest image (kernel, initramfs with the agent as `/init`, and a
//! manifest), rebuilt only when one of its inputs changed.
//!
//! The kernel is runvm's own by default (built from Debian's kernel source with everything
//! built in, see [`build`]), so the initramfs holds only the agent; `--kernel debian-cloud`
//! takes Debian's cloud kernel package instead and adds the modules the guest needs.

mod agent;
mod build;
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

use manifest::{Freshness, Inputs, KernelKind, Manifest, INITRD, MANIFEST, VMLINUZ};

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
    /// Output folder for vmlinuz, initrd.img and manifest.json
    #[arg(long, value_name = "DIR", default_value = DEFAULT_OUT)]
    pub out: PathBuf,
    /// The kernel: runvm's own (built once per machine from linux-source-6.1 and
    /// guest/kernel/runvm.config, everything built in) or Debian's cloud kernel package (with
    /// its modules in the initramfs)
    #[arg(long, value_enum, default_value = "runvm")]
    pub kernel: KernelKind,
    /// Where built kernels and downloaded kernel packages are kept [default: DIR/cache]
    #[arg(long, value_name = "CACHE")]
    pub cache: Option<PathBuf>,
    /// Rebuild the image even if manifest.json shows it is up to date, and runvm's kernel even
    /// if the cache holds it
    #[arg(long)]
    pub force: bool,
}

fn step(message: impl Display) {
    eprintln!("==> {message}");
}

/// The kernel part of an image: which kernel, what it is built from, and the modules to load.
struct GuestKernel {
    image: Vec<u8>,
    release: String,
    modules: Vec<(String, Vec<u8>)>,
}

/// What the kernel is made of, known before anything is built or fetched.
enum KernelSource {
    Runvm { source_version: String, key: String },
    DebianCloud(kernel::KernelPackage),
}

impl KernelSource {
    fn resolve(kind: KernelKind) -> Result<KernelSource> {
        Ok(match kind {
            KernelKind::Runvm => {
                let source_version = build::source_version()?;
                let key = build::cache_key(&source_version, build::FRAGMENT);
                KernelSource::Runvm {
                    source_version,
                    key,
                }
            }
            KernelKind::DebianCloud => KernelSource::DebianCloud(kernel::resolve()?),
        })
    }

    fn kind(&self) -> KernelKind {
        match self {
            KernelSource::Runvm { .. } => KernelKind::Runvm,
            KernelSource::DebianCloud(_) => KernelKind::DebianCloud,
        }
    }

    /// (package, version): the source package for runvm's kernel, the image package else.
    fn package(&self) -> (&str, &str) {
        match self {
            KernelSource::Runvm { source_version, .. } => (build::SOURCE_PACKAGE, source_version),
            KernelSource::DebianCloud(pkg) => (&pkg.name, &pkg.version),
        }
    }

    fn describe(&self) -> String {
        let (name, version) = self.package();
        match self {
            KernelSource::Runvm { .. } => {
                format!(
                    "runvm's kernel ({name} {version} + {})",
                    build::FRAGMENT_PATH
                )
            }
            KernelSource::DebianCloud(_) => format!("Debian's cloud kernel ({name} {version})"),
        }
    }

    /// Builds (or takes from `cache`) runvm's kernel, or fetches Debian's and its modules.
    fn produce(&self, cache: &Path, force: bool) -> Result<GuestKernel> {
        match self {
            KernelSource::Runvm { source_version, .. } => {
                let built = build::kernel(cache, source_version, force)?;
                if built.cached {
                    eprintln!(
                        "    cached {}, kernel release {}",
                        built.vmlinuz.display(),
                        built.release
                    );
                }
                let image = fs::read(&built.vmlinuz)
                    .with_context(|| format!("cannot read {}", built.vmlinuz.display()))?;
                Ok(GuestKernel {
                    image,
                    release: built.release,
                    modules: Vec::new(),
                })
            }
            KernelSource::DebianCloud(pkg) => debian_cloud_kernel(cache, pkg),
        }
    }
}

/// Debian's cloud kernel package: fetched (or cached), unpacked, its needed modules resolved.
fn debian_cloud_kernel(cache: &Path, pkg: &kernel::KernelPackage) -> Result<GuestKernel> {
    step(format!(
        "fetching and unpacking {} {}",
        pkg.name, pkg.version
    ));
    let (deb, cached) = kernel::fetch(cache, pkg)?;
    kernel::verify_deb(&deb, pkg)?;
    let scratch = tempfile::Builder::new()
        .prefix(".unpack-")
        .tempdir_in(cache)
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
    let image = fs::read(&unpacked.vmlinuz)
        .with_context(|| format!("cannot read {}", unpacked.vmlinuz.display()))?;
    Ok(GuestKernel {
        image,
        release: unpacked.release,
        modules: module_files,
    })
}

pub fn run(args: &GuestArgs) -> Result<()> {
    let out = &args.out;
    let cache = args.cache.clone().unwrap_or_else(|| out.join("cache"));
    for dir in [out, &cache] {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }

    step(format!("resolving the kernel ({})", args.kernel.name()));
    let source = KernelSource::resolve(args.kernel)?;
    eprintln!("    {}", source.describe());

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

    let (package, package_version) = source.package();
    let (build_key, module_roots): (&str, &[&str]) = match &source {
        KernelSource::Runvm { key, .. } => (key, &[]),
        KernelSource::DebianCloud(_) => ("", modules::ROOTS),
    };
    let inputs_sha256 = Inputs {
        kernel: source.kind(),
        kernel_build_key: build_key,
        kernel_package: package,
        kernel_package_version: package_version,
        agent_sha256: &agent_sha256,
        module_roots,
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

    if source.kind() == KernelKind::Runvm {
        step(format!(
            "building runvm's kernel (cached in {})",
            cache.display()
        ));
    }
    let kernel = source.produce(&cache, args.force)?;
    let module_names: Vec<String> = kernel.modules.iter().map(|(n, _)| n.clone()).collect();

    step("packing the initramfs");
    let initrd = pack_initrd(agent_bin, kernel.modules, source.kind(), &kernel.release)?;

    step(format!(
        "writing {VMLINUZ}, {INITRD} and {MANIFEST} to {}",
        out.display()
    ));
    let manifest = Manifest {
        kernel: source.kind(),
        kernel_package: package.to_owned(),
        kernel_package_version: package_version.to_owned(),
        kernel_release: kernel.release,
        kernel_config_sha256: (source.kind() == KernelKind::Runvm)
            .then(|| manifest::sha256_hex(build::FRAGMENT.as_bytes())),
        kernel_sha256: manifest::sha256_hex(&kernel.image),
        agent_version,
        agent_sha256,
        modules: module_names,
        initrd_sha256: manifest::sha256_hex(&initrd),
        inputs_sha256,
        format_version: manifest::FORMAT_VERSION,
    };
    let mut json = serde_json::to_vec_pretty(&manifest).context("cannot serialize the manifest")?;
    json.push(b'\n');
    manifest::write_atomic(out, VMLINUZ, &kernel.image)?;
    manifest::write_atomic(out, INITRD, &initrd)?;
    // Last, so that a manifest never describes files that are not there yet.
    manifest::write_atomic(out, MANIFEST, &json)?;
    manifest::sync_dir(out)?;
    summary(out, &manifest)
}

/// The gzip-compressed newc initramfs: the agent as `/init`, `/etc/runvm-guest` naming the
/// kernel and its release, and for a kernel with modules (Debian's) the modules in
/// `/lib/modules/<name>.ko` with their load order in `/lib/modules/load-order`. runvm's
/// kernel has everything built in: no modules, no load order.
fn pack_initrd(
    agent: Vec<u8>,
    modules: Vec<(String, Vec<u8>)>,
    kernel: KernelKind,
    release: &str,
) -> Result<Vec<u8>> {
    let mut archive = cpio::Archive::new();
    for (dir, perm) in DIRS {
        archive.dir(dir, *perm)?;
    }
    archive.char_dev("dev/console", 0o600, 5, 1)?;
    archive.char_dev("dev/null", 0o666, 1, 3)?;
    archive.file("init", 0o755, agent)?;
    if kernel == KernelKind::DebianCloud {
        let mut load_order = String::new();
        for (name, data) in modules {
            archive.file(&format!("lib/modules/{name}.ko"), 0o644, data)?;
            load_order.push_str(&format!("{name}.ko\n"));
        }
        archive.file("lib/modules/load-order", 0o644, load_order.into_bytes())?;
    }
    let info = format!("kernel={}\nkernel_release={release}\n", kernel.name());
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
    let kernel = match manifest.kernel {
        KernelKind::Runvm => format!(
            "runvm's, from {} {}, {} {}",
            manifest.kernel_package,
            manifest.kernel_package_version,
            build::FRAGMENT_PATH,
            manifest
                .kernel_config_sha256
                .as_deref()
                .map_or("?", |s| &s[..12.min(s.len())])
        ),
        KernelKind::DebianCloud => format!(
            "Debian's cloud kernel, {} {}",
            manifest.kernel_package, manifest.kernel_package_version
        ),
    };
    println!("  kernel:  {} ({kernel})", manifest.kernel_release);
    println!(
        "  agent:   {} {}",
        manifest.agent_version,
        &manifest.agent_sha256[..12]
    );
    if manifest.modules.is_empty() {
        println!("  modules: none (built into the kernel)");
    } else {
        println!(
            "  modules: {} ({})",
            manifest.modules.len(),
            manifest.modules.join(" ")
        );
    }
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
        let gz = pack_initrd(
            b"agent".to_vec(),
            modules,
            KernelKind::DebianCloud,
            "6.1.0-56-cloud-amd64",
        )
        .unwrap();
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
            b"kernel=debian-cloud\nkernel_release=6.1.0-56-cloud-amd64\n"
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
    fn initrd_for_runvm_kernel_holds_only_the_agent_and_no_modules() {
        let gz = pack_initrd(
            b"agent".to_vec(),
            Vec::new(),
            KernelKind::Runvm,
            "6.1.192-runvm",
        )
        .unwrap();
        let mut archive = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut archive)
            .unwrap();
        let entries = cpio::tests::read_back(&archive);
        let files: Vec<&str> = entries
            .iter()
            .filter(|e| e.mode & 0o170_000 == 0o100_000)
            .map(|e| e.name.as_str())
            .collect();
        assert_eq!(files, ["etc/runvm-guest", "init"]);
        let info = entries
            .iter()
            .find(|e| e.name == "etc/runvm-guest")
            .unwrap();
        assert_eq!(info.data, b"kernel=runvm\nkernel_release=6.1.192-runvm\n");
    }

    #[test]
    fn initrd_is_byte_for_byte_reproducible() {
        let build = || {
            pack_initrd(
                b"agent".to_vec(),
                vec![("m".into(), b"x".to_vec())],
                KernelKind::DebianCloud,
                "r",
            )
        };
        assert_eq!(build().unwrap(), build().unwrap());
    }
}
