//! `engram bench` without `--json`: the report as plain-text tables.

use std::fmt::Write;

use super::{BenchReport, PrefetchRun};

/// A label column and right-aligned value columns.
fn row(out: &mut String, label: &str, cells: &[String]) {
    let _ = write!(out, "  {label:<36}");
    for c in cells {
        let _ = write!(out, "{c:>22}");
    }
    out.push('\n');
}

fn mib(bytes: usize) -> String {
    format!("{} MiB", bytes >> 20)
}

fn pct(fraction: f64) -> String {
    format!("{:.2}%", fraction * 100.0)
}

/// The report as plain-text tables, one per benchmark, each ratio beside the two
/// figures it divides.
pub fn format_text(r: &BenchReport) -> String {
    let mut out = String::new();
    let all = format!("{} threads", r.threads);
    let _ = writeln!(
        out,
        "engram bench ({all}): each ratio's two sides measured in this run, at one thread count"
    );

    let _ = writeln!(
        out,
        "\nhashing, V4.1 config (layers [1, 14], orders 2-4, 8 heads), 1 thread"
    );
    let mtoks = |t: f64| format!("{:.2} M tokens/s", t / 1e6);
    row(
        &mut out,
        "prefill: one 262,144-token sequence",
        &[mtoks(r.hash_tokens_per_s)],
    );
    row(
        &mut out,
        "decode: 64 sequences, 1 token a step",
        &[mtoks(r.hash_decode_tokens_per_s)],
    );

    let g = &r.gather;
    let _ = writeln!(
        out,
        "\ngather vs memcpy: 128-byte f32 rows, table {}, {} a pass, best of 5",
        mib(g.gather_table_bytes),
        mib(g.gather_pass_bytes)
    );
    let gbs = |v: f64| format!("{v:.2} GB/s");
    let ratio = |v: f64| format!("{v:.2}");
    row(&mut out, "", &["1 thread".into(), all.clone()]);
    row(
        &mut out,
        "gather, table in RAM",
        &[gbs(g.gather_gb_per_s_1_thread), gbs(g.gather_gb_per_s)],
    );
    row(
        &mut out,
        "gather, table memory-mapped",
        &[
            gbs(g.gather_mmap_gb_per_s_1_thread),
            gbs(g.gather_mmap_gb_per_s),
        ],
    );
    row(
        &mut out,
        "memcpy: the C library's",
        &[
            gbs(g.memcpy_libc_gb_per_s_1_thread),
            gbs(g.memcpy_libc_gb_per_s),
        ],
    );
    row(
        &mut out,
        "memcpy: with the gather's stores",
        &[
            gbs(g.memcpy_streaming_gb_per_s_1_thread),
            gbs(g.memcpy_streaming_gb_per_s),
        ],
    );
    row(
        &mut out,
        "memcpy: the faster (the baseline)",
        &[gbs(g.memcpy_gb_per_s_1_thread), gbs(g.memcpy_gb_per_s)],
    );
    row(
        &mut out,
        "gather in RAM / memcpy",
        &[
            ratio(g.gather_vs_memcpy_1_thread),
            ratio(g.gather_vs_memcpy_all_threads),
        ],
    );
    row(
        &mut out,
        "gather mapped / memcpy",
        &[
            ratio(g.gather_mmap_vs_memcpy_1_thread),
            ratio(g.gather_mmap_vs_memcpy_all_threads),
        ],
    );
    let _ = writeln!(out, "  by row size, {all} (x: / memcpy, {all}):");
    row(
        &mut out,
        "row bytes",
        &["in RAM".into(), "memory-mapped".into()],
    );
    for (&(bytes, ram), &(_, mmap)) in g
        .gather_gb_per_s_by_row_bytes
        .iter()
        .zip(&g.gather_mmap_gb_per_s_by_row_bytes)
    {
        let cell = |v: f64| format!("{v:.2} GB/s {:.2}x", v / g.memcpy_gb_per_s);
        row(&mut out, &bytes.to_string(), &[cell(ram), cell(mmap)]);
    }

    let _ = writeln!(
        out,
        "\npaper layer (hidden 1024, E 1024, kernel 4), 512 tokens, {all}"
    );
    row(
        &mut out,
        "CpuLayer::forward",
        &[format!("{:.1} K tokens/s", r.layer_tokens_per_s / 1e3)],
    );

    let j = &r.projection;
    let _ = writeln!(
        out,
        "\nits projection [{}, {}] at decode-sized batches, {all}, best of 20",
        j.out_dim, j.in_dim
    );
    let us = |v: f64| format!("{v:.1} us");
    row(
        &mut out,
        "tokens",
        &[
            "per token".into(),
            "blocked GEMM".into(),
            "blocked / per token".into(),
            "path taken".into(),
        ],
    );
    for pt in &j.points {
        let taken = if pt.per_token_taken {
            "per token"
        } else {
            "blocked"
        };
        row(
            &mut out,
            &pt.tokens.to_string(),
            &[
                us(pt.per_token_us),
                us(pt.blocked_us),
                ratio(pt.blocked_over_per_token),
                taken.into(),
            ],
        );
    }
    let _ = writeln!(
        out,
        "  per token, the weight in cache (warm) and after reading 256 MiB (cold, best of 10)"
    );
    row(
        &mut out,
        "tokens",
        &["warm".into(), "cold".into(), "cold / warm".into()],
    );
    for pt in &j.cold_points {
        row(
            &mut out,
            &pt.tokens.to_string(),
            &[us(pt.warm_us), us(pt.cold_us), ratio(pt.cold_over_warm)],
        );
    }

    let p = &r.prefetch;
    let l = &p.smollm2_layer;
    let ms = |v: f64| format!("{v:.3} ms");
    let _ = writeln!(
        out,
        "\nprefetch under a simulated host: {} tokens a step, {} steps a run, {} prefetch thread(s), host on 1 thread",
        p.tokens_per_step, p.steps, p.prefetch_threads
    );
    row(
        &mut out,
        "fetch a step, host idle / busy",
        &[format!("{} / {}", ms(p.fetch_ms_idle_host), ms(p.fetch_ms))],
    );
    let _ = writeln!(
        out,
        "  SmolLM2-135M decoder layer, {} tokens, context {}: {} (median of 5, {:.3}-{:.3}); 1 token: {}",
        l.tokens,
        l.context,
        ms(l.layer_ms),
        l.layer_ms_range.0,
        l.layer_ms_range.1,
        ms(l.layer_ms_one_token)
    );
    row(
        &mut out,
        "host work each step",
        &["1.5 x fetch".into(), "1 SmolLM2 layer".into()],
    );
    let runs = [&p.host_work_from_fetch, &p.host_work_from_smollm2_layer];
    let cells = |f: &dyn Fn(&PrefetchRun) -> String| runs.iter().map(|r| f(r)).collect::<Vec<_>>();
    row(&mut out, "host work", &cells(&|r| ms(r.host_work_ms)));
    row(
        &mut out,
        "fetch during run, mean / max",
        &cells(&|r| {
            format!(
                "{:.3} / {:.3} ms",
                r.fetch_ms_during_run, r.max_fetch_ms_during_run
            )
        }),
    );
    row(
        &mut out,
        "exposed wait a step",
        &cells(&|r| ms(r.exposed_ms)),
    );
    row(
        &mut out,
        "exposed / fetch, all steps",
        &cells(&|r| pct(r.exposed_fraction)),
    );
    row(
        &mut out,
        "steps with fetch <= host work",
        &cells(&|r| format!("{} of {}", r.covered_steps, p.steps)),
    );
    row(
        &mut out,
        "exposed / fetch, those steps",
        &cells(&|r| pct(r.covered_exposed_fraction)),
    );

    let h = &r.hot_cache;
    let _ = writeln!(
        out,
        "
hot-row cache: {} bound in front of a {} memory-mapped bf16 table, Zipf({}) row ids, gathers of 4096, 1 thread",
        mib(h.cache_bound_bytes as usize),
        mib(h.table_bytes as usize),
        h.zipf_exponent
    );
    row(
        &mut out,
        "hits / misses (from empty)",
        &[format!("{} / {}", h.cache_hits, h.cache_misses)],
    );
    row(&mut out, "hit rate", &[pct(h.cache_hit_rate)]);
    row(
        &mut out,
        "cache bytes after",
        &[format!(
            "{:.1} MiB",
            h.cache_bytes as f64 / (1u64 << 20) as f64
        )],
    );
    row(
        &mut out,
        "ns a row: table / through cache",
        &[format!(
            "{:.1} / {:.1} ({:.2}x)",
            h.table_ns_per_row, h.cached_ns_per_row, h.cached_over_table
        )],
    );
    out
}
