//! NBD wire format: constants, fixed-size headers and their encoding/parsing.
//!
//! No I/O here. Everything is big-endian ("network byte order") as the protocol
//! says. Parsers take byte slices and either return the value and how many bytes
//! it used, `None` when the slice does not yet hold a whole header, or an error
//! when the bytes cannot be a valid frame (bad magic, short payload).
//!
//! Names follow the NBD protocol document (`doc/proto.md` of the reference
//! implementation) with the `NBD_` prefix dropped.

use anyhow::{bail, ensure, Result};

/// "NBDMAGIC": first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle negotiation magic; also prefixes every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Oldstyle negotiation magic (follows NBDMAGIC on ancient servers; unsupported).
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Prefix of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server, 16 bits) and client flags (32 bits).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_FLAG_ERROR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;

// Information types (NBD_OPT_GO / NBD_REP_INFO).
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Bytes of an option request header (`IHAVEOPT`, option, length).
pub const OPTION_HEADER_LEN: usize = 16;

// Transmission flags.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const FLAG_SEND_CACHE: u16 = 1 << 10;

// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
/// `NBD_CMD_FLAG_DF`: reply to a read in one data chunk (no holes, no fragments).
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// `NBD_CMD_FLAG_REQ_ONE`: block status with one extent per context.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

// Structured reply flags and chunk types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_FLAG_ERROR: u16 = 1 << 15;
pub const REPLY_TYPE_ERROR: u16 = REPLY_TYPE_FLAG_ERROR | 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_FLAG_ERROR | 2;

/// Bytes of a transmission request header.
pub const REQUEST_LEN: usize = 28;
/// Bytes of an option reply header.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
pub const SIMPLE_REPLY_LEN: usize = 16;
pub const STRUCTURED_REPLY_LEN: usize = 20;

/// Block size limits when the server advertises none (protocol defaults).
pub const DEFAULT_MIN_BLOCK: u32 = 1;
pub const DEFAULT_PREFERRED_BLOCK: u32 = 4096;
pub const DEFAULT_MAX_BLOCK: u32 = 32 * 1024 * 1024;

/// An option request: `IHAVEOPT`, option, data length, data.
pub fn encode_option(option: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + data.len());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// Data of `NBD_OPT_GO`: export name, then the information types requested.
pub fn go_data(export: &str, infos: &[u16]) -> Vec<u8> {
    let mut out = Vec::with_capacity(6 + export.len() + 2 * infos.len());
    put_string32(&mut out, export);
    out.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for info in infos {
        out.extend_from_slice(&info.to_be_bytes());
    }
    out
}

/// Data of `NBD_OPT_SET_META_CONTEXT` / `NBD_OPT_LIST_META_CONTEXT`: export name,
/// number of queries, each query as a length-prefixed string.
pub fn meta_context_data(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut out = Vec::new();
    put_string32(&mut out, export);
    out.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        put_string32(&mut out, q);
    }
    out
}

fn put_string32(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Header of one option reply; `length` bytes of data follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply: u32,
    pub length: u32,
}

impl OptionReplyHeader {
    pub fn parse(buf: &[u8; OPTION_REPLY_HEADER_LEN]) -> Result<OptionReplyHeader> {
        let magic = be_u64(&buf[0..8]);
        ensure!(
            magic == OPTION_REPLY_MAGIC,
            "bad option reply magic {magic:#018x}"
        );
        Ok(OptionReplyHeader {
            option: be_u32(&buf[8..12]),
            reply: be_u32(&buf[12..16]),
            length: be_u32(&buf[16..20]),
        })
    }
}

/// One `NBD_REP_INFO` payload the client cares about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Info {
    Export {
        size: u64,
        flags: u16,
    },
    BlockSize {
        min: u32,
        preferred: u32,
        max: u32,
    },
    /// An information type this client does not use (names, descriptions).
    Other(u16),
}

