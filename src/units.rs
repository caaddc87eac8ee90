//! Byte sizes and rates as people write them: `4M`, `4MiB`, `512K`, `20MiB/s`.
//!
//! All units are binary (K = 1024). One parser serves system.conf and the
//! bandwidth windows, so the two accept the same spellings.

/// Parse a size such as `512K`, `4M`, `4MiB`, `1G` or `65536`. A bare number is
/// taken in `bare_unit` bytes (1 for plain bytes; system.conf's
/// `i2vp_transbuffer = 4` means 4 MiB, so it passes `MIB`).
pub fn parse_size(text: &str, bare_unit: u64) -> Option<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return None;
    }
    let n: u64 = num.parse().ok()?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" => bare_unit,
        "b" => 1,
        "k" | "kb" | "kib" => KIB,
        "m" | "mb" | "mib" => MIB,
        "g" | "gb" | "gib" => GIB,
        "t" | "tb" | "tib" => GIB * 1024,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// Parse a rate such as `20MiB/s` or `512K/s` into bytes per second.
pub fn parse_rate(text: &str) -> Option<u64> {
    let t = text.trim();
    let t = t
        .strip_suffix("/s")
        .or_else(|| t.strip_suffix("/S"))
        .unwrap_or(t);
    parse_size(t, 1).filter(|&n| n > 0)
}

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;
pub const GIB: u64 = 1024 * MIB;

/// `4194304` → `4MiB`; exact multiples keep the short form, others show decimals.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [(u64, &str); 4] = [
        (GIB * 1024, "TiB"),
        (GIB, "GiB"),
        (MIB, "MiB"),
        (KIB, "KiB"),
    ];
    for (mult, name) in UNITS {
        if bytes >= mult {
            return if bytes % mult == 0 {
                format!("{}{name}", bytes / mult)
            } else {
                format!("{:.1}{name}", bytes as f64 / mult as f64)
            };
        }
    }
    format!("{bytes}B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4", MIB), Some(4 * MIB));
        assert_eq!(parse_size("4M", 1), Some(4 * MIB));
        assert_eq!(parse_size("4MiB", 1), Some(4 * MIB));
        assert_eq!(parse_size("512K", 1), Some(512 * KIB));
        assert_eq!(parse_size("1g", 1), Some(GIB));
        assert_eq!(parse_size("4X", 1), None);
        assert_eq!(parse_size("M", 1), None);
        assert_eq!(parse_size("-4M", 1), None);
        assert_eq!(parse_rate("20MiB/s"), Some(20 * MIB));
        assert_eq!(parse_rate("0/s"), None);
        assert_eq!(format_size(4 * MIB), "4MiB");
        assert_eq!(format_size(1536), "1.5KiB");
        assert_eq!(format_size(10), "10B");
    }
}
