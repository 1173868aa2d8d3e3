//! The benchmark's table (printed as it goes and again at the end) and its JSON, plus the
//! timing helpers every section uses.

use std::sync::Arc;
use std::time::Instant;

use engram_cuda::cudarc::driver::sys::CUevent_flags;
use engram_cuda::cudarc::driver::CudaStream;
use serde_json::Value;

pub type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// One line of the report table.
struct Line {
    section: &'static str,
    item: String,
    value: f64,
    unit: &'static str,
    note: String,
}

#[derive(Default)]
pub struct Report {
    lines: Vec<Line>,
    pub json: serde_json::Map<String, Value>,
}

impl Report {
    pub fn add(
        &mut self,
        section: &'static str,
        item: impl Into<String>,
        value: f64,
        unit: &'static str,
        note: impl Into<String>,
    ) {
        let (item, note) = (item.into(), note.into());
        eprintln!("  {section:<8} {item:<46} {value:>12.3} {unit:<6} {note}");
        self.lines.push(Line {
            section,
            item,
            value,
            unit,
            note,
        });
    }

    pub fn print(&self) {
        println!();
        println!(
            "{:<8} | {:<46} | {:>12} | {:<6} | note",
            "section", "item", "value", "unit"
        );
        println!("{}", "-".repeat(112));
        for l in &self.lines {
            println!(
                "{:<8} | {:<46} | {:>12.3} | {:<6} | {}",
                l.section, l.item, l.value, l.unit, l.note
            );
        }
    }
}

pub fn gbps(bytes: f64, seconds: f64) -> f64 {
    bytes / seconds / 1e9
}

/// Milliseconds of `f` on `stream`, timed with events, averaged over `reps` (one warm-up).
pub fn time_stream(
    stream: &Arc<CudaStream>,
    reps: usize,
    mut f: impl FnMut() -> Res<()>,
) -> Res<f64> {
    f()?;
    let flags = Some(CUevent_flags::CU_EVENT_DEFAULT);
    let a = stream.record_event(flags)?;
    for _ in 0..reps {
        f()?;
    }
    let b = stream.record_event(flags)?;
    Ok(a.elapsed_ms(&b)? as f64 / reps as f64)
}

/// Median and 90th percentile of `samples` (sorted in place).
pub fn median_p90(samples: &mut [f64]) -> (f64, f64) {
    if samples.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.9))
}

/// Wall-clock seconds of each of `reps` calls of `f` (after `warm` untimed ones); `f`
/// must wait for its own device work.
pub fn wall_samples(
    warm: usize,
    reps: usize,
    mut f: impl FnMut(usize) -> Res<()>,
) -> Res<Vec<f64>> {
    for k in 0..warm {
        f(k)?;
    }
    let mut v = Vec::with_capacity(reps);
    for k in 0..reps {
        let t = Instant::now();
        f(warm + k)?;
        v.push(t.elapsed().as_secs_f64());
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_p90() {
        let mut v: Vec<f64> = (1..=11).rev().map(f64::from).collect();
        assert_eq!(median_p90(&mut v), (6.0, 10.0));
        assert!(median_p90(&mut []).0.is_nan());
    }
}