pub fn parse_info(data: &[u8]) -> Result<Info> {
    ensure!(data.len() >= 2, "NBD_REP_INFO of {} bytes", data.len());
    let kind = be_u16(&data[0..2]);
    match kind {
        INFO_EXPORT => {
            ensure!(data.len() == 12, "NBD_INFO_EXPORT of {} bytes", data.len());
            Ok(Info::Export {
                size: be_u64(&data[2..10]),
                flags: be_u16(&data[10..12]),
            })
        }
        INFO_BLOCK_SIZE => {
            ensure!(
                data.len() == 14,
                "NBD_INFO_BLOCK_SIZE of {} bytes",
                data.len()
            );
            Ok(Info::BlockSize {
                min: be_u32(&data[2..6]),
                preferred: be_u32(&data[6..10]),
                max: be_u32(&data[10..14]),
            })
        }
        other => Ok(Info::Other(other)),
    }
}

/// `NBD_REP_META_CONTEXT` payload: context id and name.
pub fn parse_meta_context(data: &[u8]) -> Result<(u32, String)> {
    ensure!(
        data.len() >= 4,
        "NBD_REP_META_CONTEXT of {} bytes",
        data.len()
    );
    let name = String::from_utf8(data[4..].to_vec())
        .map_err(|_| anyhow::anyhow!("NBD_REP_META_CONTEXT name is not UTF-8"))?;
    Ok((be_u32(&data[0..4]), name))
}

/// Name of an option, for messages.
pub fn option_name(option: u32) -> String {
    match option {
        OPT_EXPORT_NAME => "NBD_OPT_EXPORT_NAME".into(),
        OPT_ABORT => "NBD_OPT_ABORT".into(),
        OPT_LIST => "NBD_OPT_LIST".into(),
        OPT_STARTTLS => "NBD_OPT_STARTTLS".into(),
        OPT_INFO => "NBD_OPT_INFO".into(),
        OPT_GO => "NBD_OPT_GO".into(),
        OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY".into(),
        OPT_LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT".into(),
        OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT".into(),
        other => format!("option {other}"),
    }
}

/// What an option error reply means, for messages.
pub fn option_error_name(reply: u32) -> String {
    match reply {
        REP_ERR_UNSUP => "not supported by the server (NBD_REP_ERR_UNSUP)".into(),
        REP_ERR_POLICY => "forbidden by server policy (NBD_REP_ERR_POLICY)".into(),
        REP_ERR_INVALID => "invalid (NBD_REP_ERR_INVALID)".into(),
        REP_ERR_PLATFORM => "not supported on the server's platform (NBD_REP_ERR_PLATFORM)".into(),
        REP_ERR_TLS_REQD => "server requires TLS (NBD_REP_ERR_TLS_REQD)".into(),
        REP_ERR_UNKNOWN => "export not found (NBD_REP_ERR_UNKNOWN)".into(),
        REP_ERR_SHUTDOWN => "server is shutting down (NBD_REP_ERR_SHUTDOWN)".into(),
        REP_ERR_BLOCK_SIZE_REQD => {
            "server requires block size negotiation (NBD_REP_ERR_BLOCK_SIZE_REQD)".into()
        }
        REP_ERR_TOO_BIG => "request too big (NBD_REP_ERR_TOO_BIG)".into(),
        other => format!("error reply {other:#x}"),
    }
}

/// A transmission request header (the write payload, if any, follows it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl Request {
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut out = [0u8; REQUEST_LEN];
        out[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.command.to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..28].copy_from_slice(&self.length.to_be_bytes());
        out
    }
}

/// The header of a reply in the transmission phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// Simple reply; for a successful read, the data follows.
    Simple { error: u32, cookie: u64 },
    /// One chunk of a structured reply; `length` bytes of payload follow.
    Structured {
        flags: u16,
        kind: u16,
        cookie: u64,
        length: u32,
    },
}

impl ReplyHeader {
    pub fn cookie(&self) -> u64 {
        match *self {
            ReplyHeader::Simple { cookie, .. } | ReplyHeader::Structured { cookie, .. } => cookie,
        }
    }

