//! docs/JSON.md read as a schema: its command sections (`Prints:`) and type
//! tables, and a checker that holds a command's `--json` output against them
//! (every documented field present, no undocumented one, timestamps in the one
//! documented form). tests/json_doc.rs runs every command through it; tests of
//! one platform (libvirt) check their commands' output with it too.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

/// A field's documented type.
#[derive(Debug, Clone, PartialEq)]
pub enum Ty {
    Str,
    Int,
    Num,
    Bool,
    Time,
    Any,
    Lit(String),
    Named(String),
    Array(Box<Ty>),
    Nullable(Box<Ty>),
}

pub fn parse_ty(s: &str) -> Ty {
    let s = s.trim().trim_matches('`');
    if let Some(inner) = s.strip_suffix('?') {
        return Ty::Nullable(Box::new(parse_ty(inner)));
    }
    if let Some(inner) = s.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        return Ty::Array(Box::new(parse_ty(inner)));
    }
    if let Some(lit) = s.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
        return Ty::Lit(lit.to_string());
    }
    match s {
        "string" => Ty::Str,
        "integer" => Ty::Int,
        "number" => Ty::Num,
        "boolean" => Ty::Bool,
        "time" => Ty::Time,
        "any" => Ty::Any,
        name => {
            assert!(
                name.chars().all(|c| c.is_ascii_alphanumeric()) && !name.is_empty(),
                "bad type {name:?} in docs/JSON.md"
            );
            Ty::Named(name.to_string())
        }
    }
}

#[derive(Debug, Clone)]
pub enum TypeDef {
    Object(Vec<(String, Ty)>),
    OneOf(Vec<String>),
}

#[derive(Debug, Clone)]
pub enum Prints {
    Document(Ty),
    Lines(Ty, Option<Ty>),
    Nothing,
}

pub struct Doc {
    pub commands: BTreeMap<String, Prints>,
    pub types: BTreeMap<String, TypeDef>,
}

/// The `### ...` sections of docs/JSON.md after "How this file is read".
pub fn read_doc() -> Doc {
    let text = include_str!("../../docs/JSON.md");
    let body = &text[text
        .find("## How this file is read by the test")
        .expect("the doc explains its format")..];
    let mut commands = BTreeMap::new();
    let mut types = BTreeMap::new();
    let mut current: Option<String> = None;
    let mut fields: Vec<(String, Ty)> = Vec::new();
    let flush = |name: &Option<String>,
                 fields: &mut Vec<(String, Ty)>,
                 types: &mut BTreeMap<String, TypeDef>| {
        if let Some(n) = name {
            if !n.starts_with("vmbackup") && !types.contains_key(n) {
                types.insert(n.clone(), TypeDef::Object(std::mem::take(fields)));
            }
        }
        fields.clear();
    };
    for line in body.lines() {
        if let Some(h) = line.strip_prefix("### ") {
            flush(&current, &mut fields, &mut types);
            current = Some(h.trim().to_string());
            continue;
        }
        let Some(name) = &current else { continue };
        if let Some(p) = line.strip_prefix("Prints: ") {
            assert!(
                name.starts_with("vmbackup"),
                "Prints: in type section {name}"
            );
            let p = p.trim();
            let prints = if p == "nothing" {
                Prints::Nothing
            } else if let Some(t) = p.strip_prefix("document ") {
                Prints::Document(parse_ty(t))
            } else if let Some(rest) = p.strip_prefix("lines ") {
                match rest.split_once(", the last one ") {
                    Some((t, last)) => Prints::Lines(parse_ty(t), Some(parse_ty(last))),
                    None => Prints::Lines(parse_ty(rest), None),
                }
            } else {
                panic!("bad Prints: line for {name}: {p}")
            };
            assert!(
                commands.insert(name.clone(), prints).is_none(),
                "{name} twice"
            );
        } else if let Some(list) = line.strip_prefix("One of: ") {
            let variants = list
                .split(',')
                .map(|v| v.trim().trim_matches('`').to_string())
                .collect();
            types.insert(name.clone(), TypeDef::OneOf(variants));
        } else if line.starts_with("| `") {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            // ["", field, type, meaning, ""]
            assert!(cells.len() >= 4, "bad row in {name}: {line}");
            fields.push((cells[1].trim_matches('`').to_string(), parse_ty(cells[2])));
        }
    }
    flush(&current, &mut fields, &mut types);
    let doc = Doc { commands, types };
    // Every named type is defined; no field twice.
    let mut referenced = Vec::new();
    fn names(t: &Ty, out: &mut Vec<String>) {
        match t {
            Ty::Named(n) => out.push(n.clone()),
            Ty::Array(t) | Ty::Nullable(t) => names(t, out),
            _ => {}
        }
    }
    for p in doc.commands.values() {
        match p {
            Prints::Document(t) => names(t, &mut referenced),
            Prints::Lines(t, last) => {
                names(t, &mut referenced);
                if let Some(l) = last {
                    names(l, &mut referenced);
                }
            }
            Prints::Nothing => {}
        }
    }
    for (name, def) in &doc.types {
        match def {
            TypeDef::Object(f) => {
                let set: BTreeSet<&String> = f.iter().map(|(k, _)| k).collect();
                assert_eq!(set.len(), f.len(), "a field twice in {name}");
                assert!(!f.is_empty(), "type {name} has no fields");
                for (_, t) in f {
                    names(t, &mut referenced);
                }
            }
            TypeDef::OneOf(v) => referenced.extend(v.iter().cloned()),
        }
    }
    for r in referenced {
        assert!(
            doc.types.contains_key(&r),
            "type {r} is used but not defined in docs/JSON.md"
        );
    }
    doc
}

