//! Uniform sampling of a stream: the values an [`Observer`](crate::Observer) keeps.

/// SplitMix64 (Steele, Lea and Flood, 2014): a small, fast generator whose output depends
/// on the seed only, the same on every platform and in every version of this crate.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`), without bias: Lemire's multiply-shift with rejection.
    fn below(&mut self, n: u64) -> u64 {
        let mut m = u128::from(self.next_u64()) * u128::from(n);
        if (m as u64) < n {
            let threshold = n.wrapping_neg() % n;
            while (m as u64) < threshold {
                m = u128::from(self.next_u64()) * u128::from(n);
            }
        }
        (m >> 64) as u64
    }
}

/// A uniform sample without replacement of at most `capacity` values of a stream (Vitter's
/// Algorithm R): after `n` values, each of them is kept with probability `capacity / n`,
/// whichever batch it came in. Seeded, so the same stream gives the same sample; batch
/// boundaries do not matter (one draw per value, in stream order).
#[derive(Debug, Clone)]
pub(crate) struct Reservoir {
    values: Vec<f32>,
    capacity: usize,
    seen: u64,
    rng: SplitMix64,
}

impl Reservoir {
    /// An empty reservoir; `capacity` must be positive.
    pub(crate) fn new(capacity: usize, seed: u64) -> Self {
        Self {
            values: Vec::new(),
            capacity,
            seen: 0,
            rng: SplitMix64(seed),
        }
    }

    /// Offers every value of `batch`, in order.
    pub(crate) fn extend(&mut self, batch: &[f32]) {
        let free = self.capacity - self.values.len();
        let (fill, rest) = batch.split_at(free.min(batch.len()));
        self.values.extend_from_slice(fill);
        self.seen += fill.len() as u64;
        for &v in rest {
            // Value number `seen` (from 0) replaces a kept one with probability
            // `capacity / (seen + 1)`, a uniformly chosen one.
            let j = self.rng.below(self.seen + 1);
            if let Some(slot) = usize::try_from(j).ok().and_then(|j| self.values.get_mut(j)) {
                *slot = v;
            }
            self.seen += 1;
        }
    }

    /// The kept values: every value offered while fewer than `capacity` had been, in order;
    /// a uniform sample of them afterwards.
    pub(crate) fn values(&self) -> &[f32] {
        &self.values
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Draws per bucket of `below`: with 60 000 draws over 6 buckets, a bucket's count has a
    /// standard deviation of about 91; six of them away from 10 000 would be a biased draw.
    const BUCKET_TOLERANCE: u64 = 600;

    #[test]
    fn bounded_draws_are_uniform_and_in_range() {
        let mut rng = SplitMix64(7);
        let mut counts = [0u64; 6];
        for _ in 0..60_000 {
            counts[rng.below(6) as usize] += 1;
        }
        assert!(
            counts
                .iter()
                .all(|&c| c.abs_diff(10_000) <= BUCKET_TOLERANCE),
            "{counts:?}"
        );
        assert_eq!(SplitMix64(1).below(1), 0);
        let mut big = SplitMix64(3);
        assert!((0..1000).all(|_| big.below(u64::MAX - 1) < u64::MAX - 1));
    }

    #[test]
    fn a_stream_within_capacity_is_kept_whole_and_in_order() {
        let mut r = Reservoir::new(10, 0);
        r.extend(&[1.0, 2.0, 3.0]);
        r.extend(&[4.0]);
        assert_eq!(r.values(), [1.0, 2.0, 3.0, 4.0]);
    }
}
