//! Parsers of untrusted bytes never panic, never hang, and never allocate beyond
//! the object's declared bound (issue 8, "Parsers that never panic").
//!
//! Property tests over every decoder of bytes that come from outside vmbackup: NBD
//! replies (simple, structured, block status) and the NBD handshake, QMP messages,
//! chunk / delta / index objects, manifests, and system.conf. Inputs are random
//! bytes and mutations of valid encodings; the valid encodings are built here from
//! docs/FORMAT.md and the protocol documents, not with vmbackup's own encoders.
//!
//! A counting global allocator records the largest single allocation each thread
//! makes, so a decoder that believes a length field (a delta claiming 4 GiB) fails
//! here before it could take a machine's memory.
//!
//! About 2,000 cases per decoder in the suite; `PROPTEST_CASES=100000` (what
//! `scripts/fuzz.sh` sets) runs more.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use proptest::sample::Index;
use serde_json::{json, Value};

use vmbackup::config::SystemConfig;
use vmbackup::error::{exit_code_of, ExitCode};
use vmbackup::nbd::inflight::{Coverage, Inflight, Op};
use vmbackup::nbd::{handshake, proto, reader};
use vmbackup::platform::qmp::Qmp;
use vmbackup::repo::{decode_chunk, decode_delta, digest_of, DiskIndex, Manifest};

// ---------------------------------------------------------------------------
// The counting allocator.

struct Counting;

thread_local! {
    /// The largest single allocation (or reallocation) this thread asked for
    /// since the last [`largest_during`] began.
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = LARGEST.try_with(|l| {
        if size > l.get() {
            l.set(size)
        }
    });
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        System.realloc(ptr, layout, new_size)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Run `f`, returning its result and the largest allocation this thread made meanwhile.
fn largest_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|l| l.set(0));
    let out = f();
    (out, LARGEST.with(|l| l.get()))
}

/// Room for the decoders' own bookkeeping (error messages, small vectors).
const SLACK: usize = 256 * 1024;
const MAX_CHUNK: usize = 32 * 1024 * 1024;

fn config() -> ProptestConfig {
    let mut c = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        c.cases = 2000;
    }
    c.failure_persistence = None;
    c
}

// ---------------------------------------------------------------------------
// Mutations of valid encodings.

#[derive(Debug, Clone)]
enum Mutation {
    Flip(Index, u8),
    Byte(Index, u8),
    U32(Index, u32),
    U64(Index, u64),
    Truncate(Index),
    Insert(Index, Vec<u8>),
    Append(Vec<u8>),
}

fn interesting_u32() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(0u32),
        Just(1),
        Just(7),
        Just(8),
        Just(0xff),
        Just(0xffff),
        Just(0x7fff_ffff),
        Just(0x8000_0000),
        Just(0xffff_fff8),
        Just(u32::MAX),
        Just(32 << 20),
        Just((32 << 20) + 1),
        any::<u32>(),
    ]
}

fn interesting_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(1),
        Just(u64::MAX),
        Just(u64::MAX / 33),
        Just(1 << 32),
        Just(i64::MAX as u64),
        any::<u64>(),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<Index>(), 0u8..8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Byte(i, b)),
        (any::<Index>(), interesting_u32()).prop_map(|(i, v)| Mutation::U32(i, v)),
        (any::<Index>(), interesting_u64()).prop_map(|(i, v)| Mutation::U64(i, v)),
        any::<Index>().prop_map(Mutation::Truncate),
        (any::<Index>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(i, b)| Mutation::Insert(i, b)),
        prop::collection::vec(any::<u8>(), 1..64).prop_map(Mutation::Append),
    ]
}

fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    prop::collection::vec(mutation(), 0..4)
}

