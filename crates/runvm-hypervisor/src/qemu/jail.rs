//! The jail of a confined VM process (QEMU, vhost-device-vsock): like Firecracker's jailer, but
//! entered between fork and exec of the child itself. The child gets its own mount namespace
//! whose root is an empty read-only tmpfs holding only what the program needs (the host's `/usr`
//! read-only for its libraries and firmware, a few device nodes, and the listed files and
//! folders at their host paths, so that the command line is unchanged); then it drops every
//! capability (bounding set included), takes an unprivileged user's uid and gid and sets
//! `no_new_privs`. The host opens what needs privilege (taps, `/dev/vhost-*`) before and passes
//! descriptors.
//!
//! Everything is computed before the fork ([`Jail::prepare`]); the child ([`PreparedJail::enter`])
//! only makes system calls on prepared C strings: it allocates nothing, as it must after
//! fork(2) in a multi-threaded process.

use std::ffi::{CStr, CString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::path::{Component, Path, PathBuf};

use crate::{HypervisorError, Result};

/// The unprivileged user confined VM processes run as (`hypervisor.user`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmmUser {
    /// Its name, for messages.
    pub name: String,
    /// Its uid (never 0).
    pub uid: u32,
    /// Its primary gid (never 0).
    pub gid: u32,
    /// Its subordinate uids (`/etc/subuid`: first, count), if it has some: each VM then runs
    /// as one of them (see [`for_vm`](Self::for_vm)).
    pub subuids: Option<(u32, u32)>,
}

/// Where subordinate uids are listed.
pub const SUBUID_FILE: &str = "/etc/subuid";

impl VmmUser {
    /// The user the processes of the VM whose run folder is `run_dir` run as: with
    /// subordinate uids, one of them chosen by a hash of the folder, so that VMs do not share
    /// a uid (a compromised QEMU can then neither signal nor trace another VM's: both need the
    /// same uid, or a capability); the group stays the user's (it owns the run folders). Two
    /// VMs get the same uid only by a hash collision (about one pair in 6,500 among ten VMs
    /// with 65,536 uids). Without subordinate uids, the user's own uid.
    pub fn for_vm(&self, run_dir: &Path) -> VmmUser {
        let uid = match self.subuids {
            Some((first, count)) if count > 0 => {
                // FNV-1a: stable across processes and releases (the uid is not recorded).
                let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
                for b in run_dir.as_os_str().as_bytes() {
                    hash ^= u64::from(*b);
                    hash = hash.wrapping_mul(0x0100_0000_01b3);
                }
                let offset = u32::try_from(hash % u64::from(count)).unwrap_or(0);
                first.saturating_add(offset)
            }
            _ => self.uid,
        };
        VmmUser {
            uid,
            ..self.clone()
        }
    }

    /// The subordinate uids of user `name` (uid `uid`) in the `subuid(5)` text `text`: the
    /// first usable range (never 0, not past `u32::MAX`).
    pub fn parse_subuids(text: &str, name: &str, uid: u32) -> Option<(u32, u32)> {
        let uid_text = uid.to_string();
        text.lines().find_map(|line| {
            let mut fields = line.trim().split(':');
            let owner = fields.next()?;
            if owner != name && owner != uid_text {
                return None;
            }
            let first: u32 = fields.next()?.trim().parse().ok()?;
            let count: u32 = fields.next()?.trim().parse().ok()?;
            (first > 0 && count > 0 && first.checked_add(count - 1).is_some())
                .then_some((first, count))
        })
    }

