//! The Llama 3 byte-level BPE tokenizer (BitNet b1.58 2B4T and the other byte-level BPE models).
//!
//! Two sources: the `tokenizer.ggml.*` metadata of a GGUF file (`model = gpt2`), encoded by our
//! compact BPE ([`crate::bpe`]: the same algorithm as `tokenizers`, in a sixth of the memory), or
//! a Hugging Face `tokenizer.json` (plus `tokenizer_config.json` next to it when present),
//! encoded by the `tokenizers` crate, which handles every pipeline such a file can describe.
//!
//! BOS is never added by the underlying tokenizer (no post-processor for GGUF; encoding with
//! `add_special_tokens = false` for tokenizer.json): [`Tokenizer::encode`] prepends it itself,
//! at most once. Decoding works on raw bytes ([`Tokenizer::token_bytes`]), so a UTF-8 character
//! split across tokens is reassembled correctly; [`StreamDecoder`] does the same incrementally.

use std::path::Path;

use bitnet_formats::GgufFile;
use serde_json::Value;

use crate::bpe::{Bpe, BpeError, TokenTable};
use crate::{bail, Error, Result};

/// The Llama 3 pre-tokenizer split regex (needs look-ahead: `fancy-regex`).
pub const LLAMA3_PRETOKENIZER_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Token texts that end a turn or a document in the model families we meet.
const STOP_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|endoftext|>",
    "<|im_end|>",
    "<|end|>",
    "<|eom_id|>",
];

/// `tokenizer.ggml.pre` values for which llama.cpp adds BOS when `tokenizer.ggml.add_bos_token`
/// is absent (its LLAMA3 pre-tokenizer branch sets `add_bos = true`).
const LLAMA3_FAMILY_PRE: &[&str] = &[
    "llama3",
    "llama-v3",
    "llama-bpe",
    "falcon3",
    "falcon-h1",
    "pixtral",
    "midm-2.0",
    "lfm2",
];

/// GGUF `tokenizer.ggml.token_type` values.
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// A byte-level BPE tokenizer with its special tokens and chat metadata. `Send + Sync`; share it
/// with `Arc`.
pub struct Tokenizer {
    encoder: Encoder,
    /// The raw bytes of every token (special tokens: their text).
    tokens: TokenTable,
    special: Vec<bool>,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
    stop: Vec<u32>,
    chat_template: Option<String>,
}

/// Text to ids: our compact BPE for GGUF files, `tokenizers` for tokenizer.json files.
enum Encoder {
    Gguf(Box<Bpe>),
    Json(Box<tokenizers::Tokenizer>),
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("n_vocab", &self.n_vocab())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("add_bos", &self.add_bos)
            .field("stop", &self.stop)
            .finish_non_exhaustive()
    }
}

/// GPT-2's `bytes_to_unicode` inverted: for a char code below 324, the byte it stands for
/// (-1 where the code is not one of the 256 image chars).
static UNICODE_TO_BYTE: [i16; 324] = unicode_to_byte_table();

const fn unicode_to_byte_table() -> [i16; 324] {
    let mut table = [-1i16; 324];
    let mut n = 0u32;
    let mut b = 0u32;
    while b < 256 {
        let printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174;
        let c = if printable {
            b
        } else {
            n += 1;
            255 + n
        };
        table[c as usize] = b as i16;
        b += 1;
    }
    table
}

/// The raw bytes of a byte-level BPE token string. Like the `tokenizers` ByteLevel decoder, a
/// token with a char outside the GPT-2 byte alphabet is kept as its UTF-8 text; returns
/// whether every char was in the alphabet.
fn byte_level_bytes(s: &str, out: &mut Vec<u8>) -> bool {
    let start = out.len();
    for c in s.chars() {
        match UNICODE_TO_BYTE.get(c as usize) {
            Some(&b) if b >= 0 => out.push(b as u8),
            _ => {
                out.truncate(start);
                out.extend_from_slice(s.as_bytes());
                return false;
            }
        }
    }
    true
}

/// The raw bytes of a SentencePiece-style token (`<0xAB>` byte tokens, `▁` for space), used for
/// tokenizer.json files whose decoder is not ByteLevel.
fn sentencepiece_bytes(s: &str, out: &mut Vec<u8>) {
    let b = s.as_bytes();
    if b.len() == 6 && s.starts_with("<0x") && s.ends_with('>') {
        if let Ok(v) = u8::from_str_radix(&s[3..5], 16) {
            out.push(v);
            return;
        }
    }
    for c in s.chars() {
        if c == '\u{2581}' {
            out.push(b' ');
        } else {
            let mut buf = [0u8; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
        }
    }
}

/// Split a GGUF merge "a b" at the first space after the first character (like llama.cpp).
fn split_merge(m: &str) -> Option<(&str, &str)> {
    let (p, _) = m.char_indices().skip(1).find(|&(_, c)| c == ' ')?;
    Some((&m[..p], &m[p + 1..]))
}

fn hf_err(ctx: &str, e: impl std::fmt::Display) -> Error {
    Error::new(format!("{ctx}: {e}"))
}

/// Does this serialized component (decoder, pre-tokenizer) contain a ByteLevel step?
fn contains_type(v: &Value, ty: &str) -> bool {
    match v {
        Value::Object(m) => {
            m.get("type").and_then(Value::as_str) == Some(ty)
                || m.values().any(|x| contains_type(x, ty))
        }
        Value::Array(a) => a.iter().any(|x| contains_type(x, ty)),
        _ => false,
    }
}

/// The ids a (serialized) post-processor puts before the first sequence, if it is a
/// TemplateProcessing (possibly inside a Sequence) whose single template starts with a special
/// token.
fn template_prefix_ids(pp: &Value) -> Option<Vec<u32>> {
    match pp.get("type").and_then(Value::as_str)? {
        "TemplateProcessing" => {
            let first = pp.get("single")?.as_array()?.first()?;
            let name = first.get("SpecialToken")?.get("id")?.as_str()?;
            let ids = pp
                .get("special_tokens")?
                .get(name)?
                .get("ids")?
                .as_array()?;
            ids.iter()
                .map(|x| x.as_u64().and_then(|i| u32::try_from(i).ok()))
                .collect()
        }
        "Sequence" => pp
            .get("processors")?
            .as_array()?
            .iter()
            .find_map(template_prefix_ids),
        _ => None,
    }
}

/// `"<s>"` or `{"content": "<s>", ...}` (tokenizer_config.json's bos_token / eos_token).
fn config_token_text(v: Option<&Value>) -> Option<&str> {
    match v? {
        Value::String(s) => Some(s),
        Value::Object(m) => m.get("content").and_then(Value::as_str),
        _ => None,
    }
}

/// tokenizer_config.json's chat_template: a string, or a list of `{name, template}` (take
/// "default").
fn config_chat_template(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Array(list) => list.iter().find_map(|t| {
            if t.get("name").and_then(Value::as_str) == Some("default") {
                t.get("template")
                    .and_then(Value::as_str)
                    .map(str::to_string)
            } else {
                None
            }
        }),
        _ => None,
    }
}

fn push_unique(v: &mut Vec<u32>, id: Option<u32>) {
    if let Some(id) = id {
        if !v.contains(&id) {
            v.push(id);
        }
    }
}