/// Apply mutations; multi-byte writes use the format's own byte order when the
/// index lands on a field start (both orders are tried by the strategy anyway).
fn apply(mut b: Vec<u8>, ms: &[Mutation], little_endian: bool) -> Vec<u8> {
    for m in ms {
        match m {
            Mutation::Flip(i, bit) if !b.is_empty() => {
                let at = i.index(b.len());
                b[at] ^= 1 << bit;
            }
            Mutation::Byte(i, v) if !b.is_empty() => {
                let at = i.index(b.len());
                b[at] = *v;
            }
            Mutation::U32(i, v) if b.len() >= 4 => {
                // Fields are 4-aligned in every format here: land on one.
                let at = i.index(b.len() / 4) * 4;
                let bytes = if little_endian {
                    v.to_le_bytes()
                } else {
                    v.to_be_bytes()
                };
                b[at..at + 4].copy_from_slice(&bytes);
            }
            Mutation::U64(i, v) if b.len() >= 8 => {
                let at = i.index(b.len() / 8) * 8;
                let bytes = if little_endian {
                    v.to_le_bytes()
                } else {
                    v.to_be_bytes()
                };
                b[at..at + 8].copy_from_slice(&bytes);
            }
            Mutation::Truncate(i) => {
                let at = i.index(b.len() + 1);
                b.truncate(at);
            }
            Mutation::Insert(i, bytes) => {
                let at = i.index(b.len() + 1);
                b.splice(at..at, bytes.iter().copied());
            }
            Mutation::Append(bytes) => b.extend_from_slice(bytes),
            _ => {}
        }
    }
    b
}

fn le_u32(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .map(|f| u32::from_le_bytes(f.try_into().unwrap()))
}

// ---------------------------------------------------------------------------
// Repository objects, encoded as docs/FORMAT.md says.

fn chunk_object(data: &[u8], zstd: bool) -> Vec<u8> {
    let payload = if zstd {
        zstd::bulk::compress(data, 1).unwrap()
    } else {
        data.to_vec()
    };
    let mut o = b"VMBCHNK1".to_vec();
    o.push(u8::from(zstd));
    o.extend_from_slice(&[0; 3]);
    o.extend_from_slice(&(data.len() as u32).to_le_bytes());
    o.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    o.extend_from_slice(&payload);
    o
}

/// A delta object and its id.
fn delta_object(
    base: [u8; 32],
    len: u32,
    patches: &[(u32, Vec<u8>)],
    zstd: bool,
) -> (Vec<u8>, [u8; 32]) {
    let raw: Vec<u8> = patches.iter().flat_map(|(_, d)| d.clone()).collect();
    let payload = if zstd {
        zstd::bulk::compress(&raw, 1).unwrap()
    } else {
        raw.clone()
    };
    let mut table = Vec::new();
    for (off, d) in patches {
        table.extend_from_slice(&off.to_le_bytes());
        table.extend_from_slice(&(d.len() as u32).to_le_bytes());
    }
    let mut o = b"VMBDLTA1".to_vec();
    o.extend_from_slice(&base);
    o.extend_from_slice(&len.to_le_bytes());
    o.extend_from_slice(&(patches.len() as u32).to_le_bytes());
    o.push(u8::from(zstd));
    o.extend_from_slice(&[0; 3]);
    o.extend_from_slice(&(raw.len() as u32).to_le_bytes());
    o.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    o.extend_from_slice(&table);
    o.extend_from_slice(&payload);
    let mut h = blake3::Hasher::new();
    h.update(b"vmbackup delta v1");
    h.update(&base);
    h.update(&len.to_le_bytes());
    h.update(&(patches.len() as u32).to_le_bytes());
    h.update(&table);
    h.update(&raw);
    (o, *h.finalize().as_bytes())
}

fn index_object(disk_size: u64, chunk_size: u32, entries: &[(u8, [u8; 32])]) -> Vec<u8> {
    let mut o = b"VMBINDX1".to_vec();
    o.extend_from_slice(&disk_size.to_le_bytes());
    o.extend_from_slice(&chunk_size.to_le_bytes());
    o.extend_from_slice(&[0; 4]);
    o.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    o.extend_from_slice(&[0; 32]);
    for (kind, digest) in entries {
        o.push(*kind);
        o.extend_from_slice(digest);
    }
    fix_index_checksum(&mut o);
    o
}

/// Recompute an index object's checksum (so mutated headers reach the later checks).
fn fix_index_checksum(o: &mut [u8]) {
    if o.len() < 64 {
        return;
    }
    let mut h = blake3::Hasher::new();
    h.update(&o[..32]);
    h.update(&o[64..]);
    let sum = *h.finalize().as_bytes();
    o[32..64].copy_from_slice(&sum);
}

