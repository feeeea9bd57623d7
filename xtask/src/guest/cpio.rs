//! A small writer for "newc" cpio archives (the format the kernel unpacks as an initramfs).
//!
//! Archives are deterministic: entries are written sorted by path (a parent folder always sorts
//! before its contents, as its path is a prefix of theirs), with mtime 0, uid and gid 0, and
//! inode numbers given in that order.

use std::collections::BTreeMap;
use std::io::{self, Write};

use anyhow::{bail, Result};

const MAGIC: &[u8] = b"070701";
const TRAILER: &str = "TRAILER!!!";

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFCHR: u32 = 0o020_000;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Dir,
    File(Vec<u8>),
    CharDev { major: u32, minor: u32 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    perm: u32,
    kind: Kind,
}

/// The entries of an archive, keyed by path (without a leading `/`).
#[derive(Debug, Default)]
pub struct Archive {
    entries: BTreeMap<String, Entry>,
}

impl Archive {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a folder with permission bits `perm` (e.g. `0o755`).
    pub fn dir(&mut self, path: &str, perm: u32) -> Result<()> {
        self.insert(path, perm, Kind::Dir)
    }

    /// Adds a regular file.
    pub fn file(&mut self, path: &str, perm: u32, data: Vec<u8>) -> Result<()> {
        self.insert(path, perm, Kind::File(data))
    }

    /// Adds a character device node.
    pub fn char_dev(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> Result<()> {
        self.insert(path, perm, Kind::CharDev { major, minor })
    }

    fn insert(&mut self, path: &str, perm: u32, kind: Kind) -> Result<()> {
        let name = path.trim_start_matches('/');
        if name.is_empty()
            || name.ends_with('/')
            || name
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..")
        {
            bail!("invalid archive path {path:?}");
        }
        if perm & !0o7777 != 0 {
            bail!("invalid permission bits {perm:o} for {path:?}");
        }
        if self.entries.contains_key(name) {
            bail!("{path:?} is already in the archive");
        }
        self.entries.insert(name.to_owned(), Entry { perm, kind });
        Ok(())
    }

    /// Writes the archive, ending with the `TRAILER!!!` entry; returns the bytes written.
    pub fn write_to<W: Write>(&self, out: W) -> io::Result<u64> {
        let mut out = Counting {
            inner: out,
            written: 0,
        };
        for (index, (name, entry)) in self.entries.iter().enumerate() {
            let ino = u32::try_from(index + 1).map_err(io::Error::other)?;
            let (mode, nlink, data, rdev) = match &entry.kind {
                Kind::Dir => (S_IFDIR | entry.perm, 2, &[][..], (0, 0)),
                Kind::File(data) => (S_IFREG | entry.perm, 1, &data[..], (0, 0)),
                Kind::CharDev { major, minor } => {
                    (S_IFCHR | entry.perm, 1, &[][..], (*major, *minor))
                }
            };
            write_entry(&mut out, ino, mode, nlink, rdev, name, data)?;
        }
        write_entry(&mut out, 0, 0, 1, (0, 0), TRAILER, &[])?;
        out.flush()?;
        Ok(out.written)
    }
}

fn write_entry<W: Write>(
    out: &mut Counting<W>,
    ino: u32,
    mode: u32,
    nlink: u32,
    (rdev_major, rdev_minor): (u32, u32),
    name: &str,
    data: &[u8],
) -> io::Result<()> {
    let size = u32::try_from(data.len()).map_err(io::Error::other)?;
    let name_size = u32::try_from(name.len() + 1).map_err(io::Error::other)?;
    // ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
    let fields = [
        ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev_major, rdev_minor, name_size, 0,
    ];
    out.write_all(MAGIC)?;
    for field in fields {
        write!(out, "{field:08X}")?;
    }
    out.write_all(name.as_bytes())?;
    out.write_all(&[0])?;
    out.pad()?;
    out.write_all(data)?;
    out.pad()
}

/// A writer that counts bytes, to pad to the 4-byte boundaries newc requires after each name and
/// each file's data.
struct Counting<W> {
    inner: W,
    written: u64,
}

impl<W: Write> Counting<W> {
    fn pad(&mut self) -> io::Result<()> {
        let pad = (4 - self.written % 4) % 4;
        self.write_all(&[0; 3][..pad as usize])
    }
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    /// Length of a newc header: the magic plus 13 fields of 8 hex digits.
    const HEADER_LEN: usize = 6 + 13 * 8;

    #[derive(Debug, PartialEq)]
    pub struct Read {
        pub name: String,
        pub ino: u32,
        pub mode: u32,
        pub nlink: u32,
        pub mtime: u32,
        pub rdev: (u32, u32),
        pub data: Vec<u8>,
    }

    /// Parses a newc archive back, checking the 4-byte alignment of every header and every
    /// file's data, up to and including the trailer.
    pub fn read_back(bytes: &[u8]) -> Vec<Read> {
        let mut pos = 0;
        let mut entries = Vec::new();
        loop {
            assert_eq!(pos % 4, 0, "header at unaligned offset {pos}");
            let header = &bytes[pos..pos + HEADER_LEN];
            assert_eq!(&header[..6], MAGIC);
            let field = |i: usize| {
                let hex = std::str::from_utf8(&header[6 + 8 * i..14 + 8 * i]).unwrap();
                u32::from_str_radix(hex, 16).unwrap()
            };
            let (size, name_size) = (field(6) as usize, field(11) as usize);
            let name_start = pos + HEADER_LEN;
            let name = &bytes[name_start..name_start + name_size];
            assert_eq!(name.last(), Some(&0), "name not NUL-terminated");
            let name = std::str::from_utf8(&name[..name_size - 1])
                .unwrap()
                .to_owned();
            let data_start = (name_start + name_size).next_multiple_of(4);
            assert!(bytes[name_start + name_size..data_start]
                .iter()
                .all(|&b| b == 0));
            let data = bytes[data_start..data_start + size].to_vec();
            pos = (data_start + size).next_multiple_of(4);
            assert!(bytes[data_start + size..pos].iter().all(|&b| b == 0));
            assert_eq!((field(2), field(3)), (0, 0), "uid/gid of {name}");
            let entry = Read {
                name,
                ino: field(0),
                mode: field(1),
                nlink: field(4),
                mtime: field(5),
                rdev: (field(9), field(10)),
                data,
            };
            if entry.name == TRAILER {
                assert_eq!(pos, bytes.len(), "bytes after the trailer");
                return entries;
            }
            entries.push(entry);
        }
    }