    /// Looks user `name` up in the host's user database. Errors name the user and the fix.
    pub fn lookup(name: &str) -> Result<VmmUser> {
        let missing = |why: String| HypervisorError::Confinement {
            what: format!("hypervisor.user {name:?}"),
            reason: why,
            hint: "create it with `useradd --system --no-create-home --shell /usr/sbin/nologin \
                   runvm-vmm` and give it subordinate uids in /etc/subuid (as `make setup` does), \
                   name an existing unprivileged user, or set \
                   hypervisor.confine = false on a host that cannot confine (runvm check warns)"
                .into(),
        };
        let user = nix::unistd::User::from_name(name)
            .map_err(|e| missing(format!("cannot read the user database: {e}")))?
            .ok_or_else(|| missing("no such user on this host".into()))?;
        if user.uid.is_root() || user.gid.as_raw() == 0 {
            return Err(missing(format!(
                "it has uid {} and gid {}: a confined VM must not run as root",
                user.uid, user.gid
            )));
        }
        let uid = user.uid.as_raw();
        let subuids = std::fs::read_to_string(SUBUID_FILE)
            .ok()
            .and_then(|text| Self::parse_subuids(&text, name, uid));
        Ok(VmmUser {
            name: name.to_owned(),
            uid,
            gid: user.gid.as_raw(),
            subuids,
        })
    }
}

/// What a jail holds, by host path (each appears at the same path inside).
#[derive(Debug, Clone)]
enum Entry {
    /// A file or folder bind-mounted, read-only unless `writable`.
    Bind { path: PathBuf, writable: bool },
    /// A character device node made in the jail, owned by the jail's user (a copy of the
    /// host's node: same major and minor).
    Device(PathBuf),
}

/// A jail being described; [`prepare`](Jail::prepare) checks it and readies it for the child.
#[derive(Debug, Clone)]
pub struct Jail {
    root: PathBuf,
    user: VmmUser,
    entries: Vec<Entry>,
}

/// One step the child takes, on prepared paths.
#[derive(Debug)]
enum Op {
    Mkdir(CString),
    Touch(CString),
    Symlink {
        target: CString,
        link: CString,
    },
    Bind {
        source: CString,
        target: CString,
    },
    Remount {
        target: CString,
        flags: libc::c_ulong,
    },
    Mknod {
        path: CString,
        dev: libc::dev_t,
    },
}

/// A jail ready to be entered in a child (see [`enter`](PreparedJail::enter)).
#[derive(Debug)]
pub struct PreparedJail {
    root: CString,
    ops: Vec<Op>,
    uid: libc::uid_t,
    gid: libc::gid_t,
}

/// The host's system folders a dynamically linked program needs: `/usr` (libraries, QEMU's
/// firmware) and the merged-`/usr` links or folders beside it.
const SYSTEM_DIRS: &[&str] = &["/bin", "/sbin", "/lib", "/lib64"];

impl Jail {
    /// A jail whose root is mounted (in the child's namespace only) over the empty folder
    /// `root`, for processes of `user`. It holds `/usr`, the dynamic linker's cache and
    /// `/dev/null`, `/dev/zero`, `/dev/urandom` and `/dev/random` from the start.
    pub fn new(root: impl Into<PathBuf>, user: VmmUser) -> Jail {
        let mut jail = Jail {
            root: root.into(),
            user,
            entries: Vec::new(),
        };
        jail = jail.read_only("/usr");
        for dev in ["/dev/null", "/dev/zero", "/dev/urandom", "/dev/random"] {
            jail = jail.device(dev);
        }
        jail
    }

    /// Adds `path` (file or folder) read-only.
    pub fn read_only(mut self, path: impl Into<PathBuf>) -> Jail {
        self.entries.push(Entry::Bind {
            path: path.into(),
            writable: false,
        });
        self
    }

    /// Adds `path` (file or folder) writable.
    pub fn writable(mut self, path: impl Into<PathBuf>) -> Jail {
        self.entries.push(Entry::Bind {
            path: path.into(),
            writable: true,
        });
        self
    }

    /// Adds the character device `path` (e.g. `/dev/kvm`), usable by the jail's user.
    pub fn device(mut self, path: impl Into<PathBuf>) -> Jail {
        self.entries.push(Entry::Device(path.into()));
        self
    }