impl Tokenizer {
    /// Build from the `tokenizer.ggml.*` metadata of a GGUF file (`tokenizer.ggml.model = gpt2`).
    pub fn from_gguf(g: &GgufFile) -> Result<Tokenizer> {
        let ctx = g.path.display().to_string();
        Self::from_gguf_inner(g).map_err(|e| e.context(ctx))
    }

    fn from_gguf_inner(g: &GgufFile) -> Result<Tokenizer> {
        match g.get_str("tokenizer.ggml.model")? {
            None => bail!("no tokenizer in the file (metadata key tokenizer.ggml.model is missing)"),
            Some("gpt2") => {}
            Some("llama") => bail!(
                "tokenizer.ggml.model = \"llama\" (a SentencePiece tokenizer) is not supported yet; \
                 only byte-level BPE (\"gpt2\") is"
            ),
            Some(other) => bail!(
                "unsupported tokenizer.ggml.model = {other:?}; only byte-level BPE (\"gpt2\") is supported"
            ),
        }
        let pre = g.get_str("tokenizer.ggml.pre")?;
        let tokens = match g.get_str_array("tokenizer.ggml.tokens")? {
            Some(t) => t,
            None => bail!("metadata key tokenizer.ggml.tokens is missing"),
        };
        let n = tokens.len();
        if n == 0 {
            bail!("tokenizer.ggml.tokens is empty");
        }
        if n > u32::MAX as usize / 2 {
            bail!("tokenizer.ggml.tokens has {n} entries, too many");
        }
        let types = g.get_int_array("tokenizer.ggml.token_type")?;
        if let Some(t) = &types {
            if t.len() != n {
                bail!(
                    "tokenizer.ggml.token_type has {} entries but tokenizer.ggml.tokens has {n}",
                    t.len()
                );
            }
        }
        let merges_raw = match g.get_str_array("tokenizer.ggml.merges")? {
            Some(m) => m,
            None => bail!(
                "metadata key tokenizer.ggml.merges is missing (needed for a gpt2 BPE tokenizer)"
            ),
        };

        let id_key = |key: &str| -> Result<Option<u32>> {
            match g.get_u64(key)? {
                None => Ok(None),
                Some(v) if (v as u128) < n as u128 => Ok(Some(v as u32)),
                Some(v) => bail!("{key} = {v} is out of range (the vocabulary has {n} tokens)"),
            }
        };
        let bos = id_key("tokenizer.ggml.bos_token_id")?;
        let eos = id_key("tokenizer.ggml.eos_token_id")?;
        let eot = id_key("tokenizer.ggml.eot_token_id")?;
        let eom = id_key("tokenizer.ggml.eom_token_id")?;
        let add_bos = match g.get_bool("tokenizer.ggml.add_bos_token")? {
            Some(b) => b,
            // llama.cpp's default: true for its Llama 3 pre-tokenizer family, false otherwise.
            None => pre.is_some_and(|p| LLAMA3_FAMILY_PRE.contains(&p)),
        };
        let chat_template = g.get_str("tokenizer.chat_template")?.map(str::to_string);

        // Control and user-defined tokens: their text is raw (not byte-level), they are never
        // split and are recognised in text.
        let mut special = vec![false; n];
        let mut text_is_raw = vec![false; n];
        let mut added = Vec::new();
        if let Some(types) = &types {
            for (i, &ty) in types.iter().enumerate() {
                if ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED {
                    text_is_raw[i] = true;
                    special[i] = ty == TOKEN_TYPE_CONTROL;
                    added.push(i as u32);
                }
            }
        }

        // `in_alphabet[i]`: BPE can reach token i, because its text is in the byte-level
        // alphabet and its bytes are what that text stands for (a control token's text is
        // kept raw, so only printable ASCII, which stands for itself, qualifies).
        let mut token_table = TokenTable::with_capacity(n);
        let mut in_alphabet = vec![false; n];
        for (i, t) in tokens.iter().enumerate() {
            token_table.push_with(|out| {
                in_alphabet[i] = if text_is_raw[i] {
                    out.extend_from_slice(t.as_bytes());
                    t.bytes().all(|b| (33..=126).contains(&b))
                } else {
                    byte_level_bytes(t, out)
                };
            })?;
        }
        token_table.shrink_to_fit();

        // Merges: "a b", split at the first space after the first character (like llama.cpp).
        let mut halves = Vec::with_capacity(merges_raw.len());
        for (i, m) in merges_raw.iter().enumerate() {
            match split_merge(m) {
                Some(h) => halves.push(h),
                None => bail!(
                    "tokenizer.ggml.merges[{i}] = {m:?} is not two tokens separated by a space"
                ),
            }
        }
        let bpe = Bpe::new(
            &token_table,
            |id| in_alphabet[id as usize],
            halves.iter().copied(),
            byte_level_bytes,
            &added,
            LLAMA3_PRETOKENIZER_REGEX,
        )
        .map_err(|e| match e {
            BpeError::Merge(i, part) => {
                let (a, b) = halves[i];
                let text = match part {
                    0 => a.to_string(),
                    1 => b.to_string(),
                    _ => format!("{a}{b}"),
                };
                Error::new(format!(
                    "tokenizer.ggml.merges[{i}] = {:?} refers to {text:?}, which is not in tokenizer.ggml.tokens",
                    merges_raw[i]
                ))
            }
            BpeError::Other(msg) => Error::new(msg),
        })?;
        drop((halves, in_alphabet));

        let mut tok = Tokenizer {
            encoder: Encoder::Gguf(Box::new(bpe)),
            tokens: token_table,
            special,
            bos,
            eos,
            add_bos,
            stop: Vec::new(),
            chat_template,
        };
        tok.stop = tok.collect_stop_ids(&[eot, eom]);
        Ok(tok)
    }

    /// Build from a Hugging Face `tokenizer.json`; reads `tokenizer_config.json` (add_bos_token,
    /// bos_token, eos_token, chat_template) from the same directory when it exists, and
    /// `chat_template.jinja` when the config has no template.
    pub fn from_tokenizer_json(path: &Path) -> Result<Tokenizer> {
        let ctx = path.display().to_string();
        let hf = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| hf_err(&ctx, format!("cannot load the tokenizer: {e}")))?;

        let dir = path.parent().unwrap_or(Path::new("."));
        let config_path = dir.join("tokenizer_config.json");
        let config: Option<Value> = if config_path.is_file() {
            let text = std::fs::read_to_string(&config_path)
                .map_err(|e| Error::from(e).context(config_path.display()))?;
            Some(
                serde_json::from_str(&text)
                    .map_err(|e| hf_err(&config_path.display().to_string(), e))?,
            )
        } else {
            None
        };
        let cfg = |key: &str| config.as_ref().and_then(|c| c.get(key));

