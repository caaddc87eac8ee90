//! GC mark benchmark on a synthetic repository (scripts/bench-prune.sh): how
//! long marking takes, and how much memory it holds, per million referenced
//! objects. Not a test.
//!
//! ```text
//! gc_mark_bench generate DIR MILLIONS POINTS   a repository in DIR/repo: POINTS points
//!                                              of one VM whose indexes name MILLIONS
//!                                              million distinct objects in all (the
//!                                              objects themselves are not written:
//!                                              marking reads indexes only)
//! gc_mark_bench mark DIR                       mark it; prints "marked N objects in S s"
//! ```
//! Peak memory comes from running `mark` under GNU time (the script does).

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use vmbackup::level::Level;
use vmbackup::repo::{
    index_file_name, parse_point_id, DiskIndex, LocalStore, Manifest, ManifestDisk, ManifestTotals,
    ManifestVm, PointStatus, Repository, Slot, Store,
};

const CHUNK: u32 = 64 * 1024;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["generate", dir, millions, points] => generate(
            dir,
            millions.parse().context("MILLIONS")?,
            points.parse().context("POINTS")?,
        ),
        ["mark", dir] => mark(dir),
        _ => bail!("usage: gc_mark_bench generate DIR MILLIONS POINTS | mark DIR"),
    }
}

fn store(dir: &str) -> Result<Arc<dyn Store>> {
    Ok(Arc::new(LocalStore::open(std::path::Path::new(dir))?))
}

fn generate(dir: &str, millions: f64, points: u64) -> Result<()> {
    let repo = Repository::create_in(store(dir)?, "repo")?;
    let total = (millions * 1e6) as u64;
    let per_point = total.div_ceil(points);
    let key = vmbackup::repo::vm_key("bench", "synthetic");
    let shared = repo.lock_shared("bench")?;
    let lock = repo.lock_vm(&shared, &key, "bench")?;
    let mut next = 0u64;
    for p in 0..points {
        let point = vmbackup::repo::new_point_id(
            parse_point_id("20270101T000000Z")? + chrono::Duration::days(p as i64),
        );
        let mut index = DiskIndex::new_zero(per_point * u64::from(CHUNK), CHUNK);
        for slot in index.slots.iter_mut() {
            *slot = Slot::Chunk(*blake3::hash(&next.to_le_bytes()).as_bytes());
            next += 1;
        }
        let mut writer = repo.begin_point(&lock, &point)?;
        writer.write_index("vda", &index)?;
        let disks = vec![ManifestDisk {
            name: "vda".into(),
            size: index.disk_size,
            chunk_size: CHUNK,
            index: index_file_name("vda"),
            bytes_read: 0,
            bytes_written: 0,
            new_chunks: 0,
            reused_chunks: 0,
            zero_slots: 0,
        }];
        let started = parse_point_id(&point)?;
        writer.commit(&Manifest {
            format: vmbackup::repo::FORMAT_VERSION,
            vm: ManifestVm {
                platform: "bench".into(),
                name: "synthetic".into(),
            },
            point: point.clone(),
            level: Level::Full,
            base: None,
            full: None,
            status: PointStatus::Completed,
            started,
            finished: started,
            fallback_reason: None,
            vm_config: serde_json::Value::Null,
            tracking: None,
            totals: ManifestTotals::of(&disks),
            disks,
        })?;
    }
    println!("generated {points} points naming {next} distinct objects");
    Ok(())
}

fn mark(dir: &str) -> Result<()> {
    let repo = Repository::open_in(store(dir)?, "repo")?;
    let t = Instant::now();
    let (marks, points) = vmbackup::repo::gc::mark(&repo)?;
    println!(
        "marked {} objects of {points} points in {:.2} s",
        marks.len(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