    /// Parse a reply header at the start of `buf`: `Ok(None)` when more bytes are
    /// needed, else the header and the number of bytes it took.
    pub fn parse(buf: &[u8]) -> Result<Option<(ReplyHeader, usize)>> {
        if buf.len() < 4 {
            return Ok(None);
        }
        match be_u32(&buf[0..4]) {
            SIMPLE_REPLY_MAGIC => {
                if buf.len() < SIMPLE_REPLY_LEN {
                    return Ok(None);
                }
                let header = ReplyHeader::Simple {
                    error: be_u32(&buf[4..8]),
                    cookie: be_u64(&buf[8..16]),
                };
                Ok(Some((header, SIMPLE_REPLY_LEN)))
            }
            STRUCTURED_REPLY_MAGIC => {
                if buf.len() < STRUCTURED_REPLY_LEN {
                    return Ok(None);
                }
                let header = ReplyHeader::Structured {
                    flags: be_u16(&buf[4..6]),
                    kind: be_u16(&buf[6..8]),
                    cookie: be_u64(&buf[8..16]),
                    length: be_u32(&buf[16..20]),
                };
                Ok(Some((header, STRUCTURED_REPLY_LEN)))
            }
            other => bail!("bad reply magic {other:#010x}"),
        }
    }
}

/// An `NBD_REPLY_TYPE_ERROR` / `ERROR_OFFSET` chunk (or an unknown error type).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkError {
    pub errno: u32,
    pub message: String,
    pub offset: Option<u64>,
}

impl std::fmt::Display for ChunkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "server error {}", errno_name(self.errno))?;
        if let Some(offset) = self.offset {
            write!(f, " at offset {offset}")?;
        }
        if !self.message.is_empty() {
            write!(f, ": {}", self.message)?;
        }
        Ok(())
    }
}

pub fn parse_error_chunk(kind: u16, payload: &[u8]) -> Result<ChunkError> {
    ensure!(payload.len() >= 6, "error chunk of {} bytes", payload.len());
    let errno = be_u32(&payload[0..4]);
    let msg_len = be_u16(&payload[4..6]) as usize;
    ensure!(
        payload.len() >= 6 + msg_len,
        "error chunk message of {msg_len} bytes in a {}-byte payload",
        payload.len()
    );
    let message = String::from_utf8_lossy(&payload[6..6 + msg_len]).into_owned();
    let rest = &payload[6 + msg_len..];
    let offset = if kind == REPLY_TYPE_ERROR_OFFSET {
        ensure!(rest.len() == 8, "ERROR_OFFSET chunk without an offset");
        Some(be_u64(rest))
    } else {
        None
    };
    Ok(ChunkError {
        errno,
        message,
        offset,
    })
}

/// `NBD_REPLY_TYPE_OFFSET_HOLE` payload: offset and length of the hole.
pub fn parse_hole(payload: &[u8]) -> Result<(u64, u32)> {
    ensure!(
        payload.len() == 12,
        "OFFSET_HOLE chunk of {} bytes",
        payload.len()
    );
    Ok((be_u64(&payload[0..8]), be_u32(&payload[8..12])))
}

/// `NBD_REPLY_TYPE_BLOCK_STATUS` payload: context id and (length, flags) pairs.
pub fn parse_block_status(payload: &[u8]) -> Result<(u32, Vec<(u32, u32)>)> {
    ensure!(
        payload.len() >= 4 && (payload.len() - 4) % 8 == 0,
        "BLOCK_STATUS chunk of {} bytes",
        payload.len()
    );
    let context = be_u32(&payload[0..4]);
    let descriptors = payload[4..]
        .chunks_exact(8)
        .map(|d| (be_u32(&d[0..4]), be_u32(&d[4..8])))
        .collect();
    Ok((context, descriptors))
}

/// `NBD_E*` error values as names with their meaning.
pub fn errno_name(errno: u32) -> String {
    let name = match errno {
        1 => "EPERM (operation not permitted)",
        5 => "EIO (input/output error)",
        12 => "ENOMEM (out of memory)",
        22 => "EINVAL (invalid argument)",
        28 => "ENOSPC (no space left)",
        75 => "EOVERFLOW (value too large)",
        95 => "ENOTSUP (not supported)",
        108 => "ESHUTDOWN (server is shutting down)",
        other => return format!("errno {other}"),
    };
    name.to_string()
}

// ---- Server side: what `super::server` sends and parses. ----

/// `NBD_E*` error values a server sends.
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// The fixed newstyle greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub fn encode_greeting(flags: u16) -> [u8; 18] {
    let mut out = [0u8; 18];
    out[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..18].copy_from_slice(&flags.to_be_bytes());
    out
}

/// Parse an option request header: its option and data length.
pub fn parse_option_header(buf: &[u8; OPTION_HEADER_LEN]) -> Result<(u32, u32)> {
    let magic = be_u64(&buf[0..8]);
    ensure!(magic == IHAVEOPT, "bad option request magic {magic:#018x}");
    Ok((be_u32(&buf[8..12]), be_u32(&buf[12..16])))
}

