//! Deterministic seeded shuffling and batching.

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use crate::{Error, Result};

/// RNG stream of [`Batcher::epoch`].
const BATCH_STREAM: u64 = 0;

/// A ChaCha8 generator keyed by `(seed, epoch, stream)`, so each combination is an independent
/// sequence that does not depend on what else was drawn.
pub(crate) fn seeded_rng(seed: u64, epoch: u64, stream: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    for (chunk, word) in key.chunks_exact_mut(8).zip([seed, epoch, stream]) {
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    ChaCha8Rng::from_seed(key)
}

/// Splits `0..len` into shuffled batches, a fresh order per epoch.
///
/// Epoch `k`'s order depends only on `(seed, k)`, not on whether earlier epochs were drawn.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batcher {
    len: usize,
    batch_size: usize,
    seed: u64,
}

impl Batcher {
    /// A batcher over `len` samples; fails with [`Error::InvalidBatchSize`] if `batch_size == 0`.
    pub fn new(len: usize, batch_size: usize, seed: u64) -> Result<Self> {
        if batch_size == 0 {
            return Err(Error::InvalidBatchSize);
        }
        Ok(Self {
            len,
            batch_size,
            seed,
        })
    }

    /// The shuffled indices of `epoch`, in batches of `batch_size` (the last may be smaller).
    pub fn epoch(&self, epoch: u64) -> Vec<Vec<usize>> {
        let mut order: Vec<usize> = (0..self.len).collect();
        order.shuffle(&mut seeded_rng(self.seed, epoch, BATCH_STREAM));
        order
            .chunks(self.batch_size)
            .map(<[usize]>::to_vec)
            .collect()
    }

    /// The number of batches per epoch, `ceil(len / batch_size)`.
    pub fn batches_per_epoch(&self) -> usize {
        self.len.div_ceil(self.batch_size)
    }

    /// The number of samples.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The batch size.
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }
}