    /// Checks every entry on the host and computes the child's steps. Errors name the path.
    pub fn prepare(&self) -> Result<PreparedJail> {
        let fail = |path: &Path, reason: String| HypervisorError::Confinement {
            what: format!("the jail's {}", path.display()),
            reason,
            hint: String::new(),
        };
        let meta = std::fs::symlink_metadata(&self.root)
            .map_err(|e| fail(&self.root, format!("cannot use it as the jail's root: {e}")))?;
        if !meta.is_dir() {
            return Err(fail(&self.root, "not a folder".into()));
        }
        let mut ops = Vec::new();
        let mut made: Vec<PathBuf> = Vec::new();
        // Merged /usr links (or, on an older layout, the folders themselves).
        for dir in SYSTEM_DIRS {
            match std::fs::symlink_metadata(dir) {
                Ok(m) if m.file_type().is_symlink() => {
                    let target =
                        std::fs::read_link(dir).map_err(|e| fail(Path::new(dir), e.to_string()))?;
                    ops.push(Op::Symlink {
                        target: cstring(&target)?,
                        link: cstring(&self.inside(Path::new(dir)))?,
                    });
                    made.push(PathBuf::from(dir));
                }
                Ok(m) if m.is_dir() => self.add_bind(&mut ops, &mut made, Path::new(dir), false)?,
                _ => {}
            }
        }
        if Path::new("/etc/ld.so.cache").is_file() {
            self.add_bind(&mut ops, &mut made, Path::new("/etc/ld.so.cache"), false)?;
        }
        for entry in &self.entries {
            match entry {
                Entry::Bind { path, writable } => {
                    self.add_bind(&mut ops, &mut made, path, *writable)?
                }
                Entry::Device(path) => {
                    use std::os::unix::fs::MetadataExt;
                    let m = std::fs::metadata(path).map_err(|e| fail(path, e.to_string()))?;
                    if !m.file_type().is_char_device() {
                        return Err(fail(path, "not a character device".into()));
                    }
                    self.add_parents(&mut ops, &mut made, path)?;
                    ops.push(Op::Mknod {
                        path: cstring(&self.inside(path))?,
                        dev: m.rdev(),
                    });
                }
            }
        }
        Ok(PreparedJail {
            root: cstring(&self.root)?,
            ops,
            uid: self.user.uid,
            gid: self.user.gid,
        })
    }

    /// `path` inside the jail's root (on the host's view before pivoting).
    fn inside(&self, path: &Path) -> PathBuf {
        let relative: PathBuf = path
            .components()
            .filter(|c| matches!(c, Component::Normal(_)))
            .collect();
        self.root.join(relative)
    }

    fn add_parents(&self, ops: &mut Vec<Op>, made: &mut Vec<PathBuf>, path: &Path) -> Result<()> {
        let mut so_far = PathBuf::from("/");
        let parents: Vec<Component<'_>> = path.parent().map_or_else(Vec::new, |p| {
            p.components()
                .filter(|c| matches!(c, Component::Normal(_)))
                .collect()
        });
        for c in parents {
            so_far.push(c);
            if !made.contains(&so_far) {
                ops.push(Op::Mkdir(cstring(&self.inside(&so_far))?));
                made.push(so_far.clone());
            }
        }
        Ok(())
    }

    fn add_bind(
        &self,
        ops: &mut Vec<Op>,
        made: &mut Vec<PathBuf>,
        path: &Path,
        writable: bool,
    ) -> Result<()> {
        if !path.is_absolute() || path.components().any(|c| c == Component::ParentDir) {
            return Err(HypervisorError::Confinement {
                what: format!("the jail's {}", path.display()),
                reason: "not an absolute path without `..`".into(),
                hint: String::new(),
            });
        }
        let meta = std::fs::metadata(path).map_err(|e| HypervisorError::Confinement {
            what: format!("the jail's {}", path.display()),
            reason: e.to_string(),
            hint: String::new(),
        })?;
        self.add_parents(ops, made, path)?;
        let target = cstring(&self.inside(path))?;
        if meta.is_dir() {
            if !made.iter().any(|m| m == path) {
                ops.push(Op::Mkdir(target.clone()));
                made.push(path.to_path_buf());
            }
        } else {
            ops.push(Op::Touch(target.clone()));
        }
        ops.push(Op::Bind {
            source: cstring(path)?,
            target: target.clone(),
        });
        let mut flags = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_NOSUID | libc::MS_NODEV;
        if !writable {
            flags |= libc::MS_RDONLY;
        }
        ops.push(Op::Remount { target, flags });
        Ok(())
    }
}

