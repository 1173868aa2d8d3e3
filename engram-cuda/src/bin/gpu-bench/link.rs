//! The limits every other figure is a fraction of: host-to-device copy bandwidth (pinned
//! and pageable) and device-to-device copy bandwidth (HBM, bytes read plus written).

use std::time::Instant;

use engram_cuda::CudaBackend;
use rayon::prelude::*;
use serde_json::json;

use crate::report::{gbps, time_stream, Report, Res};

#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// One large `cuMemcpyHtoDAsync` from pinned memory, GB/s.
    pub h2d_pinned: f64,
    /// Device-to-device copy, counting bytes read plus bytes written, GB/s.
    pub d2d: f64,
}

pub fn measure(be: &CudaBackend, r: &mut Report) -> Res<Limits> {
    let bytes = 256usize << 20;
    let ctx = be.context();
    let copy = be.copy_stream();
    let mut pinned = unsafe { ctx.alloc_pinned_with_flags::<u8>(bytes, 0)? };
    pinned
        .as_mut_slice()?
        .par_chunks_mut(1 << 20)
        .enumerate()
        .for_each(|(k, c)| c.fill(k as u8 | 1));
    let mut dev = unsafe { copy.alloc::<u8>(bytes)? };
    let ms = time_stream(copy, 8, || Ok(copy.memcpy_htod(&pinned, &mut dev)?))?;
    let h2d_pinned = gbps(bytes as f64, ms / 1e3);
    r.add(
        "link",
        "host-to-device copy, pinned (256 MiB)",
        h2d_pinned,
        "GB/s",
        "the limit for offloaded gathers",
    );
    let pageable: Vec<u8> = (0..bytes).into_par_iter().map(|i| i as u8 | 1).collect();
    copy.memcpy_htod(&pageable, &mut dev)?;
    copy.synchronize()?;
    let t = Instant::now();
    for _ in 0..4 {
        copy.memcpy_htod(&pageable, &mut dev)?;
    }
    copy.synchronize()?;
    let h2d_pageable = gbps(4.0 * bytes as f64, t.elapsed().as_secs_f64());
    r.add(
        "link",
        "host-to-device copy, pageable (256 MiB)",
        h2d_pageable,
        "GB/s",
        "",
    );
    let stream = be.stream();
    let big = 1usize << 30;
    let pattern: Vec<u8> = (0..big)
        .into_par_iter()
        .map(|i| (i >> 7) as u8 | 1)
        .collect();
    let src = be.upload(&pattern)?;
    drop(pattern);
    let mut dst = unsafe { stream.alloc::<u8>(big)? };
    let ms = time_stream(stream, 10, || Ok(stream.memcpy_dtod(&src, &mut dst)?))?;
    let d2d = gbps(2.0 * big as f64, ms / 1e3);
    r.add(
        "link",
        "device-to-device copy (1 GiB, read+write)",
        d2d,
        "GB/s",
        "the limit for device-side gathers and kernels",
    );
    r.json.insert(
        "link".into(),
        json!({"h2d_pinned_gbps": h2d_pinned, "h2d_pageable_gbps": h2d_pageable, "d2d_gbps": d2d,
               "note": "h2d: one 256 MiB copy timed with events (pinned) or the host clock (pageable); d2d: one 1 GiB copy, bytes read + written"}),
    );
    Ok(Limits { h2d_pinned, d2d })
}
