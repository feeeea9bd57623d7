//! Kernel modules for the initramfs: finding them in an unpacked kernel package, reading their
//! dependencies from `.modinfo`, and putting them in load order.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::elf::Elf;

/// The modules the guest needs (virtio PCI transport, vsock, virtiofs, net, the balloon for
/// free page reporting, virtio-mem for memory hot-plug); their dependencies are added. Nothing else: every module costs boot
/// time (loading 16 took about 0.2 s under TCG), and the console is the built-in serial port.
pub const ROOTS: &[&str] = &[
    "virtio_pci",
    "vmw_vsock_virtio_transport",
    "virtiofs",
    "virtio_net",
    "virtio_balloon",
    "virtio_mem",
];

/// Module names treat `-` and `_` alike; this is the `_` spelling.
pub fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// The module name of a file called `file_name`, if it is a kernel module (compressed or not).
fn module_name(file_name: &str) -> Option<String> {
    [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .find_map(|suffix| file_name.strip_suffix(suffix))
        .map(normalize)
}

/// The `depends=` list of a `.modinfo` section (NUL-separated `key=value` strings).
pub fn parse_depends(modinfo: &[u8]) -> Vec<String> {
    modinfo
        .split(|&b| b == 0)
        .filter_map(|entry| entry.strip_prefix(b"depends="))
        .flat_map(|list| list.split(|&b| b == b','))
        .filter(|name| !name.is_empty())
        .map(|name| normalize(&String::from_utf8_lossy(name)))
        .collect()
}

/// What a module name resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// Built into the kernel: nothing to load.
    Builtin,
    /// A loadable module needing these modules first.
    Module(Vec<String>),
}

/// The result of [`load_order`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadOrder {
    /// Modules to load, each after its dependencies.
    pub modules: Vec<String>,
    /// Modules asked for that are built into the kernel.
    pub builtin: Vec<String>,
}

/// Orders `roots` and their dependencies so that each module comes after what it depends on.
/// The order is a depth-first post-order: roots in the given order, dependencies by name, so it
/// does not depend on how `depends=` happens to list them.
pub fn load_order(
    roots: &[&str],
    mut lookup: impl FnMut(&str) -> Result<Lookup>,
) -> Result<LoadOrder> {
    let mut state = Walk::default();
    for root in roots {
        state.visit(&normalize(root), &mut lookup)?;
    }
    Ok(LoadOrder {
        modules: state.order,
        builtin: state.builtin,
    })
}

#[derive(Default)]
struct Walk {
    done: BTreeSet<String>,
    chain: Vec<String>,
    order: Vec<String>,
    builtin: Vec<String>,
}

impl Walk {
    fn visit(&mut self, name: &str, lookup: &mut impl FnMut(&str) -> Result<Lookup>) -> Result<()> {
        if self.done.contains(name) {
            return Ok(());
        }
        if self.chain.iter().any(|n| n == name) {
            bail!(
                "module dependency cycle: {} -> {name}",
                self.chain.join(" -> ")
            );
        }
        let found = lookup(name).with_context(|| match self.chain.is_empty() {
            true => format!("module {name}"),
            false => format!("module {name}, needed by {}", self.chain.join(" -> ")),
        })?;
        match found {
            Lookup::Builtin => self.builtin.push(name.to_owned()),
            Lookup::Module(mut deps) => {
                deps.sort();
                deps.dedup();
                self.chain.push(name.to_owned());
                for dep in &deps {
                    self.visit(dep, lookup)?;
                }
                self.chain.pop();
                self.order.push(name.to_owned());
            }
        }
        self.done.insert(name.to_owned());
        Ok(())
    }
}

/// The modules of one kernel release: `lib/modules/<kver>/` of an unpacked package.
#[derive(Debug)]
pub struct ModuleTree {
    dir: PathBuf,
    files: BTreeMap<String, Vec<PathBuf>>,
    builtin: BTreeSet<String>,
}

