//! Tests of the torch `.bin` reader. Oracles: pickles and zips assembled here byte by byte with their expected
//! values worked out by hand from the pickle and zip specifications; the fixture `adapter_model.bin` (written by
//! torch.save) against the same adapter's safetensors file, read here with a plain header scan.

use super::*;
use crate::error::TorchBin as K;

/// One zip member: name, content, compressed with deflate or stored.
struct Entry<'a> {
    name: &'a str,
    data: Vec<u8>,
    deflate: bool,
    /// The size the directory claims (defaults to the real one).
    claimed: Option<u64>,
}

fn entry(name: &str, data: impl Into<Vec<u8>>) -> Entry<'_> {
    Entry { name, data: data.into(), deflate: false, claimed: None }
}

/// A zip archive as the spec lays it out: local headers + data, central directory, end record.
fn zip_bytes(entries: &[Entry<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for e in entries {
        let payload = if e.deflate { miniz_oxide::deflate::compress_to_vec(&e.data, 6) } else { e.data.clone() };
        let size = e.claimed.unwrap_or(e.data.len() as u64) as u32;
        let crc = zip::crc32(&e.data);
        let method: u16 = if e.deflate { 8 } else { 0 };
        let offset = out.len() as u32;
        let common = |v: &mut Vec<u8>| {
            v.extend_from_slice(&20u16.to_le_bytes()); // version needed
            v.extend_from_slice(&0u16.to_le_bytes()); // flags
            v.extend_from_slice(&method.to_le_bytes());
            v.extend_from_slice(&[0; 4]); // time, date
            v.extend_from_slice(&crc.to_le_bytes());
            v.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            v.extend_from_slice(&size.to_le_bytes());
            v.extend_from_slice(&(e.name.len() as u16).to_le_bytes());
            v.extend_from_slice(&0u16.to_le_bytes()); // extra
        };
        out.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
        common(&mut out);
        out.extend_from_slice(e.name.as_bytes());
        out.extend_from_slice(&payload);
        central.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
        central.extend_from_slice(&20u16.to_le_bytes()); // version made by
        common(&mut central);
        central.extend_from_slice(&[0; 8]); // comment len, disk, internal attrs, external attrs (part)
        central.extend_from_slice(&[0; 2]);
        central.extend_from_slice(&offset.to_le_bytes());
        central.extend_from_slice(e.name.as_bytes());
    }
    let cd_offset = out.len() as u32;
    out.extend_from_slice(&central);
    out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
    out.extend_from_slice(&[0; 4]); // disk numbers
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&(central.len() as u32).to_le_bytes());
    out.extend_from_slice(&cd_offset.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out
}

fn unicode(s: &str) -> Vec<u8> {
    let mut v = vec![b'X'];
    v.extend_from_slice(&(s.len() as u32).to_le_bytes());
    v.extend_from_slice(s.as_bytes());
    v
}

/// `{"w": _rebuild_tensor_v2(storage("0", FloatStorage, numel), offset, size, stride, False, OrderedDict())}`,
/// written opcode by opcode; `size`/`stride` are two BININT1 each.
fn state_dict_pickle(storage_class: &str, numel: u8, offset: u8, size: [u8; 2], stride: [u8; 2]) -> Vec<u8> {
    let mut p = vec![0x80, 2, b'}']; // PROTO 2, EMPTY_DICT
    p.extend(unicode("w"));
    p.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n(("); // GLOBAL, MARK (args), MARK (pid)
    p.extend(unicode("storage"));
    p.extend_from_slice(format!("ctorch\n{storage_class}\n").as_bytes());
    p.extend(unicode("0"));
    p.extend(unicode("cpu"));
    p.extend_from_slice(&[b'K', numel, b't', b'Q']); // numel, TUPLE, BINPERSID
    p.extend_from_slice(&[b'K', offset, b'K', size[0], b'K', size[1], 0x86, b'K', stride[0], b'K', stride[1], 0x86]);
    p.extend_from_slice(b"\x89ccollections\nOrderedDict\n)R"); // False, OrderedDict()
    p.extend_from_slice(b"tRs."); // TUPLE, REDUCE, SETITEM, STOP
    p
}

fn torch_zip(pkl: Vec<u8>, storage: Vec<u8>) -> Vec<u8> {
    zip_bytes(&[entry("archive/data.pkl", pkl), entry("archive/byteorder", "little"), entry("archive/data/0", storage)])
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn as_f32(data: &[u8]) -> Vec<f32> {
    data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn kind(result: Result<Vec<Tensor>>) -> (String, u64, K) {
    match result {
        Err(Error::TorchBin { member, offset, kind }) => (member, offset, kind),
        other => panic!("expected a TorchBin error, got {other:?}"),
    }
}

fn limit_constant(result: Result<Vec<Tensor>>) -> &'static str {
    match kind(result).2 {
        K::Limit { constant, .. } => constant,
        other => panic!("expected a limit, got {other:?}"),
    }
}

#[test]
fn strided_view_of_a_float_storage() {
    // storage [0, 1, 2, 3, 4, 5]; offset 1, size (2, 2), stride (1, 2): t[i][j] = s[1 + i + 2j] = [[1, 3], [2, 4]]
    let bin = torch_zip(state_dict_pickle("FloatStorage", 6, 1, [2, 2], [1, 2]), f32_bytes(&[0., 1., 2., 3., 4., 5.]));
    let tensors = read_torch_bin_bytes(&bin).unwrap();
    assert_eq!(tensors.len(), 1);
    assert_eq!((tensors[0].name.as_str(), tensors[0].dtype, &tensors[0].shape[..]), ("w", Dtype::F32, &[2, 2][..]));
    assert_eq!(as_f32(&tensors[0].data), [1., 3., 2., 4.]);
}

#[test]
fn bfloat16_is_widened_exactly_and_big_endian_swapped() {
    // bf16 0x3FC0 = 1.5, 0xC000 = -2.0 (the high halves of the f32 bit patterns 0x3FC00000, 0xC0000000)
    let pkl = state_dict_pickle("BFloat16Storage", 2, 0, [1, 2], [2, 1]);
    let bin = torch_zip(pkl.clone(), vec![0xC0, 0x3F, 0x00, 0xC0]);
    assert_eq!(as_f32(&read_torch_bin_bytes(&bin).unwrap()[0].data), [1.5, -2.0]);
    let big = zip_bytes(&[
        entry("archive/data.pkl", pkl),
        entry("archive/byteorder", "big"),
        entry("archive/data/0", vec![0x3F, 0xC0, 0xC0, 0x00]),
    ]);
    assert_eq!(as_f32(&read_torch_bin_bytes(&big).unwrap()[0].data), [1.5, -2.0]);
}

#[test]
fn deflated_members_are_read() {
    let pkl = state_dict_pickle("FloatStorage", 4, 0, [2, 2], [2, 1]);
    let bin = zip_bytes(&[
        Entry { deflate: true, ..entry("archive/data.pkl", pkl) },
        Entry { deflate: true, ..entry("archive/data/0", f32_bytes(&[1., 2., 3., 4.])) },
    ]);
    assert_eq!(as_f32(&read_torch_bin_bytes(&bin).unwrap()[0].data), [1., 2., 3., 4.]);
}

#[test]
fn nested_tuples_a_million_deep_hit_the_depth_limit() {
    let mut p = b"\x80\x02}N".to_vec();
    p.extend(std::iter::repeat_n(0x85u8, 1_000_000)); // TUPLE1, 10^6 times
    p.extend_from_slice(b"K\x01s.");
    let (member, offset, k) = kind(read_torch_bin_bytes(&torch_zip(p, vec![])));
    assert_eq!(member, "archive/data.pkl");
    assert_eq!(offset, 4 + MAX_DEPTH_FOR_TESTS); // the 65th TUPLE1
    assert!(matches!(k, K::Limit { constant: "MAX_DEPTH", found: 65, limit: 64, .. }), "{k:?}");
}

const MAX_DEPTH_FOR_TESTS: u64 = pickle::MAX_DEPTH;

/// A memo DAG: `t_0 = (None,)`, `t_{i+1} = (t_i, t_i)`, `levels` times (2^levels leaves); only the last is left
/// on the stack.
fn memo_dag(levels: u32) -> Vec<u8> {
    let mut p = b"N\x85q\x000".to_vec(); // (None,), BINPUT 0, POP
    for i in 0..levels {
        let (get, put) = (i as u8, (i + 1) as u8);
        p.extend_from_slice(&[b'h', get, b'h', get, 0x86, b'q', put, b'0']);
    }
    p.extend_from_slice(&[b'h', levels as u8]);
    p
}

#[test]
fn memo_dag_as_a_dict_key_is_refused_at_once() {
    // 2^100 leaves are 101 levels deep: over the depth limit as the DAG is built
    let mut p = b"\x80\x02}".to_vec();
    p.extend(memo_dag(100));
    p.extend_from_slice(b"K\x01s.");
    assert_eq!(limit_constant(read_torch_bin_bytes(&torch_zip(p, vec![]))), "MAX_DEPTH");
    // 2^60 leaves fit the depth limit; as a key they are refused by type, never hashed
    let mut p = b"\x80\x02}".to_vec();
    p.extend(memo_dag(60));
    p.extend_from_slice(b"K\x01s.");
    let (_, _, k) = kind(read_torch_bin_bytes(&torch_zip(p, vec![])));
    assert_eq!(k, K::Pickle("dict key of type tuple (only str and int keys are accepted)".into()));
}

#[test]
fn memo_dag_as_a_persistent_id_is_refused_at_once() {
    // 2^60 leaves: described by type and length, never walked
    let mut p = b"\x80\x02".to_vec();
    p.extend(memo_dag(60));
    p.extend_from_slice(b"Q.");
    let (_, _, k) = kind(read_torch_bin_bytes(&torch_zip(p, vec![])));
    assert!(matches!(&k, K::Pickle(m) if m.starts_with("persistent id is a tuple of 2 items")), "{k:?}");
}

#[test]
fn hostile_globals_are_refused_by_name_before_anything_is_built() {
    let p = b"\x80\x02cposix\nsystem\nX\x04\x00\x00\x00echo\x85R.".to_vec();
    let (member, offset, k) = kind(read_torch_bin_bytes(&torch_zip(p, vec![])));
    assert_eq!((member.as_str(), offset), ("archive/data.pkl", 2));
    assert!(
        matches!(&k, K::RefusedGlobal { module, name, python3 } if module == "posix" && name == "system" && python3.is_empty())
    );
    // protocol 2 spells builtins the Python 2 way; STACK_GLOBAL (protocol 4) and INST (protocol 0) too
    let p = b"\x80\x02c__builtin__\neval\n.".to_vec();
    let k = kind(read_torch_bin_bytes(&torch_zip(p, vec![]))).2;
    assert!(k.to_string().contains("'__builtin__.eval' (Python 3: 'builtins.eval')"), "{k}");
    let p = b"\x80\x04\x8c\x02os\x8c\x06system\x93.".to_vec();
    assert!(kind(read_torch_bin_bytes(&torch_zip(p, vec![]))).2.to_string().contains("'os.system'"));
    let p = b"(S'touch x'\nios\nsystem\n.".to_vec();
    assert!(kind(read_torch_bin_bytes(&p)).2.to_string().contains("'os.system'"));
    // not a zip: same machine
}

#[test]
fn storage_classes_are_tags_never_callables() {
    let p = b"\x80\x02ctorch\nFloatStorage\n)R.".to_vec();
    let k = kind(read_torch_bin_bytes(&torch_zip(p, vec![]))).2;
    assert_eq!(k, K::Pickle("refusing to call storage class torch.FloatStorage".into()));
}

#[test]
fn opcode_memo_object_and_string_limits() {
    let mut p = b"\x80\x02".to_vec();
    p.extend(std::iter::repeat_n(*b"N0", (pickle::MAX_OPCODES / 2 + 1) as usize).flatten());
    assert_eq!(limit_constant(read_torch_bin_bytes(&torch_zip(p, vec![]))), "MAX_OPCODES");
    let mut p = b"\x80\x02N".to_vec();
    for i in 0..=pickle::MAX_MEMO as u32 {
        p.push(b'r');
        p.extend_from_slice(&i.to_le_bytes());
    }
    assert_eq!(limit_constant(read_torch_bin_bytes(&torch_zip(p, vec![]))), "MAX_MEMO");
    let mut p = b"\x80\x02".to_vec();
    p.extend(std::iter::repeat_n(*b")0", (pickle::MAX_OBJECTS + 1) as usize).flatten());
    assert_eq!(limit_constant(read_torch_bin_bytes(&torch_zip(p, vec![]))), "MAX_OBJECTS");
    let mut p = b"\x80\x02X".to_vec();
    p.extend_from_slice(&(pickle::MAX_STRING_BYTES as u32 + 1).to_le_bytes());
    assert_eq!(limit_constant(read_torch_bin_bytes(&torch_zip(p, vec![]))), "MAX_STRING_BYTES");
}

#[test]
fn views_outside_their_storage_or_beyond_the_budget_are_refused() {
    // last element 0 + 1*2 + 3*1 = 5 of a 4-element storage
    let bin = torch_zip(state_dict_pickle("FloatStorage", 4, 0, [2, 4], [2, 1]), f32_bytes(&[0.; 4]));
    assert!(kind(read_torch_bin_bytes(&bin)).2.to_string().contains("reads past its storage of 4 elements"));
    // a 1-element storage viewed with stride 0 as 255 x 255, repeated under 200 keys, is 52 MB of tensors
    let mut p = b"\x80\x02}".to_vec();
    for i in 0..200 {
        p.extend(unicode(&format!("w{i}")));
        p.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n((");
        p.extend(unicode("storage"));
        p.extend_from_slice(b"ctorch\nFloatStorage\n");
        p.extend(unicode("0"));
        p.extend(unicode("cpu"));
        p.extend_from_slice(b"K\x01tQK\x00K\xffK\xff\x86K\x00K\x00\x86\x89ccollections\nOrderedDict\n)RtRs");
    }
    p.push(b'.');
    assert_eq!(limit_constant(read_torch_bin_bytes(&torch_zip(p, f32_bytes(&[1.0])))), "VIEW_BUDGET_FACTOR");
}

#[test]
fn members_that_inflate_past_their_promise_are_refused() {
    let pkl = state_dict_pickle("FloatStorage", 4, 0, [2, 2], [2, 1]);
    // the storage member inflates to 16 MiB though the pickle promises 16 bytes and the directory says 16
    let bomb = Entry { deflate: true, claimed: Some(16), ..entry("archive/data/0", vec![0u8; 16 << 20]) };
    let bin = zip_bytes(&[entry("archive/data.pkl", pkl.clone()), bomb]);
    let (member, offset, k) = kind(read_torch_bin_bytes(&bin));
    assert_eq!((member.as_str(), offset), ("archive/data/0", 16));
    assert_eq!(k, K::Zip("inflates past the 16 bytes it promises".into()));
    // the directory saying so is refused before anything is inflated
    let bomb = Entry { deflate: true, ..entry("archive/data/0", vec![0u8; 16 << 20]) };
    let k = kind(read_torch_bin_bytes(&zip_bytes(&[entry("archive/data.pkl", pkl), bomb]))).2;
    assert!(k.to_string().contains("says it holds 16777216 bytes but 16 are expected"), "{k}");
    // data.pkl and byteorder claiming more than their limits
    let pkl_bomb = Entry { deflate: true, ..entry("archive/data.pkl", vec![b'N'; (MAX_PICKLE_BYTES + 1) as usize]) };
    assert_eq!(limit_constant(read_torch_bin_bytes(&zip_bytes(&[pkl_bomb]))), "MAX_PICKLE_BYTES");
    let order_bomb = Entry { deflate: true, ..entry("archive/byteorder", vec![b' '; 1 << 20]) };
    let bin = zip_bytes(&[entry("archive/data.pkl", b"N.".to_vec()), order_bomb]);
    assert_eq!(limit_constant(read_torch_bin_bytes(&bin)), "MAX_BYTEORDER_BYTES");
    // a directory claiming more than deflate can produce
    let liar = Entry { deflate: true, claimed: Some(u32::MAX as u64 - 1), ..entry("archive/data.pkl", b"N.".to_vec()) };
    assert!(kind(read_torch_bin_bytes(&zip_bytes(&[liar]))).2.to_string().contains("more than deflate can produce"));
}

#[test]
fn legacy_and_plain_pickles_are_refused_after_their_first_pickle() {
    // LONG1 of torch's legacy magic number 0x1950A86A20F9469CFC6C, then the protocol version (1001)
    let mut p = vec![0x80, 2, 0x8a, 10];
    p.extend_from_slice(&pickle::LEGACY_MAGIC);
    p.extend_from_slice(b".\x80\x02M\xe9\x03.");
    assert_eq!(kind(read_torch_bin_bytes(&p)).2, K::Legacy);
    // the same number in protocol 0 text (decimal 119547037146038801333356)
    assert_eq!(kind(read_torch_bin_bytes(b"L119547037146038801333356L\n.")).2, K::Legacy);
    assert_eq!(kind(read_torch_bin_bytes(b"\x80\x02}.")).2, K::PlainPickle);
    assert!(matches!(kind(read_torch_bin_bytes(b"")).2, K::Pickle(_)));
}

#[test]
fn state_dict_shape_is_checked() {
    let k = kind(read_torch_bin_bytes(&torch_zip(b"\x80\x02].".to_vec(), vec![]))).2;
    assert_eq!(k, K::Pickle("expected a state dict (a dict of tensors), got list".into()));
    let k = kind(read_torch_bin_bytes(&torch_zip(b"\x80\x02}K\x01K\x02s.".to_vec(), vec![]))).2;
    assert_eq!(k, K::Pickle("state dict key of type int is not a string".into()));
    let k = kind(read_torch_bin_bytes(&torch_zip(b"\x80\x02}X\x01\x00\x00\x00aK\x02s.".to_vec(), vec![]))).2;
    assert_eq!(k, K::Pickle("state dict entry \"a\" is a int, not a tensor".into()));
}
