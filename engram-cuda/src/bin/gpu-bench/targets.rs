//! The targets, judged from the run's own figures (ratios measured in one run):
//! - a device-table gather kernel moves at least half the device-to-device copy's bytes
//!   per second, for rows of 256 bytes or more at 4096 rows per call or more;
//! - a pinned-staging gather delivers at least 0.7 of the pinned host-to-device copy, at
//!   4096 rows per call or more;
//! - a prefetched decode lookup exposes at most 5 us over a device-resident table.

use serde_json::{json, Map, Value};

/// The lowest `key` among gather runs of `placement` with at least `min_rows` rows per
/// call and rows of at least 256 bytes, with the run it came from.
fn worst_gather(
    json: &Map<String, Value>,
    placement: &str,
    min_rows: u64,
    key: &str,
) -> Option<(f64, Value)> {
    json.get("gather")?
        .get("runs")?
        .as_array()?
        .iter()
        .filter(|r| {
            r["placement"] == placement
                && r["rows_per_call"].as_u64() >= Some(min_rows)
                && r["row_bytes"].as_u64() >= Some(256)
        })
        .map(|r| (r[key].as_f64().unwrap_or(f64::NAN), r.clone()))
        .min_by(|a, b| a.0.total_cmp(&b.0))
}

fn judge(name: &str, found: Option<(f64, Value)>, target: f64, at_least: bool) -> Value {
    let (measured, run) = found.unzip();
    let met = measured.map(|m| if at_least { m >= target } else { m <= target });
    json!({"target": name, "goal": if at_least { format!(">= {target}") } else { format!("<= {target}") },
           "measured": measured, "met": met, "worst_run": run})
}

/// Evaluates every target present in the report's JSON.
pub fn evaluate(json: &Map<String, Value>) -> Vec<Value> {
    let mut v = Vec::new();
    // The device gather as a kernel against the copy, both timed back to back between
    // two events; its per-call figures (id upload, event wait, launch) are in the run.
    v.push(judge(
        "device-table gather kernel / device-to-device copy (rows >= 256 B, >= 4096 rows)",
        worst_gather(json, "device", 4096, "kernel_b2b_fraction_of_limit"),
        0.5,
        true,
    ));
    // Pinned staging as delivered rows per second, host gather and copy pipelined.
    v.push(judge(
        "pinned-staging gather / pinned host-to-device copy (>= 4096 rows)",
        worst_gather(json, "pinned-host", 4096, "fraction_of_limit"),
        0.7,
        true,
    ));
    let exposed = json
        .get("latency")
        .and_then(|l| l["exposed_us_prefetched_pinned_vs_device"].as_f64());
    v.push(judge(
        "prefetched decode lookup, microseconds exposed over a device-resident table",
        exposed.map(|e| (e, Value::Null)),
        5.0,
        false,
    ));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worst_run_decides_and_missing_sections_are_unjudged() {
        let j = json!({"gather": {"runs": [
            {"placement": "device", "rows_per_call": 4096, "row_bytes": 264, "kernel_b2b_fraction_of_limit": 0.6},
            {"placement": "device", "rows_per_call": 65536, "row_bytes": 1024, "kernel_b2b_fraction_of_limit": 0.4},
            {"placement": "device", "rows_per_call": 64, "row_bytes": 1024, "kernel_b2b_fraction_of_limit": 0.01},
            {"placement": "pinned-host", "rows_per_call": 4096, "row_bytes": 264, "fraction_of_limit": 0.8},
        ]}});
        let t = evaluate(j.as_object().unwrap());
        assert_eq!(t[0]["measured"], json!(0.4));
        assert_eq!(t[0]["met"], json!(false));
        assert_eq!(t[1]["met"], json!(true));
        assert_eq!(t[2]["met"], Value::Null);
    }
}