fn cstring(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| HypervisorError::Confinement {
        what: format!("the jail's {}", path.display()),
        reason: "the path holds a NUL byte".into(),
        hint: String::new(),
    })
}

/// Writes `parts` to standard error (the process's log) with write(2): async-signal-safe.
fn say(parts: &[&[u8]]) {
    for part in parts {
        // SAFETY: write(2) of a valid buffer to fd 2; the result is ignored (best effort).
        unsafe {
            libc::write(2, part.as_ptr().cast(), part.len());
        }
    }
}

/// Formats `n` into `buf` without allocating; returns the digits.
fn digits(mut n: i32, buf: &mut [u8; 12]) -> &[u8] {
    let mut i = buf.len();
    if n <= 0 {
        n = n.saturating_neg().max(0);
    }
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 || i == 0 {
            break;
        }
    }
    &buf[i..]
}

/// The result of a system call: on failure, says which step on which path failed (into the
/// process's log) and returns the error.
fn check(rc: libc::c_int, step: &str, path: &CStr) -> std::io::Result<()> {
    if rc >= 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    let mut buf = [0u8; 12];
    say(&[
        b"runvm jail: ",
        step.as_bytes(),
        b" ",
        path.to_bytes(),
        b" failed: errno ",
        digits(err.raw_os_error().unwrap_or(0), &mut buf),
        b"\n",
    ]);
    Err(err)
}