        // Id table: model vocabulary plus added tokens.
        let vocab = hf.get_vocab(true);
        let Some(max_id) = vocab.values().copied().max() else {
            bail!("{ctx}: the vocabulary is empty");
        };
        if max_id as usize >= vocab.len().saturating_mul(2) + 65536 {
            bail!(
                "{ctx}: token ids are too sparse (largest id {max_id}, {} tokens)",
                vocab.len()
            );
        }
        let n = max_id as usize + 1;
        let mut text_of: Vec<Option<&str>> = vec![None; n];
        for (t, &id) in &vocab {
            text_of[id as usize] = Some(t.as_str());
        }
        let added = hf.get_added_tokens_decoder();
        let mut special = vec![false; n];
        let mut text_is_raw = vec![false; n];
        for (&id, t) in added.iter() {
            if let Some(slot) = text_is_raw.get_mut(id as usize) {
                *slot = true;
                special[id as usize] = t.special;
                text_of[id as usize] = Some(t.content.as_str());
            }
        }
        let decoder = serde_json::to_value(hf.get_decoder()).unwrap_or(Value::Null);
        let byte_level = if decoder.is_null() {
            let pre = serde_json::to_value(hf.get_pre_tokenizer()).unwrap_or(Value::Null);
            contains_type(&pre, "ByteLevel")
        } else {
            contains_type(&decoder, "ByteLevel")
        };
        let mut tokens = TokenTable::with_capacity(n);
        for (i, t) in text_of.iter().enumerate() {
            tokens.push_with(|out| {
                let Some(t) = t else { return };
                // Added tokens go through the ByteLevel decoder too in `tokenizers`
                // ("<|eot_id|>" maps to itself; a raw "\n" is not in the alphabet and stays).
                if byte_level {
                    byte_level_bytes(t, out);
                } else if text_is_raw[i] {
                    out.extend_from_slice(t.as_bytes());
                } else {
                    sentencepiece_bytes(t, out);
                }
            })?;
        }
        tokens.shrink_to_fit();

        let lookup = |v: Option<&Value>| config_token_text(v).and_then(|s| hf.token_to_id(s));
        let mut bos = lookup(cfg("bos_token"));
        let eos = lookup(cfg("eos_token"));
        let pp = serde_json::to_value(hf.get_post_processor()).unwrap_or(Value::Null);
        let pp_adds_bos = match (template_prefix_ids(&pp), bos) {
            (Some(ids), Some(b)) => ids.first() == Some(&b),
            (Some(ids), None) => match ids.first() {
                Some(&first) => {
                    bos = Some(first);
                    true
                }
                None => false,
            },
            (None, _) => false,
        };
        let add_bos = pp_adds_bos || cfg("add_bos_token").and_then(Value::as_bool) == Some(true);
        let mut chat_template = config_chat_template(cfg("chat_template"));
        if chat_template.is_none() {
            let jinja = dir.join("chat_template.jinja");
            if jinja.is_file() {
                chat_template = Some(
                    std::fs::read_to_string(&jinja)
                        .map_err(|e| Error::from(e).context(jinja.display()))?,
                );
            }
        }

