//! A minimal zip reader for `torch.save` archives: the central directory (zip64 included), stored and
//! deflate members, every member read in bounded chunks with a decompression limit and its CRC-32 checked.
//!
//! Only what torch writes is accepted: no encryption, no multi-disk archives, no duplicate names, no other
//! compression methods. A member is only ever inflated to the size the caller expects (which the caller takes
//! from the pickle's promises): a member that inflates past it, or whose directory entry claims more than
//! deflate can produce from its compressed bytes, is refused before its output is allocated.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;

use miniz_oxide::inflate::stream::{inflate, InflateState};
use miniz_oxide::{DataFormat, MZError, MZFlush, MZStatus};

use crate::error::{Error, TorchBin};

/// Largest central directory read, in bytes (about 10^6 members; torch writes a few per tensor).
pub const MAX_DIRECTORY_BYTES: u64 = 64 << 20;
/// Most members an archive may list.
pub const MAX_MEMBERS: u64 = 1 << 20;
/// The most output deflate can produce per input byte (258-byte matches of 2 bits each, with block overhead):
/// a directory entry claiming a higher ratio is a lie, refused before anything is inflated.
pub const MAX_DEFLATE_RATIO: u64 = 1032;
/// Bytes of compressed input read from the file per step.
const CHUNK: usize = 1 << 16;
/// Bytes a zip's end-of-central-directory record and comment can span at the end of the file.
const EOCD_SEARCH: u64 = 22 + 0xFFFF;

const SIG_LOCAL: u32 = 0x0403_4b50;
const SIG_CENTRAL: u32 = 0x0201_4b50;
const SIG_EOCD: u32 = 0x0605_4b50;
const SIG_ZIP64_EOCD: u32 = 0x0606_4b50;
const SIG_ZIP64_LOCATOR: u32 = 0x0706_4b50;

/// Random access to the archive's bytes: a file (positioned reads, nothing mapped) or a slice (tests, fuzzing).
pub trait Source {
    /// Total length in bytes.
    fn len(&self) -> u64;
    /// Whether the source holds no bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Fills `buf` from `offset`; the caller has checked that the range lies within [`Source::len`].
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()>;
}

impl Source for [u8] {
    fn len(&self) -> u64 {
        <[u8]>::len(self) as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| std::io::ErrorKind::UnexpectedEof)?;
        let src = self.get(start..start + buf.len()).ok_or(std::io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

/// A file of known length (taken once, when opened).
pub struct FileSource {
    /// The open file.
    pub file: File,
    /// Its length when opened.
    pub len: u64,
    /// Its path, for I/O errors.
    pub path: std::path::PathBuf,
}

impl Source for FileSource {
    fn len(&self) -> u64 {
        self.len
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
}

/// One member, as the central directory describes it.
#[derive(Debug, Clone)]
pub struct Member {
    /// Its name (UTF-8, unique in the archive).
    pub name: String,
    /// 0 = stored, 8 = deflate.
    method: u16,
    /// CRC-32 of the uncompressed bytes.
    crc32: u32,
    /// Compressed size in bytes.
    compressed: u64,
    /// Uncompressed size in bytes (what the directory promises).
    pub size: u64,
    /// Offset of the local header.
    local_header: u64,
}

/// An opened archive: its members by name.
pub struct Archive<'a, S: Source + ?Sized> {
    source: &'a S,
    members: Vec<Member>,
    by_name: HashMap<String, usize>,
}

fn zip_err(member: &str, offset: u64, what: String) -> Error {
    Error::TorchBin { member: member.to_string(), offset, kind: TorchBin::Zip(what) }
}

fn io_err<S: Source + ?Sized>(_source: &S, offset: u64, e: std::io::Error) -> Error {
    zip_err("zip directory", offset, format!("read failed: {e}"))
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([b[i], b[i + 1]])
}
fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}
fn u64_at(b: &[u8], i: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[i..i + 8]);
    u64::from_le_bytes(a)
}

