//! The 8-bit block format of hidden states (`--state-precision int8`), shared by the model,
//! which rounds each new state to it, and the state encoding, which stores such a state in a
//! byte a value.
//!
//! A row of state values is cut into blocks of [`INT8_BLOCK`] from its start (the last may be
//! shorter). A block's values are `q · 2^e`: `q` an integer with `|q| ≤ 127`, `e` one exponent
//! for the block, the smallest that holds its largest magnitude (at least
//! [`INT8_MIN_EXPONENT`]): block floating point, as OCP's MXINT8 with smaller blocks. Every
//! such value is an exact `f32`, so a stored state decodes to the same bits.

/// Consecutive state values that share one exponent.
pub const INT8_BLOCK: usize = 8;

/// The smallest shared exponent: smaller values round to zero, and every scale `2^e` is a
/// normal `f32`.
pub const INT8_MIN_EXPONENT: i32 = -120;

/// The largest exponent of a rounded block (its magnitude below 2^126).
const MAX_EXPONENT: i32 = 120;

/// Blocks holding a magnitude of 2^126 or more (which could round up past `f32::MAX`), or a
/// NaN, are left unrounded.
const TOO_LARGE: f32 = 8.507_059e37;

/// `2^e` as an `f32`, for `e` in the normal range (−126 to 127).
#[inline(always)]
fn pow2(e: i32) -> f32 {
    debug_assert!((-126..=127).contains(&e));
    f32::from_bits(((e + 127) as u32) << 23)
}

/// The largest magnitude in `block` (a NaN is skipped).
#[inline(always)]
fn magnitude(block: &[f32]) -> f32 {
    block.iter().fold(0f32, |m, v| m.max(v.abs()))
}

/// The shared exponent of a block whose largest magnitude is `max` (finite, not negative): the
/// smallest `e` with `max ≤ 127 · 2^e`, at least [`INT8_MIN_EXPONENT`].
#[inline(always)]
pub fn int8_exponent(max: f32) -> i32 {
    // max lies in [2^k, 2^(k+1)); 127 · 2^(k−6) holds it unless its mantissa is above 127/64.
    let k = ((max.to_bits() >> 23) & 0xFF) as i32 - 127;
    if k - 6 < INT8_MIN_EXPONENT {
        return INT8_MIN_EXPONENT;
    }
    if max * pow2(6 - k) <= 127.0 {
        k - 6
    } else {
        k - 5
    }
}

/// Rounds a row's values to the format, block by block, in place: each value to the nearest
/// `q · 2^e` (ties to even; zero is `+0.0`). A block with a NaN or a magnitude of 2^126 or more
/// is left as it is.
pub fn round_int8(values: &mut [f32]) {
    for block in values.chunks_mut(INT8_BLOCK) {
        if !block.iter().all(|v| v.abs() < TOO_LARGE) {
            continue;
        }
        let e = int8_exponent(magnitude(block));
        let (down, up) = (pow2(-e), pow2(e));
        // |v · 2^−e| ≤ 127: adding and taking away 1.5 · 2^23 rounds it to an integer, ties to
        // even, and gives +0.0 for a zero.
        const SHIFT: f32 = 12_582_912.0;
        for v in block {
            *v = ((*v * down + SHIFT) - SHIFT) * up;
        }
    }
}

/// One block in the format: its exponent and its values' integers, or `None` when some value
/// is not exactly `q · 2^e` (a state not rounded by [`round_int8`], or `-0.0`). `block` holds
/// at most [`INT8_BLOCK`] values; `codes` receives one integer per value.
pub fn int8_codes(block: &[f32], codes: &mut [i8]) -> Option<i8> {
    debug_assert!(block.len() <= INT8_BLOCK && codes.len() == block.len());
    let max = magnitude(block);
    // A block may round up to 2^126 itself.
    if !(max <= TOO_LARGE) || block.iter().any(|v| v.is_nan()) {
        return None;
    }
    let e = int8_exponent(max);
    let (down, up) = (pow2(-e), pow2(e));
    let mut exact = true;
    for (v, code) in block.iter().zip(codes.iter_mut()) {
        // |v · 2^−e| ≤ 127 by the choice of e. The cast truncates, so the value read back has
        // v's bits only when v is a multiple of 2^e (and not −0.0).
        *code = (*v * down) as i8;
        exact &= (f32::from(*code) * up).to_bits() == v.to_bits();
    }
    if !exact {
        return None;
    }
    i8::try_from(e).ok()
}

