//! The hot-row cache setting of [`crate::OpenOptions`]: how much RAM the cache in front
//! of each layer's table may take ([`HotCache`], from `ENGRAM_HOT_CACHE` for hosts), and
//! the wrapping of a table in an [`engram_cpu::table::CachedStore`] of that size.

use std::sync::Arc;

use engram_core::table::TableStore;
use engram_cpu::table::CachedStore;

/// Sets [`HotCache`] for [`crate::OpenOptions::from_env`]: `2GiB`, `512MiB`, `1.5GB`,
/// `100000` (bytes, over all tables), `5%` (of each table), `off` or `0` (none).
pub const HOT_CACHE_ENV: &str = "ENGRAM_HOT_CACHE";

/// How much RAM the hot-row cache in front of the tables may take. The bytes counted are
/// the cache's own: rows as f32, or 2 bytes a value for bf16 and V4.1 tables (exact for
/// them), plus [`engram_cpu::table::hot_cache::ENTRY_OVERHEAD_BYTES`] per row.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum HotCache {
    /// At most this many bytes over all tables, split in proportion to their rows.
    Bytes(u64),
    /// This fraction (0, 1] of each table's stored bytes.
    TableFraction(f64),
}

impl HotCache {
    /// The cache bound of a table of `table_rows` rows, `table_bytes` stored bytes, among
    /// tables of `all_rows` rows in all.
    pub fn bytes_for(&self, table_rows: u64, table_bytes: u64, all_rows: u64) -> u64 {
        match *self {
            HotCache::Bytes(total) => {
                (total as u128 * table_rows as u128 / all_rows.max(1) as u128) as u64
            }
            HotCache::TableFraction(f) => (table_bytes as f64 * f) as u64,
        }
    }

    /// `table` behind a cache of `bytes` (the table itself when that is zero).
    pub fn wrap(table: Arc<dyn TableStore>, bytes: u64) -> Arc<dyn TableStore> {
        if bytes == 0 {
            table
        } else {
            Arc::new(CachedStore::new(table, bytes))
        }
    }

    /// Parses a setting; `Ok(None)` for `off`, `none` or `0`.
    pub fn parse(s: &str) -> Result<Option<Self>, String> {
        let t = s.trim();
        if ["off", "none", "0"].contains(&t.to_ascii_lowercase().as_str()) {
            return Ok(None);
        }
        if let Some(p) = t.strip_suffix('%') {
            let pct: f64 = p
                .trim()
                .parse()
                .map_err(|_| format!("`{p}` is not a percentage"))?;
            if !(pct > 0.0 && pct <= 100.0) {
                return Err(format!("{pct}% is not in (0, 100]"));
            }
            return Ok(Some(HotCache::TableFraction(pct / 100.0)));
        }
        // A hand-written parse: five units do not need a dependency.
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (number, unit) = (&t[..split], t[split..].trim());
        let n: f64 = number
            .parse()
            .map_err(|_| format!("`{t}` is not a size (examples: 2GiB, 512MiB, 5%, off)"))?;
        let scale: u64 = match unit.to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1_000,
            "m" | "mb" => 1_000_000,
            "g" | "gb" => 1_000_000_000,
            "t" | "tb" => 1_000_000_000_000,
            "kib" => 1 << 10,
            "mib" => 1 << 20,
            "gib" => 1 << 30,
            "tib" => 1 << 40,
            other => {
                return Err(format!(
                    "unknown unit `{other}` (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB or %)"
                ))
            }
        };
        let bytes = n * scale as f64;
        if !bytes.is_finite() || bytes >= u64::MAX as f64 {
            return Err(format!("`{t}` is too large"));
        }
        Ok((bytes >= 1.0).then_some(HotCache::Bytes(bytes as u64)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse_and_bad_ones_say_why() {
        let p = |s| HotCache::parse(s).unwrap();
        assert_eq!(p("2GiB"), Some(HotCache::Bytes(2 << 30)));
        assert_eq!(p("512 MiB"), Some(HotCache::Bytes(512 << 20)));
        assert_eq!(p("1.5GB"), Some(HotCache::Bytes(1_500_000_000)));
        assert_eq!(p("100000"), Some(HotCache::Bytes(100_000)));
        assert_eq!(p("5%"), Some(HotCache::TableFraction(0.05)));
        assert_eq!(p("off"), None);
        assert_eq!(p("0"), None);
        for bad in ["", "lots", "5 parsecs", "0%", "150%", "-1GiB", "1e400"] {
            let e = HotCache::parse(bad).unwrap_err();
            assert!(!e.is_empty(), "{bad}");
        }
    }

    #[test]
    fn a_total_is_split_by_rows_and_a_fraction_is_per_table() {
        let total = HotCache::Bytes(1000);
        assert_eq!(total.bytes_for(300, 0, 1000), 300);
        assert_eq!(total.bytes_for(700, 0, 1000), 700);
        let f = HotCache::TableFraction(0.05);
        assert_eq!(f.bytes_for(10, 2000, 1000), 100);
    }
}
