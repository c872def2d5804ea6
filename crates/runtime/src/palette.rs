//! The bit-level codes of the palette schemes (`docs/FORMAT.md`, `palette` and
//! `palette_sparse`): cluster indices packed at `bits` bits each, and the positions of the
//! stored elements of a sparse weight, as a bitmask or as Golomb-Rice coded gaps.
//!
//! Every stream is least significant bit first: bit `j` of a stream is bit `j % 8` of byte
//! `j / 8`, and a field of `n` bits starting at bit `j` has its least significant bit at `j`.
//! The decoders check a stream completely (length, values, padding bits) and return a
//! reason for the first fault instead of panicking; the tests hold them against bit-at-a-time
//! reference decoders.

/// The largest codebook of the palette schemes: clusters per group.
pub const MAX_PALETTE_CLUSTERS: usize = 256;

/// The largest Golomb-Rice parameter a `palette_sparse` position code may use.
pub const MAX_RICE_PARAMETER: u8 = 31;

/// The width of one cluster index for a codebook of `clusters` entries: the smallest
/// `b >= 1` with `2^b >= clusters` (1 for 1 or 2 clusters, 4 for 16, 8 for 256). `None`
/// outside `1..=256`.
///
/// ```
/// use runtime::palette_index_bits;
/// assert_eq!(palette_index_bits(2), Some(1));
/// assert_eq!(palette_index_bits(3), Some(2));
/// assert_eq!(palette_index_bits(16), Some(4));
/// assert_eq!(palette_index_bits(17), Some(5));
/// assert_eq!(palette_index_bits(256), Some(8));
/// assert_eq!(palette_index_bits(257), None);
/// ```
pub fn palette_index_bits(clusters: usize) -> Option<u8> {
    if clusters == 0 || clusters > MAX_PALETTE_CLUSTERS {
        return None;
    }
    let bits = usize::BITS - (clusters - 1).leading_zeros();
    Some(bits.max(1) as u8)
}

/// Bytes of `count` fields of `bits` bits: `ceil(count * bits / 8)`; `None` on overflow.
pub(crate) fn packed_len(count: usize, bits: u8) -> Option<usize> {
    Some(count.checked_mul(usize::from(bits))?.div_ceil(8))
}

/// Appends fields to a least-significant-bit-first stream.
#[derive(Default)]
struct BitWriter {
    bytes: Vec<u8>,
    /// Bits not yet written out, the oldest in the low bits.
    pending: u64,
    filled: u32,
}

impl BitWriter {
    /// Appends the low `bits` bits of `value` (`bits <= 32`).
    fn write(&mut self, value: u64, bits: u32) {
        debug_assert!(bits <= 32);
        let mask = (1u64 << bits) - 1;
        self.pending |= (value & mask) << self.filled;
        self.filled += bits;
        while self.filled >= 8 {
            self.bytes.push(self.pending as u8);
            self.pending >>= 8;
            self.filled -= 8;
        }
    }

    /// Appends `q` one bits and a zero bit.
    fn write_unary(&mut self, mut q: u64) {
        while q >= 32 {
            self.write(u64::from(u32::MAX), 32);
            q -= 32;
        }
        self.write((1u64 << q) - 1, q as u32 + 1);
    }

    /// The stream, its last byte padded with zero bits.
    fn finish(mut self) -> Vec<u8> {
        if self.filled > 0 {
            self.bytes.push(self.pending as u8);
        }
        self.bytes
    }
}

/// Reads fields from a least-significant-bit-first stream.
struct BitReader<'a> {
    bytes: &'a [u8],
    /// Bits consumed.
    at: usize,
    /// Bits in the stream.
    len: usize,
}

