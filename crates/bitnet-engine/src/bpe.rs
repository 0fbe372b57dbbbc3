//! Byte-level BPE encoding for the tokenizer of a GGUF file (llama.cpp's `gpt2` model), in
//! compact tables.
//!
//! The `tokenizers` crate keeps a 128k-token vocabulary as two hash maps of owned strings and
//! the 280k merges as a third map: about 40 MiB of heap for Llama 3, resident for the whole run.
//! Here a token is its raw bytes in one shared buffer ([`TokenTable`]), the vocabulary index is
//! an open-addressing table of ids (8 bytes a token), and the merges are one sorted array (16
//! bytes a merge): about 7 MiB in all, built faster.
//!
//! The algorithm is the one `tokenizers` runs for these files, step for step (tests compare
//! the two on the Llama 3 vocabulary with random text, and on a vocabulary of odd corners):
//! control and user-defined tokens are split out first (leftmost-longest), the rest is split
//! with the Llama 3 pre-tokenizer regex, a piece that is itself a token is that token
//! (`ignore_merges`), and any other piece starts as one token per byte and repeatedly merges
//! the adjacent pair of lowest rank (leftmost first). Two deliberate differences, both only
//! for malformed vocabularies: a merge listed twice keeps its first rank (llama.cpp's rule;
//! `tokenizers` keeps the last), and a byte that no token stands for is an error naming it
//! (`tokenizers` drops it silently).

use std::cmp::Reverse;
use std::collections::hash_map::RandomState;
use std::collections::BinaryHeap;
use std::hash::BuildHasher;

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};

use crate::{bail, Error, Result};

/// The raw bytes of every token: `get(id)` = `bytes[offsets[id]..offsets[id + 1]]`.
#[derive(Debug, Default)]
pub(crate) struct TokenTable {
    bytes: Vec<u8>,
    offsets: Vec<u32>,
}

impl TokenTable {
    pub fn with_capacity(n: usize) -> Self {
        let mut offsets = Vec::with_capacity(n + 1);
        offsets.push(0);
        TokenTable {
            bytes: Vec::with_capacity(n * 8),
            offsets,
        }
    }

    /// Appends the next token; `fill` writes its bytes.
    pub fn push_with(&mut self, fill: impl FnOnce(&mut Vec<u8>)) -> Result<()> {
        fill(&mut self.bytes);
        match u32::try_from(self.bytes.len()) {
            Ok(end) => self.offsets.push(end),
            Err(_) => bail!("the vocabulary's token texts add up to more than 4 GiB"),
        }
        Ok(())
    }

    pub fn shrink_to_fit(&mut self) {
        self.bytes.shrink_to_fit(); // grown by doubling: up to half of it unused
    }

    pub fn len(&self) -> usize {
        self.offsets.len() - 1
    }

    /// The bytes of token `id`; empty for an out-of-range id.
    pub fn get(&self, id: u32) -> &[u8] {
        let i = id as usize;
        if i + 1 < self.offsets.len() {
            &self.bytes[self.offsets[i] as usize..self.offsets[i + 1] as usize]
        } else {
            &[]
        }
    }
}

/// Bytes to id: open addressing with linear probing over ids, at most half full. Token bytes
/// live in the [`TokenTable`]; a repeated string keeps its last id, as in llama.cpp. The hash
/// is keyed at random (SipHash): the vocabulary comes from a file we do not trust, and an
/// unkeyed hash would let a crafted one pile every token into one probe chain.
struct TokenIndex {
    slots: Vec<u32>,
    hasher: RandomState,
}

impl TokenIndex {
    const EMPTY: u32 = u32::MAX;

    fn new(table: &TokenTable, in_index: impl Fn(u32) -> bool) -> Self {
        let n = table.len();
        let mut index = TokenIndex {
            slots: vec![Self::EMPTY; (2 * n).next_power_of_two().max(2)],
            hasher: RandomState::new(),
        };
        for id in (0..n as u32).filter(|&id| in_index(id)) {
            let slot = index.find(table, table.get(id));
            index.slots[slot] = id;
        }
        index
    }

    /// The slot holding `bytes`, or the empty slot where they would go.
    fn find(&self, table: &TokenTable, bytes: &[u8]) -> usize {
        let mask = self.slots.len() - 1;
        let mut slot = self.hasher.hash_one(bytes) as usize & mask;
        loop {
            let id = self.slots[slot];
            if id == Self::EMPTY || table.get(id) == bytes {
                return slot;
            }
            slot = (slot + 1) & mask;
        }
    }