fn patches_strategy() -> impl Strategy<Value = (u32, Vec<(u32, Vec<u8>)>)> {
    (1u32..200_000).prop_flat_map(|len| {
        (
            Just(len),
            prop::collection::vec((0..len, prop::collection::vec(any::<u8>(), 1..64)), 0..6),
        )
            .prop_map(|(len, raw)| {
                // Ascending, non-overlapping, inside the content.
                let mut ps: Vec<(u32, Vec<u8>)> = Vec::new();
                let mut sorted = raw;
                sorted.sort_by_key(|(o, _)| *o);
                let mut end = 0u32;
                for (o, mut d) in sorted {
                    if o < end {
                        continue;
                    }
                    d.truncate((len - o) as usize);
                    if d.is_empty() {
                        continue;
                    }
                    end = o + d.len() as u32;
                    ps.push((o, d));
                }
                (len, ps)
            })
    })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn chunk_objects_decode_or_fail_cleanly(
        data in prop::collection::vec(any::<u8>(), 0..1024),
        repeat in 1usize..16,
        zstd in any::<bool>(),
        ms in mutations(),
        wrong_digest in any::<bool>(),
    ) {
        let data: Vec<u8> = data.iter().copied().cycle().take(data.len() * repeat).collect();
        let digest = if wrong_digest { [7u8; 32] } else { digest_of(&data) };
        let object = apply(chunk_object(&data, zstd), &ms, true);
        let declared = le_u32(&object, 12).map_or(0, |n| (n as usize).min(MAX_CHUNK));
        let (result, largest) = largest_during(|| decode_chunk(&object, &digest));
        if let Ok(content) = &result {
            prop_assert_eq!(digest_of(content), digest);
        }
        prop_assert!(largest <= object.len().max(declared) + SLACK,
            "largest allocation {largest} for a {}-byte object declaring {declared}", object.len());
    }

    #[test]
    fn random_bytes_are_not_chunks_deltas_or_indexes(bytes in prop::collection::vec(any::<u8>(), 0..512), magic in 0usize..4) {
        let mut b = bytes;
        let magics: [&[u8]; 4] = [b"VMBCHNK1", b"VMBDLTA1", b"VMBINDX1", b""];
        b.splice(0..0, magics[magic].iter().copied());
        let ((), largest) = largest_during(|| {
            let _ = decode_chunk(&b, &[0; 32]);
            let _ = decode_delta(&b, &[0; 32]);
            let _ = DiskIndex::decode(&b);
        });
        prop_assert!(largest <= 8 * b.len() + SLACK, "largest allocation {largest}");
    }

    #[test]
    fn delta_objects_decode_or_fail_cleanly(
        (len, patches) in patches_strategy(),
        base in any::<[u8; 32]>(),
        zstd in any::<bool>(),
        ms in mutations(),
    ) {
        let (object, id) = delta_object(base, len, &patches, zstd);
        let object = apply(object, &ms, true);
        let raw_len = le_u32(&object, 52).map_or(0, |n| (n as usize).min(MAX_CHUNK));
        let (result, largest) = largest_during(|| decode_delta(&object, &id));
        if ms.is_empty() {
            prop_assert!(result.is_ok(), "a valid delta was refused: {:#}", result.unwrap_err());
        }
        if let Ok(d) = &result {
            prop_assert_eq!(d.id(), id);
        }
        prop_assert!(largest <= 4 * object.len() + raw_len + SLACK,
            "largest allocation {largest} for a {}-byte delta declaring {raw_len} patch bytes", object.len());
    }

    #[test]
    fn index_objects_decode_or_fail_cleanly(
        disk_size in prop_oneof![Just(0u64), 1u64..(1 << 24), interesting_u64()],
        chunk_shift in 14u32..27,
        kinds in prop::collection::vec((0u8..4, any::<[u8; 32]>()), 0..40),
        ms in mutations(),
        keep_checksum_valid in any::<bool>(),
    ) {
        let chunk_size = 1u32 << chunk_shift;
        let entries: Vec<(u8, [u8; 32])> = kinds
            .into_iter()
            .map(|(k, d)| if k == 0 { (0, [0; 32]) } else { (k, d) })
            .collect();
        let mut object = apply(index_object(disk_size, chunk_size, &entries), &ms, true);
        if keep_checksum_valid {
            fix_index_checksum(&mut object);
        }
        let (result, largest) = largest_during(|| DiskIndex::decode(&object));
        if let Ok(index) = &result {
            prop_assert!(index.check().is_ok());
            for i in 0..index.slots.len() {
                let _ = (index.slot_offset(i), index.slot_len(i));
            }
        }
        prop_assert!(largest <= 2 * object.len() + SLACK, "largest allocation {largest}");
    }
}