impl<'a> BitReader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self {
            bytes,
            at: 0,
            len: bytes.len().saturating_mul(8),
        }
    }

    /// The next 57 or more bits (zeros past the end), without consuming them.
    fn peek(&self) -> u64 {
        let start = self.at / 8;
        let word = match self.bytes.get(start..start + 8) {
            Some(eight) => u64::from_le_bytes(eight.try_into().unwrap_or_default()),
            None => {
                let mut word = [0u8; 8];
                let tail = self.bytes.get(start..).unwrap_or_default();
                word[..tail.len()].copy_from_slice(tail);
                u64::from_le_bytes(word)
            }
        };
        word >> (self.at % 8)
    }

    /// The next `bits` bits (`bits <= 32`) as a number; `None` past the end.
    fn read(&mut self, bits: u32) -> Option<u64> {
        debug_assert!(bits <= 32);
        if self.len - self.at < bits as usize {
            return None;
        }
        let value = self.peek() & ((1u64 << bits) - 1);
        self.at += bits as usize;
        Some(value)
    }

    /// A unary number: the one bits before the next zero bit, which is consumed too.
    /// Stops early with `Unary::Over` once more than `limit` ones are read.
    fn read_unary(&mut self, limit: u64) -> Unary {
        let mut ones = 0u64;
        loop {
            let left = self.len - self.at;
            if left == 0 {
                return Unary::End;
            }
            // At least 57 valid bits in the window; count within the valid ones only.
            let valid = left.min(57) as u32;
            let run = self.peek().trailing_ones().min(valid);
            ones += u64::from(run);
            if ones > limit {
                return Unary::Over;
            }
            self.at += run as usize;
            if run < valid {
                self.at += 1;
                return Unary::Value(ones);
            }
        }
    }

    /// Checks that the stream ends within the byte of the last field read and that the
    /// bits after it are zero.
    fn finish(&self, what: &str) -> Result<(), String> {
        let used = self.at.div_ceil(8);
        if self.bytes.len() > used {
            return Err(format!(
                "{} bytes follow the end of the {what}",
                self.bytes.len() - used
            ));
        }
        if !self.at.is_multiple_of(8) && self.bytes[used - 1] >> (self.at % 8) != 0 {
            return Err(format!("padding bits after the {what} are set"));
        }
        Ok(())
    }
}

enum Unary {
    Value(u64),
    /// The stream ended before the zero bit.
    End,
    /// More ones than the limit.
    Over,
}

/// `indices` packed at `bits` bits each (`1..=8`), least significant bit first, the last
/// byte padded with zero bits: `packed_len(indices.len(), bits)` bytes. Bits of an index
/// above `bits` are dropped; callers check that indices fit.
pub(crate) fn pack_indices(indices: impl IntoIterator<Item = u8>, bits: u8) -> Vec<u8> {
    let mut w = BitWriter::default();
    for index in indices {
        w.write(u64::from(index), u32::from(bits));
    }
    w.finish()
}

/// The `count` indices of `bits` bits packed in `bytes`, each checked to be below
/// `clusters`, with the byte length and the padding bits checked.
pub(crate) fn unpack_indices(
    bytes: &[u8],
    bits: u8,
    count: usize,
    clusters: usize,
) -> Result<Vec<u8>, String> {
    let expected =
        packed_len(count, bits).ok_or_else(|| "the index stream's length overflows".to_owned())?;
    if bytes.len() != expected {
        return Err(format!(
            "{} bytes, but {count} indices of {bits} bits take {expected}",
            bytes.len()
        ));
    }
    // Whole bytes into a bit buffer, fields out of it; the range check is one maximum.
    let mask = (1u64 << bits) - 1;
    let (mut pending, mut filled) = (0u64, 0u32);
    let mut next = bytes.iter();
    let mut out = Vec::with_capacity(count);
    let mut largest = 0u8;
    for _ in 0..count {
        while filled < u32::from(bits) {
            // The length was checked above.
            pending |= u64::from(next.next().copied().unwrap_or(0)) << filled;
            filled += 8;
        }
        let index = (pending & mask) as u8;
        pending >>= bits;
        filled -= u32::from(bits);
        largest = largest.max(index);
        out.push(index);
    }
    if usize::from(largest) >= clusters {
        let i = out
            .iter()
            .position(|&index| usize::from(index) >= clusters)
            .unwrap_or(0);
        return Err(format!(
            "index {i} is {}, beyond the codebook's {clusters} entries",
            out[i]
        ));
    }
    if pending != 0 {
        return Err("padding bits after the indices are set".to_owned());
    }
    Ok(out)
}

