//! A loopback HTTP proxy in front of the S3 gateway that removes
//! `If-None-Match` from every request, as a server that ignores the header
//! (Garage) would behave. The client signs every header it sends (SigV4), so
//! the proxy signs each request it changes again with the test identity's
//! secret; everything else is forwarded byte for byte.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use ring::{digest, hmac};

use super::seaweedfs::SECRET_KEY;

pub struct StripProxy {
    port: u16,
    stripped: Arc<AtomicUsize>,
}

impl StripProxy {
    /// Listen on a free loopback port, forwarding to `upstream` (a loopback port).
    pub fn start(upstream: u16) -> StripProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stripped = Arc::new(AtomicUsize::new(0));
        let count = stripped.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let count = count.clone();
                std::thread::spawn(move || {
                    let _ = serve(conn, upstream, &count);
                });
            }
        });
        StripProxy { port, stripped }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// How many requests carried `If-None-Match` (and lost it).
    pub fn stripped(&self) -> usize {
        self.stripped.load(Ordering::SeqCst)
    }
}

/// Serve one client connection: requests in turn, each over a fresh upstream
/// connection.
fn serve(client: TcpStream, upstream: u16, count: &AtomicUsize) -> std::io::Result<()> {
    let mut reader = BufReader::new(client.try_clone()?);
    let mut client = client;
    {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line)? == 0 {
            return Ok(());
        }
        let mut headers: Vec<(String, String)> = Vec::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line)?;
            let line = line.trim_end_matches(['\r', '\n']);
            if line.is_empty() {
                break;
            }
            let (k, v) = line.split_once(':').unwrap();
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
        let len: usize = header(&headers, "content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        reader.read_exact(&mut body)?;
        if header(&headers, "if-none-match").is_some() {
            headers.retain(|(k, _)| !k.eq_ignore_ascii_case("if-none-match"));
            resign(&request_line, &mut headers);
            count.fetch_add(1, Ordering::SeqCst);
        }
        headers.retain(|(k, _)| !k.eq_ignore_ascii_case("connection"));
        headers.push(("Connection".into(), "close".into()));
        let mut up = TcpStream::connect(("127.0.0.1", upstream))?;
        let mut head = request_line.clone();
        for (k, v) in &headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        up.write_all(head.as_bytes())?;
        up.write_all(&body)?;
        let mut response = Vec::new();
        up.read_to_end(&mut response)?;
        // The upstream said "Connection: close": so does the client's connection.
        client.write_all(&response)
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// AWS's URI encoding for canonical query strings.
fn aws_encode(s: &[u8]) -> String {
    s.iter()
        .map(|&b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// Sign the request again (SigV4, header auth) without the removed headers.
fn resign(request_line: &str, headers: &mut [(String, String)]) {
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap();
    let target = parts.next().unwrap();
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let auth = header(headers, "authorization").unwrap().to_string();
    let field = |name: &str| -> String {
        let start = auth.find(&format!("{name}=")).unwrap() + name.len() + 1;
        auth[start..].split(',').next().unwrap().trim().to_string()
    };
    let credential = field("Credential");
    let signed: Vec<String> = field("SignedHeaders")
        .split(';')
        .filter(|h| *h != "if-none-match")
        .map(String::from)
        .collect();
    let scope = credential.split_once('/').unwrap().1.to_string();
    let mut scope_parts = scope.split('/');
    let (date, region, service) = (
        scope_parts.next().unwrap(),
        scope_parts.next().unwrap(),
        scope_parts.next().unwrap(),
    );
    let mut pairs: Vec<(String, String)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (
                aws_encode(&percent_decode(k)),
                aws_encode(&percent_decode(v)),
            )
        })
        .collect();
    pairs.sort();
    let canonical_query: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let mut canonical_headers = String::new();
    for h in &signed {
        let v = header(headers, h).unwrap_or("");
        canonical_headers.push_str(&format!("{h}:{}\n", v.trim()));
    }
    let payload = header(headers, "x-amz-content-sha256").unwrap().to_string();
    let canonical = format!(
        "{method}\n{path}\n{}\n{canonical_headers}\n{}\n{payload}",
        canonical_query.join("&"),
        signed.join(";")
    );
    let amz_date = header(headers, "x-amz-date").unwrap().to_string();
    let to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        hex(digest::digest(&digest::SHA256, canonical.as_bytes()).as_ref())
    );
    let mut key = format!("AWS4{SECRET_KEY}").into_bytes();
    for part in [date, region, service, "aws4_request"] {
        key = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &key), part.as_bytes())
            .as_ref()
            .to_vec();
    }
    let signature =
        hex(hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &key), to_sign.as_bytes()).as_ref());
    let new_auth = format!(
        "AWS4-HMAC-SHA256 Credential={credential}, SignedHeaders={}, Signature={signature}",
        signed.join(";")
    );
    for (k, v) in headers.iter_mut() {
        if k.eq_ignore_ascii_case("authorization") {
            *v = new_auth.clone();
        }
    }
}
