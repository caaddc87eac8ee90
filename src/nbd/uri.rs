//! NBD URIs (the form qemu-img, qemu-io and nbdinfo accept):
//! `nbd://HOST[:PORT]/EXPORT` (TCP, port 10809 by default) and
//! `nbd+unix:///EXPORT?socket=PATH`. TLS schemes (`nbds`, `nbds+unix`) are
//! recognised and refused. Percent escapes are decoded in the export and socket.

use std::path::PathBuf;

use anyhow::Result;

use crate::error::invalid;
use crate::platform::NbdAddr;

/// The IANA port of NBD.
pub const DEFAULT_PORT: u16 = 10809;

const FORMS: &str = "expected nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH";

/// Split an NBD URI into the server address and the export name.
pub fn parse_uri(uri: &str) -> Result<(NbdAddr, String)> {
    let bad = |why: &str| invalid("NBD URI", uri, format!("{why}; {FORMS}"));
    let (scheme, rest) = uri.split_once("://").ok_or_else(|| bad("no scheme"))?;
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let export =
        decode(path.strip_prefix('/').unwrap_or(path)).ok_or_else(|| bad("bad % escape"))?;
    let mut socket = None;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if key == "socket" {
            socket = Some(decode(value).ok_or_else(|| bad("bad % escape"))?);
        }
    }
    match scheme {
        "nbd" | "nbd+tcp" => {
            if socket.is_some() {
                return Err(bad("socket= needs the nbd+unix scheme"));
            }
            let (host, port) = host_port(authority).ok_or_else(|| bad("bad host or port"))?;
            Ok((NbdAddr::Tcp { host, port }, export))
        }
        "nbd+unix" => {
            if !authority.is_empty() {
                return Err(bad("nbd+unix takes no host"));
            }
            let path = socket
                .filter(|s| !s.is_empty())
                .ok_or_else(|| bad("missing ?socket=PATH"))?;
            Ok((
                NbdAddr::Unix {
                    path: PathBuf::from(path),
                },
                export,
            ))
        }
        "nbds" | "nbds+tcp" | "nbds+unix" => Err(bad("TLS is not supported")),
        _ => Err(bad("unknown scheme")),
    }
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`.
fn host_port(authority: &str) -> Option<(String, u16)> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        match after {
            "" => (host, None),
            _ => (host, Some(after.strip_prefix(':')?)),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return None;
    }
    let port = match port {
        Some(p) => p.parse().ok()?,
        None => DEFAULT_PORT,
    };
    Some((host.to_string(), port))
}

fn decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{exit_code_of, ExitCode};

    #[test]
    fn unix_uris() {
        let (addr, export) = parse_uri("nbd+unix:///guest-disk0?socket=/run/vm/nbd.sock").unwrap();
        assert_eq!(
            addr,
            NbdAddr::Unix {
                path: "/run/vm/nbd.sock".into()
            }
        );
        assert_eq!(export, "guest-disk0");
        let (addr, export) = parse_uri("nbd+unix://?socket=/tmp/a%20b.sock").unwrap();
        assert_eq!(
            addr,
            NbdAddr::Unix {
                path: "/tmp/a b.sock".into()
            }
        );
        assert_eq!(export, "");
    }

    #[test]
    fn tcp_uris() {
        let tcp = |h: &str, p| NbdAddr::Tcp {
            host: h.into(),
            port: p,
        };
        assert_eq!(
            parse_uri("nbd://127.0.0.1:10810/disk").unwrap(),
            (tcp("127.0.0.1", 10810), "disk".into())
        );
        assert_eq!(
            parse_uri("nbd://host/a%2Fb").unwrap(),
            (tcp("host", 10809), "a/b".into())
        );
        assert_eq!(
            parse_uri("nbd://[::1]:1234/x").unwrap(),
            (tcp("::1", 1234), "x".into())
        );
        assert_eq!(
            parse_uri("nbd://[::1]").unwrap(),
            (tcp("::1", 10809), "".into())
        );
    }

    #[test]
    fn bad_uris_are_usage_errors_naming_the_uri() {
        for uri in [
            "nbd+unix:///disk",
            "nbd://:99/disk",
            "nbd://host:notaport/disk",
            "nbds://host/disk",
            "http://host/disk",
            "/just/a/path",
            "nbd://host/%zz",
            "nbd://host/d?socket=/x",
        ] {
            let e = parse_uri(uri).unwrap_err();
            assert_eq!(exit_code_of(&e), ExitCode::Usage, "{uri}");
            assert!(e.to_string().contains(uri), "{e}");
        }
    }
}