/// The bitmask of the stored positions among `numel` elements: bit `p` set for every
/// position `p` (`positions` ascending, below `numel`).
pub(crate) fn encode_bitmask(positions: &[u32], numel: usize) -> Vec<u8> {
    let mut mask = vec![0u8; numel.div_ceil(8)];
    for &p in positions {
        mask[p as usize / 8] |= 1 << (p % 8);
    }
    mask
}

/// The positions marked in a bitmask over `numel` elements, ascending; the length and the
/// padding bits are checked.
pub(crate) fn decode_bitmask(mask: &[u8], numel: usize) -> Result<Vec<u32>, String> {
    if mask.len() != numel.div_ceil(8) {
        return Err(format!(
            "{} bytes, but a bitmask of {numel} elements takes {}",
            mask.len(),
            numel.div_ceil(8)
        ));
    }
    if !numel.is_multiple_of(8) && mask.last().is_some_and(|&b| b >> (numel % 8) != 0) {
        return Err(format!("bits past the {numel} elements are set"));
    }
    let mut positions = Vec::new();
    for (i, &byte) in mask.iter().enumerate() {
        let mut bits = byte;
        while bits != 0 {
            positions.push((i * 8) as u32 + bits.trailing_zeros());
            bits &= bits - 1;
        }
    }
    Ok(positions)
}

/// The gaps of the Rice code: before each stored position, the elements skipped since the
/// previous one, then the elements after the last one (`numel - 1 - last`, or `numel` when
/// nothing is stored).
fn gaps(positions: &[u32], numel: usize) -> impl Iterator<Item = u64> + '_ {
    let mut next = 0u64;
    positions
        .iter()
        .map(|&p| u64::from(p))
        .chain(std::iter::once(numel as u64))
        .map(move |p| {
            let gap = p - next;
            next = p + 1;
            gap
        })
}

/// Bits of the Rice code of `positions` among `numel` elements with parameter `parameter`.
pub(crate) fn rice_bits(positions: &[u32], numel: usize, parameter: u8) -> u64 {
    gaps(positions, numel)
        .map(|gap| (gap >> parameter) + 1 + u64::from(parameter))
        .sum()
}

/// The Rice parameter (`0..=MAX_RICE_PARAMETER`) that codes `positions` in the fewest bits,
/// the smallest of equals, with that size in bytes.
pub(crate) fn best_rice_parameter(positions: &[u32], numel: usize) -> (u8, usize) {
    (0..=MAX_RICE_PARAMETER)
        .map(|r| (r, rice_bits(positions, numel, r)))
        .min_by_key(|&(r, bits)| (bits, r))
        .map(|(r, bits)| (r, bits.div_ceil(8) as usize))
        .unwrap_or((0, 0))
}

/// The Rice code of `positions` (ascending, below `numel`) with parameter `parameter`:
/// every gap `d` (see [`gaps`]) as `d >> parameter` one bits, a zero bit, then the low
/// `parameter` bits of `d`.
pub(crate) fn encode_rice(positions: &[u32], numel: usize, parameter: u8) -> Vec<u8> {
    let mut w = BitWriter::default();
    let mask = (1u64 << parameter) - 1;
    for gap in gaps(positions, numel) {
        w.write_unary(gap >> parameter);
        w.write(gap & mask, u32::from(parameter));
    }
    w.finish()
}

