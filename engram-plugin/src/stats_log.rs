//! Lookup stats of a long-running host (a server) as log lines at an interval: a thread
//! that asks the host for the runtime's totals and live sequences every
//! `ENGRAM_STATS_INTERVAL` seconds and logs a line whenever they changed.

use std::time::Duration;

use crate::error::{PluginError, Result};
use crate::stats::LookupStats;

/// Seconds between stats lines (`0` or `off`: none); unset: [`DEFAULT_INTERVAL`].
pub const STATS_INTERVAL_ENV: &str = "ENGRAM_STATS_INTERVAL";
/// The interval when [`STATS_INTERVAL_ENV`] is unset.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(60);

/// The interval [`STATS_INTERVAL_ENV`] asks for; `None`: no stats lines. A value that does
/// not parse is an error naming the variable.
pub fn interval_from_env() -> Result<Option<Duration>> {
    match std::env::var(STATS_INTERVAL_ENV) {
        Err(_) => Ok(Some(DEFAULT_INTERVAL)),
        Ok(v) => parse_interval(&v),
    }
}

fn parse_interval(v: &str) -> Result<Option<Duration>> {
    let v = v.trim();
    if v.is_empty() {
        return Ok(Some(DEFAULT_INTERVAL));
    }
    if v == "off" {
        return Ok(None);
    }
    match v.parse::<f64>() {
        Ok(s) if s.is_finite() && s >= 0.0 => Ok((s > 0.0).then(|| Duration::from_secs_f64(s))),
        _ => Err(PluginError::Setting {
            name: STATS_INTERVAL_ENV.into(),
            value: v.into(),
            reason: "seconds between stats lines (a positive number), or 0 / off".into(),
        }),
    }
}

/// What one stats line says.
pub fn stats_line(model: &str, stats: &LookupStats, live_sequences: usize) -> String {
    format!(
        "Engram stats {model}: {} steps, {} tokens, {} rows, {} bytes fetched, fetch {:.3} s, \
         exposed wait {:.3} s, host time {:.3} s, {live_sequences} live sequences, {} evicted",
        stats.steps,
        stats.tokens,
        stats.rows_fetched,
        stats.bytes_fetched,
        stats.fetch_time.as_secs_f64(),
        stats.exposed_wait.as_secs_f64(),
        stats.host_time.as_secs_f64(),
        stats.evicted_sequences,
    )
}

/// Starts a thread that, every `interval`, calls `probe` for the runtime's totals and live
/// sequences and logs [`stats_line`] (tracing, `info`) when they changed since the last
/// line. It ends when `probe` returns `None` (the host dropped the runtime).
pub fn spawn<F>(model: String, interval: Duration, probe: F) -> std::io::Result<()>
where
    F: Fn() -> Option<(LookupStats, usize)> + Send + 'static,
{
    std::thread::Builder::new()
        .name("engram-stats".into())
        .spawn(move || {
            let mut last = None;
            loop {
                std::thread::sleep(interval);
                let Some((stats, live)) = probe() else { return };
                let now = (stats.steps, stats.evicted_sequences, live);
                if last != Some(now) {
                    tracing::info!("{}", stats_line(&model, &stats, live));
                    last = Some(now);
                }
            }
        })
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_parse_or_name_the_variable() {
        assert_eq!(parse_interval("").unwrap(), Some(DEFAULT_INTERVAL));
        assert_eq!(parse_interval("off").unwrap(), None);
        assert_eq!(parse_interval("0").unwrap(), None);
        assert_eq!(
            parse_interval("2.5").unwrap(),
            Some(Duration::from_millis(2500))
        );
        for bad in ["-1", "soon", "inf"] {
            let err = parse_interval(bad).unwrap_err().to_string();
            assert!(err.contains(STATS_INTERVAL_ENV), "{err}");
        }
    }

    #[test]
    fn the_line_names_every_figure() {
        let stats = LookupStats {
            steps: 3,
            tokens: 40,
            rows_fetched: 1280,
            bytes_fetched: 81920,
            fetch_time: Duration::from_millis(12),
            exposed_wait: Duration::from_millis(2),
            host_time: Duration::from_millis(30),
            ..Default::default()
        };
        let line = stats_line("m", &stats, 2);
        assert_eq!(
            line,
            "Engram stats m: 3 steps, 40 tokens, 1280 rows, 81920 bytes fetched, \
             fetch 0.012 s, exposed wait 0.002 s, host time 0.030 s, 2 live sequences, \
             0 evicted"
        );
    }

    /// The thread logs through `probe` and ends once the runtime is gone.
    #[test]
    fn the_thread_ends_when_the_probe_says_the_runtime_is_gone() {
        let (tx, rx) = std::sync::mpsc::channel();
        let calls = std::sync::atomic::AtomicUsize::new(0);
        spawn("m".into(), Duration::from_millis(5), move || {
            let n = calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if n < 3 {
                Some((LookupStats::default(), n))
            } else {
                tx.send(n).unwrap();
                None
            }
        })
        .unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), 3);
    }
}
