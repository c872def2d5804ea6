//! Seeded randomness for the random centroid initialisations: ChaCha8, keyed by the seed,
//! the variable's name and the group, so that a seed gives the same centroids on every
//! platform and run, a group's draws depend on no other variable, and nothing touches
//! global state (`tch::manual_seed` would reseed the caller's own generator).

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

/// The generator of one group of one variable.
pub(crate) fn for_group(seed: u64, name: &str, group: usize) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&(group as u64).to_le_bytes());
    key[16..].copy_from_slice(&Sha256::digest(name.as_bytes())[..16]);
    ChaCha8Rng::from_seed(key)
}

#[cfg(test)]
mod tests {
    use rand::Rng;

    use super::*;

    #[test]
    fn groups_and_names_get_different_streams() {
        let first = |seed, name: &str, group| for_group(seed, name, group).random::<u64>();
        assert_eq!(first(3, "0.weight", 0), first(3, "0.weight", 0));
        assert_ne!(first(3, "0.weight", 0), first(3, "0.weight", 1));
        assert_ne!(first(3, "0.weight", 0), first(3, "1.weight", 0));
        assert_ne!(first(3, "0.weight", 0), first(4, "0.weight", 0));
    }
}
