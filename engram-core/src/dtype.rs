//! Element types of tables and weights, and the exact conversions the math relies on.

use half::{bf16, f16};

/// Columns that share one E8M0 scale in an FP8 (E4M3) table row of DeepSeek-V4.1: column
/// `c` of a row is scaled by the row's scale byte `c / FP8_SCALE_BLOCK`, so a row of
/// `width` columns carries `width.div_ceil(FP8_SCALE_BLOCK)` scale bytes (V4.1 widths are
/// multiples of it). V4.1's `wkv` weight is quantized the same way in square blocks of
/// `FP8_SCALE_BLOCK x FP8_SCALE_BLOCK` (docs/algorithm.md, sections 6 and 8).
///
/// The one definition in Rust; the CUDA kernels (`engram-cuda/src/kernels/*.cu`) spell
/// it as a literal 32 and must agree.
pub const FP8_SCALE_BLOCK: usize = 32;

/// How one table row is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowDtype {
    F32,
    BF16,
    F16,
    /// FP8 E4M3 values with one E8M0 scale per [`FP8_SCALE_BLOCK`] columns (DeepSeek-V4.1).
    F8E4M3Scaled,
}

impl RowDtype {
    /// Bytes of one row of `width` columns (scales included).
    pub fn row_bytes(self, width: usize) -> usize {
        self.value_row_bytes(width) + self.scale_row_bytes(width)
    }

    /// Bytes of one row's values (scales excluded).
    pub fn value_row_bytes(self, width: usize) -> usize {
        match self {
            RowDtype::F32 => 4 * width,
            RowDtype::BF16 | RowDtype::F16 => 2 * width,
            RowDtype::F8E4M3Scaled => width,
        }
    }

    /// Bytes of one row's E8M0 scales: one per [`FP8_SCALE_BLOCK`] columns for FP8 rows,
    /// 0 for the others.
    pub fn scale_row_bytes(self, width: usize) -> usize {
        match self {
            RowDtype::F8E4M3Scaled => width.div_ceil(FP8_SCALE_BLOCK),
            _ => 0,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            RowDtype::F32 => "F32",
            RowDtype::BF16 => "BF16",
            RowDtype::F16 => "F16",
            RowDtype::F8E4M3Scaled => "F8_E4M3+E8M0",
        }
    }
}

impl std::fmt::Display for RowDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Value of an FP8 E4M3 (fn: no infinities, 0x7f/0xff are NaN) byte.
#[inline]
pub fn f8e4m3_to_f32(bits: u8) -> f32 {
    float8::F8E4M3::from_bits(bits).to_f32()
}

/// The power of two an E8M0 scale byte stands for: 2^(bits - 127); 0xff is NaN.
#[inline]
pub fn e8m0_to_f32(bits: u8) -> f32 {
    if bits == 0xff {
        f32::NAN
    } else {
        // 2^(e-127) for e in 0..=254; e = 0 is the subnormal 2^-127.
        f32::from_bits(if bits == 0 {
            0x0040_0000
        } else {
            (bits as u32) << 23
        })
    }
}

/// Rounds an f32 to the nearest bf16 (ties to even) and back.
#[inline]
pub fn round_bf16(x: f32) -> f32 {
    bf16::from_f32(x).to_f32()
}

#[inline]
pub fn bf16_bits_to_f32(bits: u16) -> f32 {
    bf16::from_bits(bits).to_f32()
}

#[inline]
pub fn f16_bits_to_f32(bits: u16) -> f32 {
    f16::from_bits(bits).to_f32()
}

/// Dequantizes one V4.1 row: `bf16(e4m3(w[d]) * 2^(scale[d/32]-127))` (32 being
/// [`FP8_SCALE_BLOCK`]).
pub fn dequant_f8_row(values: &[u8], scales: &[u8], out: &mut [f32]) {
    for (d, (o, &v)) in out.iter_mut().zip(values).enumerate() {
        *o = round_bf16(f8e4m3_to_f32(v) * e8m0_to_f32(scales[d / FP8_SCALE_BLOCK]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp8_and_scales() {
        assert_eq!(f8e4m3_to_f32(0x38), 1.0);
        assert_eq!(f8e4m3_to_f32(0x7e), 448.0);
        assert_eq!(f8e4m3_to_f32(0x01), 2f32.powi(-9));
        assert!(f8e4m3_to_f32(0x7f).is_nan());
        assert_eq!(e8m0_to_f32(127), 1.0);
        assert_eq!(e8m0_to_f32(130), 8.0);
        assert_eq!(e8m0_to_f32(0), 2f32.powi(-127));
        assert_eq!(round_bf16(1.0 + 2f32.powi(-9)), 1.0);
    }

    #[test]
    fn row_bytes_count_one_scale_per_block() {
        let f8 = RowDtype::F8E4M3Scaled;
        assert_eq!(
            (
                f8.value_row_bytes(64),
                f8.scale_row_bytes(64),
                f8.row_bytes(64)
            ),
            (64, 2, 66)
        );
        assert_eq!(f8.scale_row_bytes(FP8_SCALE_BLOCK + 1), 2);
        assert_eq!(RowDtype::BF16.row_bytes(64), 128);
        assert_eq!(RowDtype::F32.scale_row_bytes(64), 0);
        // Column 32 is scaled by the second scale byte.
        let mut out = [0f32; 33];
        dequant_f8_row(&[0x38; 33], &[127, 128], &mut out);
        assert_eq!((out[31], out[32]), (1.0, 2.0));
    }
}