/// An option reply: magic, option, reply type, data length, data.
pub fn encode_option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(OPTION_REPLY_HEADER_LEN + data.len());
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// `NBD_INFO_EXPORT` payload: size and transmission flags.
pub fn info_export_data(size: u64, flags: u16) -> Vec<u8> {
    let mut out = INFO_EXPORT.to_be_bytes().to_vec();
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out
}

/// `NBD_INFO_BLOCK_SIZE` payload.
pub fn info_block_size_data(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut out = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for v in [min, preferred, max] {
        out.extend_from_slice(&v.to_be_bytes());
    }
    out
}

/// `NBD_INFO_NAME` / `NBD_INFO_DESCRIPTION` payload: the type, then the text.
pub fn info_text_data(kind: u16, text: &str) -> Vec<u8> {
    let mut out = kind.to_be_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    out
}

/// `NBD_REP_SERVER` payload: one export name (and no description).
pub fn server_reply_data(name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + name.len());
    put_string32(&mut out, name);
    out
}

/// `NBD_REP_META_CONTEXT` payload: context id and name.
pub fn meta_context_reply_data(id: u32, name: &str) -> Vec<u8> {
    let mut out = id.to_be_bytes().to_vec();
    out.extend_from_slice(name.as_bytes());
    out
}

/// Reply to `NBD_OPT_EXPORT_NAME`: size, transmission flags, and 124 zero bytes
/// unless the client asked for none.
pub fn export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut out = size.to_be_bytes().to_vec();
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
    out
}

/// A length-prefixed (u32) UTF-8 string at the start of `data`, and the rest.
fn take_string32(data: &[u8]) -> Result<(String, &[u8])> {
    ensure!(data.len() >= 4, "truncated string length");
    let len = be_u32(&data[0..4]) as usize;
    ensure!(
        data.len() - 4 >= len,
        "string of {len} bytes in {} bytes",
        data.len() - 4
    );
    let text = std::str::from_utf8(&data[4..4 + len])
        .map_err(|_| anyhow::anyhow!("string is not UTF-8"))?;
    Ok((text.to_string(), &data[4 + len..]))
}

/// Data of `NBD_OPT_GO` / `NBD_OPT_INFO`: export name and requested info types.
pub fn parse_go_data(data: &[u8]) -> Result<(String, Vec<u16>)> {
    let (export, rest) = take_string32(data)?;
    ensure!(rest.len() >= 2, "no information request count");
    let n = be_u16(&rest[0..2]) as usize;
    ensure!(
        rest.len() == 2 + 2 * n,
        "{n} information requests in {} bytes",
        rest.len() - 2
    );
    let infos = rest[2..].chunks_exact(2).map(be_u16).collect();
    Ok((export, infos))
}

/// Data of `NBD_OPT_SET_META_CONTEXT` / `LIST_META_CONTEXT`: export and queries.
pub fn parse_meta_context_data(data: &[u8]) -> Result<(String, Vec<String>)> {
    let (export, rest) = take_string32(data)?;
    ensure!(rest.len() >= 4, "no query count");
    let n = be_u32(&rest[0..4]) as usize;
    let mut rest = &rest[4..];
    let mut queries = Vec::new();
    for _ in 0..n {
        let (q, more) = take_string32(rest)?;
        queries.push(q);
        rest = more;
    }
    ensure!(rest.is_empty(), "{} bytes after the last query", rest.len());
    Ok((export, queries))
}

impl Request {
    /// Parse a transmission request header (a write's payload follows it).
    pub fn parse(buf: &[u8; REQUEST_LEN]) -> Result<Request> {
        let magic = be_u32(&buf[0..4]);
        ensure!(magic == REQUEST_MAGIC, "bad request magic {magic:#010x}");
        Ok(Request {
            flags: be_u16(&buf[4..6]),
            command: be_u16(&buf[6..8]),
            cookie: be_u64(&buf[8..16]),
            offset: be_u64(&buf[16..24]),
            length: be_u32(&buf[24..28]),
        })
    }
}

