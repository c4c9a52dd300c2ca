//! A regular input file opened read-only through a memory map: the one place inputs are mapped.
//!
//! GGUF files, the shards of a split model and legacy GGML/GGJT models are all read this way: opening costs no
//! memory for the tensor data, which is paged in on demand and can be dropped again ([`MappedFile::release_pages`])
//! so that streaming through a model larger than RAM keeps the resident set flat.

use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::error::{Error, Result};

/// How far before a released range its pages may have been mapped again. A page fault on a file mapping maps
/// the whole page-cache folio around the page (Linux 6.x large folios: up to the PMD size, 2 MiB on x86-64 and
/// 4 KiB-page arm64), so reading the first page of the next chunk re-maps the end of the chunk just released,
/// which then stayed resident: 8-15% of every tensor streamed through (measured on Linux 6.18, ext4).
pub const REMAPPED_BEHIND: usize = 2 << 20;

/// An input file and its read-only memory map.
pub struct MappedFile {
    path: PathBuf,
    file: File,
    map: Mmap,
}

impl std::fmt::Debug for MappedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedFile").field("path", &self.path).field("len", &self.map.len()).finish()
    }
}

impl MappedFile {
    /// Opens and maps `path`. A FIFO, device, socket or directory is refused without blocking (see
    /// [`crate::paths::open_input`]).
    pub fn open(path: impl AsRef<Path>) -> Result<MappedFile> {
        let path = path.as_ref().to_path_buf();
        let file = crate::paths::open_input(&path)?;
        // SAFETY: the map is read-only and private to this process. Like every mmap reader (ggml, gguf-py,
        // safetensors) we accept that another process truncating or rewriting the file while it is mapped
        // is outside our control; this crate never writes to a file it has mapped (outputs go to a new
        // temporary file that is renamed into place).
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        Ok(MappedFile { path, file, map })
    }

    /// The path the file was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file handle (the same file as the map), e.g. for kernel-side copies of tensor data.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The whole mapped file.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// Tells the kernel this process is done with the pages of `range` (absolute bytes) for now, so they leave
    /// its resident set; they stay in the page cache and are read again transparently if touched later.
    ///
    /// Made for reading forward through the file: the [`REMAPPED_BEHIND`] bytes before `range` are released
    /// too, because reading the start of `range` may have mapped them again (see there).
    pub fn release_pages(&self, range: std::ops::Range<usize>) {
        let end = range.end.min(self.map.len());
        if range.start >= end {
            return;
        }
        let start = range.start.saturating_sub(REMAPPED_BEHIND);
        // SAFETY: the map is a read-only file mapping, for which MADV_DONTNEED only drops this process's
        // page-table entries: later reads fault the same file contents back in, so no reference into the map
        // can observe a change. (It is only unsafe for private *writable* maps, where it discards changes.)
        let _ = unsafe { self.map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start) };
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::io::Write;

    /// Resident kilobytes of this process's mapping of `path`, from the kernel's `/proc/self/smaps` (the oracle).
    fn mapping_rss_kb(path: &Path) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("/proc/self/smaps");
        let mut in_mapping = false;
        let mut total = 0;
        for line in smaps.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.first().is_some_and(|f| f.contains('-') && !f.ends_with(':')) {
                in_mapping = fields.last().is_some_and(|name| Path::new(name) == path);
            } else if in_mapping && fields.first() == Some(&"Rss:") {
                total += fields[1].parse::<u64>().expect("Rss value");
            }
        }
        total
    }

    /// Streaming through a file in chunks, releasing each chunk once read, keeps the mapping's resident set to
    /// about one chunk and one folio, whatever the file size: what the patch engine relies on for flat memory.
    /// The oracle is the kernel's own account of the mapping (smaps). Without the release behind each range, a
    /// kernel that reads ahead into large folios (Linux 6.18 on ext4 here) left 13% of this file resident.
    #[test]
    fn releasing_chunks_while_streaming_keeps_the_mapping_small() {
        let path = std::env::temp_dir().join(format!("ggml-lora-mapped-release-{}", std::process::id()));
        let size = 64usize << 20;
        {
            let mut f = File::create(&path).expect("create");
            let block = vec![7u8; 8 << 20];
            for _ in 0..size / block.len() {
                f.write_all(&block).expect("write");
            }
            // Out of the page cache, so that the reads below fault the file in through the mapping, as a model
            // read for the first time is: that is when the kernel reads ahead into large folios.
            f.sync_all().expect("fsync");
            use std::os::fd::AsRawFd;
            // SAFETY: a plain advice call on an open descriptor; it changes no memory of this process.
            unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        }
        let mapped = MappedFile::open(&path).expect("open");
        let page = 4096;
        let chunk = 600_000; // about the patch engine's chunk of q4_K rows; not page-aligned, like tensor data
        let mut offset = 12_345;
        let mut sum = 0u64;
        let mut largest = 0;
        while offset + chunk <= size {
            sum += mapped.bytes()[offset..offset + chunk].iter().step_by(page).map(|&b| u64::from(b)).sum::<u64>();
            mapped.release_pages(offset..offset + chunk);
            largest = largest.max(mapping_rss_kb(&path));
            offset += chunk;
        }
        let _ = std::fs::remove_file(&path);
        assert!(sum > 0);
        // After each release, what may still be mapped: the folio (up to 2 MiB) that holds the next bytes.
        let bound_kb = ((REMAPPED_BEHIND + chunk) / 1024) as u64;
        assert!(largest <= bound_kb, "{largest} KiB of the 64 MiB file stayed mapped (bound {bound_kb} KiB)");
    }
}