/// The positions a Rice code with parameter `parameter` (at most [`MAX_RICE_PARAMETER`])
/// stores among `numel` elements, ascending. The code must end exactly at element `numel`,
/// within its last byte, with zero padding bits.
pub(crate) fn decode_rice(bytes: &[u8], numel: usize, parameter: u8) -> Result<Vec<u32>, String> {
    if parameter > MAX_RICE_PARAMETER {
        return Err(format!(
            "Rice parameter {parameter} is above {MAX_RICE_PARAMETER}"
        ));
    }
    let numel = numel as u64;
    let mut r = BitReader::new(bytes);
    let mut positions = Vec::new();
    let mut next = 0u64;
    let underrun = |stored: usize, next: u64| {
        format!(
            "the code ends after {stored} stored positions, at element {next} of {numel}, \
             before the final gap reaches the end"
        )
    };
    loop {
        // A larger quotient would put the position past `numel`.
        let limit = (numel - next) >> parameter;
        let q = match r.read_unary(limit) {
            Unary::Value(q) => q,
            Unary::End => return Err(underrun(positions.len(), next)),
            Unary::Over => {
                return Err(format!(
                    "gap {} runs past the {numel} elements",
                    positions.len()
                ));
            }
        };
        let low = r
            .read(u32::from(parameter))
            .ok_or_else(|| underrun(positions.len(), next))?;
        let position = next + (q << parameter | low);
        if position == numel {
            break;
        }
        if position > numel {
            return Err(format!(
                "gap {} runs past the {numel} elements (to element {position})",
                positions.len()
            ));
        }
        // Below `numel`, which the caller bounds far below `u32::MAX`.
        positions.push(position as u32);
        next = position + 1;
    }
    r.finish("Rice code")?;
    Ok(positions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Every bit of `bytes`, least significant first.
    fn bits_of(bytes: &[u8]) -> Vec<bool> {
        bytes
            .iter()
            .flat_map(|&b| (0..8).map(move |j| b >> j & 1 == 1))
            .collect()
    }

    /// Reference: the number in `bits` bits starting at bit `at`, or `None` past the end.
    fn field(stream: &[bool], at: usize, bits: usize) -> Option<u64> {
        let bits = stream.get(at..at + bits)?;
        Some(
            bits.iter()
                .enumerate()
                .map(|(j, &b)| u64::from(b) << j)
                .sum(),
        )
    }

    /// The scalar reference of [`unpack_indices`]: one bit at a time.
    fn reference_unpack(bytes: &[u8], bits: u8, count: usize, clusters: usize) -> Option<Vec<u8>> {
        let stream = bits_of(bytes);
        let bits = usize::from(bits);
        if bytes.len() != (count * bits).div_ceil(8) {
            return None;
        }
        if stream[count * bits..].iter().any(|&b| b) {
            return None;
        }
        (0..count)
            .map(|i| {
                let v = field(&stream, i * bits, bits)?;
                (v < clusters as u64).then_some(v as u8)
            })
            .collect()
    }

    /// The scalar reference of [`decode_rice`]: one bit at a time.
    fn reference_rice(bytes: &[u8], numel: usize, parameter: u8) -> Option<Vec<u32>> {
        let stream = bits_of(bytes);
        let (mut at, mut next, mut positions) = (0usize, 0usize, Vec::new());
        loop {
            let mut q = 0usize;
            while *stream.get(at)? {
                q += 1;
                at += 1;
                if q > numel {
                    return None;
                }
            }
            at += 1;
            let low = field(&stream, at, usize::from(parameter))? as usize;
            at += usize::from(parameter);
            let position = next + (q << parameter) + low;
            match position.cmp(&numel) {
                std::cmp::Ordering::Equal => break,
                std::cmp::Ordering::Greater => return None,
                std::cmp::Ordering::Less => positions.push(position as u32),
            }
            next = position + 1;
        }
        let ok = bytes.len() == at.div_ceil(8) && stream[at..].iter().all(|&b| !b);
        ok.then_some(positions)
    }

    /// Ascending distinct positions below `numel`, from arbitrary flags.
    fn positions_of(flags: &[bool]) -> Vec<u32> {
        (0..flags.len() as u32)
            .filter(|&i| flags[i as usize])
            .collect()
    }

    #[test]
    fn index_widths() {
        let widths: Vec<u8> = [1, 2, 3, 4, 5, 8, 9, 16, 17, 128, 129, 256]
            .iter()
            .map(|&k| palette_index_bits(k).unwrap())
            .collect();
        assert_eq!(widths, [1, 1, 2, 2, 3, 3, 4, 4, 5, 7, 8, 8]);
        assert_eq!(palette_index_bits(0), None);
        assert_eq!(palette_index_bits(257), None);
    }

    #[test]
    fn packing_is_least_significant_bit_first() {
        // 3-bit fields 1, 2, 7: bits 100 010 111 -> byte 0b11_010_001, byte 0b1.
        assert_eq!(pack_indices([1, 2, 7], 3), [0b1101_0001, 0b1]);
        assert_eq!(
            unpack_indices(&[0b1101_0001, 0b1], 3, 3, 8).unwrap(),
            [1, 2, 7]
        );
    }

    #[test]
    fn index_faults_are_named() {
        let packed = pack_indices([0, 1, 2], 2);
        assert!(unpack_indices(&packed, 2, 3, 3).is_ok());
        let e = unpack_indices(&pack_indices([0, 3, 1], 2), 2, 3, 3).unwrap_err();
        assert!(
            e.contains("index 1 is 3, beyond the codebook's 3 entries"),
            "{e}"
        );
        let e = unpack_indices(&[packed[0] | 0x80], 2, 3, 3).unwrap_err();
        assert!(e.contains("padding bits"), "{e}");
        let e = unpack_indices(&[], 2, 3, 3).unwrap_err();
        assert!(e.contains("0 bytes, but 3 indices of 2 bits take 1"), "{e}");
    }

    #[test]
    fn rice_code_by_hand() {
        // Positions 2 and 3 of 6 with parameter 1: gaps 2, 0, 2 -> `10 0`, `0 0`, `10 0`.
        let code = encode_rice(&[2, 3], 6, 1);
        assert_eq!(code, [0b0010_0001]);
        assert_eq!(rice_bits(&[2, 3], 6, 1), 8);
        assert_eq!(decode_rice(&code, 6, 1).unwrap(), [2, 3]);
        // Nothing stored: one gap of `numel`.
        assert!(
            decode_rice(&encode_rice(&[], 100, 5), 100, 5)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn rice_faults_are_named() {
        let code = encode_rice(&[2, 3], 6, 1);
        let e = decode_rice(&code, 5, 1).unwrap_err();
        assert!(e.contains("runs past the 5 elements"), "{e}");
        // With 7 elements the last gap ends at element 6, stored, and the code stops there.
        let e = decode_rice(&code, 7, 1).unwrap_err();
        assert!(e.contains("ends after 3 stored positions"), "{e}");
        let e = decode_rice(&[code[0], 0], 6, 1).unwrap_err();
        assert!(e.contains("1 bytes follow the end"), "{e}");
        // 7 bits used: the eighth is padding.
        let short = encode_rice(&[2], 5, 1);
        assert_eq!(rice_bits(&[2], 5, 1), 6);
        let e = decode_rice(&[short[0] | 0x80], 5, 1).unwrap_err();
        assert!(
            e.contains("padding bits after the Rice code are set"),
            "{e}"
        );
        let e = decode_rice(&[0xff; 64], 10, 0).unwrap_err();
        assert!(e.contains("gap 0 runs past"), "{e}");
        let e = decode_rice(&code, 6, 32).unwrap_err();
        assert!(e.contains("above 31"), "{e}");
    }

    #[test]
    fn the_writer_picks_the_smallest_rice_code() {
        // Every tenth element stored: a thousand gaps of 9, which cost 5 bits at parameters
        // 2, 3 and 4, then a final gap of 0, which costs 3 bits at parameter 2.
        let positions: Vec<u32> = (0..1000).map(|i| i * 10 + 9).collect();
        let (r, bytes) = best_rice_parameter(&positions, 10_000);
        assert_eq!(r, 2);
        assert_eq!(bytes, 5003usize.div_ceil(8));
        for other in 0..=MAX_RICE_PARAMETER {
            assert!(rice_bits(&positions, 10_000, other) >= rice_bits(&positions, 10_000, r));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn packed_indices_round_trip(
            bits in 1u8..=8,
            raw in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let indices: Vec<u8> = raw.iter().map(|&v| v & ((1u16 << bits) - 1) as u8).collect();
            let packed = pack_indices(indices.iter().copied(), bits);
            prop_assert_eq!(Some(packed.len()), packed_len(indices.len(), bits));
            let clusters = 1usize << bits;
            prop_assert_eq!(&unpack_indices(&packed, bits, indices.len(), clusters).unwrap(), &indices);
            prop_assert_eq!(reference_unpack(&packed, bits, indices.len(), clusters), Some(indices));
        }

        #[test]
        fn index_decoder_matches_the_reference(
            bits in 1u8..=8,
            count in 0usize..64,
            clusters in 1usize..=256,
            mut bytes in proptest::collection::vec(any::<u8>(), 72),
            length in prop_oneof![3 => Just(None), 1 => (0usize..72).prop_map(Some)],
            clear_padding in any::<bool>(),
        ) {
            // Mostly the right length, often with clean padding, so that the index values
            // are what decides.
            let len = length.unwrap_or((count * usize::from(bits)).div_ceil(8));
            bytes.truncate(len);
            let used = count * usize::from(bits);
            if clear_padding && used % 8 != 0 && used.div_ceil(8) == len {
                bytes[len - 1] &= (1u8 << (used % 8)) - 1;
            }
            let fast = unpack_indices(&bytes, bits, count, clusters).ok();
            prop_assert_eq!(fast, reference_unpack(&bytes, bits, count, clusters));
        }

        #[test]
        fn rice_codes_round_trip(
            flags in proptest::collection::vec(proptest::bool::weighted(0.15), 0..2000),
            parameter in 0u8..=MAX_RICE_PARAMETER,
        ) {
            let positions = positions_of(&flags);
            let code = encode_rice(&positions, flags.len(), parameter);
            prop_assert_eq!(code.len() as u64, rice_bits(&positions, flags.len(), parameter).div_ceil(8));
            prop_assert_eq!(&decode_rice(&code, flags.len(), parameter).unwrap(), &positions);
            prop_assert_eq!(reference_rice(&code, flags.len(), parameter), Some(positions));
        }

        #[test]
        fn rice_decoder_matches_the_reference_on_random_bytes(
            bytes in proptest::collection::vec(any::<u8>(), 0..48),
            numel in 0usize..400,
            parameter in 0u8..=8,
        ) {
            let fast = decode_rice(&bytes, numel, parameter).ok();
            prop_assert_eq!(fast, reference_rice(&bytes, numel, parameter));
        }

        #[test]
        fn rice_decoder_matches_the_reference_on_damaged_codes(
            flags in proptest::collection::vec(proptest::bool::weighted(0.2), 0..400),
            parameter in 0u8..=8,
            flip in any::<proptest::sample::Index>(),
            damage in 0u8..5,
            numel_delta in -2i64..=2,
        ) {
            let mut code = encode_rice(&positions_of(&flags), flags.len(), parameter);
            match damage {
                0 if !code.is_empty() => {
                    let bit = flip.index(code.len() * 8);
                    code[bit / 8] ^= 1 << (bit % 8);
                }
                1 => {
                    code.pop();
                }
                2 => code.push(flip.index(256) as u8),
                3 if !code.is_empty() => *code.last_mut().unwrap() |= 0x80,
                _ => {}
            }
            let numel = (flags.len() as i64 + numel_delta).max(0) as usize;
            let fast = decode_rice(&code, numel, parameter).ok();
            prop_assert_eq!(fast, reference_rice(&code, numel, parameter));
        }

        #[test]
        fn bitmasks_round_trip(flags in proptest::collection::vec(any::<bool>(), 0..300)) {
            let positions = positions_of(&flags);
            let mask = encode_bitmask(&positions, flags.len());
            prop_assert_eq!(decode_bitmask(&mask, flags.len()).unwrap(), positions);
        }
    }
}
