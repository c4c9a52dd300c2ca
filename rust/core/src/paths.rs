//! The kinds of path the project reads and writes.
//!
//! Every input is a regular file (a symlink to one is fine): a FIFO, device or socket is refused before it is
//! opened, so a FIFO given as the model cannot block the process in `open` and no device is ever read. Every
//! output is a regular file, replaced atomically, or a new name: a device, FIFO, socket or directory at the
//! output path is refused before any work and never replaced (see [`crate::atomic`]).

use std::fs::{File, Metadata, OpenOptions};
use std::io;
use std::path::Path;

use crate::error::{Error, Result};

/// What a path names when it is not a regular file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// A directory.
    Directory,
    /// A character device (`/dev/null`, a terminal, ...).
    CharDevice,
    /// A block device (a disk).
    BlockDevice,
    /// A FIFO (named pipe).
    Fifo,
    /// A Unix domain socket.
    Socket,
    /// Anything else that is not a regular file.
    Other,
}

impl std::fmt::Display for FileKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FileKind::Directory => "a directory",
            FileKind::CharDevice => "a character device",
            FileKind::BlockDevice => "a block device",
            FileKind::Fifo => "a FIFO (named pipe)",
            FileKind::Socket => "a socket",
            FileKind::Other => "not a regular file",
        })
    }
}

/// `None` for a regular file, else what the metadata describes.
pub fn file_kind(meta: &Metadata) -> Option<FileKind> {
    let ft = meta.file_type();
    if ft.is_file() {
        return None;
    }
    if ft.is_dir() {
        return Some(FileKind::Directory);
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if ft.is_char_device() {
            return Some(FileKind::CharDevice);
        }
        if ft.is_block_device() {
            return Some(FileKind::BlockDevice);
        }
        if ft.is_fifo() {
            return Some(FileKind::Fifo);
        }
        if ft.is_socket() {
            return Some(FileKind::Socket);
        }
    }
    Some(FileKind::Other)
}

/// Refuses an output path that names anything but a regular file (following symlinks): a device, FIFO, socket
/// or directory. A path that does not exist yet (a new name) passes; other `stat` failures pass too, and the
/// creation of the temporary file then reports them.
pub fn check_output(path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    match std::fs::metadata(path) {
        Ok(meta) => match file_kind(&meta) {
            None => Ok(()),
            Some(kind) => Err(Error::NotRegularFile { path: path.to_path_buf(), kind, output: true }),
        },
        Err(_) => Ok(()),
    }
}

/// Refuses an input path that exists and is not a regular file (following symlinks), without opening it.
/// A missing path passes (opening it reports that).
pub fn check_input(path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    match std::fs::metadata(path) {
        Ok(meta) => refuse_input_kind(path, &meta),
        Err(_) => Ok(()),
    }
}

fn refuse_input_kind(path: &Path, meta: &Metadata) -> Result<()> {
    match file_kind(meta) {
        None => Ok(()),
        Some(kind) => Err(Error::NotRegularFile { path: path.to_path_buf(), kind, output: false }),
    }
}

/// Opens an input for reading, refusing anything but a regular file without blocking: the path is checked
/// before it is opened, and opened non-blocking (a FIFO swapped in meanwhile then opens at once) and checked
/// again on the open descriptor. Non-blocking mode has no effect on reads of regular files.
pub fn open_input(path: impl AsRef<Path>) -> Result<File> {
    let path = path.as_ref();
    check_input(path)?;
    let mut options = OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK);
    }
    let file = options.open(path).map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    refuse_input_kind(path, &meta)?;
    Ok(file)
}

/// The longest file name (one path component, in bytes) Linux file systems accept (`NAME_MAX`).
pub const NAME_MAX: usize = 255;

/// `name` cut to at most `max` bytes, at a character boundary when it is UTF-8.
pub(crate) fn truncate_name(name: &[u8], max: usize) -> &[u8] {
    if name.len() <= max {
        return name;
    }
    let mut end = max;
    if let Ok(text) = std::str::from_utf8(name) {
        while !text.is_char_boundary(end) {
            end -= 1;
        }
    }
    &name[..end]
}

/// An `io::Error` for a path that is not a file path at all (e.g. ends in `..`).
pub(crate) fn not_a_file_path() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, "not a file path")
}