/// `len` bytes at `offset`, bounds-checked against the source (the caller bounds `len`).
fn read_vec<S: Source + ?Sized>(source: &S, offset: u64, len: u64, what: &str) -> Result<Vec<u8>, Error> {
    let end = offset.checked_add(len).filter(|&e| e <= source.len());
    if end.is_none() {
        return Err(zip_err(
            "zip directory",
            offset,
            format!("{what} ({len} bytes) runs past the end of the file ({} bytes)", source.len()),
        ));
    }
    let mut buf = vec![0u8; len as usize];
    source.read_at(offset, &mut buf).map_err(|e| io_err(source, offset, e))?;
    Ok(buf)
}

impl<'a, S: Source + ?Sized> Archive<'a, S> {
    /// Reads the central directory. `Ok(None)` when the file has no end-of-central-directory record (not a zip);
    /// an error when it has one but the directory is malformed.
    pub fn open(source: &'a S) -> Result<Option<Self>, Error> {
        let len = source.len();
        let tail_start = len.saturating_sub(EOCD_SEARCH);
        let tail = read_vec(source, tail_start, len - tail_start, "end of file")?;
        let Some(at) = (0..tail.len().saturating_sub(21)).rev().find(|&i| u32_at(&tail, i) == SIG_EOCD) else {
            return Ok(None);
        };
        let eocd_offset = tail_start + at as u64;
        let eocd = &tail[at..];
        let (disk, cd_disk) = (u16_at(eocd, 4), u16_at(eocd, 6));
        let mut entries = u64::from(u16_at(eocd, 10));
        let mut cd_size = u64::from(u32_at(eocd, 12));
        let mut cd_offset = u64::from(u32_at(eocd, 16));
        if disk != 0 || cd_disk != 0 {
            return Err(zip_err("zip directory", eocd_offset, "multi-disk archives are not supported".into()));
        }
        if entries == 0xFFFF || cd_size == 0xFFFF_FFFF || cd_offset == 0xFFFF_FFFF {
            // zip64: a locator just before the record points at the zip64 end-of-central-directory record
            let locator_offset = eocd_offset
                .checked_sub(20)
                .ok_or_else(|| zip_err("zip directory", eocd_offset, "zip64 fields without a zip64 locator".into()))?;
            let locator = read_vec(source, locator_offset, 20, "zip64 locator")?;
            if u32_at(&locator, 0) != SIG_ZIP64_LOCATOR {
                return Err(zip_err("zip directory", locator_offset, "zip64 fields without a zip64 locator".into()));
            }
            let record_offset = u64_at(&locator, 8);
            let record = read_vec(source, record_offset, 56, "zip64 end of central directory")?;
            if u32_at(&record, 0) != SIG_ZIP64_EOCD {
                return Err(zip_err(
                    "zip directory",
                    record_offset,
                    "bad zip64 end-of-central-directory signature".into(),
                ));
            }
            entries = u64_at(&record, 32);
            cd_size = u64_at(&record, 40);
            cd_offset = u64_at(&record, 48);
        }
        if entries > MAX_MEMBERS {
            return Err(limit("zip directory", eocd_offset, "member count", entries, MAX_MEMBERS, "MAX_MEMBERS"));
        }
        if cd_size > MAX_DIRECTORY_BYTES {
            return Err(limit(
                "zip directory",
                eocd_offset,
                "central directory size",
                cd_size,
                MAX_DIRECTORY_BYTES,
                "MAX_DIRECTORY_BYTES",
            ));
        }
        let cd = read_vec(source, cd_offset, cd_size, "central directory")?;
        let mut members = Vec::with_capacity(entries as usize);
        let mut by_name = HashMap::with_capacity(entries as usize);
        let mut pos = 0usize;
        for _ in 0..entries {
            let here = cd_offset + pos as u64;
            let err = |what: &str| zip_err("zip directory", here, what.to_string());
            let fixed = cd.get(pos..pos + 46).ok_or_else(|| err("central directory ends inside an entry"))?;
            if u32_at(fixed, 0) != SIG_CENTRAL {
                return Err(err("bad central directory entry signature"));
            }
            let flags = u16_at(fixed, 8);
            let method = u16_at(fixed, 10);
            let crc32 = u32_at(fixed, 16);
            let mut compressed = u64::from(u32_at(fixed, 20));
            let mut size = u64::from(u32_at(fixed, 24));
            let (n_name, n_extra, n_comment) =
                (usize::from(u16_at(fixed, 28)), usize::from(u16_at(fixed, 30)), usize::from(u16_at(fixed, 32)));
            let mut local_header = u64::from(u32_at(fixed, 42));
            let var = cd
                .get(pos + 46..pos + 46 + n_name + n_extra + n_comment)
                .ok_or_else(|| err("central directory ends inside an entry's name or extra field"))?;
            let name = std::str::from_utf8(&var[..n_name]).map_err(|_| err("member name is not UTF-8"))?.to_string();
            // zip64 extra field: the 64-bit values, in this order, of the fields that hold 0xFFFFFFFF
            let mut extra = &var[n_name..n_name + n_extra];
            while extra.len() >= 4 {
                let (id, n) = (u16_at(extra, 0), usize::from(u16_at(extra, 2)));
                let body = extra.get(4..4 + n).ok_or_else(|| err("extra field runs past its entry"))?;
                if id == 1 {
                    let mut values = body.chunks_exact(8).map(|c| u64_at(c, 0));
                    for field in [&mut size, &mut compressed, &mut local_header] {
                        if *field == 0xFFFF_FFFF {
                            *field = values.next().ok_or_else(|| err("zip64 extra field is too short"))?;
                        }
                    }
                }
                extra = &extra[4 + n..];
            }
            if flags & 1 != 0 {
                return Err(zip_err(&name, 0, "encrypted members are not supported".into()));
            }
            if method != 0 && method != 8 {
                return Err(zip_err(
                    &name,
                    0,
                    format!("compression method {method} is not supported (stored or deflate only)"),
                ));
            }
            if method == 0 && compressed != size {
                return Err(zip_err(
                    &name,
                    0,
                    format!("stored member of {size} bytes has {compressed} compressed bytes"),
                ));
            }
            if method == 8 && size > compressed.saturating_mul(MAX_DEFLATE_RATIO).saturating_add(64) {
                return Err(zip_err(
                    &name,
                    0,
                    format!(
                        "claims {size} bytes inflated from {compressed} compressed bytes, more than deflate can \
                         produce ({MAX_DEFLATE_RATIO}:1)"
                    ),
                ));
            }
            if by_name.insert(name.clone(), members.len()).is_some() {
                return Err(zip_err(&name, 0, "the archive lists this member twice".into()));
            }
            members.push(Member { name, method, crc32, compressed, size, local_header });
            pos += 46 + n_name + n_extra + n_comment;
        }
        Ok(Some(Archive { source, members, by_name }))
    }

