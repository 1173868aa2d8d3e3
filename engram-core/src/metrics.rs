//! How far one output is from another: the error measures every check uses (the golden
//! CLI, the backends' tests, the end-to-end checks), each with one meaning, and the one
//! way to fold many errors into a worst one.
//!
//! NaN never passes. `f64::max` drops NaN (`0.0f64.max(NaN) == 0.0`), so a worst error
//! folded with it hides a NaN output; [`worse`] and [`worst`] keep it, and every
//! `worst <= tolerance` check then fails on it.

use half::bf16;

/// `||a - b|| / ||b||` in f64: 0 when both are zero, infinite when only `b` is, NaN when
/// either holds a NaN.
pub fn relative_error(a: &[f32], b: &[f32]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        num += (x as f64 - y as f64).powi(2);
        den += (y as f64).powi(2);
    }
    if a.len() != b.len() || num.is_nan() || den.is_nan() {
        return f64::NAN;
    }
    if den == 0.0 {
        if num == 0.0 {
            0.0
        } else {
            f64::INFINITY
        }
    } else {
        (num / den).sqrt()
    }
}

/// `max |a - b| / max |b|` in f64 (the scale-free worst element): 0 when both are zero,
/// infinite when only `b` is, NaN when either holds a NaN or the lengths differ.
pub fn max_relative_diff(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() {
        return f64::NAN;
    }
    let scale = worst(b.iter().map(|&y| (y as f64).abs()));
    let diff = worst(a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).abs()));
    if diff.is_nan() || scale.is_nan() {
        f64::NAN
    } else if scale == 0.0 {
        if diff == 0.0 {
            0.0
        } else {
            f64::INFINITY
        }
    } else {
        diff / scale
    }
}

/// The larger of two errors, NaN if either is NaN.
pub fn worse(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

/// The worst of `errors`: NaN if any is NaN, 0 when there are none.
pub fn worst(errors: impl IntoIterator<Item = f64>) -> f64 {
    errors.into_iter().fold(0.0, worse)
}

/// Elements whose bf16 values differ, and the largest distance in bf16 ulps (the number
/// of representable bf16 values between them). A NaN on either side counts as off by
/// `u32::MAX`, even against another NaN.
pub fn bf16_distance(a: &[f32], b: &[f32]) -> (usize, u32) {
    bf16_distance_over(a, b, 0)
}

/// Elements more than `ulps` bf16 ulps apart, and the largest distance in ulps (as
/// [`bf16_distance`], which is `ulps` = 0). Extra elements of the longer slice count as
/// off by `u32::MAX`.
pub fn bf16_distance_over(a: &[f32], b: &[f32], ulps: u32) -> (usize, u32) {
    // bf16 bits mapped to integers whose difference counts the representable values
    // between (both zeros map to 0).
    let ordered = |x: f32| {
        let bits = bf16::from_f32(x).to_bits() as i32;
        if bits & 0x8000 != 0 {
            -(bits & 0x7fff)
        } else {
            bits
        }
    };
    let mut off = a.len().abs_diff(b.len());
    let mut max = if off > 0 { u32::MAX } else { 0 };
    for (&x, &y) in a.iter().zip(b) {
        let d = if x.is_nan() || y.is_nan() {
            u32::MAX
        } else {
            (ordered(x) - ordered(y)).unsigned_abs()
        };
        if d > ulps {
            off += 1;
        }
        max = max.max(d);
    }
    (off, max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_error_has_one_meaning() {
        assert_eq!(relative_error(&[3.0, 4.0], &[3.0, 4.0]), 0.0);
        assert!((relative_error(&[3.0, 4.0], &[0.0, 4.0]) - 0.75).abs() < 1e-12);
        assert_eq!(relative_error(&[0.0; 3], &[0.0; 3]), 0.0);
        // A zero reference makes any other output infinitely wrong, not "absolutely" wrong.
        assert_eq!(relative_error(&[1e-9, 0.0], &[0.0, 0.0]), f64::INFINITY);
        assert!(relative_error(&[1.0], &[1.0, 2.0]).is_nan());
    }

    #[test]
    fn a_planted_nan_fails_every_measure() {
        let want = [1.0f32, 2.0, 3.0];
        let got = [1.0f32, f32::NAN, 3.0];
        assert!(relative_error(&got, &want).is_nan());
        assert!(relative_error(&want, &got).is_nan());
        assert!(max_relative_diff(&got, &want).is_nan());
        assert!(max_relative_diff(&want, &got).is_nan());
        assert_eq!(bf16_distance(&got, &want), (1, u32::MAX));
        assert_eq!(bf16_distance(&got, &got), (1, u32::MAX));
        // Folding: NaN wins wherever it sits, where f64::max would drop it.
        assert!(worst([0.1, f64::NAN, 0.2]).is_nan());
        assert!(worst([f64::NAN, 0.1]).is_nan());
        assert!(worst([0.1, 0.2, f64::NAN]).is_nan());
        assert!(worse(f64::NAN, 1.0).is_nan() && worse(1.0, f64::NAN).is_nan());
        // What a check does with it: `worst <= tolerance` is false.
        let passes = |e: f64| e <= 1e-3;
        assert!(!passes(worst([0.0, f64::NAN])));
        assert_eq!([0.0, f64::NAN].into_iter().fold(0.0, f64::max), 0.0);
    }

    #[test]
    fn worst_is_the_max_otherwise() {
        assert_eq!(worst([]), 0.0);
        assert_eq!(worst([0.5, 2.0, 1.0]), 2.0);
        assert_eq!(worst([f64::INFINITY, 1.0]), f64::INFINITY);
    }

    #[test]
    fn max_relative_diff_scales_by_the_largest_reference_element() {
        assert_eq!(max_relative_diff(&[1.0, 2.0], &[1.0, 4.0]), 0.5);
        assert_eq!(max_relative_diff(&[0.0, 0.0], &[0.0, 0.0]), 0.0);
        assert_eq!(max_relative_diff(&[0.0, 1.0], &[0.0, 0.0]), f64::INFINITY);
        assert!(max_relative_diff(&[1.0], &[1.0, 1.0]).is_nan());
    }

    #[test]
    fn bf16_distance_counts_representable_values_between() {
        let one = 1.0f32;
        let up = |x: f32, k: u16| bf16::from_bits(bf16::from_f32(x).to_bits() + k).to_f32();
        assert_eq!(bf16_distance(&[one], &[one]), (0, 0));
        assert_eq!(bf16_distance(&[up(one, 1)], &[one]), (1, 1));
        assert_eq!(bf16_distance(&[one], &[up(one, 2)]), (1, 2));
        // Across zero: the smallest positive and negative subnormals are 2 apart, and
        // +0 and -0 are the same value.
        let tiny = bf16::from_bits(1).to_f32();
        assert_eq!(bf16_distance(&[tiny], &[-tiny]), (1, 2));
        assert_eq!(bf16_distance(&[0.0], &[-0.0]), (0, 0));
        // Values that differ below bf16's precision are the same bf16 value.
        assert_eq!(bf16_distance(&[1.0], &[1.0 + 1e-4]), (0, 0));
        // The threshold: 3 elements off by 0, 1 and 2 ulps.
        let got = [one, up(one, 1), up(one, 2)];
        assert_eq!(bf16_distance_over(&got, &[one; 3], 1), (1, 2));
        assert_eq!(bf16_distance_over(&got, &[one; 3], 0), (2, 2));
        // A length mismatch is never a match.
        assert_eq!(bf16_distance(&[one, one], &[one]), (1, u32::MAX));
    }
}
