//! API keys: how they are generated and how they are kept.
//!
//! A key is only ever stored as its SHA-256 digest. Looking a presented key
//! up by its digest compares digests, never the secret, so the time a lookup
//! takes says nothing about how much of a guess was right.

use crate::store::KeyHash;
use rand::Rng;
use sha2::{Digest, Sha256};

/// The prefix of keys that tollgate generates, so they are easy to
/// recognise (and to find when leaked).
pub const KEY_PREFIX: &str = "tg_";

/// Characters of the random part: 32 base62 characters, about 190 bits.
const RANDOM_LEN: usize = 32;
const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// A new random key, `tg_` followed by 32 base62 characters.
pub fn generate() -> String {
    let mut rng = rand::rng();
    let random: String = (0..RANDOM_LEN)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect();
    format!("{KEY_PREFIX}{random}")
}

/// The digest under which a key is stored: of its bytes (UTF-8 for a
/// configured key, as a client sends it in a header).
pub fn hash(key: impl AsRef<[u8]>) -> KeyHash {
    KeyHash(lower_hex(&Sha256::digest(key.as_ref())))
}

/// `bytes` in lower-case hexadecimal (a key is hashed on every request, and
/// the `hex` crate's encoder goes character by character through an
/// iterator).
fn lower_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_prefixed_random_and_distinct() {
        let a = generate();
        let b = generate();
        assert!(a.starts_with("tg_"));
        assert_eq!(a.len(), 3 + RANDOM_LEN);
        assert!(a[3..].bytes().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(a, b);
    }

    #[test]
    fn hashes_are_stable_hex_digests() {
        assert_eq!(
            hash("abc").0,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_ne!(hash("abc"), hash("abd"));
        assert_eq!(
            lower_hex(&[0x00, 0x09, 0x0f, 0x10, 0xa5, 0xff]),
            "00090f10a5ff"
        );
    }
}