    /// The members, in directory order.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// The member called `name`.
    pub fn member(&self, name: &str) -> Option<&Member> {
        self.by_name.get(name).map(|&i| &self.members[i])
    }

    /// The whole uncompressed content of `member`, which must be exactly `expected` bytes: the directory's
    /// size is checked first (nothing is allocated for a member that claims otherwise), then the bytes are
    /// read (stored) or inflated (deflate) in chunks of [`CHUNK`] input bytes into a buffer of `expected`
    /// bytes, refusing a stream that would produce more; then the CRC-32 is checked.
    pub fn read_exact(&self, member: &Member, expected: u64) -> Result<Vec<u8>, Error> {
        let name = member.name.as_str();
        if member.size != expected {
            return Err(zip_err(
                name,
                0,
                format!("the zip directory says it holds {} bytes but {expected} are expected", member.size),
            ));
        }
        let header = read_vec(self.source, member.local_header, 30, "local file header")?;
        if u32_at(&header, 0) != SIG_LOCAL {
            return Err(zip_err(name, 0, format!("bad local header signature at file byte {}", member.local_header)));
        }
        let data_start = member.local_header + 30 + u64::from(u16_at(&header, 26)) + u64::from(u16_at(&header, 28));
        let data_end = data_start.checked_add(member.compressed).filter(|&e| e <= self.source.len());
        let Some(data_end) = data_end else {
            return Err(zip_err(
                name,
                0,
                format!("compressed data runs past the end of the file ({} bytes)", self.source.len()),
            ));
        };
        let mut out = Vec::new();
        let size = usize::try_from(expected).map_err(|_| oom(name, expected))?;
        out.try_reserve_exact(size).map_err(|_| oom(name, expected))?;
        out.resize(size, 0);
        let read = |offset: u64, buf: &mut [u8]| {
            self.source
                .read_at(offset, buf)
                .map_err(|e| zip_err(name, offset - data_start, format!("read failed: {e}")))
        };
        if member.method == 0 {
            for (i, chunk) in out.chunks_mut(CHUNK).enumerate() {
                read(data_start + (i * CHUNK) as u64, chunk)?;
            }
        } else {
            let mut state = InflateState::new_boxed(DataFormat::Raw);
            let mut input = vec![0u8; CHUNK];
            let (mut in_pos, mut in_len, mut consumed_total) = (0usize, 0usize, data_start);
            let mut written = 0usize;
            let mut probe = [0u8; 1];
            loop {
                if in_pos == in_len && consumed_total < data_end {
                    in_len = (data_end - consumed_total).min(CHUNK as u64) as usize;
                    read(consumed_total, &mut input[..in_len])?;
                    consumed_total += in_len as u64;
                    in_pos = 0;
                }
                let last = consumed_total == data_end;
                // once the promised bytes are out, any further output (into a one-byte probe) is a bomb
                let target: &mut [u8] = if written < size { &mut out[written..] } else { &mut probe };
                let r = inflate(&mut state, &input[in_pos..in_len], target, MZFlush::None);
                in_pos += r.bytes_consumed;
                if written >= size && r.bytes_written > 0 {
                    return Err(zip_err(name, expected, format!("inflates past the {expected} bytes it promises")));
                }
                written += r.bytes_written;
                match r.status {
                    Ok(MZStatus::StreamEnd) => break,
                    Ok(_) | Err(MZError::Buf) => {}
                    Err(e) => return Err(zip_err(name, written as u64, format!("corrupt deflate stream ({e:?})"))),
                }
                if r.bytes_consumed == 0 && r.bytes_written == 0 && (in_pos < in_len || last) {
                    return Err(zip_err(name, written as u64, "deflate stream ends early (truncated)".into()));
                }
            }
            if written != size {
                return Err(zip_err(name, written as u64, format!("inflates to {written} bytes, {expected} promised")));
            }
        }
        let crc = crc32(&out);
        if crc != member.crc32 {
            return Err(zip_err(
                name,
                0,
                format!("CRC-32 {crc:#010x} does not match the directory's {:#010x}", member.crc32),
            ));
        }
        Ok(out)
    }
}

fn oom(name: &str, bytes: u64) -> Error {
    Error::TorchBin {
        member: name.to_string(),
        offset: 0,
        kind: TorchBin::OutOfMemory { what: "the member's content".into(), bytes },
    }
}

/// A [`TorchBin::Limit`] error.
pub(crate) fn limit(
    member: &str,
    offset: u64,
    what: &'static str,
    found: u64,
    limit: u64,
    constant: &'static str,
) -> Error {
    Error::TorchBin { member: member.to_string(), offset, kind: TorchBin::Limit { what, found, limit, constant } }
}

/// CRC-32 (IEEE 802.3, reflected, as zip uses it).
pub fn crc32(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    let mut c = !0u32;
    for &b in data {
        c = TABLE[((c ^ u32::from(b)) & 0xFF) as usize] ^ (c >> 8);
    }
    !c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_of_the_standard_check_string() {
        // the CRC catalogue's check value for CRC-32/ISO-HDLC
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }
}