/// A simple reply header (a successful read's data follows it).
pub fn encode_simple_reply(error: u32, cookie: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut out = [0u8; SIMPLE_REPLY_LEN];
    out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out
}

/// The header of one structured reply chunk; `length` bytes of payload follow.
pub fn encode_chunk_header(
    flags: u16,
    kind: u16,
    cookie: u64,
    length: u32,
) -> [u8; STRUCTURED_REPLY_LEN] {
    let mut out = [0u8; STRUCTURED_REPLY_LEN];
    out[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&kind.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out[16..20].copy_from_slice(&length.to_be_bytes());
    out
}

/// `NBD_REPLY_TYPE_OFFSET_HOLE` payload.
pub fn hole_payload(offset: u64, length: u32) -> [u8; 12] {
    let mut out = [0u8; 12];
    out[0..8].copy_from_slice(&offset.to_be_bytes());
    out[8..12].copy_from_slice(&length.to_be_bytes());
    out
}

/// `NBD_REPLY_TYPE_BLOCK_STATUS` payload: context id, then (length, flags) pairs.
pub fn block_status_payload(context: u32, descriptors: &[(u32, u32)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + 8 * descriptors.len());
    out.extend_from_slice(&context.to_be_bytes());
    for (length, flags) in descriptors {
        out.extend_from_slice(&length.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
    }
    out
}

/// `NBD_REPLY_TYPE_ERROR` payload: errno and a message (cut to fit u16).
pub fn error_payload(errno: u32, message: &str) -> Vec<u8> {
    let mut msg = message.as_bytes();
    if msg.len() > 4096 {
        msg = &msg[..4096];
    }
    let mut out = errno.to_be_bytes().to_vec();
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
    out
}

pub fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

pub fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

pub fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[0..8]);
    u64::from_be_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_encodes_big_endian_in_protocol_order() {
        let r = Request {
            flags: 0x0102,
            command: CMD_BLOCK_STATUS,
            cookie: 0x1122_3344_5566_7788,
            offset: 0x0000_0001_0000_0000,
            length: 0x0020_0000,
        };
        let bytes = r.encode();
        assert_eq!(
            bytes.to_vec(),
            [
                vec![0x25, 0x60, 0x95, 0x13, 0x01, 0x02, 0x00, 0x07],
                vec![0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88],
                vec![0, 0, 0, 1, 0, 0, 0, 0],
                vec![0x00, 0x20, 0x00, 0x00],
            ]
            .concat()
        );
    }

    #[test]
    fn option_request_and_go_data() {
        let data = go_data("disk", &[INFO_BLOCK_SIZE]);
        assert_eq!(data, [&[0, 0, 0, 4][..], b"disk", &[0, 1, 0, 3]].concat());
        let opt = encode_option(OPT_GO, &data);
        assert_eq!(&opt[0..8], b"IHAVEOPT");
        assert_eq!(be_u32(&opt[8..12]), OPT_GO);
        assert_eq!(be_u32(&opt[12..16]) as usize, data.len());
        assert_eq!(&opt[16..], &data[..]);
        assert_eq!(NBDMAGIC.to_be_bytes(), *b"NBDMAGIC");
    }

    #[test]
    fn meta_context_data_lists_export_and_queries() {
        let data = meta_context_data("d", &["base:allocation", "qemu:dirty-bitmap:b0"]);
        let mut want = vec![0, 0, 0, 1, b'd', 0, 0, 0, 2, 0, 0, 0, 15];
        want.extend_from_slice(b"base:allocation");
        want.extend_from_slice(&[0, 0, 0, 20]);
        want.extend_from_slice(b"qemu:dirty-bitmap:b0");
        assert_eq!(data, want);
    }

    #[test]
    fn option_reply_header_checks_magic() {
        let mut buf = [0u8; OPTION_REPLY_HEADER_LEN];
        buf[0..8].copy_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        buf[8..12].copy_from_slice(&OPT_GO.to_be_bytes());
        buf[12..16].copy_from_slice(&REP_ERR_UNKNOWN.to_be_bytes());
        buf[16..20].copy_from_slice(&7u32.to_be_bytes());
        let h = OptionReplyHeader::parse(&buf).unwrap();
        assert_eq!(
            h,
            OptionReplyHeader {
                option: OPT_GO,
                reply: REP_ERR_UNKNOWN,
                length: 7
            }
        );
        buf[0] = 0xff;
        assert!(OptionReplyHeader::parse(&buf).is_err());
    }

    #[test]
    fn info_replies_parse() {
        let mut export = vec![0, 0];
        export.extend_from_slice(&(1u64 << 30).to_be_bytes());
        export.extend_from_slice(&(FLAG_HAS_FLAGS | FLAG_READ_ONLY).to_be_bytes());
        assert_eq!(
            parse_info(&export).unwrap(),
            Info::Export {
                size: 1 << 30,
                flags: 3
            }
        );
        let mut bs = vec![0, 3];
        for v in [1u32, 4096, 32 << 20] {
            bs.extend_from_slice(&v.to_be_bytes());
        }
        assert_eq!(
            parse_info(&bs).unwrap(),
            Info::BlockSize {
                min: 1,
                preferred: 4096,
                max: 32 << 20
            }
        );
        assert_eq!(parse_info(&[0, 1, b'x']).unwrap(), Info::Other(1));
        assert!(parse_info(&export[..11]).is_err());
        assert!(parse_info(&[0]).is_err());
    }

    #[test]
    fn meta_context_reply_parses() {
        let mut d = 7u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"base:allocation");
        assert_eq!(
            parse_meta_context(&d).unwrap(),
            (7, "base:allocation".to_string())
        );
        assert!(parse_meta_context(&[0, 0]).is_err());
    }

    #[test]
    fn reply_headers_need_whole_frames() {
        let mut simple = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
        simple.extend_from_slice(&5u32.to_be_bytes());
        simple.extend_from_slice(&42u64.to_be_bytes());
        for cut in 0..simple.len() {
            assert_eq!(ReplyHeader::parse(&simple[..cut]).unwrap(), None);
        }
        simple.push(0xaa); // the next frame's first byte is not consumed
        assert_eq!(
            ReplyHeader::parse(&simple).unwrap(),
            Some((
                ReplyHeader::Simple {
                    error: 5,
                    cookie: 42
                },
                16
            ))
        );

        let mut chunk = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
        chunk.extend_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
        chunk.extend_from_slice(&REPLY_TYPE_OFFSET_DATA.to_be_bytes());
        chunk.extend_from_slice(&9u64.to_be_bytes());
        chunk.extend_from_slice(&4104u32.to_be_bytes());
        assert_eq!(ReplyHeader::parse(&chunk[..19]).unwrap(), None);
        let (h, used) = ReplyHeader::parse(&chunk).unwrap().unwrap();
        assert_eq!(used, 20);
        assert_eq!(h.cookie(), 9);
        assert_eq!(
            h,
            ReplyHeader::Structured {
                flags: REPLY_FLAG_DONE,
                kind: REPLY_TYPE_OFFSET_DATA,
                cookie: 9,
                length: 4104
            }
        );

        let err = ReplyHeader::parse(&[0xde, 0xad, 0xbe, 0xef]).unwrap_err();
        assert!(err.to_string().contains("0xdeadbeef"), "{err}");
    }

    #[test]
    fn error_chunks_parse_with_and_without_offset() {
        let mut p = 5u32.to_be_bytes().to_vec();
        p.extend_from_slice(&3u16.to_be_bytes());
        p.extend_from_slice(b"bad");
        let e = parse_error_chunk(REPLY_TYPE_ERROR, &p).unwrap();
        assert_eq!(e.offset, None);
        assert_eq!(e.to_string(), "server error EIO (input/output error): bad");
        p.extend_from_slice(&65536u64.to_be_bytes());
        let e = parse_error_chunk(REPLY_TYPE_ERROR_OFFSET, &p).unwrap();
        assert_eq!(e.offset, Some(65536));
        assert_eq!(
            e.to_string(),
            "server error EIO (input/output error) at offset 65536: bad"
        );
        assert!(parse_error_chunk(REPLY_TYPE_ERROR_OFFSET, &p[..9]).is_err());
        assert!(parse_error_chunk(REPLY_TYPE_ERROR, &p[..3]).is_err());
    }

    #[test]
    fn hole_and_block_status_payloads() {
        let mut h = 4096u64.to_be_bytes().to_vec();
        h.extend_from_slice(&512u32.to_be_bytes());
        assert_eq!(parse_hole(&h).unwrap(), (4096, 512));
        assert!(parse_hole(&h[..11]).is_err());

        let mut bs = 2u32.to_be_bytes().to_vec();
        for (len, flags) in [(65536u32, 0u32), (131072, 3)] {
            bs.extend_from_slice(&len.to_be_bytes());
            bs.extend_from_slice(&flags.to_be_bytes());
        }
        assert_eq!(
            parse_block_status(&bs).unwrap(),
            (2, vec![(65536, 0), (131072, 3)])
        );
        assert!(parse_block_status(&bs[..9]).is_err());
        assert!(parse_block_status(&bs[..3]).is_err());
    }

    #[test]
    fn server_encoders_round_trip_through_the_client_parsers() {
        let go = go_data("vda", &[INFO_BLOCK_SIZE, INFO_NAME]);
        assert_eq!(
            parse_go_data(&go).unwrap(),
            ("vda".to_string(), vec![INFO_BLOCK_SIZE, INFO_NAME])
        );
        assert!(parse_go_data(&go[..go.len() - 1]).is_err());
        let meta = meta_context_data("vda", &["base:allocation", "base:"]);
        assert_eq!(
            parse_meta_context_data(&meta).unwrap(),
            (
                "vda".to_string(),
                vec!["base:allocation".to_string(), "base:".to_string()]
            )
        );
        assert!(parse_meta_context_data(&meta[..meta.len() - 1]).is_err());
        let opt = encode_option(OPT_GO, &go);
        let mut head = [0u8; OPTION_HEADER_LEN];
        head.copy_from_slice(&opt[..OPTION_HEADER_LEN]);
        assert_eq!(
            parse_option_header(&head).unwrap(),
            (OPT_GO, go.len() as u32)
        );

        let reply = encode_option_reply(OPT_GO, REP_INFO, &info_export_data(1 << 20, 3));
        let mut rh = [0u8; OPTION_REPLY_HEADER_LEN];
        rh.copy_from_slice(&reply[..OPTION_REPLY_HEADER_LEN]);
        let h = OptionReplyHeader::parse(&rh).unwrap();
        assert_eq!((h.option, h.reply, h.length), (OPT_GO, REP_INFO, 12));
        assert_eq!(
            parse_info(&reply[OPTION_REPLY_HEADER_LEN..]).unwrap(),
            Info::Export {
                size: 1 << 20,
                flags: 3
            }
        );
        assert_eq!(
            parse_info(&info_block_size_data(1, 4096, 1 << 25)).unwrap(),
            Info::BlockSize {
                min: 1,
                preferred: 4096,
                max: 1 << 25
            }
        );
        assert_eq!(
            parse_meta_context(&meta_context_reply_data(1, "base:allocation")).unwrap(),
            (1, "base:allocation".to_string())
        );

        let req = Request {
            flags: CMD_FLAG_DF,
            command: CMD_READ,
            cookie: 9,
            offset: 4096,
            length: 512,
        };
        assert_eq!(Request::parse(&req.encode()).unwrap(), req);
        let (h, used) = ReplyHeader::parse(&encode_simple_reply(EPERM, 9))
            .unwrap()
            .unwrap();
        assert_eq!(
            (h, used),
            (
                ReplyHeader::Simple {
                    error: EPERM,
                    cookie: 9
                },
                SIMPLE_REPLY_LEN
            )
        );
        let (h, _) = ReplyHeader::parse(&encode_chunk_header(
            REPLY_FLAG_DONE,
            REPLY_TYPE_OFFSET_HOLE,
            9,
            12,
        ))
        .unwrap()
        .unwrap();
        assert_eq!(
            h,
            ReplyHeader::Structured {
                flags: REPLY_FLAG_DONE,
                kind: REPLY_TYPE_OFFSET_HOLE,
                cookie: 9,
                length: 12
            }
        );
        assert_eq!(parse_hole(&hole_payload(4096, 512)).unwrap(), (4096, 512));
        assert_eq!(
            parse_block_status(&block_status_payload(1, &[(4096, 3)])).unwrap(),
            (1, vec![(4096, 3)])
        );
        let e = parse_error_chunk(REPLY_TYPE_ERROR, &error_payload(EIO, "bad chunk")).unwrap();
        assert_eq!((e.errno, e.message.as_str()), (EIO, "bad chunk"));
    }
}
