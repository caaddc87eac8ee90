//! Secrets out of what vmbackup keeps about a VM (issue 8).
//!
//! A VM's configuration goes into every point's manifest, and with it the
//! hypervisor's command line, which may carry secrets: `-object
//! secret,id=sec0,data=...`, `password=`, keys and tokens. Every option keeps its
//! key, but the value of a key containing `data`, `password`, `passwd`, `secret`,
//! `key` or `token` becomes [`REDACTED`], except a reference to a secret object
//! by id (`password-secret=sec0`, `key-secret=`, `keyid=`), which names no secret.
//! Both option syntaxes are understood: `k=v,k=v` (`,,` is an escaped comma) and
//! JSON objects (`{"qom-type":"secret","data":...}`, any depth).
//!
//! Redaction happens when the configuration is captured, so nothing downstream
//! (manifest, task log, debug output, JSON) ever holds the value;
//! `vmbackup cleanup --redact` applies it to manifests written before.
//!
//! What `-v` prints of QMP traffic goes through [`for_log`]: the same rules on
//! every JSON object and every string in it (QEMU reports some options as
//! `json:{...}` file names), and credentials in URLs (`nbd://user:pw@host`).

use serde_json::Value;

/// What a secret value is replaced with.
pub const REDACTED: &str = "<redacted>";

/// Words that make an option key's value a secret.
const SECRET_WORDS: [&str; 6] = ["data", "password", "passwd", "secret", "key", "token"];

/// Whether the value of option `key` is a secret (see the module docs).
pub fn is_secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    let reference = k.ends_with("-secret") || k.ends_with("id");
    SECRET_WORDS.iter().any(|w| k.contains(w)) && !reference
}

/// A command line with every secret value redacted.
pub fn redact_args(args: &[String]) -> Vec<String> {
    args.iter().map(|a| redact_arg(a)).collect()
}

/// One argument with its secret values redacted: a JSON object (also as a
/// `json:{...}` file name), or `k=v` items; credentials in URLs too.
pub fn redact_arg(arg: &str) -> String {
    let body = arg.strip_prefix("json:").unwrap_or(arg);
    if body.trim_start().starts_with('{') {
        if let Ok(mut v) = serde_json::from_str::<Value>(body) {
            redact_json(&mut v);
            return format!("{}{v}", &arg[..arg.len() - body.len()]);
        }
    }
    let items = split_items(arg)
        .into_iter()
        .map(|item| match item.split_once('=') {
            Some((k, _)) if is_secret_key(k) => format!("{k}={REDACTED}"),
            _ => item,
        })
        .collect::<Vec<_>>()
        .join(",");
    redact_url_credentials(&items)
}

/// A copy of a JSON value (a QMP command or reply) fit for a log: secret keys'
/// values and every string through [`redact_arg`].
pub fn for_log(v: &Value) -> Value {
    let mut v = v.clone();
    redact_json(&mut v);
    redact_strings(&mut v);
    v
}

fn redact_strings(v: &mut Value) {
    match v {
        Value::String(s) => {
            let r = redact_arg(s);
            if r != *s {
                *s = r;
            }
        }
        Value::Array(items) => items.iter_mut().for_each(redact_strings),
        Value::Object(map) => map.values_mut().for_each(redact_strings),
        _ => {}
    }
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

/// Redact the values of secret keys in JSON objects, at any depth; true when
/// something changed.
pub fn redact_json(v: &mut Value) -> bool {
    let mut changed = false;
    match v {
        Value::Object(map) => {
            for (k, val) in map.iter_mut() {
                if is_secret_key(k) && !val.is_object() && !val.is_array() {
                    if *val != Value::String(REDACTED.into()) {
                        *val = Value::String(REDACTED.into());
                        changed = true;
                    }
                } else {
                    changed |= redact_json(val);
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                changed |= redact_json(item);
            }
        }
        _ => {}
    }
    changed
}

/// Redact a stored VM configuration (a manifest's `vm_config`): its command line
/// (`cmdline`, a list of arguments) or libvirt's `domain_xml` (secret attributes).
/// True when something changed.
pub fn redact_vm_config(config: &mut Value) -> bool {
    // libvirt: the domain XML's secret attributes.
    if let Some(xml) = config.get("domain_xml").and_then(Value::as_str) {
        return match super::libvirt::xml::redact(xml) {
            Ok(r) if r != xml => {
                config["domain_xml"] = Value::String(r);
                true
            }
            _ => false,
        };
    }
    let Some(args) = config.get_mut("cmdline").and_then(Value::as_array_mut) else {
        return false;
    };
    let mut changed = false;
    for a in args.iter_mut() {
        if let Some(text) = a.as_str() {
            let redacted = redact_arg(text);
            if redacted != text {
                *a = Value::String(redacted);
                changed = true;
            }
        }
    }
    changed
}

/// `k=v,k2=v2` items; `,,` (an escaped comma) stays inside its item.
fn split_items(s: &str) -> Vec<String> {
    let mut items = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push_str(",,");
            } else {
                items.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    items.push(cur);
    items
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_lose_secrets_in_json_file_names_and_urls() {
        let v = serde_json::json!({
            "execute": "object-add",
            "arguments": {"qom-type": "secret", "id": "s0", "data": "letmein"},
            "return": [{"file": "json:{\"driver\":\"nbd\",\"password\":\"x1\"}", "node-name": "n"},
                       {"file": "nbd://u:p4ss@host:10809/exp"}]
        });
        let out = for_log(&v).to_string();
        for secret in ["letmein", "x1", "p4ss"] {
            assert!(!out.contains(secret), "{secret} in {out}");
        }
        assert!(
            out.contains("\"id\":\"s0\"") && out.contains("host:10809"),
            "{out}"
        );
        assert!(out.contains("json:{"), "{out}");
        assert_eq!(redact_arg("/var/lib/a=b/c"), "/var/lib/a=b/c");
        assert_eq!(
            redact_arg("https://alice:pw@x/y"),
            "https://alice:<redacted>@x/y"
        );
    }

    #[test]
    fn secret_values_go_references_and_the_rest_stay() {
        assert_eq!(
            redact_arg("secret,id=sec0,data=hunter2,format=raw"),
            "secret,id=sec0,data=<redacted>,format=raw"
        );
        assert_eq!(
            redact_arg("secret,id=s,data=a,,b,,c,keyid=master"),
            "secret,id=s,data=<redacted>,keyid=master"
        );
        assert_eq!(
            redact_arg("driver=rbd,password-secret=sec0,key=abc,user=admin"),
            "driver=rbd,password-secret=sec0,key=<redacted>,user=admin"
        );
        assert_eq!(redact_arg("-vnc"), "-vnc");
        assert_eq!(
            redact_arg(":0,passwd=x,token=y"),
            ":0,passwd=<redacted>,token=<redacted>"
        );
        assert_eq!(
            redact_arg(
                r#"{"qom-type":"secret","id":"s1","data":"x","nested":{"password":"p","key-secret":"s1"}}"#
            ),
            r#"{"data":"<redacted>","id":"s1","nested":{"key-secret":"s1","password":"<redacted>"},"qom-type":"secret"}"#
        );
        assert_eq!(
            redact_arg("file=/var/lib/keys/disk.img"),
            "file=/var/lib/keys/disk.img"
        );
        let mut config = serde_json::json!({ "cmdline": ["q", "secret,id=a,data=b"] });
        assert!(redact_vm_config(&mut config));
        assert!(!redact_vm_config(&mut config), "idempotent");
        assert_eq!(config["cmdline"][1], "secret,id=a,data=<redacted>");
    }
}