    fn get(&self, table: &TokenTable, bytes: &[u8]) -> Option<u32> {
        let id = self.slots[self.find(table, bytes)];
        (id != Self::EMPTY).then_some(id)
    }
}

/// The encoder's tables. Token bytes live in the [`TokenTable`] passed to each call.
pub(crate) struct Bpe {
    index: TokenIndex,
    /// `left << 32 | right`, sorted; `merge_to[i]` is that pair's (rank, merged id).
    merge_keys: Vec<u64>,
    merge_to: Vec<(u32, u32)>,
    /// The token of each single byte (`u32::MAX`: none).
    byte_token: [u32; 256],
    split: fancy_regex::Regex,
    /// Control and user-defined tokens, recognised in text before any splitting.
    specials: Option<AhoCorasick>,
    special_ids: Vec<u32>,
}

impl Bpe {
    /// `in_index(id)`: whether BPE can produce token `id` (its text is in the byte-level
    /// alphabet; `tokenizers` looks tokens up by that text, so no other token is ever reached).
    /// `merges` yields each merge's two halves in rank order, as token texts that `to_bytes`
    /// turns into raw bytes, returning false for a text outside the alphabet (such a merge can
    /// never apply and is skipped). `specials` are the ids recognised in text before splitting.
    pub fn new<'m>(
        table: &TokenTable,
        in_index: impl Fn(u32) -> bool,
        merges: impl ExactSizeIterator<Item = (&'m str, &'m str)>,
        to_bytes: impl Fn(&str, &mut Vec<u8>) -> bool,
        specials: &[u32],
        split_regex: &str,
    ) -> std::result::Result<Bpe, BpeError> {
        let index = TokenIndex::new(table, in_index);
        let mut byte_token = [u32::MAX; 256];
        for (b, slot) in byte_token.iter_mut().enumerate() {
            if let Some(id) = index.get(table, &[b as u8]) {
                *slot = id;
            }
        }

        let mut pairs: Vec<(u64, u32, u32)> = Vec::with_capacity(merges.len());
        let (mut left, mut right, mut joined) = (Vec::new(), Vec::new(), Vec::new());
        let mut joined_text = String::new();
        for (rank, (a, b)) in merges.enumerate() {
            // The merged token is looked up by its text, as `tokenizers` does.
            joined_text.clear();
            joined_text.push_str(a);
            joined_text.push_str(b);
            left.clear();
            right.clear();
            joined.clear();
            let in_alphabet = to_bytes(a, &mut left)
                && to_bytes(b, &mut right)
                && to_bytes(&joined_text, &mut joined);
            if !in_alphabet {
                continue;
            }
            let part = |p: &[u8], which| index.get(table, p).ok_or(BpeError::Merge(rank, which));
            let (l, r, to) = (part(&left, 0)?, part(&right, 1)?, part(&joined, 2)?);
            pairs.push(((l as u64) << 32 | r as u64, rank as u32, to));
        }
        // A repeated pair keeps its first (lowest) rank, as llama.cpp's rank map does.
        pairs.sort_unstable_by_key(|&(key, rank, _)| (key, rank));
        pairs.dedup_by_key(|p| p.0);
        let merge_keys = pairs.iter().map(|p| p.0).collect();
        let merge_to = pairs.iter().map(|p| (p.1, p.2)).collect();
        drop(pairs);

        let split = fancy_regex::Regex::new(split_regex)
            .map_err(|e| BpeError::Other(format!("pre-tokenizer regex: {e}")))?;
        // One pattern per text; a text that several special tokens share means the last of
        // them, as a repeated vocabulary string does.
        let mut special_ids: Vec<u32> = specials
            .iter()
            .copied()
            .filter(|&id| !table.get(id).is_empty())
            .collect();
        special_ids.sort_by(|&a, &b| table.get(a).cmp(table.get(b)).then(b.cmp(&a)));
        special_ids.dedup_by(|a, b| table.get(*a) == table.get(*b));
        let specials = if special_ids.is_empty() {
            None
        } else {
            let patterns = special_ids.iter().map(|&id| table.get(id));
            Some(
                AhoCorasickBuilder::new()
                    .match_kind(MatchKind::LeftmostLongest)
                    .build(patterns)
                    .map_err(|e| BpeError::Other(format!("special tokens: {e}")))?,
            )
        };
        Ok(Bpe {
            index,
            merge_keys,
            merge_to,
            byte_token,
            split,
            specials,
            special_ids,
        })
    }

    /// The token whose raw bytes are `bytes`.
    pub fn token_id(&self, table: &TokenTable, bytes: &[u8]) -> Option<u32> {
        self.index.get(table, bytes)
    }

    fn merge(&self, left: u32, right: u32) -> Option<(u32, u32)> {
        let key = (left as u64) << 32 | right as u64;
        self.merge_keys
            .binary_search(&key)
            .ok()
            .map(|i| self.merge_to[i])
    }

    /// Appends the ids of `text` to `out`.
    pub fn encode(&self, table: &TokenTable, text: &str, out: &mut Vec<u32>) -> Result<()> {
        let mut scratch = MergeScratch::default();
        let mut done = 0;
        if let Some(ac) = &self.specials {
            for m in ac.find_iter(text) {
                self.encode_ordinary(table, &text[done..m.start()], out, &mut scratch)?;
                out.push(self.special_ids[m.pattern().as_usize()]);
                done = m.end();
            }
        }
        self.encode_ordinary(table, &text[done..], out, &mut scratch)
    }

    /// Text without special tokens: pre-tokenizer pieces (matches and what lies between them).
    fn encode_ordinary(
        &self,
        table: &TokenTable,
        text: &str,
        out: &mut Vec<u32>,
        scratch: &mut MergeScratch,
    ) -> Result<()> {
        let mut done = 0;
        for m in self.split.find_iter(text) {
            let m = m.map_err(|e| Error::new(format!("tokenizer: pre-tokenizer regex: {e}")))?;
            if m.start() > done {
                self.encode_piece(table, &text.as_bytes()[done..m.start()], out, scratch)?;
            }
            self.encode_piece(table, m.as_str().as_bytes(), out, scratch)?;
            done = m.end();
        }
        if done < text.len() {
            self.encode_piece(table, &text.as_bytes()[done..], out, scratch)?;
        }
        Ok(())
    }

    fn encode_piece(
        &self,
        table: &TokenTable,
        piece: &[u8],
        out: &mut Vec<u32>,
        s: &mut MergeScratch,
    ) -> Result<()> {
        if let Some(id) = self.token_id(table, piece) {
            out.push(id);
            return Ok(());
        }
        // One symbol per byte, as a doubly linked list; a merged-away symbol gets len 0.
        s.syms.clear();
        for (i, &b) in piece.iter().enumerate() {
            let id = self.byte_token[b as usize];
            if id == u32::MAX {
                bail!("tokenizer: the text has byte 0x{b:02X}, which no token of this vocabulary stands for");
            }
            s.syms.push(Sym {
                id,
                prev: i.wrapping_sub(1),
                next: i + 1,
                len: 1,
            });
        }
        let last = s.syms.len() - 1;
        s.syms[last].next = usize::MAX;
        s.heap.clear();
        for i in 0..last {
            if let Some((rank, to)) = self.merge(s.syms[i].id, s.syms[i + 1].id) {
                s.heap.push(Reverse((rank, i, to)));
            }
        }
        while let Some(Reverse((_, pos, to))) = s.heap.pop() {
            let next = s.syms[pos].next;
            if s.syms[pos].len == 0 || next == usize::MAX {
                continue;
            }
            // Stale entry: one of the two symbols has merged with something else since.
            if self.merge(s.syms[pos].id, s.syms[next].id).map(|m| m.1) != Some(to) {
                continue;
            }
            let right = s.syms[next];
            s.syms[next].len = 0;
            let sym = &mut s.syms[pos];
            sym.id = to;
            sym.len += right.len;
            sym.next = right.next;
            if right.next != usize::MAX {
                s.syms[right.next].prev = pos;
            }
            let prev = s.syms[pos].prev;
            if prev != usize::MAX {
                if let Some((rank, to)) = self.merge(s.syms[prev].id, to) {
                    s.heap.push(Reverse((rank, prev, to)));
                }
            }
            if right.next != usize::MAX {
                if let Some((rank, to)) = self.merge(to, s.syms[right.next].id) {
                    s.heap.push(Reverse((rank, pos, to)));
                }
            }
        }
        out.extend(s.syms.iter().filter(|sym| sym.len > 0).map(|sym| sym.id));
        Ok(())
    }
}