        let mut tok = Tokenizer {
            encoder: Encoder::Json(Box::new(hf)),
            tokens,
            special,
            bos,
            eos,
            add_bos,
            stop: Vec::new(),
            chat_template,
        };
        tok.stop = tok.collect_stop_ids(&[]);
        Ok(tok)
    }

    /// The tokenizer of a Hugging Face model directory; `Ok(None)` when it has no tokenizer.json.
    pub fn from_hf_dir(dir: &Path) -> Result<Option<Tokenizer>> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Ok(None);
        }
        Self::from_tokenizer_json(&path).map(Some)
    }

    fn collect_stop_ids(&self, extra: &[Option<u32>]) -> Vec<u32> {
        let mut stop = Vec::new();
        push_unique(&mut stop, self.eos);
        for &id in extra {
            push_unique(&mut stop, id);
        }
        for t in STOP_TEXTS {
            push_unique(&mut stop, self.token_id(t));
        }
        stop
    }

    /// Encode `text`. Special-token text (e.g. `<|eot_id|>`) becomes its token. BOS is prepended
    /// only when `allow_bos`, the source says to add it, and the text does not already start
    /// with it.
    pub fn encode(&self, text: &str, allow_bos: bool) -> Result<Vec<u32>> {
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        match &self.encoder {
            Encoder::Gguf(bpe) => bpe.encode(&self.tokens, text, &mut out)?,
            Encoder::Json(hf) => {
                let enc = hf
                    .encode_fast(text, false)
                    .map_err(|e| hf_err("tokenizer", e))?;
                out.extend_from_slice(enc.get_ids());
            }
        }
        if allow_bos && self.add_bos {
            if let Some(b) = self.bos {
                if out.first() != Some(&b) {
                    out.insert(0, b);
                }
            }
        }
        Ok(out)
    }

    /// Lossy UTF-8 of the concatenated token bytes.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut buf = Vec::new();
        for &id in ids {
            buf.extend_from_slice(self.token_bytes(id));
        }
        String::from_utf8_lossy(&buf).into_owned()
    }

    /// The raw bytes of one token (special tokens: their text); empty for an out-of-range id.
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.tokens.get(id)
    }

    pub fn n_vocab(&self) -> usize {
        self.tokens.len()
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// Whether the tokenizer source asks for a BOS at the start of a prompt.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// EOS, EOT/EOM ids from the metadata, and every token whose text is a known end-of-turn
    /// marker (`<|eot_id|>`, `<|end_of_text|>`, `<|endoftext|>`, `<|im_end|>`, `<|end|>`,
    /// `<|eom_id|>`). No duplicates.
    pub fn stop_ids(&self) -> Vec<u32> {
        self.stop.clone()
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Exact vocabulary lookup (byte-level form for ordinary tokens, e.g. `"Ġworld"`).
    pub fn token_id(&self, text: &str) -> Option<u32> {
        match &self.encoder {
            Encoder::Gguf(bpe) => {
                // The index holds the tokens BPE can reach, by the bytes their byte-level text
                // stands for; any other token (a control token with a space, say) is found by
                // its raw text, the last of equal ones as in the vocabulary.
                let mut bytes = Vec::with_capacity(text.len());
                let found = match byte_level_bytes(text, &mut bytes) {
                    true => bpe.token_id(&self.tokens, &bytes),
                    false => None,
                };
                found.or_else(|| {
                    let n = self.tokens.len() as u32;
                    (0..n)
                        .rev()
                        .find(|&id| self.tokens.get(id) == text.as_bytes())
                })
            }
            Encoder::Json(hf) => hf.token_to_id(text),
        }
    }

    /// A control token: GGUF token_type 3, or a tokenizer.json added token marked special.
    pub fn is_special(&self, id: u32) -> bool {
        self.special.get(id as usize).copied().unwrap_or(false)
    }
}

/// Incremental decoder for streaming: never returns half a UTF-8 character. The concatenation
/// of everything returned by `push` and `flush` equals `Tokenizer::decode` of the same ids.
#[derive(Debug, Default, Clone)]
pub struct StreamDecoder {
    pending: Vec<u8>,
}

impl StreamDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// The text completed by token `id` (may be empty). Invalid bytes become U+FFFD exactly as
    /// in a lossy decode; an incomplete character at the end is kept for the next call.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> String {
        self.pending.extend_from_slice(tok.token_bytes(id));
        let mut out = String::new();
        let mut start = 0;
        loop {
            match std::str::from_utf8(&self.pending[start..]) {
                Ok(s) => {
                    out.push_str(s);
                    start = self.pending.len();
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // This prefix was just validated by from_utf8.
                    if let Ok(s) = std::str::from_utf8(&self.pending[start..start + valid]) {
                        out.push_str(s);
                    }
                    match e.error_len() {
                        Some(bad) => {
                            out.push('\u{FFFD}');
                            start += valid + bad;
                        }
                        None => {
                            start += valid;
                            break;
                        }
                    }
                }
            }
        }
        self.pending.drain(..start);
        out
    }

    /// Whatever is left (an incomplete character at the end becomes U+FFFD).
    pub fn flush(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitnet_formats::gguf::GgufWriter;
    use bitnet_formats::MetaValue;
    use std::path::PathBuf;

    fn manifest() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
    }

    fn llama3_dir() -> PathBuf {
        manifest().join("../../../shared/golden/llama3-tokenizer")
    }

    fn tiny_gguf(name: &str) -> PathBuf {
        manifest().join("../../tests/data/tiny/gguf").join(name)
    }

    fn tiny(name: &str) -> Tokenizer {
        let g = GgufFile::open(tiny_gguf(name)).unwrap();
        Tokenizer::from_gguf(&g).unwrap()
    }

    fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "bitnet-tokenizer-test-{}-{name}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    const TINY_TEXT: &str = "Hello world, this is a BitNet b1.58 test: 1234567 tokens.\n  x";
    const TINY_IDS: [u32; 34] = [
        39, 68, 270, 78, 307, 265, 911, 11, 723, 370, 266, 448, 277, 45, 343, 286, 16, 13, 20, 23,
        1004, 25, 220, 643, 18, 19, 20, 21, 22, 721, 304, 220, 220, 87,
    ];

    #[test]
    fn send_sync() {
        fn check<T: Send + Sync>() {}
        check::<Tokenizer>();
        check::<StreamDecoder>();
    }

    #[test]
    fn byte_table_is_a_bijection() {
        let t = &UNICODE_TO_BYTE;
        let mut seen = [false; 256];
        for &b in t.iter().filter(|&&b| b >= 0) {
            assert!(!seen[b as usize]);
            seen[b as usize] = true;
        }
        assert!(seen.iter().all(|&s| s));
        assert_eq!(t['Ġ' as usize], b' ' as i16);
        assert_eq!(t['Ċ' as usize], b'\n' as i16);
        assert_eq!(t['!' as usize], b'!' as i16);
        let bl = |s: &str| {
            let mut v = b"x".to_vec();
            byte_level_bytes(s, &mut v);
            v[1..].to_vec()
        };
        assert_eq!(bl("Ġworld"), b" world");
        assert_eq!(bl("Ã©"), "é".as_bytes());
        assert_eq!(bl("<|eot_id|>"), b"<|eot_id|>");
        assert_eq!(bl("\n"), b"\n");
        assert_eq!(bl("Ġ日本"), "Ġ日本".as_bytes());
        let mut v = Vec::new();
        sentencepiece_bytes("<0x0A>", &mut v);
        sentencepiece_bytes("\u{2581}the", &mut v);
        sentencepiece_bytes("<0xZZ>", &mut v);
        assert_eq!(v, b"\n the<0xZZ>");
    }

    // ---- 1. Llama 3 golden cases ----

    fn llama3_cases() -> Option<(Tokenizer, Vec<Value>)> {
        let dir = llama3_dir();
        if !dir.join("tokenizer.json").is_file() {
            eprintln!("SKIPPED: ../shared/golden/llama3-tokenizer not found, Llama 3 tokenizer cases did not run");
            return None;
        }
        let t0 = std::time::Instant::now();
        let tok = Tokenizer::from_tokenizer_json(&dir.join("tokenizer.json")).unwrap();
        eprintln!("llama3 tokenizer.json loaded in {:?}", t0.elapsed());
        let cases: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap())
                .unwrap();
        let cases = cases["cases"].as_array().unwrap().clone();
        Some((tok, cases))
    }

    fn case_ids(c: &Value) -> Vec<u32> {
        c["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    }

    fn check_llama3_cases(tok: &Tokenizer, cases: &[Value]) {
        assert_eq!(cases.len(), 45, "cases.json has 45 cases");
        for c in cases {
            let text = c["text"].as_str().unwrap();
            let ids = case_ids(c);
            assert_eq!(tok.encode(text, false).unwrap(), ids, "encode {text:?}");
            assert_eq!(
                tok.decode(&ids),
                c["decoded"].as_str().unwrap(),
                "decode {text:?}"
            );
            assert_eq!(tok.decode(&ids), text, "round trip {text:?}");
            // The streaming decoder gives the same text.
            let mut sd = StreamDecoder::new();
            let mut s: String = ids.iter().map(|&id| sd.push(tok, id)).collect();
            s.push_str(&sd.flush());
            assert_eq!(s, text);
        }
    }

    #[test]
    fn llama3_tokenizer_json_cases() {
        let Some((tok, cases)) = llama3_cases() else {
            return;
        };
        check_llama3_cases(&tok, &cases);
        assert_eq!(tok.n_vocab(), 128256);
        // This tokenizer.json has no TemplateProcessing and no tokenizer_config.json: no BOS.
        assert!(!tok.add_bos());
        assert_eq!(tok.bos_id(), None);
        assert_eq!(
            tok.encode("Hello, world!", true).unwrap(),
            vec![9906, 11, 1917, 0]
        );
        assert_eq!(tok.encode("a<|eot_id|>", false).unwrap(), vec![64, 128009]);
        assert_eq!(tok.token_id("<|eot_id|>"), Some(128009));
        assert_eq!(tok.token_id("Ġworld"), Some(1917));
        assert!(tok.is_special(128000) && tok.is_special(128255) && !tok.is_special(1917));
        assert_eq!(tok.token_bytes(1917), b" world");
        assert_eq!(tok.token_bytes(128009), b"<|eot_id|>");
        assert_eq!(tok.token_bytes(128256), b"");
        let stop = tok.stop_ids();
        assert!(stop.contains(&128009) && stop.contains(&128001), "{stop:?}");
        assert_eq!(tok.chat_template(), None);
    }

    /// The Llama 3 vocabulary written as GGUF metadata (the way llama.cpp's converter does) and
    /// read back through `from_gguf`. Also times the 128k build.
    fn llama3_as_gguf(json_tok: &Tokenizer, name: &str) -> Tokenizer {
        let j: Value = serde_json::from_str(
            &std::fs::read_to_string(llama3_dir().join("tokenizer.json")).unwrap(),
        )
        .unwrap();
        let n = json_tok.n_vocab();
        let mut tokens = vec![String::new(); n];
        for (t, id) in j["model"]["vocab"].as_object().unwrap() {
            tokens[id.as_u64().unwrap() as usize] = t.clone();
        }
        let mut types = vec![1i32; n];
        for a in j["added_tokens"].as_array().unwrap() {
            let id = a["id"].as_u64().unwrap() as usize;
            tokens[id] = a["content"].as_str().unwrap().to_string();
            types[id] = 3;
        }
        let merges: Vec<String> = j["model"]["merges"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| match m {
                Value::String(s) => s.clone(),
                Value::Array(p) => format!("{} {}", p[0].as_str().unwrap(), p[1].as_str().unwrap()),
                _ => panic!("merge {m:?}"),
            })
            .collect();
        let mut w = GgufWriter::default();
        let md = &mut w.metadata;
        md.push(("tokenizer.ggml.model".into(), MetaValue::Str("gpt2".into())));
        md.push((
            "tokenizer.ggml.tokens".into(),
            MetaValue::Array(tokens.into_iter().map(MetaValue::Str).collect()),
        ));
        md.push((
            "tokenizer.ggml.token_type".into(),
            MetaValue::Array(types.into_iter().map(MetaValue::I32).collect()),
        ));
        md.push((
            "tokenizer.ggml.merges".into(),
            MetaValue::Array(merges.into_iter().map(MetaValue::Str).collect()),
        ));
        md.push(("tokenizer.ggml.bos_token_id".into(), MetaValue::U32(128000)));
        md.push(("tokenizer.ggml.eos_token_id".into(), MetaValue::U32(128001)));
        md.push(("tokenizer.ggml.eot_token_id".into(), MetaValue::U32(128009)));
        md.push(("tokenizer.ggml.add_bos_token".into(), MetaValue::Bool(true)));
        let dir = temp_dir(name);
        let path = dir.join("llama3-vocab.gguf");
        std::fs::write(&path, w.to_bytes()).unwrap();
        let g = GgufFile::open(&path).unwrap();
        let t0 = std::time::Instant::now();
        let tok = Tokenizer::from_gguf(&g).unwrap();
        eprintln!("128k-vocab GGUF tokenizer built in {:?}", t0.elapsed());
        drop(g);
        let _ = std::fs::remove_dir_all(&dir);
        tok
    }

    /// The GGUF tokenizer (our compact BPE) gives the same ids as the golden cases.
    #[test]
    fn llama3_as_gguf_matches_cases() {
        let Some((json_tok, cases)) = llama3_cases() else {
            return;
        };
        let n = json_tok.n_vocab();
        let tok = llama3_as_gguf(&json_tok, "llama3gguf");
        assert_eq!(tok.n_vocab(), 128256);
        for c in &cases {
            let text = c["text"].as_str().unwrap();
            assert_eq!(
                tok.encode(text, false).unwrap(),
                case_ids(c),
                "gguf encode {text:?}"
            );
        }
        for id in 0..n as u32 {
            assert_eq!(tok.token_bytes(id), json_tok.token_bytes(id), "token {id}");
        }
        assert_eq!(tok.encode("Hi", true).unwrap(), vec![128000, 13347]);
        assert_eq!(
            tok.encode("<|begin_of_text|>Hi", true).unwrap(),
            vec![128000, 13347]
        );
        assert_eq!(tok.stop_ids(), vec![128001, 128009]);
        assert_eq!(tok.token_id("Ġworld"), Some(1917));
        assert_eq!(tok.token_id("<|eot_id|>"), Some(128009));
        assert_eq!(tok.token_id("no such token"), None);
    }

    /// Our compact BPE (GGUF) against the `tokenizers` crate (tokenizer.json) on the Llama 3
    /// vocabulary: the same ids for thousands of random texts mixing scripts, digits,
    /// whitespace runs, contractions, emoji, special-token texts and near-misses of them, and
    /// for long pieces that exercise the merge queue (a quadratic merge loop would hang here).
    #[test]
    fn llama3_gguf_bpe_equals_tokenizers_crate() {
        let Some((json_tok, _)) = llama3_cases() else {
            return;
        };
        let tok = llama3_as_gguf(&json_tok, "llama3bpe");
        const PARTS: &[&str] = &[
            " ",
            "  ",
            "\t",
            "\n",
            "\r\n",
            "\n\n",
            " \n ",
            "\u{a0}",
            "\u{3000}",
            "a",
            "the",
            "The",
            " world",
            "HELLO",
            "'s",
            "'T",
            "'re",
            "'ll",
            "'d",
            "'m",
            "'ve",
            "'",
            "\"",
            "1",
            "12",
            "12345",
            "3.14",
            "٣",
            "Ⅻ",
            "½",
            ".",
            ",",
            "!!",
            "?",
            "...",
            "-",
            "_",
            "(",
            ")",
            "{}",
            "<",
            ">",
            "</",
            "<|",
            "|>",
            "<|eot_id|>",
            "<|begin_of_text|>",
            "<|eot_id",
            "<|reserved_special_token_0|>",
            "é",
            "e\u{301}",
            "ß",
            "Ω",
            "Привет",
            "мир",
            "你好",
            "世界",
            "日本語",
            "한국어",
            "नमस्ते",
            "ि",
            "مرحبا",
            "שלום",
            "😀",
            "👍🏽",
            "👨\u{200d}👩",
            "🇫🇷",
            "\u{200b}",
            "\u{feff}",
            "∑",
            "→",
            "\u{10ffff}",
            "\u{fffd}",
            "\x7f",
            "\x01",
            "fn",
            "let",
            "::",
            "->",
            "=>",
            "//",
            "#",
            "@",
            "$",
            "%",
            "^",
            "&",
            "*",
            "~",
            "`",
        ];
        let mut state = 0x2545F4914F6CDD1Du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut texts: Vec<String> = (0..3000)
            .map(|_| {
                let len = (next() % 24) as usize;
                (0..len)
                    .map(|_| PARTS[(next() % PARTS.len() as u64) as usize])
                    .collect()
            })
            .collect();
        texts.push("!".repeat(20000));
        texts.push("a".repeat(20000));
        texts.push("ab".repeat(10000) + &" ".repeat(5000) + "x");
        texts.push("😀".repeat(3000));
        texts.push("1".repeat(999) + &"\n".repeat(1000));
        for text in &texts {
            let want = json_tok.encode(text, false).unwrap();
            let got = tok.encode(text, false).unwrap();
            assert_eq!(got, want, "{text:?}");
        }
    }

    // ---- 2. tiny GGUF tokenizers ----

    #[test]
    fn tiny_gguf_example_and_bos() {
        for name in ["tiny-i2_s.gguf", "tiny-tq2_0.gguf"] {
            let tok = tiny(name);
            assert_eq!(tok.n_vocab(), 1024);
            assert_eq!(tok.encode(TINY_TEXT, false).unwrap(), TINY_IDS, "{name}");
            assert_eq!(tok.decode(&TINY_IDS), TINY_TEXT);
            assert_eq!(tok.bos_id(), Some(1022));
            assert_eq!(tok.eos_id(), Some(1023));
            assert_eq!(tok.token_id("<|begin_of_text|>"), Some(1022));
            assert!(tok.is_special(1022) && tok.is_special(1023) && !tok.is_special(39));
            assert!(!tok.is_special(5000));
            assert_eq!(tok.token_bytes(1023), b"<|end_of_text|>");
            assert_eq!(tok.token_bytes(220), b" ");
            assert_eq!(tok.token_bytes(1024), b"");
            assert_eq!(tok.stop_ids(), vec![1023]);
            // Special-token text in the middle of text is one token.
            let ids = tok.encode("x<|end_of_text|>x", false).unwrap();
            assert_eq!(ids, vec![87, 1023, 87], "{name}");
            let ids = tok.encode("Hello world<|end_of_text|> x", false).unwrap();
            assert_eq!(ids.iter().filter(|&&i| i == 1023).count(), 1);
            assert_eq!(tok.decode(&ids), "Hello world<|end_of_text|> x");
        }
        // bitnet.cpp's file says add_bos_token = true, llama.cpp's says false.
        let g = GgufFile::open(tiny_gguf("tiny-i2_s.gguf")).unwrap();
        assert_eq!(
            g.get_bool("tokenizer.ggml.add_bos_token").unwrap(),
            Some(true)
        );
        let i2s = Tokenizer::from_gguf(&g).unwrap();
        assert!(i2s.add_bos());
        let with_bos = i2s.encode(TINY_TEXT, true).unwrap();
        assert_eq!(with_bos[0], 1022);
        assert_eq!(&with_bos[1..], TINY_IDS);
        let already = i2s
            .encode(&format!("<|begin_of_text|>{TINY_TEXT}"), true)
            .unwrap();
        assert_eq!(already, with_bos, "BOS must not be doubled");
        assert_eq!(i2s.encode("", true).unwrap(), vec![1022]);
        assert_eq!(i2s.encode("", false).unwrap(), Vec::<u32>::new());
        assert!(i2s.chat_template().unwrap().contains("BITNETAssistant"));

        let g = GgufFile::open(tiny_gguf("tiny-tq2_0.gguf")).unwrap();
        assert_eq!(
            g.get_bool("tokenizer.ggml.add_bos_token").unwrap(),
            Some(false)
        );
        let tq = Tokenizer::from_gguf(&g).unwrap();
        assert!(!tq.add_bos());
        assert_eq!(tq.encode(TINY_TEXT, true).unwrap(), TINY_IDS);
        assert_eq!(tq.chat_template(), None);
    }

    // ---- 3. streaming ----

    /// The single-byte token ids of a tiny vocabulary, by byte value.
    fn byte_ids(tok: &Tokenizer) -> Vec<u32> {
        (0..=255u8)
            .map(|b| {
                (0..tok.n_vocab() as u32)
                    .find(|&id| tok.token_bytes(id) == [b] && !tok.is_special(id))
                    .unwrap_or_else(|| panic!("no token for byte {b}"))
            })
            .collect()
    }

    #[test]
    fn stream_decoder_never_splits_a_character() {
        let tok = tiny("tiny-tq2_0.gguf");
        let by = byte_ids(&tok);
        let text = "é 🦀 x€";
        let ids: Vec<u32> = text.bytes().map(|b| by[b as usize]).collect();
        assert_eq!(tok.decode(&ids), text);
        let mut sd = StreamDecoder::new();
        let mut pieces = Vec::new();
        for &id in &ids {
            pieces.push(sd.push(&tok, id));
        }
        pieces.push(sd.flush());
        // "é" = C3 A9: nothing after the first byte, the whole char after the second.
        assert_eq!(pieces[0], "");
        assert_eq!(pieces[1], "é");
        // The crab is 4 bytes (index 3..7): only the last push yields it.
        assert_eq!(&pieces[3..7], ["", "", "", "🦀"]);
        for p in &pieces {
            assert!(!p.contains('\u{FFFD}'), "partial character in {pieces:?}");
        }
        assert_eq!(pieces.concat(), text);

        // Invalid and truncated sequences: same as the lossy decode of everything.
        let raw: &[&[u8]] = &[
            b"a\xE2\x82",
            b"b",
            b"\xF0\x9F",
            b"\x80\xFF\xC3",
            b"\xA9z\xE2\x82",
        ];
        let ids: Vec<u32> = raw.concat().iter().map(|&b| by[b as usize]).collect();
        let mut sd = StreamDecoder::new();
        let mut s: String = ids.iter().map(|&id| sd.push(&tok, id)).collect();
        s.push_str(&sd.flush());
        assert_eq!(s, tok.decode(&ids));
        assert_eq!(s, String::from_utf8_lossy(&raw.concat()));
        // Out-of-range ids add nothing.
        let mut sd = StreamDecoder::new();
        assert_eq!(sd.push(&tok, 99999), "");
        assert_eq!(sd.flush(), "");
    }

    #[test]
    fn stream_decoder_on_real_tokens() {
        let tok = tiny("tiny-i2_s.gguf");
        let text = "naïve café – ünïcödé 日本語 🎉 done.\n";
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(tok.decode(&ids), text);
        let mut sd = StreamDecoder::new();
        let mut s = String::new();
        for &id in &ids {
            let piece = sd.push(&tok, id);
            assert!(!piece.contains('\u{FFFD}'));
            s.push_str(&piece);
        }
        s.push_str(&sd.flush());
        assert_eq!(s, text);
    }

    /// A vocabulary with the corners a converted file can have, against the `tokenizers`
    /// pipeline built from the same metadata: a normal token outside the byte-level alphabet
    /// ("日", a raw "\n"), which BPE never reaches; two control tokens with the same text (the
    /// last id wins); a control token with a space; merges through those corners.
    #[test]
    fn quirky_vocab_matches_tokenizers_crate() {
        let table = &UNICODE_TO_BYTE;
        let mut alphabet = vec![String::new(); 256];
        for (c, &b) in table.iter().enumerate() {
            if b >= 0 {
                alphabet[b as usize] = char::from_u32(c as u32).unwrap().to_string();
            }
        }
        let mut tokens = alphabet.clone();
        let mut types = vec![1i32; 256];
        let mut add = |t: &str, ty: i32| {
            tokens.push(t.to_string());
            types.push(ty);
        };
        add("日", 1);
        add("\n", 1);
        add("<x>", 3);
        add("<x>", 3);
        add("<a b>", 3);
        add("ab", 1);
        add("abc", 1);
        add("ĠĠ", 1);
        add("本", 1);
        add("日本", 1);
        let merges = ["a b", "ab c", "Ġ Ġ", "日 本"];
        let mut w = GgufWriter::default();
        let md = &mut w.metadata;
        md.push(("tokenizer.ggml.model".into(), MetaValue::Str("gpt2".into())));
        let strs = |v: Vec<String>| MetaValue::Array(v.into_iter().map(MetaValue::Str).collect());
        md.push(("tokenizer.ggml.tokens".into(), strs(tokens)));
        let types = types.into_iter().map(MetaValue::I32).collect();
        md.push(("tokenizer.ggml.token_type".into(), MetaValue::Array(types)));
        let merges = merges.iter().map(|m| m.to_string()).collect();
        md.push(("tokenizer.ggml.merges".into(), strs(merges)));
        let dir = temp_dir("quirky");
        let path = dir.join("quirky.gguf");
        std::fs::write(&path, w.to_bytes()).unwrap();
        let ours = Tokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
        let hf = hf_from_gguf(&path);
        for text in [
            "日",
            "日本",
            "a\nb",
            "\n",
            "<x>",
            "a<x>b<x>",
            "<a b>",
            "x <a b> y",
            "abc abcab",
            "    ",
            "日本語 <x><x> abc\n\n  ab",
        ] {
            let want = hf.encode_fast(text, false).unwrap().get_ids().to_vec();
            assert_eq!(ours.encode(text, false).unwrap(), want, "{text:?}");
        }
        assert_eq!(ours.token_id("<x>"), Some(259));
        assert_eq!(ours.token_id("<a b>"), Some(260));
        assert_eq!(ours.token_id("ĠĠ"), Some(263));
        let _ = std::fs::remove_dir_all(&dir);
    }

    // ---- tokenizer.json + tokenizer_config.json ----

    /// A GGUF file's tokenizer as a `tokenizers` pipeline (what `from_gguf` built before it had
    /// its own BPE), to write tokenizer.json files from.
    fn hf_from_gguf(path: &Path) -> tokenizers::Tokenizer {
        use tokenizers::models::bpe::BpeBuilder;
        use tokenizers::pre_tokenizers::{byte_level::ByteLevel, sequence::Sequence, split};
        let g = GgufFile::open(path).unwrap();
        let tokens = g.get_str_array("tokenizer.ggml.tokens").unwrap().unwrap();
        let types = g
            .get_int_array("tokenizer.ggml.token_type")
            .unwrap()
            .unwrap();
        let merges = g.get_str_array("tokenizer.ggml.merges").unwrap().unwrap();
        let vocab = tokens.iter().enumerate();
        let vocab: tokenizers::models::bpe::Vocab =
            vocab.map(|(i, t)| (t.to_string(), i as u32)).collect();
        let merges = merges.iter().map(|m| split_merge(m).unwrap());
        let merges = merges
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        let bpe = BpeBuilder::new().vocab_and_merges(vocab, merges);
        let mut hf = tokenizers::Tokenizer::new(bpe.ignore_merges(true).build().unwrap());
        let regex = split::SplitPattern::Regex(LLAMA3_PRETOKENIZER_REGEX.to_string());
        let isolated = tokenizers::SplitDelimiterBehavior::Isolated;
        let split = split::Split::new(regex, isolated, false).unwrap();
        let byte_level = ByteLevel::new(false, false, false);
        hf.with_pre_tokenizer(Some(Sequence::new(vec![split.into(), byte_level.into()])));
        hf.with_decoder(Some(ByteLevel::default()));
        let added = (0..tokens.len()).filter(|&i| types[i] == TOKEN_TYPE_CONTROL);
        let added = added.map(|i| tokenizers::AddedToken::from(tokens[i], true));
        hf.add_special_tokens(added.collect::<Vec<_>>()).unwrap();
        hf
    }

    #[test]
    fn tokenizer_json_config_and_post_processor() {
        // Write the tiny GGUF tokenizer out as tokenizer.json, then read it back with configs.
        let base = tiny("tiny-tq2_0.gguf");
        let base_hf = hf_from_gguf(&tiny_gguf("tiny-tq2_0.gguf"));
        let dir = temp_dir("json");
        base_hf.save(dir.join("tokenizer.json"), false).unwrap();
        assert!(Tokenizer::from_hf_dir(&temp_dir("empty"))
            .unwrap()
            .is_none());

        // No config: no BOS, no EOS, same ids.
        let t = Tokenizer::from_hf_dir(&dir).unwrap().unwrap();
        assert_eq!(t.encode(TINY_TEXT, true).unwrap(), TINY_IDS);
        assert_eq!((t.bos_id(), t.eos_id(), t.add_bos()), (None, None, false));
        assert_eq!(t.n_vocab(), 1024);
        for id in 0..1024 {
            assert_eq!(t.token_bytes(id), base.token_bytes(id), "token {id}");
        }
        assert!(t.is_special(1022) && !t.is_special(5));
        assert_eq!(t.stop_ids(), vec![1023]);

        // Config with add_bos_token, object-form bos, list-form chat template.
        let cfg = serde_json::json!({
            "add_bos_token": true,
            "bos_token": {"content": "<|begin_of_text|>", "special": true},
            "eos_token": "<|end_of_text|>",
            "chat_template": [
                {"name": "tool_use", "template": "T"},
                {"name": "default", "template": "D"}
            ]
        });
        std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
        let t = Tokenizer::from_hf_dir(&dir).unwrap().unwrap();
        assert_eq!(
            (t.bos_id(), t.eos_id(), t.add_bos()),
            (Some(1022), Some(1023), true)
        );
        assert_eq!(t.chat_template(), Some("D"));
        let ids = t.encode(TINY_TEXT, true).unwrap();
        assert_eq!(ids[0], 1022);
        assert_eq!(&ids[1..], TINY_IDS);
        assert_eq!(
            t.encode(&format!("<|begin_of_text|>{TINY_TEXT}"), true)
                .unwrap(),
            ids
        );
        assert_eq!(t.encode(TINY_TEXT, false).unwrap(), TINY_IDS);

        // add_bos from a TemplateProcessing post-processor (config without add_bos_token): the
        // post-processor itself is not used when encoding, so BOS still appears only once.
        let mut hf = base_hf.clone();
        let tp = tokenizers::processors::template::TemplateProcessing::builder()
            .try_single("<|begin_of_text|> $A")
            .unwrap()
            .special_tokens(vec![("<|begin_of_text|>", 1022)])
            .build()
            .unwrap();
        hf.with_post_processor(Some(tp));
        hf.save(dir.join("tokenizer.json"), false).unwrap();
        let cfg = serde_json::json!({"bos_token": "<|begin_of_text|>", "chat_template": "C"});
        std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
        let t = Tokenizer::from_hf_dir(&dir).unwrap().unwrap();
        assert!(t.add_bos());
        assert_eq!(t.chat_template(), Some("C"));
        assert_eq!(
            t.encode("<|begin_of_text|>x", true).unwrap(),
            vec![1022, 87]
        );
        assert_eq!(t.encode("x", true).unwrap(), vec![1022, 87]);
        // Without a config the template's first token is taken as BOS.
        std::fs::remove_file(dir.join("tokenizer_config.json")).unwrap();
        let t = Tokenizer::from_hf_dir(&dir).unwrap().unwrap();
        assert_eq!((t.bos_id(), t.add_bos()), (Some(1022), true));
        assert_eq!(t.chat_template(), None);

        // Garbage tokenizer.json / config: errors, not panics.
        std::fs::write(dir.join("tokenizer_config.json"), "{not json").unwrap();
        assert!(Tokenizer::from_hf_dir(&dir).is_err());
        std::fs::write(dir.join("tokenizer.json"), "{\"model\": 3}").unwrap();
        let e = Tokenizer::from_hf_dir(&dir).unwrap_err();
        assert!(e.message.contains("tokenizer.json"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn falcon_tiny_gguf_matches_its_tokenizer_json() {
        let root = manifest().join("../../../shared/golden/falcon-tiny");
        let gguf = root.join("falcon-tiny-TQ2_0.gguf");
        let json = root.join("checkpoint_packed/tokenizer.json");
        if !gguf.is_file() || !json.is_file() {
            eprintln!("SKIPPED: ../shared/golden/falcon-tiny not found, falcon tokenizer cross-check did not run");
            return;
        }
        let a = Tokenizer::from_gguf(&GgufFile::open(&gguf).unwrap()).unwrap();
        let b = Tokenizer::from_tokenizer_json(&json).unwrap();
        assert_eq!(a.n_vocab(), b.n_vocab());
        for id in 0..a.n_vocab() as u32 {
            assert_eq!(a.token_bytes(id), b.token_bytes(id));
            assert_eq!(a.is_special(id), b.is_special(id));
        }
        for text in [
            TINY_TEXT,
            "<|endoftext|>Hi there!\n\n  12345 ümlaut's",
            "x<|pad|>y",
        ] {
            assert_eq!(
                a.encode(text, true).unwrap(),
                b.encode(text, true).unwrap(),
                "{text:?}"
            );
        }
        assert!(!a.add_bos() && !b.add_bos());
        assert_eq!(a.eos_id(), Some(0));
        assert_eq!(b.eos_id(), Some(0));
        assert_eq!(a.stop_ids(), vec![0]);
    }

    // ---- hostile metadata ----

    fn writer_with(tokens: &[&str], merges: &[&str]) -> GgufWriter {
        let mut w = GgufWriter::default();
        w.metadata
            .push(("tokenizer.ggml.model".into(), MetaValue::Str("gpt2".into())));
        w.metadata.push((
            "tokenizer.ggml.tokens".into(),
            MetaValue::Array(
                tokens
                    .iter()
                    .map(|s| MetaValue::Str(s.to_string()))
                    .collect(),
            ),
        ));
        w.metadata.push((
            "tokenizer.ggml.merges".into(),
            MetaValue::Array(
                merges
                    .iter()
                    .map(|s| MetaValue::Str(s.to_string()))
                    .collect(),
            ),
        ));
        w
    }

    fn set(w: &mut GgufWriter, key: &str, v: MetaValue) {
        w.metadata.retain(|(k, _)| k != key);
        w.metadata.push((key.to_string(), v));
    }

    fn load(w: &GgufWriter, dir: &Path, name: &str) -> Result<Tokenizer> {
        let p = dir.join(format!("{name}.gguf"));
        std::fs::write(&p, w.to_bytes()).unwrap();
        let g = GgufFile::open(&p)?;
        Tokenizer::from_gguf(&g)
    }

    #[test]
    fn hostile_metadata_gives_errors() {
        let dir = temp_dir("hostile");
        let toks = ["a", "b", "ab", "Ġ", "Ġa", "<|eot_id|>"];
        let good = writer_with(&toks, &["a b", "Ġ a"]);
        let t = load(&good, &dir, "good").unwrap();
        assert_eq!(t.encode("ab a", false).unwrap(), vec![2, 4]);
        assert!(!t.add_bos());
        assert_eq!(t.stop_ids(), vec![5]);
        assert!(!t.is_special(5));

        let err = |w: &GgufWriter, name: &str, want: &str| {
            let e = load(w, &dir, name).unwrap_err();
            assert!(e.message.contains(want), "{name}: {e}");
        };
        let mut w = good.clone_for_test();
        set(
            &mut w,
            "tokenizer.ggml.model",
            MetaValue::Str("llama".into()),
        );
        err(&w, "spm", "SentencePiece");
        set(
            &mut w,
            "tokenizer.ggml.model",
            MetaValue::Str("bert".into()),
        );
        err(&w, "bert", "\"bert\"");
        set(&mut w, "tokenizer.ggml.model", MetaValue::U32(7));
        err(&w, "model-int", "tokenizer.ggml.model");
        let mut w = good.clone_for_test();
        w.metadata.retain(|(k, _)| k != "tokenizer.ggml.model");
        err(&w, "no-model", "tokenizer.ggml.model");

        let mut w = good.clone_for_test();
        set(
            &mut w,
            "tokenizer.ggml.tokens",
            MetaValue::Array(vec![MetaValue::U32(1)]),
        );
        err(&w, "tokens-int", "tokenizer.ggml.tokens");
        set(&mut w, "tokenizer.ggml.tokens", MetaValue::Array(vec![]));
        err(&w, "tokens-empty", "tokenizer.ggml.tokens");
        w.metadata.retain(|(k, _)| k != "tokenizer.ggml.tokens");
        err(&w, "tokens-missing", "tokenizer.ggml.tokens");

        let mut w = good.clone_for_test();
        set(
            &mut w,
            "tokenizer.ggml.token_type",
            MetaValue::Array(vec![MetaValue::I32(1); 3]),
        );
        err(&w, "types-len", "token_type");
        set(
            &mut w,
            "tokenizer.ggml.token_type",
            MetaValue::Str("x".into()),
        );
        err(&w, "types-str", "token_type");

        for (i, m) in [
            "ab",
            "a c",
            "b a",
            "ab ab",
            "Ġa Ġa",
            " a",
            "a ",
            "<|eot_id|> <|eot_id|>",
        ]
        .iter()
        .enumerate()
        {
            let w = writer_with(&toks, &["a b", m]);
            err(&w, &format!("merge{i}"), "tokenizer.ggml.merges[1]");
        }
        let mut w = good.clone_for_test();
        w.metadata.retain(|(k, _)| k != "tokenizer.ggml.merges");
        err(&w, "merges-missing", "tokenizer.ggml.merges");

        for key in [
            "bos_token_id",
            "eos_token_id",
            "eot_token_id",
            "eom_token_id",
        ] {
            let key = format!("tokenizer.ggml.{key}");
            let mut w = good.clone_for_test();
            set(&mut w, &key, MetaValue::U32(6));
            err(&w, "id-range", &format!("{key} = 6 is out of range"));
            set(&mut w, &key, MetaValue::I32(-1));
            err(&w, "id-neg", &key);
        }
        let mut w = good.clone_for_test();
        set(&mut w, "tokenizer.ggml.add_bos_token", MetaValue::U8(1));
        err(&w, "addbos", "add_bos_token");

        // Control token types: special, recognised in text, raw bytes are the text.
        let mut w = good.clone_for_test();
        let types = [1, 1, 1, 1, 1, 3]
            .iter()
            .map(|&t| MetaValue::I32(t))
            .collect();
        set(&mut w, "tokenizer.ggml.token_type", MetaValue::Array(types));
        set(&mut w, "tokenizer.ggml.bos_token_id", MetaValue::U32(5));
        set(
            &mut w,
            "tokenizer.ggml.pre",
            MetaValue::Str("llama-bpe".into()),
        );
        let t = load(&w, &dir, "control").unwrap();
        assert!(t.is_special(5));
        assert!(
            t.add_bos(),
            "llama-bpe without add_bos_token defaults to BOS like llama.cpp"
        );
        assert_eq!(t.encode("a<|eot_id|>b", true).unwrap(), vec![5, 0, 5, 1]);
        assert_eq!(t.token_bytes(4), b" a");
        let _ = std::fs::remove_dir_all(&dir);
    }

    trait CloneForTest {
        fn clone_for_test(&self) -> GgufWriter;
    }
    impl CloneForTest for GgufWriter {
        fn clone_for_test(&self) -> GgufWriter {
            GgufWriter {
                version: self.version,
                alignment: self.alignment,
                metadata: self.metadata.clone(),
                tensors: self.tensors.clone(),
            }
        }
    }
}
