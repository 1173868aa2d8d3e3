//! [`CudaLayer`]: a whole Engram layer on the device for a batch of segments, with the
//! same semantics as [`engram_core::backend::EngramLayer::forward`] (which it also
//! implements, by copying host buffers to the device and back).
//!
//! Per batch: one GEMM `kv = E @ W^T` for the keys and the value of every branch (cuBLAS
//! sgemm, f32), then one fused gate kernel (paper: gate, value and the short conv's
//! normalized input; V4.1: gate and the bf16 output), then (paper) the short conv, which
//! reads each segment's remembered `z` rows, and the update of those windows.

use std::sync::{Arc, Mutex};

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, DevicePtrMut, LaunchConfig};
use engram_core::backend::{check_forward_args, EngramLayer, Segment, ShortConvState};
use engram_core::checkpoint::LayerWeights;
use engram_core::config::{
    EngramConfig, Variant, GATE_SCORE_CLAMP, PAPER_CONV_NORM_EPS, PAPER_GATE_NORM_EPS,
};
use engram_core::Result as CoreResult;

use crate::backend::{CudaBackend, BLOCK};
use crate::error::{CudaBackendError, DriverResultExt, Result};
use crate::kernels::{In, Out};
use crate::table::{DeviceTableStore, Prefetch};

/// One sequence's short-conv window for one layer, in device memory: the last
/// `(K-1)*dilation` rows of `z` (`hc_mult * hidden_size` channels), oldest first.
pub struct DeviceConvState {
    buf: CudaSlice<f32>,
    channels: usize,
    history: usize,
}

impl DeviceConvState {
    /// A fresh (all-zero) window for `cfg`.
    pub fn new(backend: &CudaBackend, cfg: &EngramConfig) -> Result<Self> {
        Ok(Self {
            buf: backend.alloc_zeros(cfg.conv_history() * cfg.branch_channels())?,
            channels: cfg.branch_channels(),
            history: cfg.conv_history(),
        })
    }

    /// A device copy of a host window.
    pub fn from_host(backend: &CudaBackend, state: &ShortConvState) -> Result<Self> {
        let rows = state.rows();
        let buf = if rows.is_empty() {
            backend.alloc_zeros(1)?
        } else {
            backend.upload(rows)?
        };
        Ok(Self {
            buf,
            channels: state.channels(),
            history: state.history(),
        })
    }

    /// Copies the window back into `state` (same shape).
    pub fn download_into(&self, backend: &CudaBackend, state: &mut ShortConvState) -> Result<()> {
        if state.channels() != self.channels || state.history() != self.history {
            return Err(CudaBackendError::Invalid(format!(
                "conv state of {} rows x {} channels cannot take a window of {} x {}",
                state.history(),
                state.channels(),
                self.history,
                self.channels
            )));
        }
        let n = self.history * self.channels;
        if n == 0 {
            return Ok(());
        }
        let mut rows = vec![0f32; n];
        backend.download_into(&self.buf, &mut rows)?;
        // Pushing a whole window replaces the state's rows.
        state.push_rows(&rows);
        Ok(())
    }

    /// The window as a host state.
    pub fn to_host(&self, backend: &CudaBackend) -> Result<ShortConvState> {
        let mut s = ShortConvState::with_size(self.channels, self.history);
        self.download_into(backend, &mut s)?;
        Ok(s)
    }

    pub fn history(&self) -> usize {
        self.history
    }
    pub fn channels(&self) -> usize {
        self.channels
    }
}

/// One run of consecutive new tokens of one sequence, with its device conv window.
pub struct DeviceSegment<'a> {
    pub len: usize,
    /// `None`: the segment starts its sequence and nothing is remembered after it.
    pub conv: Option<&'a mut DeviceConvState>,
}

impl<'a> DeviceSegment<'a> {
    pub fn fresh(len: usize) -> Self {
        Self { len, conv: None }
    }
    pub fn with_state(len: usize, conv: &'a mut DeviceConvState) -> Self {
        Self {
            len,
            conv: Some(conv),
        }
    }
}