/// Refuses an output that would replace one of `inputs` (the same file by device and inode, or the same path):
/// writing it would destroy an input the output is being made from. The one such check of the project.
pub fn refuse_output_onto_inputs<P: AsRef<Path>>(out: &Path, inputs: impl IntoIterator<Item = P>) -> Result<()> {
    if inputs.into_iter().any(|input| same_file(input.as_ref(), out)) {
        return Err(Error::Incompatible(crate::error::Incompatible::OutputIsInput { path: out.display().to_string() }));
    }
    Ok(())
}

/// True when `a` and `b` name the same existing file (same device and inode), or the same path.
pub fn same_file(a: &Path, b: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let (Ok(ma), Ok(mb)) = (std::fs::metadata(a), std::fs::metadata(b)) {
            return ma.dev() == mb.dev() && ma.ino() == mb.ino();
        }
    }
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(ca), Ok(cb)) => ca == cb,
        _ => false,
    }
}

#[cfg(all(test, unix))]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::FileTypeExt;
    use std::path::PathBuf;

    pub(crate) fn scratch_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ggml-lora-paths-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    pub(crate) fn mkfifo(path: &Path) {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo {}", path.display());
    }

    fn kind_of(err: Error) -> (FileKind, bool) {
        match err {
            Error::NotRegularFile { kind, output, .. } => (kind, output),
            other => panic!("expected NotRegularFile, got {other}"),
        }
    }

    #[test]
    fn output_rules_by_kind() {
        let dir = scratch_dir("out");
        let fifo = dir.join("pipe");
        mkfifo(&fifo);
        let regular = dir.join("file");
        std::fs::write(&regular, b"x").unwrap();
        check_output(&regular).unwrap();
        check_output(dir.join("new-name")).unwrap();
        let err = check_output("/dev/null").unwrap_err();
        assert_eq!(err.to_string(), "/dev/null is a character device; the output must be a regular file or a new name");
        assert_eq!(kind_of(err), (FileKind::CharDevice, true));
        assert_eq!(kind_of(check_output(&fifo).unwrap_err()), (FileKind::Fifo, true));
        assert_eq!(kind_of(check_output(&dir).unwrap_err()), (FileKind::Directory, true));
        let socket = dir.join("sock");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        assert_eq!(kind_of(check_output(&socket).unwrap_err()), (FileKind::Socket, true));
        assert_eq!(kind_of(open_input(&socket).unwrap_err()), (FileKind::Socket, false));
        // A symlink is judged by what it points to.
        let link = dir.join("link");
        std::os::unix::fs::symlink("/dev/null", &link).unwrap();
        assert_eq!(kind_of(check_output(&link).unwrap_err()), (FileKind::CharDevice, true));
        assert!(std::fs::metadata("/dev/null").unwrap().file_type().is_char_device());
    }

    #[test]
    fn a_fifo_input_is_refused_without_blocking() {
        let dir = scratch_dir("in");
        let fifo = dir.join("model.gguf");
        mkfifo(&fifo);
        // With no writer, a blocking open would never return: this test finishing is the proof.
        let err = open_input(&fifo).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("{} is a FIFO (named pipe); an input must be a regular file", fifo.display())
        );
        assert_eq!(kind_of(err), (FileKind::Fifo, false));
        assert_eq!(kind_of(open_input("/dev/zero").unwrap_err()), (FileKind::CharDevice, false));
        assert_eq!(kind_of(open_input(&dir).unwrap_err()), (FileKind::Directory, false));
        let regular = dir.join("ok");
        std::fs::write(&regular, b"data").unwrap();
        let mut text = String::new();
        std::io::Read::read_to_string(&mut open_input(&regular).unwrap(), &mut text).unwrap();
        assert_eq!(text, "data");
        assert!(matches!(open_input(dir.join("missing")).unwrap_err(), Error::Io { .. }));
    }

    #[test]
    fn names_are_cut_at_character_boundaries() {
        assert_eq!(truncate_name(b"abc", 5), b"abc");
        assert_eq!(truncate_name(b"abcdef", 3), b"abc");
        let e_acute = "é".repeat(3); // 2 bytes each
        assert_eq!(truncate_name(e_acute.as_bytes(), 3), "é".as_bytes());
        // Not UTF-8: cut at the byte.
        assert_eq!(truncate_name(&[0xff, 0xfe, 0xfd], 2), &[0xff, 0xfe]);
    }
}