impl PreparedJail {
    /// Enters the jail: to be called in the child between fork and exec, after anything else
    /// that needs privilege (joining a network namespace, moving into a cgroup). Makes no
    /// allocation; a failing step is named in the child's log.
    ///
    /// # Safety
    /// Only in a forked child before exec: it changes the process's mount namespace, root,
    /// credentials and capabilities.
    pub unsafe fn enter(&self) -> std::io::Result<()> {
        let none = std::ptr::null::<libc::c_char>();
        let slash = c"/";
        // SAFETY: plain system calls on NUL-terminated strings that live in
        // `self` (prepared before the fork) or are literals; no memory is shared with another
        // thread (the child has one).
        unsafe {
            check(libc::unshare(libc::CLONE_NEWNS), "unshare", slash)?;
            // Nothing mounted here reaches the host, nor the reverse.
            check(
                libc::mount(
                    none,
                    slash.as_ptr(),
                    none,
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ),
                "make private",
                slash,
            )?;
            check(
                libc::mount(
                    c"tmpfs".as_ptr(),
                    self.root.as_ptr(),
                    c"tmpfs".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NOEXEC,
                    c"mode=0755,size=64k,nr_inodes=256".as_ptr().cast(),
                ),
                "mount tmpfs on",
                &self.root,
            )?;
            for op in &self.ops {
                match op {
                    Op::Mkdir(path) => {
                        let rc = libc::mkdir(path.as_ptr(), 0o755);
                        if rc < 0
                            && std::io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST)
                        {
                            check(rc, "mkdir", path)?;
                        }
                    }
                    Op::Touch(path) => {
                        let fd = libc::open(
                            path.as_ptr(),
                            libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                            0o644,
                        );
                        check(fd, "create", path)?;
                        libc::close(fd);
                    }
                    Op::Symlink { target, link } => check(
                        libc::symlink(target.as_ptr(), link.as_ptr()),
                        "symlink",
                        link,
                    )?,
                    Op::Bind { source, target } => check(
                        libc::mount(
                            source.as_ptr(),
                            target.as_ptr(),
                            none,
                            libc::MS_BIND,
                            std::ptr::null(),
                        ),
                        "bind-mount",
                        source,
                    )?,
                    Op::Remount { target, flags } => check(
                        libc::mount(none, target.as_ptr(), none, *flags, std::ptr::null()),
                        "remount",
                        target,
                    )?,
                    Op::Mknod { path, dev } => {
                        check(
                            libc::mknod(path.as_ptr(), libc::S_IFCHR | 0o600, *dev),
                            "mknod",
                            path,
                        )?;
                        check(
                            libc::chown(path.as_ptr(), self.uid, self.gid),
                            "chown",
                            path,
                        )?;
                    }
                }
            }
            // The tmpfs was mounted noexec for its own files; device nodes in it must open.
            check(
                libc::mount(
                    none,
                    self.root.as_ptr(),
                    none,
                    libc::MS_REMOUNT | libc::MS_NOSUID | libc::MS_NOEXEC | libc::MS_RDONLY,
                    c"mode=0755,size=64k,nr_inodes=256".as_ptr().cast(),
                ),
                "remount read-only",
                &self.root,
            )?;
            check(libc::chdir(self.root.as_ptr()), "chdir", &self.root)?;
            // pivot_root(".", "."): the old root ends up under the new one, then goes.
            check(
                libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int,
                "pivot_root into",
                &self.root,
            )?;
            check(
                libc::umount2(c".".as_ptr(), libc::MNT_DETACH),
                "detach the old root",
                slash,
            )?;
            check(libc::chdir(slash.as_ptr()), "chdir", slash)?;
            // No capability can come back: empty the bounding set, then leave root.
            for cap in 0..64 {
                let rc = libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0);
                if rc < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
                    check(rc, "drop capability from the bounding set", slash)?;
                }
            }
            check(
                libc::prctl(
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAP_AMBIENT_CLEAR_ALL,
                    0,
                    0,
                    0,
                ),
                "clear ambient capabilities",
                slash,
            )?;
            let groups = [self.gid];
            check(libc::setgroups(1, groups.as_ptr()), "setgroups", slash)?;
            check(
                libc::setresgid(self.gid, self.gid, self.gid),
                "setresgid",
                slash,
            )?;
            // With every uid non-zero (and no SECBIT_KEEP_CAPS), the kernel clears the
            // permitted and effective capability sets.
            check(
                libc::setresuid(self.uid, self.uid, self.uid),
                "setresuid",
                slash,
            )?;
            check(
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
                "set no_new_privs",
                slash,
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits_format_without_allocating() {
        let mut buf = [0u8; 12];
        assert_eq!(digits(0, &mut buf), b"0");
        assert_eq!(digits(13, &mut buf), b"13");
        assert_eq!(digits(2147483647, &mut buf), b"2147483647");
    }

    #[test]
    fn each_vm_gets_a_stable_subordinate_uid_and_the_users_group() {
        let text = "other:100000:65536\nrunvm-vmm:200000:65536\n";
        let range = VmmUser::parse_subuids(text, "runvm-vmm", 999);
        assert_eq!(range, Some((200000, 65536)));
        let user = VmmUser {
            name: "runvm-vmm".into(),
            uid: 999,
            gid: 995,
            subuids: range,
        };
        let a = user.for_vm(Path::new("/run/runvm/a/vm"));
        let b = user.for_vm(Path::new("/run/runvm/b/vm"));
        assert_ne!(a.uid, b.uid);
        assert_eq!(a.uid, user.for_vm(Path::new("/run/runvm/a/vm")).uid);
        for vm in [&a, &b] {
            assert!((200000..265536).contains(&vm.uid), "{}", vm.uid);
            assert_eq!(vm.gid, 995);
        }
        // By uid too; bad or zero ranges are not used; no range: the user's own uid.
        assert_eq!(
            VmmUser::parse_subuids("999:300000:10\n", "runvm-vmm", 999),
            Some((300000, 10))
        );
        assert_eq!(
            VmmUser::parse_subuids("runvm-vmm:0:10\n", "runvm-vmm", 999),
            None
        );
        assert_eq!(
            VmmUser::parse_subuids("runvm-vmm:4294967295:2\n", "runvm-vmm", 999),
            None
        );
        assert_eq!(
            VmmUser::parse_subuids("runvm-vmm:x:2\n", "runvm-vmm", 999),
            None
        );
        let plain = VmmUser {
            subuids: None,
            ..user
        };
        assert_eq!(plain.for_vm(Path::new("/run/runvm/a/vm")).uid, 999);
    }

    #[test]
    fn a_missing_user_is_named_with_the_fix() {
        let err = VmmUser::lookup("no-such-user-runvm")
            .unwrap_err()
            .to_string();
        assert!(err.contains("no-such-user-runvm"), "{err}");
        assert!(err.contains("useradd"), "{err}");
        let err = VmmUser::lookup("root").unwrap_err().to_string();
        assert!(err.contains("must not run as root"), "{err}");
    }

    #[test]
    fn a_jail_lists_parents_once_and_refuses_relative_paths() {
        let dir = tempfile::tempdir().unwrap();
        let user = VmmUser {
            name: "x".into(),
            uid: 1,
            gid: 1,
            subuids: None,
        };
        let jail = Jail::new(dir.path(), user.clone())
            .writable(dir.path())
            .read_only("/etc/hostname");
        let prepared = jail.prepare().unwrap();
        let mkdirs = prepared
            .ops
            .iter()
            .filter(|op| matches!(op, Op::Mkdir(p) if p.as_bytes().ends_with(b"/etc")))
            .count();
        assert_eq!(mkdirs, 1);
        let err = Jail::new(dir.path(), user.clone())
            .read_only("etc/hostname")
            .prepare()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("etc/hostname") && err.contains("absolute"),
            "{err}"
        );
        let err = Jail::new(dir.path(), user)
            .read_only("/no/such/file")
            .prepare()
            .unwrap_err()
            .to_string();
        assert!(err.contains("/no/such/file"), "{err}");
    }

    fn nobody() -> VmmUser {
        VmmUser {
            name: "nobody".into(),
            uid: 65534,
            gid: 65534,
            subuids: None,
        }
    }

    #[tokio::test]
    async fn a_jailed_child_runs_unprivileged_in_a_root_holding_only_its_entries() {
        use super::super::process::{ManagedChild, Placement};
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("jail");
        std::fs::create_dir(&root).unwrap();
        let shared = dir.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        let jail = Jail::new(&root, nobody())
            .read_only(&shared)
            .prepare()
            .unwrap();
        let log = dir.path().join("log");
        let script = format!(
            "id -u; id -g; grep -E '^(CapEff|NoNewPrivs)' /proc/self/status 2>&1; ls /; ls /dev; \
             touch {}/x 2>&1 || echo read-only",
            shared.display()
        );
        let mut child = ManagedChild::spawn_placed(
            "sh",
            Path::new("/bin/sh"),
            &["-c".into(), script.into()],
            &log,
            Placement {
                jail: Some(jail),
                ..Placement::default()
            },
        )
        .unwrap();
        assert!(child.wait_exit(std::time::Duration::from_secs(10)).await);
        let out = std::fs::read_to_string(&log).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(&lines[..2], ["65534", "65534"], "{out}");
        // No /proc in the jail: its status cannot even be read.
        assert!(!out.contains("CapEff"), "{out}");
        let top = shared
            .components()
            .nth(1)
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .into_owned();
        for name in ["bin", "dev", "etc", "lib", "usr", &top] {
            assert!(lines.contains(&name), "{name} missing: {out}");
        }
        for name in ["home", "root", "proc", "sys", "boot"] {
            assert!(!lines.contains(&name), "{name} present: {out}");
        }
        assert!(
            out.contains("urandom") && out.contains("read-only"),
            "{out}"
        );
    }

    #[tokio::test]
    async fn a_jail_that_cannot_be_entered_fails_the_spawn_naming_the_step() {
        use super::super::process::{ManagedChild, Placement};
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("jail");
        std::fs::create_dir(&root).unwrap();
        let jail = Jail::new(&root, nobody()).prepare().unwrap();
        // Gone before the child mounts its root there.
        std::fs::remove_dir(&root).unwrap();
        let err = ManagedChild::spawn_placed(
            "sh",
            Path::new("/bin/sh"),
            &["-c".into(), "true".into()],
            &dir.path().join("log"),
            Placement {
                jail: Some(jail),
                ..Placement::default()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("runvm jail: mount tmpfs on") && err.contains(&root.display().to_string()),
            "{err}"
        );
        assert!(err.contains("errno 2"), "{err}");
    }
}