impl ModuleTree {
    /// Indexes `release_dir/kernel/**` and reads `release_dir/modules.builtin`.
    pub fn scan(release_dir: &Path) -> Result<Self> {
        let builtin_list = release_dir.join("modules.builtin");
        let builtin = fs::read_to_string(&builtin_list)
            .with_context(|| format!("cannot read {}", builtin_list.display()))?
            .lines()
            .filter_map(|line| line.rsplit('/').next().and_then(module_name))
            .collect();
        let mut files = BTreeMap::new();
        collect(&release_dir.join("kernel"), &mut files)?;
        Ok(Self {
            dir: release_dir.to_owned(),
            files,
            builtin,
        })
    }

    /// The plain `.ko` file of module `name`; an error if it is missing, ambiguous or compressed.
    pub fn path(&self, name: &str) -> Result<&Path> {
        let paths = self.files.get(name).map(Vec::as_slice).unwrap_or_default();
        let path = match paths {
            [] => bail!("not found under {}/kernel", self.dir.display()),
            [path] => path,
            _ => bail!("several files: {paths:?}"),
        };
        if path.extension().is_some_and(|ext| ext != "ko") {
            bail!(
                "{} is compressed; only plain .ko modules are supported (they are loaded with \
                 finit_module, which needs the kernel's module decompression)",
                path.display()
            );
        }
        Ok(path)
    }

    /// Resolves `name` for [`load_order`], reading the module's `.modinfo`.
    pub fn lookup(&self, name: &str) -> Result<Lookup> {
        if self.builtin.contains(name) {
            return Ok(Lookup::Builtin);
        }
        let path = self.path(name)?;
        let data = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let modinfo = Elf::parse(&data)
            .and_then(|elf| elf.section(".modinfo"))
            .with_context(|| format!("cannot parse {}", path.display()))?
            .with_context(|| format!("{} has no .modinfo section", path.display()))?;
        Ok(Lookup::Module(parse_depends(modinfo)))
    }
}