#[test]
fn a_delta_claiming_4_gib_is_refused_without_allocating_it() {
    let mut o = b"VMBDLTA1".to_vec();
    o.extend_from_slice(&[1; 32]);
    o.extend_from_slice(&u32::MAX.to_le_bytes()); // content length
    o.extend_from_slice(&(u32::MAX / 8).to_le_bytes()); // patch count
    o.push(1);
    o.extend_from_slice(&[0; 3]);
    o.extend_from_slice(&u32::MAX.to_le_bytes()); // patch bytes
    o.extend_from_slice(&u32::MAX.to_le_bytes()); // payload length
    o.extend_from_slice(&[0xab; 100]);
    let (result, largest) = largest_during(|| decode_delta(&o, &[0; 32]));
    assert!(result.is_err());
    assert!(largest <= SLACK, "largest allocation {largest}");

    // A well-formed table whose patch claims offset u32::MAX - 1: the end
    // overflows u32.
    let (o, id) = delta_object([2; 32], 100, &[(10, vec![1; 8])], false);
    let mut o = o;
    o[60..64].copy_from_slice(&(u32::MAX - 1).to_le_bytes());
    let (result, largest) = largest_during(|| decode_delta(&o, &id));
    assert!(result.is_err());
    assert!(largest <= SLACK, "largest allocation {largest}");
}

#[test]
fn a_chunk_or_index_claiming_4_gib_is_refused_without_allocating_it() {
    let mut o = chunk_object(&[5; 100], false);
    o[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    let (result, largest) = largest_during(|| decode_chunk(&o, &[0; 32]));
    assert!(result.is_err());
    assert!(largest <= SLACK, "largest allocation {largest}");

    let mut o = index_object(1 << 20, 1 << 16, &[(0, [0; 32])]);
    o[24..32].copy_from_slice(&(u64::MAX / 33).to_le_bytes());
    fix_index_checksum(&mut o);
    let (result, largest) = largest_during(|| DiskIndex::decode(&o));
    assert!(result.is_err());
    assert!(largest <= SLACK, "largest allocation {largest}");
}

// ---------------------------------------------------------------------------
// Manifests.

fn manifest_json() -> Value {
    let disk = |name: &str, size: u64| {
        json!({ "name": name, "size": size, "chunk_size": 4194304, "index": format!("{name}.idx"),
                "bytes_read": 1, "bytes_written": 2, "new_chunks": 3, "reused_chunks": 4, "zero_slots": 5 })
    };
    json!({
        "format": 1,
        "vm": { "platform": "lab", "name": "web01" },
        "point": "20261124T120000Z",
        "level": "inc",
        "base": "20261123T120000Z",
        "full": "20261120T120000Z",
        "status": "completed",
        "started": "2026-11-24T12:00:00Z",
        "finished": "2026-11-24T12:01:00Z",
        "fallback_reason": null,
        "vm_config": { "cmdline": ["qemu-system-x86_64", "-name", "web01"] },
        "disks": [disk("vda", 1 << 30), disk("vdb", 1 << 20)],
        "totals": { "size": (1u64 << 30) + (1 << 20), "bytes_read": 2, "bytes_written": 4,
                    "new_chunks": 6, "reused_chunks": 8, "zero_slots": 10 },
    })
}

const MANIFEST_FIELDS: &[&str] = &[
    "/format",
    "/vm/name",
    "/point",
    "/level",
    "/base",
    "/full",
    "/status",
    "/started",
    "/finished",
    "/fallback_reason",
    "/vm_config",
    "/disks",
    "/disks/0/name",
    "/disks/0/size",
    "/disks/0/chunk_size",
    "/disks/0/index",
    "/disks/0/bytes_read",
    "/disks/0/new_chunks",
    "/disks/1/size",
    "/disks/1/bytes_written",
    "/disks/1/zero_slots",
    "/totals",
    "/totals/size",
    "/totals/new_chunks",
];

fn json_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        Just(json!(u64::MAX)),
        Just(json!(u64::MAX - 1)),
        Just(json!(-1)),
        Just(json!(1.5)),
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        "[0-9TZ:.-]{0,24}".prop_map(Value::from),
        ".{0,16}".prop_map(Value::from),
        Just(json!("20261124T120000Z")),
        Just(json!("99991231T235959Z")),
        Just(json!("full")),
        Just(json!("diff")),
        Just(json!([])),
        Just(json!({})),
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn manifests_parse_or_fail_cleanly(
        edits in prop::collection::vec((0..MANIFEST_FIELDS.len(), json_value()), 0..5),
        byte_edits in mutations(),
    ) {
        let mut m = manifest_json();
        for (field, value) in edits {
            if let Some(slot) = m.pointer_mut(MANIFEST_FIELDS[field]) {
                *slot = value;
            }
        }
        let text = serde_json::to_vec(&m).unwrap();
        let text = apply(text, &byte_edits, true);
        let text = String::from_utf8_lossy(&text).into_owned();
        let (_, largest) = largest_during(|| {
            if let Ok(parsed) = Manifest::parse(&text, Path::new("manifest.json")) {
                let _ = parsed.check();
                let _ = parsed.to_json();
            }
        });
        prop_assert!(largest <= 16 * text.len() + SLACK, "largest allocation {largest}");
    }
}

