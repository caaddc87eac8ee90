//! Secrets kept out of diagnostics: what `-v`/`-vv` print of QMP traffic and of
//! a VM's configuration goes through here first.
//!
//! QEMU carries secrets in a few known shapes: `secret` objects
//! (`-object secret,id=s0,data=...` or the same as JSON), password-like options
//! (`password=`, `passwd=`, `passphrase=`, rbd's `key=`), and credentials in
//! URLs (`https://user:pass@host/...`). Values under those names are replaced by
//! [`REDACTED`]; ids of secret objects (`key-secret=s0`) are kept, they are how
//! a reader follows the configuration.

use serde_json::Value;

/// What a secret is replaced with.
pub const REDACTED: &str = "<redacted>";

/// Option and JSON key names whose values are secrets wherever they appear.
const SECRET_KEYS: [&str; 6] = ["password", "passwd", "passphrase", "token", "key", "secret"];

fn is_secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    SECRET_KEYS.contains(&k.as_str())
}

/// A JSON value (QMP arguments or reply, a `-blockdev` JSON) with secrets
/// replaced: values of secret keys, `data` of `secret` objects, and secrets
/// inside strings (see [`text`]).
pub fn json(v: &Value) -> Value {
    match v {
        Value::Object(map) => {
            let secret_object = map
                .get("qom-type")
                .and_then(Value::as_str)
                .is_some_and(|t| t.starts_with("secret"));
            Value::Object(
                map.iter()
                    .map(|(k, v)| {
                        let hide = is_secret_key(k) || (secret_object && k == "data");
                        let v = if hide && !v.is_null() {
                            Value::String(REDACTED.into())
                        } else {
                            json(v)
                        };
                        (k.clone(), v)
                    })
                    .collect(),
            )
        }
        Value::Array(items) => Value::Array(items.iter().map(json).collect()),
        Value::String(s) => Value::String(text(s)),
        other => other.clone(),
    }
}

/// A command line with secrets replaced (each argument through [`text`]).
pub fn command_line(args: &[String]) -> Vec<String> {
    args.iter().map(|a| text(a)).collect()
}

/// One string with secrets replaced: a JSON object (`json:{...}` filenames,
/// `-object {...}`), a QEMU option list (`secret,id=s0,data=...`,
/// `driver=rbd,key=...`), and URL credentials anywhere in it.
pub fn text(s: &str) -> String {
    let body = s.strip_prefix("json:").unwrap_or(s);
    if body.starts_with('{') {
        if let Ok(v) = serde_json::from_str::<Value>(body) {
            let prefix = &s[..s.len() - body.len()];
            return format!("{prefix}{}", json(&v));
        }
    }
    let options = redact_options(s);
    redact_url_credentials(&options)
}

/// `a=b,c=d` lists: values of secret keys, and `data=` in a `secret` object.
fn redact_options(s: &str) -> String {
    if !s.contains('=') {
        return s.to_string();
    }
    let secret_object = s.starts_with("secret,")
        || s.starts_with("secret_keyring,")
        || s.contains("qom-type=secret");
    // QEMU escapes a literal comma as ",,"; keep such pairs inside one value.
    let mut parts: Vec<String> = Vec::new();
    let mut current = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                current.push_str(",,");
                continue;
            }
            parts.push(std::mem::take(&mut current));
        } else {
            current.push(c);
        }
    }
    parts.push(current);
    parts
        .into_iter()
        .map(|p| match p.split_once('=') {
            Some((k, _)) if is_secret_key(k) || (secret_object && k == "data") => {
                format!("{k}={REDACTED}")
            }
            _ => p,
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// `scheme://user:password@host` → `scheme://user:<redacted>@host`.
fn redact_url_credentials(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let end = tail.find(['/', '?', '#', ' ', '"']).unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rfind('@') {
            Some(at) => {
                let userinfo = &authority[..at];
                match userinfo.split_once(':') {
                    Some((user, _)) => out.push_str(&format!("{user}:{REDACTED}")),
                    None => out.push_str(userinfo),
                }
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json as j;

    #[test]
    fn secret_objects_and_password_options_on_command_lines() {
        let args: Vec<String> = [
            "qemu-system-x86_64",
            "-object",
            "secret,id=sec0,data=TOPSECRET",
            "-drive",
            "file=rbd:pool/img:id=admin:key=AQBx==,format=raw,password=hunter2",
            "-blockdev",
            "driver=luks,node-name=l0,key-secret=sec0,file=f0",
            "-object",
            r#"{"qom-type":"secret","id":"sec1","data":"ALSOSECRET","format":"raw"}"#,
            "-drive",
            "file=https://alice:pw123@example.com/disk.img,,x",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let out = command_line(&args).join(" ");
        for secret in ["TOPSECRET", "hunter2", "ALSOSECRET", "pw123"] {
            assert!(!out.contains(secret), "{secret} in {out}");
        }
        // Ids and the rest of the configuration stay readable.
        for kept in [
            "id=sec0",
            "key-secret=sec0",
            "\"id\":\"sec1\"",
            "alice:",
            "example.com",
            "format=raw",
            "node-name=l0",
        ] {
            assert!(out.contains(kept), "{kept} missing from {out}");
        }
        assert!(out.contains("data=<redacted>"), "{out}");
    }

    #[test]
    fn qmp_values_lose_secret_fields_and_strings() {
        let v = j!({
            "execute": "object-add",
            "arguments": {"qom-type": "secret", "id": "s0", "data": "letmein"},
            "return": [{"file": "json:{\"driver\":\"nbd\",\"password\":\"x1\"}", "node-name": "n"},
                       {"file": "nbd://u:p4ss@host:10809/exp", "password": null}]
        });
        let out = json(&v).to_string();
        for secret in ["letmein", "x1", "p4ss"] {
            assert!(!out.contains(secret), "{secret} in {out}");
        }
        assert!(
            out.contains("\"id\":\"s0\"") && out.contains("host:10809"),
            "{out}"
        );
        // Strings without secrets are untouched.
        assert_eq!(text("driver=qcow2,file=disk0"), "driver=qcow2,file=disk0");
        assert_eq!(text("/var/lib/a=b/c"), "/var/lib/a=b/c");
        assert_eq!(text("plain"), "plain");
    }
}