fn collect(dir: &Path, files: &mut BTreeMap<String, Vec<PathBuf>>) -> Result<()> {
    let entries = fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        let path = entry.path();
        let kind = entry
            .file_type()
            .with_context(|| format!("cannot stat {}", path.display()))?;
        if kind.is_dir() {
            collect(&path, files)?;
        } else if let Some(name) = entry.file_name().to_str().and_then(module_name) {
            files.entry(name).or_default().push(path);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::elf::synthetic;
    use super::*;

    fn graph(edges: &[(&str, &[&str])]) -> impl FnMut(&str) -> Result<Lookup> {
        let map: BTreeMap<String, Lookup> = edges
            .iter()
            .map(|(name, deps)| {
                let lookup = match *deps {
                    ["<builtin>"] => Lookup::Builtin,
                    _ => Lookup::Module(deps.iter().map(|d| d.to_string()).collect()),
                };
                (name.to_string(), lookup)
            })
            .collect();
        move |name| map.get(name).cloned().context("not found")
    }

    #[test]
    fn depends_are_read_from_modinfo_strings() {
        let modinfo = b"license=GPL\0depends=virtio_ring,virtio,net-failover\0vermagic=6.1\0";
        assert_eq!(
            parse_depends(modinfo),
            ["virtio_ring", "virtio", "net_failover"]
        );
        assert!(parse_depends(b"license=GPL\0depends=\0intree=Y\0").is_empty());
        assert!(parse_depends(b"license=GPL\0").is_empty());
        // Only a key at the start of an entry counts.
        assert!(parse_depends(b"description=no depends=x here\0").is_empty());
    }

    #[test]
    fn dependencies_come_before_dependents() {
        let order = load_order(
            &["virtio_pci", "virtio_net"],
            graph(&[
                (
                    "virtio_pci",
                    &["virtio_ring", "virtio_pci_modern_dev", "virtio"],
                ),
                ("virtio_pci_modern_dev", &[]),
                ("virtio", &["virtio_ring"]),
                ("virtio_ring", &[]),
                ("virtio_net", &["net_failover", "virtio", "virtio_ring"]),
                ("net_failover", &["failover"]),
                ("failover", &[]),
            ]),
        )
        .unwrap();
        assert_eq!(
            order.modules,
            [
                "virtio_ring",
                "virtio",
                "virtio_pci_modern_dev",
                "virtio_pci",
                "failover",
                "net_failover",
                "virtio_net"
            ]
        );
        assert!(order.builtin.is_empty());
    }

    #[test]
    fn order_does_not_depend_on_how_depends_lists_them() {
        let a = load_order(
            &["m"],
            graph(&[("m", &["b", "a", "c"]), ("a", &[]), ("b", &[]), ("c", &[])]),
        );
        let b = load_order(
            &["m"],
            graph(&[("m", &["c", "a", "b"]), ("a", &[]), ("b", &[]), ("c", &[])]),
        );
        assert_eq!(a.unwrap().modules, ["a", "b", "c", "m"]);
        assert_eq!(b.unwrap().modules, ["a", "b", "c", "m"]);
    }

    #[test]
    fn builtin_modules_are_skipped_and_reported() {
        let order = load_order(
            &["virtio-blk", "overlay"],
            graph(&[
                ("virtio_blk", &["virtio"]),
                ("virtio", &["<builtin>"]),
                ("overlay", &[]),
            ]),
        )
        .unwrap();
        assert_eq!(order.modules, ["virtio_blk", "overlay"]);
        assert_eq!(order.builtin, ["virtio"]);
    }

    #[test]
    fn missing_dependency_is_an_error_naming_who_needs_it() {
        let err =
            load_order(&["virtio_net"], graph(&[("virtio_net", &["net_failover"])])).unwrap_err();
        let text = format!("{err:#}");
        assert!(
            text.contains("module net_failover, needed by virtio_net"),
            "{text}"
        );
    }

    #[test]
    fn dependency_cycle_is_an_error() {
        let err = load_order(&["a"], graph(&[("a", &["b"]), ("b", &["a"])])).unwrap_err();
        assert!(format!("{err:#}").contains("cycle: a -> b -> a"), "{err:#}");
    }

    fn write_module(dir: &Path, relative: &str, depends: &str) {
        let path = dir.join(relative);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        let modinfo = format!("license=GPL\0depends={depends}\0");
        fs::write(
            path,
            synthetic::elf(&[(".modinfo", modinfo.as_bytes())], false),
        )
        .unwrap();
    }

    #[test]
    fn tree_resolves_modules_from_files_and_modules_builtin() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::write(
            root.join("modules.builtin"),
            "kernel/drivers/block/virtio_blk.ko\n",
        )
        .unwrap();
        write_module(root, "kernel/drivers/virtio/virtio.ko", "virtio_ring");
        write_module(root, "kernel/drivers/virtio/virtio_ring.ko", "");
        write_module(root, "kernel/drivers/net/net-failover.ko", "failover");
        write_module(root, "kernel/net/core/failover.ko", "");
        write_module(
            root,
            "kernel/drivers/net/virtio_net.ko",
            "net_failover,virtio",
        );
        let tree = ModuleTree::scan(root).unwrap();
        let order = load_order(&["virtio_net", "virtio_blk"], |n| tree.lookup(n)).unwrap();
        assert_eq!(
            order.modules,
            [
                "failover",
                "net_failover",
                "virtio_ring",
                "virtio",
                "virtio_net"
            ]
        );
        assert_eq!(order.builtin, ["virtio_blk"]);
        assert!(tree
            .path("net_failover")
            .unwrap()
            .ends_with("net-failover.ko"));
    }

    #[test]
    fn compressed_module_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::write(root.join("modules.builtin"), "").unwrap();
        write_module(root, "kernel/fs/overlayfs/overlay.ko.zst", "");
        let tree = ModuleTree::scan(root).unwrap();
        let err = load_order(&["overlay"], |n| tree.lookup(n)).unwrap_err();
        assert!(
            format!("{err:#}").contains("overlay.ko.zst is compressed"),
            "{err:#}"
        );
    }
}