// ---------------------------------------------------------------------------
// system.conf.

fn conf_line() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        Just("bk_tsk_thd".to_string()),
        Just("i2vp_transbuffer".to_string()),
        Just("Max_ThreadNum_PerHost".to_string()),
        Just("io_timeout".to_string()),
        "[A-Za-z_]{0,12}",
    ];
    let value = prop_oneof![
        "[0-9]{0,22}[KMGkmgiB]{0,3}",
        "\"[^\"]{0,8}\"?",
        "'[^']{0,8}'?",
        ".{0,12}",
    ];
    prop_oneof![
        (key, "[ \t]{0,2}=[ \t]{0,2}", value).prop_map(|(k, eq, v)| format!("{k}{eq}{v}")),
        "#.{0,20}",
        ".{0,30}",
    ]
}

proptest! {
    #![proptest_config(config())]

    /// Every system.conf content error is one line, exit 2.
    #[test]
    fn system_conf_text_parses_or_is_a_one_line_usage_error(lines in prop::collection::vec(conf_line(), 0..8)) {
        let text = lines.join("\n");
        let (result, largest) = largest_during(|| SystemConfig::parse(&text, Path::new("/etc/vmbackup/system.conf")));
        if let Err(e) = result {
            prop_assert_eq!(exit_code_of(&e), ExitCode::Usage, "{:#}", e);
            prop_assert!(!format!("{e:#}").contains('\n'), "{:#}", e);
        }
        prop_assert!(largest <= 4 * text.len() + SLACK, "largest allocation {largest}");
    }

    /// Whatever bytes the file holds (binary, a BOM, invalid UTF-8), loading it
    /// gives a configuration or a one-line exit-2 error.
    #[test]
    fn system_conf_files_load_or_give_a_one_line_usage_error(
        lines in prop::collection::vec(conf_line(), 0..6),
        ms in mutations(),
        bom in any::<bool>(),
    ) {
        let mut bytes = if bom { vec![0xef, 0xbb, 0xbf] } else { Vec::new() };
        bytes.extend_from_slice(lines.join("\n").as_bytes());
        let bytes = apply(bytes, &ms, true);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("system.conf");
        std::fs::write(&path, &bytes).unwrap();
        if let Err(e) = SystemConfig::load(&path, true) {
            prop_assert_eq!(exit_code_of(&e), ExitCode::Usage, "{:#}", e);
            prop_assert!(!format!("{e:#}").contains('\n'), "{:#}", e);
        }
    }
}

// ---------------------------------------------------------------------------
// NBD: reply frames and the handshake.