pub fn is_time(s: &str) -> bool {
    let b = s.as_bytes();
    s.len() == 24
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && b[19] == b'.'
        && b[23] == b'Z'
        && chrono::DateTime::parse_from_rfc3339(s).is_ok()
}

/// Errors of `v` against `t`, each naming the JSON path.
pub fn check(doc: &Doc, v: &Value, t: &Ty, path: &str, errors: &mut Vec<String>) {
    let bad = |errors: &mut Vec<String>, want: &str| {
        errors.push(format!("{path}: expected {want}, got {v}"));
    };
    match t {
        Ty::Nullable(_) if v.is_null() => {}
        Ty::Nullable(inner) => check(doc, v, inner, path, errors),
        Ty::Str if !v.is_string() => bad(errors, "a string"),
        Ty::Int if !(v.is_i64() || v.is_u64()) => bad(errors, "an integer"),
        Ty::Num if !v.is_number() => bad(errors, "a number"),
        Ty::Bool if !v.is_boolean() => bad(errors, "a boolean"),
        Ty::Time if !v.as_str().is_some_and(is_time) => {
            bad(errors, "a time like 2026-12-03T08:30:00.123Z")
        }
        Ty::Lit(l) if v.as_str() != Some(l.as_str()) => bad(errors, &format!("\"{l}\"")),
        Ty::Array(inner) => match v.as_array() {
            Some(items) => {
                for (i, item) in items.iter().enumerate() {
                    check(doc, item, inner, &format!("{path}[{i}]"), errors);
                }
            }
            None => bad(errors, "an array"),
        },
        Ty::Named(name) => match &doc.types[name] {
            TypeDef::Object(fields) => {
                let Some(obj) = v.as_object() else {
                    return bad(errors, &format!("a {name} object"));
                };
                for (k, ft) in fields {
                    match obj.get(k) {
                        Some(fv) => check(doc, fv, ft, &format!("{path}.{k}"), errors),
                        None => errors.push(format!("{path}: {name} field '{k}' is missing")),
                    }
                }
                for k in obj.keys() {
                    if !fields.iter().any(|(f, _)| f == k) {
                        errors.push(format!("{path}: field '{k}' is not documented in {name}"));
                    }
                }
            }
            TypeDef::OneOf(variants) => {
                let mut tried = Vec::new();
                for variant in variants {
                    let mut e = Vec::new();
                    check(doc, v, &Ty::Named(variant.clone()), path, &mut e);
                    if e.is_empty() {
                        return;
                    }
                    tried.push(format!("{variant}: {}", e.join("; ")));
                }
                errors.push(format!(
                    "{path}: {v} is none of {name}: {}",
                    tried.join(" | ")
                ));
            }
        },
        _ => {}
    }
}

/// Check one command's stdout against its section.
pub fn check_output(doc: &Doc, command: &str, stdout: &str) {
    let prints = doc
        .commands
        .get(command)
        .unwrap_or_else(|| panic!("{command} has no section in docs/JSON.md"));
    let mut errors = Vec::new();
    match prints {
        Prints::Document(t) => {
            let v: Value = serde_json::from_str(stdout)
                .unwrap_or_else(|e| panic!("{command}: not one JSON document ({e}):\n{stdout}"));
            check(doc, &v, t, "$", &mut errors);
        }
        Prints::Lines(t, last) => {
            let lines: Vec<Value> = stdout
                .lines()
                .map(|l| {
                    serde_json::from_str(l)
                        .unwrap_or_else(|e| panic!("{command}: not JSON ({e}): {l}"))
                })
                .collect();
            assert!(!lines.is_empty(), "{command}: no JSON lines");
            for (i, v) in lines.iter().enumerate() {
                check(doc, v, t, &format!("line {}", i + 1), &mut errors);
            }
            if let Some(last) = last {
                check(doc, lines.last().unwrap(), last, "last line", &mut errors);
                let summaries = lines.iter().filter(|l| l["type"] == "summary").count();
                assert_eq!(summaries, 1, "{command}: one summary line:\n{stdout}");
            }
        }
        Prints::Nothing => {}
    }
    assert!(
        errors.is_empty(),
        "{command} does not print what docs/JSON.md says:\n{}\n--- output:\n{stdout}",
        errors.join("\n")
    );
}

/// Check the `--json` output of `command` (`vmbackup restore`) against docs/JSON.md.
pub fn assert_documented(command: &str, stdout: &str) {
    check_output(&read_doc(), command, stdout);
}

/// `vmbackup --json ARGS` (a `recover` command), exit 0, its output checked
/// against docs/JSON.md; the one JSON document or summary line it printed.
pub fn recover_doc(env: &super::Env, args: &[&str]) -> Value {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    let out = env.ok(&a);
    let command = match args.get(1) {
        Some(sub) if ["list", "stop", "resume", "abort"].contains(sub) => {
            format!("vmbackup recover {sub}")
        }
        _ => "vmbackup recover".to_string(),
    };
    assert_documented(&command, &out);
    serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("not one JSON document ({e}): {out}"))
}
