//! The size of the machine's largest CPU cache: above it, an output cannot stay cached
//! for its reader, so large gathers write it straight to memory (as glibc's memcpy does
//! above its own threshold).

use std::sync::LazyLock;

/// Used where the size cannot be read (not Linux, no sysfs).
pub const FALLBACK_CACHE_BYTES: usize = 64 << 20;

static LARGEST: LazyLock<usize> =
    LazyLock::new(|| read_largest_cache_bytes().unwrap_or(FALLBACK_CACHE_BYTES));

/// The largest CPU cache in bytes (usually the shared L3), read once from Linux's sysfs;
/// [`FALLBACK_CACHE_BYTES`] where unknown.
pub fn largest_cache_bytes() -> usize {
    *LARGEST
}

fn read_largest_cache_bytes() -> Option<usize> {
    (0..8)
        .filter_map(|i| {
            std::fs::read_to_string(format!("/sys/devices/system/cpu/cpu0/cache/index{i}/size"))
                .ok()
        })
        .filter_map(|text| parse_cache_size(&text))
        .max()
}

/// Parses sysfs's cache sizes: `32K`, `300M`, `1G` or plain bytes.
fn parse_cache_size(text: &str) -> Option<usize> {
    let t = text.trim();
    let (num, mult) = match t.chars().last()? {
        'K' => (&t[..t.len() - 1], 1 << 10),
        'M' => (&t[..t.len() - 1], 1 << 20),
        'G' => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    num.parse::<usize>().ok()?.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sysfs_sizes() {
        assert_eq!(parse_cache_size("32K\n"), Some(32 << 10));
        assert_eq!(parse_cache_size("300M"), Some(300 << 20));
        assert_eq!(parse_cache_size("1G"), Some(1 << 30));
        assert_eq!(parse_cache_size("4096"), Some(4096));
        assert_eq!(parse_cache_size("x"), None);
        assert_eq!(parse_cache_size(""), None);
    }
}
