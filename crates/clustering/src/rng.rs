//! A small seeded generator (SplitMix64) for the random centroid initialisations.
//!
//! Centroids are drawn once, when clustering starts, so quality needs are modest; what
//! matters is that a seed gives the same centroids on every platform and every run,
//! and that drawing them touches no global state (`tch::manual_seed` would reseed the
//! caller's own generator).

/// SplitMix64 (Steele, Lea and Flood, 2014): a 64-bit state advanced by a constant and
/// mixed on output.
#[derive(Debug, Clone)]
pub(crate) struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// A generator for one group of one variable: the same seed gives every group its
    /// own stream, and a group's stream does not depend on which other variables are
    /// clustered.
    pub(crate) fn for_group(seed: u64, name: &str, group: usize) -> Self {
        // FNV-1a of the name, then the group index and the seed mixed through the output
        // function, so that neighbouring seeds and groups give unrelated streams.
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in name.bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        let mut mixer = Self::new(seed ^ mix(hash ^ mix(group as u64)));
        Self::new(mixer.next_u64())
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.state)
    }

    /// Uniform in [0, 1), with 53 random bits.
    pub(crate) fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `0..n` (`n > 0`), without modulo bias (Lemire's multiply-shift with
    /// rejection).
    pub(crate) fn below(&mut self, n: usize) -> usize {
        let n = n as u64;
        let threshold = n.wrapping_neg() % n;
        loop {
            let product = u128::from(self.next_u64()) * u128::from(n);
            if (product as u64) >= threshold {
                return (product >> 64) as usize;
            }
        }
    }
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_reference_sequence() {
        // The first outputs of SplitMix64 seeded with 1234567, from the reference C code.
        let mut rng = SplitMix64::new(1_234_567);
        let expected = [
            6_457_827_717_110_365_317u64,
            3_203_168_211_198_807_973,
            9_817_491_932_198_370_423,
            4_593_380_528_125_082_431,
            16_408_922_859_458_223_821,
        ];
        for value in expected {
            assert_eq!(rng.next_u64(), value);
        }
    }

    #[test]
    fn draws_stay_in_range_and_cover_it() {
        let mut rng = SplitMix64::new(7);
        let mut seen = [false; 5];
        for _ in 0..200 {
            let x = rng.next_f64();
            assert!((0.0..1.0).contains(&x));
            seen[rng.below(5)] = true;
        }
        assert!(seen.iter().all(|&s| s));
    }

    #[test]
    fn groups_and_names_get_different_streams() {
        let first = |name: &str, group| SplitMix64::for_group(3, name, group).next_u64();
        assert_eq!(first("0.weight", 0), first("0.weight", 0));
        assert_ne!(first("0.weight", 0), first("0.weight", 1));
        assert_ne!(first("0.weight", 0), first("1.weight", 0));
        assert_ne!(
            SplitMix64::for_group(3, "0.weight", 0).next_u64(),
            SplitMix64::for_group(4, "0.weight", 0).next_u64()
        );
    }
}
