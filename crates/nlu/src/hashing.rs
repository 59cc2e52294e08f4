//! A small, fast, deterministic hasher for the vocabulary and lexicon tables: the keys are short
//! strings of our own training data or lexicons, so SipHash's protection against chosen keys is
//! not needed, and the tables are looked up a few hundred times per message.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// The multiplicative hash of rustc's `FxHasher`, one 8-byte word at a time.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct FxHasher {
    hash: u64,
}

const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl FxHasher {
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0_u8; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = [0_u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(word));
        }
    }

    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    fn finish(&self) -> u64 {
        self.hash
    }
}

/// A `HashMap` with [`FxHasher`].
pub(crate) type FxHashMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinguishes_keys_and_is_stable() {
        let mut map: FxHashMap<String, u32> = FxHashMap::default();
        for (i, key) in ["a", "ab", "abcdefgh", "abcdefghi", "退款", ""]
            .iter()
            .enumerate()
        {
            map.insert((*key).to_owned(), i as u32);
        }
        assert_eq!(map.len(), 6);
        assert_eq!(map.get("abcdefghi"), Some(&3));
        let hash = |s: &str| {
            let mut h = FxHasher::default();
            h.write(s.as_bytes());
            h.finish()
        };
        assert_eq!(hash("card"), hash("card"));
        assert_ne!(hash("card"), hash("cards"));
    }
}