pub(crate) enum BpeError {
    /// Merge number, part (0 left, 1 right, 2 joined) that is not a token.
    Merge(usize, u8),
    Other(String),
}

#[derive(Clone, Copy)]
struct Sym {
    id: u32,
    prev: usize,
    next: usize,
    len: u32,
}

/// Reused across the pieces of one text. The heap orders by (rank, position): lowest rank
/// first, the leftmost of equal ranks first.
#[derive(Default)]
struct MergeScratch {
    syms: Vec<Sym>,
    heap: BinaryHeap<Reverse<(u32, usize, u32)>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(t: &str, out: &mut Vec<u8>) -> bool {
        out.extend_from_slice(t.as_bytes());
        true
    }

    /// The textbook BPE loop: merge the lowest-ranked adjacent pair (leftmost of equal ranks)
    /// until none is left. Quadratic, obviously right.
    fn naive(table: &TokenTable, merges: &[(String, String)], piece: &[u8]) -> Vec<u32> {
        let id_of = |b: &[u8]| (0..table.len() as u32).rev().find(|&i| table.get(i) == b);
        if let Some(id) = id_of(piece) {
            return vec![id];
        }
        let rank_of = |l: u32, r: u32| {
            merges
                .iter()
                .position(|(a, b)| id_of(a.as_bytes()) == Some(l) && id_of(b.as_bytes()) == Some(r))
        };
        let mut syms: Vec<u32> = piece.iter().map(|&b| id_of(&[b]).unwrap()).collect();
        loop {
            let best = (0..syms.len().saturating_sub(1))
                .filter_map(|i| rank_of(syms[i], syms[i + 1]).map(|r| (r, i)))
                .min();
            let Some((r, i)) = best else { return syms };
            let (a, b) = &merges[r];
            syms[i] = id_of(format!("{a}{b}").as_bytes()).unwrap();
            syms.remove(i + 1);
        }
    }

