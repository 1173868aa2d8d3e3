//! The device forward of a [`CudaLayer`]: argument checks, the GEMM, the gate kernel of
//! each variant (the paper's short conv is in `short_conv.rs`), and
//! [`CudaLayer::forward_rows`], which first gathers the rows from a table.

use cudarc::driver::CudaSlice;
use engram_core::config::{GATE_SCORE_CLAMP, PAPER_CONV_NORM_EPS, PAPER_GATE_NORM_EPS};

use super::profile::{mark, Marks};
use super::weights::DeviceWeights;
use super::{CudaLayer, DeviceSegment};
use crate::error::{CudaBackendError, Result};
use crate::kernels::{In, Out};
use crate::table::{DeviceTableStore, Prefetch};

/// Where [`CudaLayer::forward_rows`] takes its rows from.
pub enum Rows<'a> {
    /// Row ids (`[tokens, heads]`, offsets added): gathered now.
    Ids(&'a [u64]),
    /// A prefetch issued earlier on the same table.
    Prefetched(Prefetch),
}

impl CudaLayer {
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
}
