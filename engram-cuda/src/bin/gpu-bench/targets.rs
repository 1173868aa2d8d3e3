//! The targets, judged from the run's own figures (ratios measured in one run):
//! - a device-table gather moves at least half the device-to-device copy's bytes per
//!   second, for rows of 256 bytes or more at 4096 rows per call or more;
//! - a pinned-staging gather delivers at least 0.7 of the pinned host-to-device copy, at
//!   4096 rows per call or more;
//! - a prefetched decode lookup exposes at most 5 us over a device-resident table.

use serde_json::{json, Map, Value};

/// The lowest `fraction_of_limit` among gather runs of `placement` with at least
/// `min_rows` rows per call and rows of at least 256 bytes, with the run it came from.
fn worst_gather(json: &Map<String, Value>, placement: &str, min_rows: u64) -> Option<Value> {
    json.get("gather")?
        .get("runs")?
        .as_array()?
        .iter()
        .filter(|r| {
            r["placement"] == placement
                && r["rows_per_call"].as_u64() >= Some(min_rows)
                && r["row_bytes"].as_u64() >= Some(256)
        })
        .min_by(|a, b| {
            let f = |r: &Value| r["fraction_of_limit"].as_f64().unwrap_or(f64::NAN);
            f(a).total_cmp(&f(b))
        })
        .cloned()
}

fn judge(
    name: &str,
    measured: Option<f64>,
    target: f64,
    at_least: bool,
    run: Option<Value>,
) -> Value {
    let met = measured.map(|m| if at_least { m >= target } else { m <= target });
    json!({"target": name, "goal": if at_least { format!(">= {target}") } else { format!("<= {target}") },
           "measured": measured, "met": met, "worst_run": run})
}

/// Evaluates every target present in the report's JSON.
pub fn evaluate(json: &Map<String, Value>) -> Vec<Value> {
    let mut v = Vec::new();
    let dev = worst_gather(json, "device", 4096);
    v.push(judge(
        "device-table gather / device-to-device copy (rows >= 256 B, >= 4096 rows)",
        dev.as_ref().and_then(|r| r["fraction_of_limit"].as_f64()),
        0.5,
        true,
        dev,
    ));
    let pin = worst_gather(json, "pinned-host", 4096);
    v.push(judge(
        "pinned-staging gather / pinned host-to-device copy (>= 4096 rows)",
        pin.as_ref().and_then(|r| r["fraction_of_limit"].as_f64()),
        0.7,
        true,
        pin,
    ));
    let exposed = json
        .get("latency")
        .and_then(|l| l["exposed_us_prefetched_pinned_vs_device"].as_f64());
    v.push(judge(
        "prefetched decode lookup, microseconds exposed over a device-resident table",
        exposed,
        5.0,
        false,
        None,
    ));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worst_run_decides_and_missing_sections_are_unjudged() {
        let j = json!({"gather": {"runs": [
            {"placement": "device", "rows_per_call": 4096, "row_bytes": 264, "fraction_of_limit": 0.6},
            {"placement": "device", "rows_per_call": 65536, "row_bytes": 1024, "fraction_of_limit": 0.4},
            {"placement": "device", "rows_per_call": 64, "row_bytes": 1024, "fraction_of_limit": 0.01},
            {"placement": "pinned-host", "rows_per_call": 4096, "row_bytes": 264, "fraction_of_limit": 0.8},
        ]}});
        let t = evaluate(j.as_object().unwrap());
        assert_eq!(t[0]["measured"], json!(0.4));
        assert_eq!(t[0]["met"], json!(false));
        assert_eq!(t[1]["met"], json!(true));
        assert_eq!(t[2]["met"], Value::Null);
    }
}