#[derive(Debug, Clone)]
enum Frame {
    Simple {
        error: u32,
        cookie: u64,
        payload: Vec<u8>,
    },
    Structured {
        flags: u16,
        kind: u16,
        cookie: u64,
        length: Option<u32>,
        payload: Vec<u8>,
    },
    Garbage(Vec<u8>),
}

fn cookie() -> impl Strategy<Value = u64> {
    prop_oneof![0u64..5, any::<u64>()]
}

fn reply_payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        // OFFSET_DATA / OFFSET_HOLE: an offset near the requests' offsets first.
        (
            prop_oneof![Just(0u64), Just(65536), Just(65536 + 4096), any::<u64>()],
            prop::collection::vec(any::<u8>(), 0..300)
        )
            .prop_map(|(off, mut rest)| {
                let mut p = off.to_be_bytes().to_vec();
                p.append(&mut rest);
                p
            }),
        // BLOCK_STATUS: a context id and descriptors.
        (
            0u32..3,
            prop::collection::vec((any::<u32>(), any::<u32>()), 0..8)
        )
            .prop_map(|(ctx, ds)| {
                let mut p = ctx.to_be_bytes().to_vec();
                for (l, f) in ds {
                    p.extend_from_slice(&l.to_be_bytes());
                    p.extend_from_slice(&f.to_be_bytes());
                }
                p
            }),
        // ERROR: errno, message length, message (maybe lying), maybe an offset.
        (any::<u32>(), any::<u16>(), ".{0,10}", any::<bool>()).prop_map(|(e, n, m, off)| {
            let mut p = e.to_be_bytes().to_vec();
            p.extend_from_slice(&n.to_be_bytes());
            p.extend_from_slice(m.as_bytes());
            if off {
                p.extend_from_slice(&7u64.to_be_bytes());
            }
            p
        }),
        prop::collection::vec(any::<u8>(), 0..64),
    ]
}

fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (
            prop_oneof![Just(0u32), any::<u32>()],
            cookie(),
            prop::collection::vec(any::<u8>(), 0..5000)
        )
            .prop_map(|(error, cookie, payload)| Frame::Simple {
                error,
                cookie,
                payload
            }),
        (
            prop_oneof![Just(0u16), Just(1), any::<u16>()],
            prop_oneof![
                Just(0u16),
                Just(1),
                Just(2),
                Just(5),
                Just(0x8001),
                Just(0x8002),
                any::<u16>()
            ],
            cookie(),
            prop_oneof![
                4 => Just(None),
                1 => interesting_u32().prop_map(Some),
            ],
            reply_payload(),
        )
            .prop_map(|(flags, kind, cookie, length, payload)| Frame::Structured {
                flags,
                kind,
                cookie,
                length,
                payload
            }),
        prop::collection::vec(any::<u8>(), 0..32).prop_map(Frame::Garbage),
    ]
}

fn encode_frames(frames: &[Frame]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in frames {
        match f {
            Frame::Simple {
                error,
                cookie,
                payload,
            } => {
                out.extend_from_slice(&proto::SIMPLE_REPLY_MAGIC.to_be_bytes());
                out.extend_from_slice(&error.to_be_bytes());
                out.extend_from_slice(&cookie.to_be_bytes());
                out.extend_from_slice(payload);
            }
            Frame::Structured {
                flags,
                kind,
                cookie,
                length,
                payload,
            } => {
                out.extend_from_slice(&proto::STRUCTURED_REPLY_MAGIC.to_be_bytes());
                out.extend_from_slice(&flags.to_be_bytes());
                out.extend_from_slice(&kind.to_be_bytes());
                out.extend_from_slice(&cookie.to_be_bytes());
                out.extend_from_slice(&length.unwrap_or(payload.len() as u32).to_be_bytes());
                out.extend_from_slice(payload);
            }
            Frame::Garbage(g) => out.extend_from_slice(g),
        }
    }
    out
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The reader's metadata chunk limit (reader.rs): the bound a server may declare.
const MAX_METADATA_CHUNK: usize = 64 * 1024 * 1024;

fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut o = proto::OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
    o.extend_from_slice(&option.to_be_bytes());
    o.extend_from_slice(&reply.to_be_bytes());
    o.extend_from_slice(&(data.len() as u32).to_be_bytes());
    o.extend_from_slice(data);
    o
}