/// Timing events recorded between the stages of a forward.
struct Marks {
    stream: Arc<CudaStream>,
    events: Vec<(&'static str, CudaEvent)>,
}

impl Marks {
    fn new(stream: &Arc<CudaStream>) -> Self {
        Self {
            stream: stream.clone(),
            events: Vec::new(),
        }
    }
    fn mark(&mut self, stage: &'static str) -> Result<()> {
        let ev = self
            .stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .ctx("recording a timing event")?;
        self.events.push((stage, ev));
        Ok(())
    }
    /// Milliseconds between consecutive marks, named by the later one.
    fn times(self) -> Result<Vec<(&'static str, f32)>> {
        self.events
            .windows(2)
            .map(|w| {
                w[0].1
                    .elapsed_ms(&w[1].1)
                    .map(|ms| (w[1].0, ms))
                    .ctx("reading timing events")
            })
            .collect()
    }
}

fn mark(marks: &mut Option<&mut Marks>, stage: &'static str) -> Result<()> {
    match marks {
        Some(m) => m.mark(stage),
        None => Ok(()),
    }
}

/// Where [`CudaLayer::forward_rows`] takes its rows from.
pub enum Rows<'a> {
    /// Row ids (`[tokens, heads]`, offsets added): gathered now.
    Ids(&'a [u64]),
    /// A prefetch issued earlier on the same table.
    Prefetched(Prefetch),
}

#[allow(clippy::large_enum_variant)] // one per layer
enum DeviceWeights {
    Paper {
        /// `[(G+1)*D, E]`: the G key projections, then the value projection.
        w: CudaSlice<f32>,
        /// `[(G+1)*D]`.
        bias: CudaSlice<f32>,
        norm1: CudaSlice<f32>,
        norm2: CudaSlice<f32>,
        /// `[G*D, K]`.
        conv_w: CudaSlice<f32>,
        conv_norm: CudaSlice<f32>,
    },
    V41 {
        /// `[(G+1)*D, E]`, dequantized.
        w: CudaSlice<f32>,
        /// `[G*D]`: q_weight * k_weight in f32.
        wqk: CudaSlice<f32>,
    },
}

/// An Engram layer whose math runs on the device.
pub struct CudaLayer {
    backend: CudaBackend,
    cfg: EngramConfig,
    layer_id: usize,
    weights: DeviceWeights,
    /// Serializes forwards of this layer (one cuBLAS handle, one stream).
    lock: Mutex<()>,
}

fn expect_len(what: &str, got: usize, want: usize) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(CudaBackendError::Invalid(format!(
            "layer weights: {what} has {got} values, expected {want}"
        )))
    }
}

impl CudaLayer {
    /// Uploads layer `layer_id`'s weights (checked against `cfg`).
    pub fn new(
        backend: &CudaBackend,
        cfg: EngramConfig,
        layer_id: usize,
        weights: &LayerWeights,
    ) -> Result<Self> {
        cfg.layer_index(layer_id)?;
        let (g, d, e) = (cfg.hc_mult, cfg.hidden_size, cfg.embed_dim());
        let weights = match (weights, cfg.variant) {
            (LayerWeights::Paper(w), Variant::Paper) => {
                expect_len("key projections", w.key_weight.len(), g)?;
                let mut wcat = Vec::with_capacity((g + 1) * d * e);
                let mut bias = Vec::with_capacity((g + 1) * d);
                for h in 0..g {
                    expect_len("a key projection", w.key_weight[h].len(), d * e)?;
                    expect_len("a key bias", w.key_bias[h].len(), d)?;
                    wcat.extend_from_slice(&w.key_weight[h]);
                    bias.extend_from_slice(&w.key_bias[h]);
                }
                expect_len("the value projection", w.value_weight.len(), d * e)?;
                expect_len("the value bias", w.value_bias.len(), d)?;
                wcat.extend_from_slice(&w.value_weight);
                bias.extend_from_slice(&w.value_bias);
                let flat = |what: &str, v: &[Vec<f32>]| -> Result<Vec<f32>> {
                    expect_len(what, v.len(), g)?;
                    for x in v {
                        expect_len(what, x.len(), d)?;
                    }
                    Ok(v.concat())
                };
                expect_len(
                    "the short-conv weight",
                    w.conv_weight.len(),
                    g * d * cfg.kernel_size,
                )?;
                DeviceWeights::Paper {
                    w: backend.upload(&wcat)?,
                    bias: backend.upload(&bias)?,
                    norm1: backend.upload(&flat("norm1", &w.norm1)?)?,
                    norm2: backend.upload(&flat("norm2", &w.norm2)?)?,
                    conv_w: backend.upload(&w.conv_weight)?,
                    conv_norm: backend.upload(&flat("short_conv.norms", &w.conv_norms)?)?,
                }
            }
            (LayerWeights::V41(w), Variant::V41) => {
                expect_len("wkv", w.wkv.len(), (g + 1) * d * e)?;
                expect_len("q_weight", w.q_weight.len(), g * d)?;
                expect_len("k_weight", w.k_weight.len(), g * d)?;
                let wqk: Vec<f32> = w
                    .q_weight
                    .iter()
                    .zip(&w.k_weight)
                    .map(|(q, k)| q * k)
                    .collect();
                DeviceWeights::V41 {
                    w: backend.upload(&w.wkv)?,
                    wqk: backend.upload(&wqk)?,
                }
            }
            _ => {
                return Err(engram_core::EngramError::config(
                    "variant",
                    "weights are for the other variant",
                )
                .into())
            }
        };
        Ok(Self {
            backend: backend.clone(),
            cfg,
            layer_id,
            weights,
            lock: Mutex::new(()),
        })
    }

