//! The Merkle tree over one run's chain hashes, shaped as RFC 6962 §2.1 with BLAKE3:
//!
//! ```text
//! leaf(h)    = BLAKE3(0x00 || h)
//! node(l, r) = BLAKE3(0x01 || l || r)
//! MTH([h])   = leaf(h)
//! MTH(D[n])  = node(MTH(D[0:k]), MTH(D[k:n])), k = the largest power of two < n
//! ```
//!
//! One signature over the root commits to every assignment of the run, and each
//! assignment's receipt carries its audit path (at most ⌈log2 n⌉ hashes), so a client
//! can check its own receipt without the rest of the run.

use crate::hash::Hash32;
use crate::{Error, Result};

fn leaf(h: &Hash32) -> Hash32 {
    // One contiguous input, hashed in one call: no hasher state to set up.
    let mut input = [0u8; 33];
    input[1..].copy_from_slice(&h.0);
    Hash32::digest(&input)
}

fn node(l: &Hash32, r: &Hash32) -> Hash32 {
    let mut input = [1u8; 65];
    input[1..33].copy_from_slice(&l.0);
    input[33..].copy_from_slice(&r.0);
    Hash32::digest(&input)
}

fn split(n: usize) -> usize {
    // Largest power of two strictly below n (n >= 2).
    let mut k = 1;
    while k * 2 < n {
        k *= 2;
    }
    k
}

/// The root of the tree over `leaves`; `Hash32::ZERO` for an empty slice, which no
/// run ever has.
pub fn root(leaves: &[Hash32]) -> Hash32 {
    match leaves.len() {
        0 => Hash32::ZERO,
        1 => leaf(&leaves[0]),
        n => {
            let k = split(n);
            node(&root(&leaves[..k]), &root(&leaves[k..]))
        }
    }
}

/// The root of the tree over `leaves`, computed in place: `leaves` is overwritten
/// with the tree's nodes, level by level, and nothing is allocated. The same root as
/// [`root`] and [`Tree::root`] (each level pairs nodes left to right and carries an
/// odd last node up unchanged); `Hash32::ZERO` for no leaves.
pub fn root_in_place(leaves: &mut [Hash32]) -> Hash32 {
    if leaves.is_empty() {
        return Hash32::ZERO;
    }
    for h in leaves.iter_mut() {
        *h = leaf(h);
    }
    let mut len = leaves.len();
    while len > 1 {
        let pairs = len / 2;
        for i in 0..pairs {
            // Slot i is free: its old content (at 2i or below) was already consumed.
            leaves[i] = node(&leaves[2 * i], &leaves[2 * i + 1]);
        }
        if len % 2 == 1 {
            leaves[pairs] = leaves[len - 1];
        }
        len = pairs + len % 2;
    }
    leaves[0]
}

/// The audit path of leaf `index`, from the leaf's sibling up to the root's children.
pub fn proof(leaves: &[Hash32], index: usize) -> Result<Vec<Hash32>> {
    if index >= leaves.len() {
        return Err(Error::InvalidProof("index outside the tree"));
    }
    let mut path = Vec::new();
    let mut lo = 0;
    let mut hi = leaves.len();
    // Walk down, collecting the sibling subtree roots, then reverse (leaf first).
    while hi - lo > 1 {
        let k = split(hi - lo);
        if index < lo + k {
            path.push(root(&leaves[lo + k..hi]));
            hi = lo + k;
        } else {
            path.push(root(&leaves[lo..lo + k]));
            lo += k;
        }
    }
    path.reverse();
    Ok(path)
}

/// The whole tree of one run, built once so that every audit path costs O(log n)
/// instead of O(n). Built bottom-up: each level pairs nodes left to right and carries
/// an odd last node up unchanged, which is the same tree as RFC 6962's recursive split.
#[derive(Debug, Clone)]
pub struct Tree {
    levels: Vec<Vec<Hash32>>,
}

impl Tree {
    /// The tree over `leaves` (chain hashes).
    pub fn new(leaves: &[Hash32]) -> Tree {
        let mut levels = vec![leaves.iter().map(leaf).collect::<Vec<_>>()];
        while levels.last().is_some_and(|l| l.len() > 1) {
            let below = levels.last().map(Vec::as_slice).unwrap_or_default();
            let up = below
                .chunks(2)
                .map(|c| {
                    if c.len() == 2 {
                        node(&c[0], &c[1])
                    } else {
                        c[0]
                    }
                })
                .collect();
            levels.push(up);
        }
        Tree { levels }
    }