/// What a good server sends for a handshake selecting `base:allocation`.
fn handshake_transcript() -> Vec<u8> {
    let mut t = proto::NBDMAGIC.to_be_bytes().to_vec();
    t.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    t.extend_from_slice(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes());
    t.extend(option_reply(
        proto::OPT_STRUCTURED_REPLY,
        proto::REP_ACK,
        &[],
    ));
    let mut meta = 1u32.to_be_bytes().to_vec();
    meta.extend_from_slice(b"base:allocation");
    t.extend(option_reply(
        proto::OPT_SET_META_CONTEXT,
        proto::REP_META_CONTEXT,
        &meta,
    ));
    t.extend(option_reply(
        proto::OPT_SET_META_CONTEXT,
        proto::REP_ACK,
        &[],
    ));
    let mut export = vec![0, 0];
    export.extend_from_slice(&(1u64 << 30).to_be_bytes());
    export.extend_from_slice(&(proto::FLAG_HAS_FLAGS | proto::FLAG_READ_ONLY).to_be_bytes());
    t.extend(option_reply(proto::OPT_GO, proto::REP_INFO, &export));
    let mut bs = vec![0, 3];
    for v in [1u32, 4096, 32 << 20] {
        bs.extend_from_slice(&v.to_be_bytes());
    }
    t.extend(option_reply(proto::OPT_GO, proto::REP_INFO, &bs));
    t.extend(option_reply(proto::OPT_GO, proto::REP_ACK, &[]));
    t
}

proptest! {
    #![proptest_config(config())]

    /// Any reply stream ends the reader (at EOF at the latest) with every pending
    /// request answered: none waits forever.
    #[test]
    fn nbd_reply_streams_route_or_fail_every_request(frames in prop::collection::vec(frame(), 0..8)) {
        let bytes = encode_frames(&frames);
        let inflight = Arc::new(Inflight::default());
        let mut waiters = Vec::new();
        for op in [
            Op::Read { offset: 0, buf: vec![0; 4096], covered: Coverage::default() },
            Op::Read { offset: 65536, buf: vec![0; 8192], covered: Coverage::default() },
            Op::BlockStatus { chunks: Vec::new() },
            Op::Plain,
        ] {
            waiters.push(inflight.register(op).unwrap().1);
        }
        let rt = runtime();
        let (done, largest) = largest_during(|| {
            rt.block_on(async {
                tokio::time::timeout(
                    Duration::from_secs(10),
                    reader::run(&bytes[..], inflight.clone(), "fuzz".into(), 1 << 20),
                )
                .await
            })
        });
        prop_assert!(done.is_ok(), "the reader did not finish");
        for mut w in waiters {
            prop_assert!(w.try_recv().is_ok(), "a request was left waiting");
        }
        prop_assert!(largest <= MAX_METADATA_CHUNK.max(2 * bytes.len()) + SLACK, "largest allocation {largest}");
    }

    #[test]
    fn nbd_headers_and_payloads_parse_or_fail(bytes in prop::collection::vec(any::<u8>(), 0..64), kind in any::<u16>()) {
        let _ = proto::ReplyHeader::parse(&bytes);
        let _ = proto::parse_info(&bytes);
        let _ = proto::parse_meta_context(&bytes);
        let _ = proto::parse_error_chunk(kind, &bytes);
        let _ = proto::parse_error_chunk(proto::REPLY_TYPE_ERROR_OFFSET, &bytes);
        let _ = proto::parse_hole(&bytes);
        let _ = proto::parse_block_status(&bytes);
        if bytes.len() >= proto::OPTION_REPLY_HEADER_LEN {
            let head: [u8; proto::OPTION_REPLY_HEADER_LEN] = bytes[..proto::OPTION_REPLY_HEADER_LEN].try_into().unwrap();
            let _ = proto::OptionReplyHeader::parse(&head);
        }
        if let Ok((_, descriptors)) = proto::parse_block_status(&bytes) {
            let mut out = Vec::new();
            let _ = vmbackup::nbd::extents::append(&mut out, 4096, 1 << 40, &descriptors);
        }
    }

    #[test]
    fn nbd_handshakes_negotiate_or_fail(ms in mutations(), contexts in 0usize..3) {
        let transcript = apply(handshake_transcript(), &ms, false);
        let wanted: &[&str] = &["base:allocation", "qemu:dirty-bitmap:b"][..contexts.min(2)];
        let rt = runtime();
        let (done, largest) = largest_during(|| {
            rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(10), async {
                    let mut rd = &transcript[..];
                    let mut wr = tokio::io::sink();
                    handshake::negotiate(&mut rd, &mut wr, "disk", wanted).await
                })
                .await
            })
        });
        prop_assert!(done.is_ok(), "the handshake did not finish");
        prop_assert!(largest <= (1 << 20) + 2 * transcript.len() + SLACK, "largest allocation {largest}");
    }
}

