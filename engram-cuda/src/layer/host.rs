//! The forwards of a [`CudaLayer`] on host buffers (copied to the device and back), and
//! its [`EngramLayer`] implementation.

use cudarc::driver::CudaSlice;
use engram_core::backend::{check_forward_args, EngramLayer, Segment};
use engram_core::config::EngramConfig;
use engram_core::Result as CoreResult;

use super::forward::Rows;
use super::{CudaLayer, DeviceConvState, DeviceSegment};
use crate::error::Result;
use crate::table::DeviceTableStore;

impl CudaLayer {
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