/// The scale `2^e` of a block of exponent `e`, or `None` for an exponent the format never
/// writes; a value of the block is its integer times the scale.
#[inline(always)]
pub fn int8_scale(e: i8) -> Option<f32> {
    let e = i32::from(e);
    (INT8_MIN_EXPONENT..=MAX_EXPONENT).contains(&e).then(|| pow2(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Int8 blocks: every value becomes `q · 2^e` with `|q| ≤ 127` and `e` the block's
    /// smallest exponent, the nearest such value (ties to even), and rounding again changes no
    /// bit. Blocks of every magnitude from subnormal to the largest `f32`, with zeros, ties and
    /// negative values.
    #[test]
    fn int8_blocks_round_to_the_nearest_multiple_of_their_scale() {
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for case in 0..400_000 {
            let len = 1 + (next() % INT8_BLOCK as u64) as usize;
            // One magnitude per block (any finite exponent), values spread below it.
            // Any finite, non-negative bit pattern.
            let top = f32::from_bits((next() as u32) % 0x7F80_0000);
            if top >= 2f32.powi(126) {
                continue;
            }
            let mut block: Vec<f32> = (0..len)
                .map(|_| {
                    let r = next();
                    let v = match r % 5 {
                        0 => 0.0,
                        1 => top,
                        // A tie of the block's scale, often.
                        2 => top * (((r >> 8) % 256) as f32 / 256.0),
                        _ => top * (((r >> 8) as u32) as f32 / u32::MAX as f32),
                    };
                    if r & (1 << 40) != 0 { -v } else { v }
                })
                .collect();
            let before = block.clone();
            round_int8(&mut block);
            let max = before.iter().fold(0f32, |m, v| m.max(v.abs()));
            let e = int8_exponent(max);
            assert!(e == INT8_MIN_EXPONENT || max > 127.0 * 2f32.powi(e - 1), "case {case}: {e} is not the smallest exponent for {max}");
            assert!(max <= 127.0 * 2f64.powi(e) as f32, "case {case}");
            for (v, r) in before.iter().zip(&block) {
                let q = f64::from(*r) / 2f64.powi(e);
                assert!(q.fract() == 0.0 && q.abs() <= 127.0, "case {case}: {r} is not q·2^{e}");
                let exact = f64::from(*v) / 2f64.powi(e);
                assert!((exact - q).abs() <= 0.5, "case {case}: {v} rounded to {r}");
                if (exact - q).abs() == 0.5 {
                    assert_eq!(q % 2.0, 0.0, "case {case}: a tie goes to even");
                }
                assert_ne!(r.to_bits(), 0x8000_0000, "case {case}: zero is +0.0");
            }
            let again = block.clone();
            round_int8(&mut block);
            assert_eq!(again.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), block.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "case {case}");
            // Stored and read back to the same bits; the unrounded block (unless it already was
            // in the format) is refused.
            let mut codes = vec![0i8; len];
            let stored = int8_codes(&block, &mut codes).unwrap_or_else(|| panic!("case {case}: {block:?} from {before:?}"));
            let scale = int8_scale(stored).expect("a written exponent");
            let back: Vec<u32> = codes.iter().map(|q| (f32::from(*q) * scale).to_bits()).collect();
            assert_eq!(back, block.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "case {case}");
            if before.iter().zip(&block).any(|(a, b)| a.to_bits() != b.to_bits()) {
                assert_eq!(int8_codes(&before, &mut codes), None, "case {case}: {before:?}");
            }
        }
        // Rows split into blocks from their start; a block with a NaN, an infinity or a value
        // that could round past f32::MAX is kept.
        let mut row = [1.0, 0.3, 0.0, -0.5, 0.25, 0.125, 0.7, -1.0, 100.0, 1.0, f32::NAN, 0.3, 0.3, 0.3, 0.3, 0.3, f32::MAX, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, f32::INFINITY, 0.3];
        round_int8(&mut row);
        assert_eq!(row[..8], [1.0, 0.296_875, 0.0, -0.5, 0.25, 0.125, 0.703_125, -1.0]);
        assert_eq!(row[8..10], [100.0, 1.0]);
        assert!(row[10].is_nan() && row[11] == 0.3);
        assert!(row[16] == f32::MAX && row[17] == 0.3);
        assert!(row[24].is_infinite() && row[25] == 0.3);
    }

    /// Negative zero, subnormals and NaN are not in the format; exponents outside it do not read.
    #[test]
    fn values_outside_the_format_are_refused() {
        let mut codes = [0i8; 2];
        assert_eq!(int8_codes(&[0.0, 0.0], &mut codes), Some(INT8_MIN_EXPONENT as i8));
        assert_eq!(int8_codes(&[0.0, -0.0], &mut codes), None);
        assert_eq!(int8_codes(&[0.5, f32::from_bits(1)], &mut codes), None);
        assert_eq!(int8_codes(&[0.5, f32::NAN], &mut codes), None);
        assert_eq!(int8_codes(&[1.0, -0.25], &mut codes), Some(-6));
        assert_eq!(codes, [64, -16]);
        assert_eq!(int8_scale(-121), None);
        assert_eq!(int8_scale(121), None);
        assert_eq!(int8_scale(-2).map(|scale| f32::from(-3i8) * scale), Some(-0.75));
    }
}