// ---------------------------------------------------------------------------
// QMP.

/// Serve `blob` to the first client of a fresh socket, then close the write side.
fn qmp_server(
    blob: Vec<u8>,
) -> (
    tempfile::TempDir,
    std::path::PathBuf,
    std::thread::JoinHandle<()>,
) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.qmp");
    let listener = UnixListener::bind(&path).unwrap();
    let server = std::thread::spawn(move || {
        if let Ok((mut s, _)) = listener.accept() {
            let _ = s.write_all(&blob);
            let _ = s.shutdown(std::net::Shutdown::Write);
            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
            let mut sink = [0u8; 4096];
            while let Ok(n) = s.read(&mut sink) {
                if n == 0 {
                    break;
                }
            }
        }
    });
    (dir, path, server)
}

fn qmp_line() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}}, "capabilities": []}}"#.to_string()),
        Just(r#"{"return": {}, "id": 1}"#.to_string()),
        Just(r#"{"return": {"status": "running", "running": true}, "id": 2}"#.to_string()),
        Just(r#"{"error": {"class": "GenericError", "desc": "no"}, "id": 2}"#.to_string()),
        Just(r#"{"error": {"class": 5, "desc": []}, "id": 2}"#.to_string()),
        Just(r#"{"event": "SHUTDOWN", "data": {}, "timestamp": {"seconds": 1, "microseconds": 2}}"#.to_string()),
        Just(r#"{"event": 7}"#.to_string()),
        Just(r#"{"id": "x"}"#.to_string()),
        Just(r#"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]"#.to_string()),
        Just(r#"{"return": 1, "id": 18446744073709551615}"#.to_string()),
        ".{0,40}",
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn qmp_conversations_end_in_answers_or_errors(lines in prop::collection::vec(qmp_line(), 0..6), ms in mutations()) {
        let mut blob = lines.join("\n").into_bytes();
        blob.push(b'\n');
        let blob = apply(blob, &ms, false);
        let (_dir, path, server) = qmp_server(blob);
        let started = std::time::Instant::now();
        if let Ok(mut qmp) = Qmp::connect_with_timeout(&path, Duration::from_secs(10)) {
            let _ = qmp.execute("query-status", Value::Null);
            let _ = qmp.wait_event("SHUTDOWN", |_| true, Duration::from_millis(50));
        }
        // The server closed its side: every read ends at once, no deadline needed.
        prop_assert!(started.elapsed() < Duration::from_secs(5), "QMP client hung");
        server.join().unwrap();
    }
}

/// A monitor that never ends its line: the client gives up at its message limit
/// instead of buffering everything (the limit, 16 MiB, is far above the largest
/// real reply).
#[test]
fn a_qmp_line_that_never_ends_is_refused_at_the_message_limit() {
    const SENT: usize = 40 << 20;
    let (_dir, path, server) = qmp_server({
        let mut b = b"{\"QMP\": ".to_vec();
        b.resize(SENT, b'[');
        b
    });
    let (result, largest) =
        largest_during(|| Qmp::connect_with_timeout(&path, Duration::from_secs(30)));
    let err = result.expect_err("no greeting was sent");
    assert!(
        format!("{err:#}").contains("longer than"),
        "unexpected error: {err:#}"
    );
    assert!(
        largest <= 2 * vmbackup::platform::qmp::MAX_MESSAGE + SLACK,
        "largest allocation {largest} for a line of {SENT} bytes"
    );
    server.join().unwrap();
}