    /// Random vocabularies over a 3-letter alphabet (merges that build the same string in two
    /// ways, repeated pairs, long runs of one letter) against the naive loop.
    #[test]
    fn merge_queue_equals_naive_bpe() {
        let mut state = 0x9E3779B97F4A7C15u64;
        let mut next = |m: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % m as u64) as usize
        };
        for _vocab in 0..40 {
            let mut words: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
            let mut merges = Vec::new();
            for _ in 0..30 {
                let a = words[next(words.len())].clone();
                let b = words[next(words.len())].clone();
                let joined = format!("{a}{b}");
                if joined.len() > 6 {
                    continue;
                }
                if !words.contains(&joined) {
                    words.push(joined);
                }
                merges.push((a, b));
            }
            let mut table = TokenTable::with_capacity(words.len());
            for w in &words {
                table
                    .push_with(|out| out.extend_from_slice(w.as_bytes()))
                    .unwrap();
            }
            let pairs = merges.iter().map(|(a, b)| (a.as_str(), b.as_str()));
            let Ok(bpe) = Bpe::new(&table, |_| true, pairs, raw, &[], r"[\s\S]+") else {
                panic!("vocabulary {words:?}");
            };
            for _ in 0..50 {
                let len = 1 + next(14);
                let text: String = (0..len).map(|_| ['a', 'b', 'c'][next(3)]).collect();
                let mut got = Vec::new();
                bpe.encode(&table, &text, &mut got).unwrap();
                assert_eq!(
                    got,
                    naive(&table, &merges, text.as_bytes()),
                    "{text:?} {merges:?}"
                );
            }
        }
    }

    #[test]
    fn errors_name_the_problem() {
        let mut table = TokenTable::with_capacity(2);
        for w in ["a", "b"] {
            table
                .push_with(|out| out.extend_from_slice(w.as_bytes()))
                .unwrap();
        }
        let merge = |a, b| Bpe::new(&table, |_| true, [(a, b)].into_iter(), raw, &[], ".");
        assert!(matches!(merge("a", "x"), Err(BpeError::Merge(0, 1))));
        assert!(matches!(merge("a", "b"), Err(BpeError::Merge(0, 2))));
        let Ok(bpe) = Bpe::new(&table, |_| true, std::iter::empty(), raw, &[1], ".") else {
            panic!()
        };
        let mut out = Vec::new();
        bpe.encode(&table, "abba", &mut out).unwrap();
        assert_eq!(out, [0, 1, 1, 0]);
        let e = bpe.encode(&table, "ac", &mut out).unwrap_err().to_string();
        assert!(e.contains("byte 0x63"), "{e}");
    }
}