    /// The root (`Hash32::ZERO` for no leaves).
    pub fn root(&self) -> Hash32 {
        self.levels
            .last()
            .and_then(|l| l.first())
            .copied()
            .unwrap_or(Hash32::ZERO)
    }

    /// The audit path of leaf `index`, leaf side first.
    pub fn proof(&self, index: usize) -> Result<Vec<Hash32>> {
        if index >= self.levels.first().map_or(0, Vec::len) {
            return Err(Error::InvalidProof("index outside the tree"));
        }
        let mut path = Vec::new();
        let mut i = index;
        for level in &self.levels[..self.levels.len() - 1] {
            if let Some(sibling) = level.get(i ^ 1) {
                path.push(*sibling);
            }
            i /= 2;
        }
        Ok(path)
    }
}

/// Recomputes the root from one leaf and its audit path (RFC 9162 §2.1.3.2).
pub fn root_from_proof(
    leaf_hash: &Hash32,
    index: usize,
    size: usize,
    path: &[Hash32],
) -> Result<Hash32> {
    if index >= size {
        return Err(Error::InvalidProof("index outside the tree"));
    }
    let (mut f_n, mut s_n) = (index, size - 1);
    let mut r = leaf(leaf_hash);
    for p in path {
        if s_n == 0 {
            return Err(Error::InvalidProof("path longer than the tree is deep"));
        }
        if f_n & 1 == 1 || f_n == s_n {
            r = node(p, &r);
            if f_n & 1 == 0 {
                while f_n & 1 == 0 && f_n != 0 {
                    f_n >>= 1;
                    s_n >>= 1;
                }
            }
        } else {
            r = node(&r, p);
        }
        f_n >>= 1;
        s_n >>= 1;
    }
    if s_n != 0 {
        return Err(Error::InvalidProof("path shorter than the tree is deep"));
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_proof_of_every_size_leads_to_the_root() {
        for n in 1..=40usize {
            let leaves: Vec<Hash32> = (0..n).map(|i| Hash32::digest(&i.to_be_bytes())).collect();
            let r = root(&leaves);
            for i in 0..n {
                let p = proof(&leaves, i).unwrap();
                assert!(p.len() <= 6);
                assert_eq!(
                    root_from_proof(&leaves[i], i, n, &p).unwrap(),
                    r,
                    "n={n} i={i}"
                );
                // A wrong leaf, index or path must not reach the root.
                let wrong = Hash32::digest(b"wrong");
                assert_ne!(root_from_proof(&wrong, i, n, &p).unwrap(), r);
                if n > 1 {
                    let other = (i + 1) % n;
                    assert_ne!(root_from_proof(&leaves[i], other, n, &p).ok(), Some(r));
                    let mut bent = p.clone();
                    bent[0] = wrong;
                    assert_ne!(root_from_proof(&leaves[i], i, n, &bent).unwrap(), r);
                }
            }
        }
    }

    #[test]
    fn the_built_tree_equals_the_recursive_definition() {
        for n in 1..=70usize {
            let leaves: Vec<Hash32> = (0..n)
                .map(|i| Hash32::digest(&(i * 7).to_be_bytes()))
                .collect();
            let tree = Tree::new(&leaves);
            assert_eq!(tree.root(), root(&leaves), "n={n}");
            for i in 0..n {
                assert_eq!(
                    tree.proof(i).unwrap(),
                    proof(&leaves, i).unwrap(),
                    "n={n} i={i}"
                );
            }
            assert!(tree.proof(n).is_err());
        }
    }

    #[test]
    fn the_root_in_place_equals_the_recursive_definition() {
        assert_eq!(root_in_place(&mut []), Hash32::ZERO);
        for n in 1..=70usize {
            let leaves: Vec<Hash32> = (0..n)
                .map(|i| Hash32::digest(&(i * 3).to_be_bytes()))
                .collect();
            assert_eq!(root_in_place(&mut leaves.clone()), root(&leaves), "n={n}");
        }
    }

    #[test]
    fn a_single_leaf_tree_has_an_empty_path() {
        let h = Hash32::digest(b"x");
        assert_eq!(proof(&[h], 0).unwrap(), vec![]);
        assert_eq!(root_from_proof(&h, 0, 1, &[]).unwrap(), root(&[h]));
        assert!(proof(&[h], 1).is_err());
    }
}
