//! The block graph of one QEMU process: nodes, their children and dirty bitmaps.
//!
//! Built from `query-named-block-nodes` (driver, file, size, read-only, bitmaps) and
//! `x-debug-query-block-graph` (parent/child edges, which the former lacks).

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::{json, Value};

use super::names;
use crate::platform::qmp::Qmp;

/// Drivers that pass data through to their `file` child; a disk's data lives below.
const FILTER_DRIVERS: &[&str] = &[
    "copy-before-write",
    "throttle",
    "copy-on-read",
    "preallocate",
    "compress",
    "blkdebug",
    "blklogwrites",
];

/// One dirty bitmap on a node.
#[derive(Debug, Clone, Serialize)]
pub struct Bitmap {
    pub name: String,
    /// Records guest writes now (enabled and usable).
    pub recording: bool,
    pub persistent: bool,
    /// Left `in-use` by an unclean stop: unusable, must be removed.
    pub inconsistent: bool,
    pub granularity: u64,
    /// Dirty bytes.
    pub count: u64,
}

/// One block node.
#[derive(Debug, Clone, Serialize)]
pub struct BlockNode {
    pub name: String,
    pub drv: String,
    pub file: Option<String>,
    pub read_only: bool,
    pub size: u64,
    pub bitmaps: Vec<Bitmap>,
    /// `(role, child node)`: `file`, `backing`, `target`, ...
    pub children: Vec<(String, String)>,
    /// Names of block-driver nodes that have this one as a child.
    #[serde(skip)]
    pub parents: Vec<String>,
}

impl BlockNode {
    pub fn bitmap(&self, name: &str) -> Option<&Bitmap> {
        self.bitmaps.iter().find(|b| b.name == name)
    }

    pub fn child(&self, role: &str) -> Option<&str> {
        self.children
            .iter()
            .find(|(r, _)| r == role)
            .map(|(_, c)| c.as_str())
    }
}

/// All named block nodes of one QEMU process.
#[derive(Debug, Clone, Serialize)]
pub struct BlockGraph {
    pub nodes: BTreeMap<String, BlockNode>,
}

impl BlockGraph {
    pub fn query(qmp: &mut Qmp) -> Result<BlockGraph> {
        let list = qmp.execute("query-named-block-nodes", json!({ "flat": true }))?;
        let mut nodes = BTreeMap::new();
        for n in list
            .as_array()
            .context("query-named-block-nodes: not a list")?
        {
            let node = parse_node(n)?;
            nodes.insert(node.name.clone(), node);
        }
        let graph = qmp.execute("x-debug-query-block-graph", Value::Null)?;
        let mut by_id: BTreeMap<u64, (String, String)> = BTreeMap::new();
        for n in graph["nodes"].as_array().into_iter().flatten() {
            if let (Some(id), Some(kind), Some(name)) =
                (n["id"].as_u64(), n["type"].as_str(), n["name"].as_str())
            {
                by_id.insert(id, (kind.to_string(), name.to_string()));
            }
        }
        for e in graph["edges"].as_array().into_iter().flatten() {
            let (Some(parent), Some(child)) = (
                e["parent"].as_u64().and_then(|id| by_id.get(&id)),
                e["child"].as_u64().and_then(|id| by_id.get(&id)),
            ) else {
                continue;
            };
            if parent.0 != "block-driver" {
                continue;
            }
            let role = e["name"].as_str().unwrap_or("").to_string();
            if let Some(p) = nodes.get_mut(&parent.1) {
                p.children.push((role, child.1.clone()));
            }
            if let Some(c) = nodes.get_mut(&child.1) {
                c.parents.push(parent.1.clone());
            }
        }
        Ok(BlockGraph { nodes })
    }

    pub fn node(&self, name: &str) -> Option<&BlockNode> {
        self.nodes.get(name)
    }

    /// The node holding a disk's data: `name` itself, or the first node below
    /// filter drivers (our own backup job inserts a `copy-before-write` filter).
    pub fn data_node<'a>(&'a self, mut name: &'a str) -> &'a str {
        for _ in 0..16 {
            match self.nodes.get(name) {
                Some(n) if FILTER_DRIVERS.contains(&n.drv.as_str()) => match n.child("file") {
                    Some(child) => name = child,
                    None => break,
                },
                _ => break,
            }
        }
        name
    }

    /// Disk nodes of a process without guest devices (qemu-storage-daemon): named
    /// nodes that no other user node has as a child. Our own nodes and QEMU's
    /// auto-named ones (`#block123`, e.g. a backup job's filter) neither count as
    /// disks nor as parents.
    pub fn top_nodes(&self) -> Vec<&str> {
        let is_user = |name: &str| !name.starts_with(names::PREFIX) && !name.starts_with('#');
        let mut tops: Vec<&str> = Vec::new();
        for node in self.nodes.values() {
            if !is_user(&node.name) || node.parents.iter().any(|p| is_user(p)) {
                continue;
            }
            let data = self.data_node(&node.name);
            if !tops.contains(&data) {
                tops.push(data);
            }
        }
        tops
    }

    /// Every node holding at least one of our bitmaps, with those bitmaps.
    pub fn our_bitmaps(&self) -> Vec<(&BlockNode, Vec<&Bitmap>)> {
        self.nodes
            .values()
            .filter(|n| !n.name.starts_with(names::PREFIX))
            .map(|n| {
                let ours = n
                    .bitmaps
                    .iter()
                    .filter(|b| names::parse_bitmap(&b.name).is_some())
                    .collect::<Vec<_>>();
                (n, ours)
            })
            .filter(|(_, ours)| !ours.is_empty())
            .collect()
    }
}

fn parse_node(n: &Value) -> Result<BlockNode> {
    let name = n["node-name"]
        .as_str()
        .with_context(|| format!("block node without node-name: {n}"))?
        .to_string();
    let bitmaps = n["dirty-bitmaps"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| Bitmap {
            name: b["name"].as_str().unwrap_or("").to_string(),
            recording: b["recording"].as_bool().unwrap_or(false),
            persistent: b["persistent"].as_bool().unwrap_or(false),
            inconsistent: b["inconsistent"].as_bool().unwrap_or(false),
            granularity: b["granularity"].as_u64().unwrap_or(0),
            count: b["count"].as_u64().unwrap_or(0),
        })
        .collect();
    Ok(BlockNode {
        name,
        drv: n["drv"].as_str().unwrap_or("").to_string(),
        file: n["file"].as_str().map(str::to_string),
        read_only: n["ro"].as_bool().unwrap_or(false),
        size: n["image"]["virtual-size"].as_u64().unwrap_or(0),
        bitmaps,
        children: Vec::new(),
        parents: Vec::new(),
    })
}
