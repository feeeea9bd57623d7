//! Reading a small input file (a bundle's `config.json`, the TOML configuration) safely.
//!
//! The file is opened without blocking (`O_NONBLOCK`, so a FIFO with no writer does not hang the
//! open), checked with `fstat` on the open descriptor to be a regular file (a FIFO, a device such
//! as `/dev/zero`, a directory or a socket is refused), and read once, at most `cap + 1` bytes,
//! so an oversize file is refused without being held in memory. What was read is what the caller
//! validates and uses: there is no second look at the path.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Errors reading a capped regular file.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The file could not be opened or read (or, for text, is not UTF-8).
    #[error("cannot read {}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The path names something other than a regular file.
    #[error("{} is a {file_type}: a regular file is required", path.display())]
    NotRegular {
        /// The file.
        path: PathBuf,
        /// What it is: `directory`, `FIFO`, `character device`, `block device`, `socket`.
        file_type: &'static str,
    },
    /// The file is larger than the cap.
    #[error("{} is too large: {size} bytes, over the cap of {cap} bytes", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size (at least `cap + 1` when it grew while being read).
        size: u64,
        /// The cap, bytes.
        cap: u64,
    },
}

/// A name for a file type, for errors.
fn type_name(file_type: std::fs::FileType) -> &'static str {
    if file_type.is_dir() {
        "directory"
    } else if file_type.is_fifo() {
        "FIFO"
    } else if file_type.is_char_device() {
        "character device"
    } else if file_type.is_block_device() {
        "block device"
    } else if file_type.is_socket() {
        "socket"
    } else if file_type.is_symlink() {
        "symbolic link"
    } else {
        "special file"
    }
}

/// Reads the regular file at `path`, at most `cap` bytes: anything else (a FIFO, a device, a
/// directory) or anything larger is refused, without blocking and without reading past the cap.
pub fn read_regular_file(path: &Path, cap: u64) -> Result<Vec<u8>, FileError> {
    let io = |source| FileError::Io {
        path: path.to_path_buf(),
        source,
    };
    // O_NONBLOCK: opening a FIFO returns at once instead of waiting for a writer; O_NOCTTY: a
    // terminal named by mistake does not become the controlling one. (std adds O_CLOEXEC.)
    let file: File = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)
        .map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if !meta.file_type().is_file() {
        return Err(FileError::NotRegular {
            path: path.to_path_buf(),
            file_type: type_name(meta.file_type()),
        });
    }
    let too_large = |size: u64| FileError::TooLarge {
        path: path.to_path_buf(),
        size,
        cap,
    };
    if meta.len() > cap {
        return Err(too_large(meta.len()));
    }
    let limit = cap.saturating_add(1);
    // The size from fstat is a hint only: the file may change while it is read.
    let mut data = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.take(limit).read_to_end(&mut data).map_err(io)?;
    let read = data.len() as u64;
    if read > cap {
        return Err(too_large(read.max(meta.len())));
    }
    Ok(data)
}

/// [`read_regular_file`], as UTF-8 text.
pub fn read_regular_file_to_string(path: &Path, cap: u64) -> Result<String, FileError> {
    let data = read_regular_file(path, cap)?;
    String::from_utf8(data).map_err(|e| FileError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.utf8_error()),
    })
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    #[test]
    fn a_small_regular_file_is_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"hello").unwrap();
        assert_eq!(read_regular_file(&p, 5).unwrap(), b"hello");
        assert_eq!(read_regular_file_to_string(&p, 100).unwrap(), "hello");
        std::fs::write(&p, b"").unwrap();
        assert_eq!(read_regular_file(&p, 0).unwrap(), b"");
    }

    #[test]
    fn an_oversize_file_is_refused_naming_path_size_and_cap() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("big");
        std::fs::write(&p, vec![b'x'; 4097]).unwrap();
        let err = read_regular_file(&p, 4096).unwrap_err();
        assert!(
            matches!(
                err,
                FileError::TooLarge {
                    size: 4097,
                    cap: 4096,
                    ..
                }
            ),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(text.contains(&p.display().to_string()), "{text}");
        assert!(text.contains("4097"), "{text}");
        assert!(text.contains("4096"), "{text}");
    }

    #[test]
    fn a_fifo_is_refused_without_hanging() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("fifo");
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let started = Instant::now();
        let err = read_regular_file(&p, 1024).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(
            matches!(
                err,
                FileError::NotRegular {
                    file_type: "FIFO",
                    ..
                }
            ),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(text.contains(&p.display().to_string()), "{text}");
        assert!(text.contains("FIFO"), "{text}");
        assert!(text.contains("regular file is required"), "{text}");
    }

    #[test]
    fn a_character_device_is_refused() {
        for dev in ["/dev/zero", "/dev/null"] {
            let err = read_regular_file(Path::new(dev), 1024).unwrap_err();
            assert!(
                matches!(
                    err,
                    FileError::NotRegular {
                        file_type: "character device",
                        ..
                    }
                ),
                "{dev}: {err:?}"
            );
            assert!(err.to_string().contains(dev), "{err}");
        }
    }

    #[test]
    fn a_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = read_regular_file(dir.path(), 1024).unwrap_err();
        assert!(
            matches!(
                err,
                FileError::NotRegular {
                    file_type: "directory",
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("directory"), "{err}");
    }

    #[test]
    fn a_missing_file_is_an_io_error_naming_it() {
        let err = read_regular_file(Path::new("/nonexistent/x.json"), 10).unwrap_err();
        assert!(matches!(err, FileError::Io { .. }), "{err:?}");
        assert!(err.to_string().contains("/nonexistent/x.json"), "{err}");
    }

    #[test]
    fn text_must_be_utf8() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bin");
        std::fs::write(&p, [0xff, 0xfe]).unwrap();
        let err = read_regular_file_to_string(&p, 10).unwrap_err();
        assert!(matches!(err, FileError::Io { .. }), "{err:?}");
    }
}