    fn sample() -> Archive {
        let mut archive = Archive::new();
        archive.file("/init", 0o755, b"#!agent".to_vec()).unwrap();
        archive.dir("/dev", 0o755).unwrap();
        archive.char_dev("/dev/console", 0o600, 5, 1).unwrap();
        archive.dir("/lib", 0o755).unwrap();
        archive.file("/lib/empty", 0o644, Vec::new()).unwrap();
        archive
    }

    fn bytes_of(archive: &Archive) -> Vec<u8> {
        let mut bytes = Vec::new();
        let written = archive.write_to(&mut bytes).unwrap();
        assert_eq!(written, bytes.len() as u64);
        bytes
    }

    #[test]
    fn round_trip_keeps_names_modes_and_data_sorted() {
        let entries = read_back(&bytes_of(&sample()));
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["dev", "dev/console", "init", "lib", "lib/empty"]);
        let init = &entries[2];
        assert_eq!((init.mode, init.nlink, init.mtime), (0o100_755, 1, 0));
        assert_eq!(init.data, b"#!agent");
        assert_eq!((entries[0].mode, entries[0].nlink), (0o040_755, 2));
        assert!(entries[4].data.is_empty());
        let inos: Vec<u32> = entries.iter().map(|e| e.ino).collect();
        assert_eq!(inos, [1, 2, 3, 4, 5]);
    }

    #[test]
    fn device_node_has_char_mode_and_rdev() {
        let entries = read_back(&bytes_of(&sample()));
        let console = entries.iter().find(|e| e.name == "dev/console").unwrap();
        assert_eq!(console.mode, 0o020_600);
        assert_eq!(console.rdev, (5, 1));
        assert!(console.data.is_empty());
    }

    #[test]
    fn names_and_data_of_every_length_are_padded_to_four_bytes() {
        let mut archive = Archive::new();
        for len in 1..=9 {
            let name = "n".repeat(len);
            archive.file(&name, 0o644, vec![len as u8; len]).unwrap();
        }
        let bytes = bytes_of(&archive);
        assert_eq!(bytes.len() % 4, 0);
        let entries = read_back(&bytes);
        assert_eq!(entries.len(), 9);
        for entry in entries {
            assert_eq!(entry.data, vec![entry.name.len() as u8; entry.name.len()]);
        }
    }

    #[test]
    fn output_does_not_depend_on_insertion_order() {
        let mut reversed = Archive::new();
        reversed.file("lib/empty", 0o644, Vec::new()).unwrap();
        reversed.dir("lib", 0o755).unwrap();
        reversed.char_dev("dev/console", 0o600, 5, 1).unwrap();
        reversed.dir("dev", 0o755).unwrap();
        reversed.file("init", 0o755, b"#!agent".to_vec()).unwrap();
        assert_eq!(bytes_of(&reversed), bytes_of(&sample()));
    }

    #[test]
    fn duplicate_and_invalid_paths_are_rejected() {
        let mut archive = sample();
        assert!(archive.dir("dev", 0o755).is_err());
        assert!(archive.dir("/", 0o755).is_err());
        assert!(archive.file("lib/../etc", 0o644, Vec::new()).is_err());
        assert!(archive.file("lib//x", 0o644, Vec::new()).is_err());
        assert!(archive.file("x", 0o100_644, Vec::new()).is_err());
    }

    /// Cross-checks with GNU cpio when it is installed (the own reader above covers the format
    /// when it is not).
    #[test]
    fn gnu_cpio_lists_and_extracts_the_archive() {
        if Command::new("cpio").arg("--version").output().is_err() {
            eprintln!("cpio not installed; skipping the cross-check");
            return;
        }
        let bytes = bytes_of(&sample());
        let listing = pipe_into(Command::new("cpio").args(["-t", "--quiet"]), &bytes);
        assert_eq!(listing, "dev\ndev/console\ninit\nlib\nlib/empty\n");
        let verbose = pipe_into(Command::new("cpio").args(["-tv", "--quiet"]), &bytes);
        let console = verbose
            .lines()
            .find(|l| l.ends_with("dev/console"))
            .unwrap();
        assert!(console.starts_with("crw-------"), "{console}");
        assert!(console.contains("5,"), "{console}");

        // Extract everything but the device node (creating one needs root).
        let mut files = Archive::new();
        files.dir("lib", 0o755).unwrap();
        files.file("lib/data", 0o644, b"abcde".to_vec()).unwrap();
        files.file("init", 0o755, b"#!agent".to_vec()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut cpio = Command::new("cpio");
        cpio.args(["-idv", "--quiet"]).current_dir(dir.path());
        pipe_into(&mut cpio, &bytes_of(&files));
        assert_eq!(
            std::fs::read(dir.path().join("lib/data")).unwrap(),
            b"abcde"
        );
        assert_eq!(std::fs::read(dir.path().join("init")).unwrap(), b"#!agent");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("init"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
    }

    fn pipe_into(cmd: &mut Command, input: &[u8]) -> String {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}