    pub fn backend(&self) -> &CudaBackend {
        &self.backend
    }

    fn stream(&self) -> &Arc<CudaStream> {
        self.backend.stream()
    }

    fn cfg1d(&self, items: usize) -> LaunchConfig {
        self.backend.launch_cfg(items)
    }

    /// The whole layer on device buffers: `hidden` `[tokens, hc_mult, hidden_size]`,
    /// `embeddings` `[tokens, embed_dim]`, `out` like `hidden` (the delta for the paper
    /// variant, the updated hidden states for V4.1). Segments' windows are read and
    /// updated in place. Work is queued on the backend's compute stream.
    pub fn forward_device(
        &self,
        hidden: &CudaSlice<f32>,
        embeddings: &CudaSlice<f32>,
        dead: Option<&[bool]>,
        segments: &mut [DeviceSegment<'_>],
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        self.forward_impl(hidden, embeddings, dead, segments, out, None)
    }

    /// [`Self::forward_device`], timing each stage with events (waits for the device):
    /// `(stage, milliseconds)` for "gemm", "gate" and, for the paper variant, "conv" and
    /// "window" (the update of the remembered rows).
    pub fn forward_device_profiled(
        &self,
        hidden: &CudaSlice<f32>,
        embeddings: &CudaSlice<f32>,
        dead: Option<&[bool]>,
        segments: &mut [DeviceSegment<'_>],
        out: &mut CudaSlice<f32>,
    ) -> Result<Vec<(&'static str, f32)>> {
        let mut marks = Marks::new(self.stream());
        marks.mark("start")?;
        self.forward_impl(hidden, embeddings, dead, segments, out, Some(&mut marks))?;
        marks.times()
    }

    fn forward_impl(
        &self,
        hidden: &CudaSlice<f32>,
        embeddings: &CudaSlice<f32>,
        dead: Option<&[bool]>,
        segments: &mut [DeviceSegment<'_>],
        out: &mut CudaSlice<f32>,
        mut marks: Option<&mut Marks>,
    ) -> Result<()> {
        let cfg = &self.cfg;
        let tokens: usize = segments.iter().map(|s| s.len).sum();
        let (g, d, e, c) = (
            cfg.hc_mult,
            cfg.hidden_size,
            cfg.embed_dim(),
            cfg.branch_channels(),
        );
        let need = |what: &str, got: usize, want: usize| -> Result<()> {
            if got < want {
                return Err(CudaBackendError::Invalid(format!(
                    "{what}: device buffer of {got} floats for {tokens} tokens needs {want}"
                )));
            }
            Ok(())
        };
        need("hidden states", hidden.len(), tokens * c)?;
        need("embeddings", embeddings.len(), tokens * e)?;
        need("output", out.len(), tokens * c)?;
        if let Some(m) = dead {
            if m.len() != tokens {
                return Err(CudaBackendError::Invalid(format!(
                    "dead-token mask has {} entries for {tokens} tokens",
                    m.len()
                )));
            }
        }
        for s in segments.iter() {
            if let Some(st) = &s.conv {
                if st.channels != c || st.history != cfg.conv_history() {
                    return Err(CudaBackendError::Invalid(format!(
                        "short-conv state of {} rows x {} channels, expected {} x {c}",
                        st.history,
                        st.channels,
                        cfg.conv_history()
                    )));
                }
            }
        }
        if tokens == 0 {
            return Ok(());
        }
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let be = &self.backend;
        let stream = self.stream().clone();
        let n_kv = (g + 1) * d;
        let mut kv = be.alloc_zeros::<f32>(tokens * n_kv)?;
        let as_i32 = |v: usize| {
            i32::try_from(v)
                .map_err(|_| CudaBackendError::Invalid(format!("{v} does not fit in an int")))
        };
        let (t_i, g_i, d_i) = (as_i32(tokens)?, as_i32(g)?, as_i32(d)?);
        let clamp = GATE_SCORE_CLAMP as f32;
        match &self.weights {
            DeviceWeights::V41 { w, wqk } => {
                be.gemm_nt(embeddings, w, &mut kv, tokens, n_kv, e)?;
                mark(&mut marks, "gemm")?;
                let dead_dev = dead
                    .map(|m| be.upload(&m.iter().map(|&b| b as u8).collect::<Vec<u8>>()))
                    .transpose()?;
                let eps = cfg.rms_norm_eps as f32;
                let dead_arg = dead_dev.as_ref().map_or(In::Addr(0), In::Buf);
                unsafe {
                    be.kernels().v41_gate(
                        &stream,
                        self.cfg1d(tokens * g),
                        In::Buf(hidden),
                        In::Buf(&kv),
                        In::Buf(wqk),
                        dead_arg,
                        Out::Buf(out),
                        t_i,
                        g_i,
                        d_i,
                        eps,
                        clamp,
                    )
                }?;
                mark(&mut marks, "gate")?;
            }
            DeviceWeights::Paper {
                w,
                bias,
                norm1,
                norm2,
                conv_w,
                conv_norm,
            } => {
                be.gemm_nt(embeddings, w, &mut kv, tokens, n_kv, e)?;
                mark(&mut marks, "gemm")?;
                let mut val = be.alloc_zeros::<f32>(tokens * c)?;
                let mut z = be.alloc_zeros::<f32>(tokens * c)?;
                let (gate_eps, conv_eps) = (PAPER_GATE_NORM_EPS, PAPER_CONV_NORM_EPS);
                unsafe {
                    be.kernels().paper_gate(
                        &stream,
                        self.cfg1d(tokens * g),
                        In::Buf(hidden),
                        In::Buf(&kv),
                        In::Buf(bias),
                        In::Buf(norm1),
                        In::Buf(norm2),
                        In::Buf(conv_norm),
                        Out::Buf(&mut val),
                        Out::Buf(&mut z),
                        t_i,
                        g_i,
                        d_i,
                        gate_eps,
                        conv_eps,
                        clamp,
                    )
                }?;
                mark(&mut marks, "gate")?;
                self.short_conv(&stream, &val, &z, conv_w, segments, out, tokens, marks)?;
            }
        }
        Ok(())
    }

    /// The short conv over all segments, then the update of their windows.
    #[allow(clippy::too_many_arguments)]
    fn short_conv(
        &self,
        stream: &Arc<CudaStream>,
        val: &CudaSlice<f32>,
        z: &CudaSlice<f32>,
        conv_w: &CudaSlice<f32>,
        segments: &mut [DeviceSegment<'_>],
        out: &mut CudaSlice<f32>,
        tokens: usize,
        mut marks: Option<&mut Marks>,
    ) -> Result<()> {
        let be = &self.backend;
        let cfg = &self.cfg;
        let c = cfg.branch_channels();
        let (k, dil, h) = (cfg.kernel_size, cfg.conv_dilation(), cfg.conv_history());
        let s_count = segments.len();
        let mut seg_of = Vec::with_capacity(tokens);
        let mut pos_of = Vec::with_capacity(tokens);
        let mut seg_start = Vec::with_capacity(s_count);
        let mut seg_len = Vec::with_capacity(s_count);
        let mut start = 0usize;
        for (i, s) in segments.iter().enumerate() {
            seg_start.push(start as i32);
            seg_len.push(s.len as i32);
            for p in 0..s.len {
                seg_of.push(i as i32);
                pos_of.push(p as i32);
            }
            start += s.len;
        }
        // Device addresses of the windows (0: a segment that starts its sequence). The
        // guards order later users of the windows after this forward.
        let mut guards = Vec::new();
        let mut hist = Vec::with_capacity(s_count);
        for s in segments.iter_mut() {
            match s.conv.as_deref_mut() {
                Some(st) if h > 0 => {
                    let (p, guard) = st.buf.device_ptr_mut(stream);
                    hist.push(p);
                    guards.push(guard);
                }
                _ => hist.push(0u64),
            }
        }
        let seg_of_d = be.upload(&seg_of)?;
        let pos_of_d = be.upload(&pos_of)?;
        let hist_d = be.upload(&hist)?;
        let (t_i, c_i, k_i, dil_i, h_i, s_i) = (
            tokens as i32,
            c as i32,
            k as i32,
            dil as i32,
            h as i32,
            s_count as i32,
        );
        unsafe {
            be.kernels().short_conv(
                stream,
                self.cfg1d(tokens),
                In::Buf(val),
                In::Buf(z),
                In::Buf(conv_w),
                In::Buf(&seg_of_d),
                In::Buf(&pos_of_d),
                In::Buf(&hist_d),
                Out::Buf(out),
                t_i,
                c_i,
                k_i,
                dil_i,
                h_i,
            )
        }?;
        mark(&mut marks, "conv")?;
        if h > 0 && hist.iter().any(|&p| p != 0) {
            let seg_start_d = be.upload(&seg_start)?;
            let seg_len_d = be.upload(&seg_len)?;
            let mut scratch = be.alloc_zeros::<f32>(s_count * h * c)?;
            unsafe {
                be.kernels().conv_window(
                    stream,
                    self.cfg1d(s_count * h),
                    In::Buf(z),
                    In::Buf(&hist_d),
                    In::Buf(&seg_start_d),
                    In::Buf(&seg_len_d),
                    Out::Buf(&mut scratch),
                    s_i,
                    c_i,
                    h_i,
                )
            }?;
            unsafe {
                be.kernels().store_windows(
                    stream,
                    self.cfg1d(s_count * h),
                    In::Buf(&scratch),
                    In::Buf(&hist_d),
                    s_i,
                    c_i,
                    h_i,
                )
            }?;
        }
        mark(&mut marks, "window")?;
        drop(guards);
        Ok(())
    }

    /// Gathers the rows (`[tokens, heads]` ids, or an earlier prefetch of them) from
    /// `table` and runs the layer: the whole Engram layer on the device.
    pub fn forward_rows(
        &self,
        table: &mut dyn DeviceTableStore,
        rows: Rows<'_>,
        hidden: &CudaSlice<f32>,
        dead: Option<&[bool]>,
        segments: &mut [DeviceSegment<'_>],
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let tokens: usize = segments.iter().map(|s| s.len).sum();
        let heads = self.cfg.heads_per_layer();
        if table.width() != self.cfg.head_dim {
            return Err(CudaBackendError::Invalid(format!(
                "table `{}` has rows of {} columns; the layer's head_dim is {}",
                table.name(),
                table.width(),
                self.cfg.head_dim
            )));
        }
        let n = match &rows {
            Rows::Ids(ids) => ids.len(),
            Rows::Prefetched(t) => t.rows(),
        };
        if n != tokens * heads {
            return Err(CudaBackendError::Invalid(format!(
                "{n} row ids for {tokens} tokens x {heads} heads"
            )));
        }
        let mut emb = self
            .backend
            .alloc_zeros::<f32>(tokens * self.cfg.embed_dim())?;
        let stream = self.stream().clone();
        match rows {
            Rows::Ids(ids) => table.gather_to_device(ids, &mut emb, &stream)?,
            Rows::Prefetched(t) => table.gather_prefetched(t, &mut emb, &stream)?,
        }
        self.forward_device(hidden, &emb, dead, segments, out)
    }

    /// [`EngramLayer::forward`] with the crate's error type: host buffers copied to the
    /// device and back.
    pub fn forward_host(
        &self,
        hidden: &[f32],
        embeddings: &[f32],
        dead: Option<&[bool]>,
        segments: &mut [Segment<'_>],
        out: &mut [f32],
    ) -> Result<()> {
        self.on_host_buffers(
            hidden,
            embeddings.len(),
            dead,
            segments,
            out,
            |h, segs, o| {
                let e = self.backend.upload(embeddings)?;
                self.forward_device(h, &e, dead, segs, o)
            },
        )
    }

    /// [`Self::forward_rows`] for a host engine that keeps hidden states and windows in
    /// host memory: the rows come from `table` (ids, or a prefetch issued earlier, whose
    /// transfer the compute stream waits for), everything else is copied like
    /// [`Self::forward_host`].
    pub fn forward_host_rows(
        &self,
        table: &mut dyn DeviceTableStore,
        rows: Rows<'_>,
        hidden: &[f32],
        dead: Option<&[bool]>,
        segments: &mut [Segment<'_>],
        out: &mut [f32],
    ) -> Result<()> {
        let tokens: usize = segments.iter().map(|s| s.len).sum();
        let embeddings = tokens * self.cfg.embed_dim();
        self.on_host_buffers(hidden, embeddings, dead, segments, out, |h, segs, o| {
            self.forward_rows(table, rows, h, dead, segs, o)
        })
    }

    /// Checks host arguments, uploads `hidden` and the segments' windows, runs `run` on
    /// the device copies, and downloads the output and the updated windows.
    fn on_host_buffers(
        &self,
        hidden: &[f32],
        embeddings: usize,
        dead: Option<&[bool]>,
        segments: &mut [Segment<'_>],
        out: &mut [f32],
        run: impl FnOnce(&CudaSlice<f32>, &mut [DeviceSegment<'_>], &mut CudaSlice<f32>) -> Result<()>,
    ) -> Result<()> {
        let tokens = check_forward_args(
            &self.cfg,
            hidden.len(),
            embeddings,
            dead,
            segments,
            out.len(),
        )?;
        if tokens == 0 {
            return Ok(());
        }
        let be = &self.backend;
        let h = be.upload(hidden)?;
        let mut o = be.alloc_zeros::<f32>(out.len())?;
        let mut states = segments
            .iter()
            .map(|s| {
                s.conv
                    .as_deref()
                    .map(|c| DeviceConvState::from_host(be, c))
                    .transpose()
            })
            .collect::<Result<Vec<_>>>()?;
        {
            let mut dsegs: Vec<DeviceSegment<'_>> = segments
                .iter()
                .zip(states.iter_mut())
                .map(|(s, st)| DeviceSegment {
                    len: s.len,
                    conv: st.as_mut(),
                })
                .collect();
            run(&h, &mut dsegs, &mut o)?;
        }
        be.download_into(&o, out)?;
        for (seg, st) in segments.iter_mut().zip(&states) {
            if let (Some(host), Some(dev)) = (seg.conv.as_deref_mut(), st) {
                dev.download_into(be, host)?;
            }
        }
        Ok(())
    }
}

impl EngramLayer for CudaLayer {
    fn config(&self) -> &EngramConfig {
        &self.cfg
    }
    fn layer_id(&self) -> usize {
        self.layer_id
    }
    fn forward(
        &self,
        hidden: &[f32],
        embeddings: &[f32],
        dead: Option<&[bool]>,
        segments: &mut [Segment<'_>],
        out: &mut [f32],
    ) -> CoreResult<()> {
        self.forward_host(hidden, embeddings, dead, segments, out)
            .map_err(Into::into)
    }
}

// The block size the kernels assume (a multiple of 32).
const _: () = assert!(BLOCK.is_multiple_of(32) && BLOCK <= 1024);
