//! Model references `OWNER/REPO[:X][@REVISION]` and the files of a repository they mean.
//!
//! `:X` is an exact file name when the repository has that file, otherwise a quantization tag
//! matched case-insensitively in the GGUF file names (`:i2_s`, `:TQ2_0`), as llama.cpp's
//! `-hf repo:quant`. Without `:X` a GGUF repository gives its I2_S file (by name), else TQ2_0,
//! else TQ1_0, else its only GGUF; a safetensors repository gives the files a Hugging Face
//! model directory needs (config, tokenizer, `model*.safetensors` and their index).

use crate::{ErrorKind, HubError, Result};
use std::fmt;

/// The revision used when a reference names none.
pub const DEFAULT_REVISION: &str = "main";

/// Quantization tags tried, in this order, when a GGUF repository is named without `:X`.
pub const PREFERRED_QUANTS: [&str; 3] = ["i2_s", "tq2_0", "tq1_0"];

/// Files of a safetensors repository that make up a model directory (besides the weights).
pub const HF_DIR_FILES: [&str; 6] = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelRef {
    /// `OWNER/REPO`.
    pub repo: String,
    /// The `:X` part: a file name or a quantization tag.
    pub selector: Option<String>,
    /// The `@REVISION` part: a branch, tag or commit hash.
    pub revision: Option<String>,
}

fn invalid(s: &str, why: &str) -> HubError {
    HubError::new(
        ErrorKind::InvalidReference,
        format!("{s:?} is not a model reference (OWNER/REPO[:FILE_OR_QUANT][@REVISION]): {why}"),
    )
}

/// Is `name` a valid Hub owner or repository name? (Letters, digits, `-`, `_`, `.`; not
/// starting or ending with `-` or `.`; no `--` or `..`; at most 96 characters.)
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 96
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with(['-', '.'])
        && !name.ends_with(['-', '.'])
        && !name.contains("--")
        && !name.contains("..")
}

impl ModelRef {
    /// Parse `OWNER/REPO[:X][@REVISION]`.
    pub fn parse(s: &str) -> Result<ModelRef> {
        let (base, revision) = match s.split_once('@') {
            Some((b, r)) => (b, Some(r)),
            None => (s, None),
        };
        let (repo, selector) = match base.split_once(':') {
            Some((r, x)) => (r, Some(x)),
            None => (base, None),
        };
        let Some((owner, name)) = repo.split_once('/') else {
            return Err(invalid(s, "expected OWNER/REPO"));
        };
        if !valid_name(owner) || !valid_name(name) {
            return Err(invalid(
                s,
                "owner and repository names are letters, digits, '-', '_' and '.'",
            ));
        }
        if let Some(x) = selector {
            if x.is_empty() || x.starts_with('/') || x.split('/').any(|p| p == ".." || p.is_empty())
            {
                return Err(invalid(s, "empty or unsafe file name after ':'"));
            }
        }
        if let Some(r) = revision {
            if r.is_empty()
                || r.chars().any(|c| c.is_whitespace() || c.is_control())
                || r.split('/').any(|p| p == ".." || p == "." || p.is_empty())
            {
                return Err(invalid(s, "bad revision after '@'"));
            }
        }
        Ok(ModelRef {
            repo: repo.to_string(),
            selector: selector.map(str::to_string),
            revision: revision.map(str::to_string),
        })
    }

    /// The revision to use (`main` unless the reference names one).
    pub fn revision(&self) -> &str {
        self.revision.as_deref().unwrap_or(DEFAULT_REVISION)
    }

    /// Does this text look meant as a local path rather than a Hub reference? (Used to give a
    /// "no such file" error instead of asking the Hub about `models/foo.gguf`.)
    pub fn looks_like_path(s: &str) -> bool {
        let lower = s.to_ascii_lowercase();
        s.starts_with(['.', '/', '~', '\\'])
            || s.contains('\\')
            || (s.len() > 1 && s.as_bytes()[1] == b':' && s.as_bytes()[0].is_ascii_alphabetic())
            || [".gguf", ".json", ".safetensors", ".bin"]
                .iter()
                .any(|ext| lower.split(['@', ':']).next().unwrap_or("").ends_with(ext))
            || s.split(['@', ':'])
                .next()
                .unwrap_or("")
                .matches('/')
                .count()
                != 1
    }
}

impl fmt::Display for ModelRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.repo)?;
        if let Some(x) = &self.selector {
            write!(f, ":{x}")?;
        }
        if let Some(r) = &self.revision {
            write!(f, "@{r}")?;
        }
        Ok(())
    }
}

/// What a reference resolves to inside a repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// One file (a GGUF model, or the exact file named with `:FILE`).
    File(String),
    /// The files of a Hugging Face model directory (the snapshot folder is the model).
    Dir(Vec<String>),
}

impl Selection {
    pub fn files(&self) -> Vec<String> {
        match self {
            Selection::File(f) => vec![f.clone()],
            Selection::Dir(v) => v.clone(),
        }
    }
}

fn is_gguf(f: &str) -> bool {
    f.to_ascii_lowercase().ends_with(".gguf")
}

/// The base name of a repository path.
fn base_name(f: &str) -> &str {
    f.rsplit('/').next().unwrap_or(f)
}

/// GGUF files whose base name contains `tag` (case-insensitive). Matches bounded on both sides
/// by a separator other than `_` (or the name's ends) are preferred, so `q4_0` picks
/// `m-q4_0.gguf` over `m-q4_0_4_8.gguf`; plain substring matches are the fallback.
fn tag_matches<'a>(ggufs: &[&'a str], tag: &str) -> Vec<&'a str> {
    let tag = tag.to_ascii_lowercase();
    let bounded = |name: &str| -> bool {
        let name = name.to_ascii_lowercase();
        let stem = name.strip_suffix(".gguf").unwrap_or(&name);
        let mut start = 0;
        while let Some(i) = stem[start..].find(&tag) {
            let a = start + i;
            let b = a + tag.len();
            let before = stem[..a].chars().next_back();
            let after = stem[b..].chars().next();
            let sep = |c: Option<char>| match c {
                None => true,
                Some(c) => !c.is_ascii_alphanumeric() && c != '_',
            };
            if sep(before) && sep(after) {
                return true;
            }
            // On to the next char (a byte further could split a multi-byte one).
            start = a + stem[a..].chars().next().map_or(1, char::len_utf8);
        }
        false
    };
    let exact: Vec<&str> = ggufs
        .iter()
        .copied()
        .filter(|f| bounded(base_name(f)))
        .collect();
    if !exact.is_empty() {
        return exact;
    }
    ggufs
        .iter()
        .copied()
        .filter(|f| base_name(f).to_ascii_lowercase().contains(&tag))
        .collect()
}

fn list(files: &[&str]) -> String {
    files.join(", ")
}

/// Choose the files of a repository (given as its file list) that a reference means.
/// `repo` is only used in messages.
pub fn select_files(repo: &str, files: &[String], selector: Option<&str>) -> Result<Selection> {
    let ggufs: Vec<&str> = files
        .iter()
        .map(String::as_str)
        .filter(|f| is_gguf(f))
        .collect();
    if let Some(x) = selector {
        if files.iter().any(|f| f == x) {
            return Ok(Selection::File(x.to_string()));
        }
        let m = tag_matches(&ggufs, x);
        return match m.as_slice() {
            [one] => Ok(Selection::File(one.to_string())),
            [] if ggufs.is_empty() => Err(HubError::new(
                ErrorKind::InvalidReference,
                format!("{repo} has no file named {x:?} and no GGUF files"),
            )),
            [] => Err(HubError::new(
                ErrorKind::InvalidReference,
                format!(
                    "{repo} has no file named {x:?} and no GGUF file with {x:?} in its name (GGUF files: {})",
                    list(&ggufs)
                ),
            )),
            many => Err(HubError::new(
                ErrorKind::InvalidReference,
                format!(
                    "{x:?} matches several files of {repo} ({}): name one exactly with {repo}:FILE",
                    list(many)
                ),
            )),
        };
    }
    if !ggufs.is_empty() {
        for q in PREFERRED_QUANTS {
            let m = tag_matches(&ggufs, q);
            match m.as_slice() {
                [] => continue,
                [one] => return Ok(Selection::File(one.to_string())),
                many => {
                    return Err(HubError::new(
                        ErrorKind::InvalidReference,
                        format!(
                            "{repo} has several {} files ({}): name one with {repo}:FILE",
                            q.to_ascii_uppercase(),
                            list(many)
                        ),
                    ))
                }
            }
        }
        if let [one] = ggufs.as_slice() {
            return Ok(Selection::File(one.to_string()));
        }
        return Err(HubError::new(
            ErrorKind::InvalidReference,
            format!(
                "{repo} has several GGUF files and none is I2_S, TQ2_0 or TQ1_0 ({}): pick one with {repo}:FILE or {repo}:QUANT",
                list(&ggufs)
            ),
        ));
    }
    let top: Vec<&str> = files
        .iter()
        .map(String::as_str)
        .filter(|f| !f.contains('/'))
        .collect();
    let weights: Vec<&str> = top
        .iter()
        .copied()
        .filter(|f| f.starts_with("model") && f.ends_with(".safetensors"))
        .collect();
    if !top.contains(&"config.json") || weights.is_empty() {
        return Err(HubError::new(
            ErrorKind::InvalidReference,
            format!("{repo} has no GGUF file and no config.json with model*.safetensors: it is not a model bitnet-rs can run"),
        ));
    }
    let mut out: Vec<String> = HF_DIR_FILES
        .iter()
        .filter(|f| top.contains(f))
        .map(|f| f.to_string())
        .collect();
    if top.contains(&"model.safetensors.index.json") {
        out.push("model.safetensors.index.json".into());
    }
    let mut weights: Vec<String> = weights.iter().map(|f| f.to_string()).collect();
    weights.sort();
    out.extend(weights);
    Ok(Selection::Dir(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parses_every_part() {
        let r = ModelRef::parse("microsoft/bitnet-b1.58-2B-4T-gguf").unwrap();
        assert_eq!(r.repo, "microsoft/bitnet-b1.58-2B-4T-gguf");
        assert_eq!((r.selector.as_deref(), r.revision()), (None, "main"));
        let r = ModelRef::parse("a/b:I2_S@v1.0").unwrap();
        assert_eq!(
            (r.repo.as_str(), r.selector.as_deref(), r.revision()),
            ("a/b", Some("I2_S"), "v1.0")
        );
        let r = ModelRef::parse("a/b@refs/pr/1").unwrap();
        assert_eq!(r.revision(), "refs/pr/1");
        let r = ModelRef::parse("a/b:sub/x.gguf").unwrap();
        assert_eq!(r.selector.as_deref(), Some("sub/x.gguf"));
        assert_eq!(r.to_string(), "a/b:sub/x.gguf");
        for bad in [
            "a", "a/b/c", "/b", "a/", "a/b:", "a/b@", "a--x/b", "a/.b", "a/b:../x", "a/b@x y",
            "a/b@../x", "a b/c",
        ] {
            let e = ModelRef::parse(bad).unwrap_err();
            assert_eq!(e.kind, ErrorKind::InvalidReference, "{bad}");
        }
    }

    #[test]
    fn tells_paths_from_references() {
        for p in [
            "./m.gguf",
            "/abs/m",
            "models/foo.gguf",
            "a/b/c",
            "model.gguf",
            "C:\\x",
            "dir",
        ] {
            assert!(ModelRef::looks_like_path(p), "{p}");
        }
        for r in [
            "microsoft/bitnet-b1.58-2B-4T",
            "a/b:i2_s",
            "a/b:x.gguf@main",
        ] {
            assert!(!ModelRef::looks_like_path(r), "{r}");
        }
    }

    #[test]
    fn default_gguf_choice_prefers_i2_s_then_tq2_0_then_tq1_0() {
        let all = files(&[
            "README.md",
            "m-TQ1_0.gguf",
            "m-tq2_0.gguf",
            "ggml-model-i2_s.gguf",
            "m-f16.gguf",
        ]);
        let pick = |f: &[String]| select_files("o/r", f, None).unwrap();
        assert_eq!(pick(&all), Selection::File("ggml-model-i2_s.gguf".into()));
        assert_eq!(pick(&all[..3]), Selection::File("m-tq2_0.gguf".into()));
        assert_eq!(pick(&all[..2]), Selection::File("m-TQ1_0.gguf".into()));
        assert_eq!(
            pick(&files(&["x.gguf", "config.json"])),
            Selection::File("x.gguf".into())
        );
        let e = select_files("o/r", &files(&["a-f16.gguf", "a-q8_0.gguf"]), None).unwrap_err();
        assert!(
            e.message.contains("a-f16.gguf") && e.message.contains(":FILE"),
            "{e}"
        );
    }

    #[test]
    fn selector_is_a_file_name_or_a_case_insensitive_quant_tag() {
        let all = files(&[
            "m-I2_S.gguf",
            "m-tq2_0.gguf",
            "m-q4_0.gguf",
            "m-q4_0_4_8.gguf",
            "i2_s",
        ]);
        let sel = |x: &str| select_files("o/r", &all, Some(x));
        assert_eq!(
            sel("m-tq2_0.gguf").unwrap(),
            Selection::File("m-tq2_0.gguf".into())
        );
        assert_eq!(
            sel("TQ2_0").unwrap(),
            Selection::File("m-tq2_0.gguf".into())
        );
        assert_eq!(sel("q4_0").unwrap(), Selection::File("m-q4_0.gguf".into()));
        // An exact file name wins over a tag.
        assert_eq!(sel("i2_s").unwrap(), Selection::File("i2_s".into()));
        assert_eq!(
            sel("I2_S.gguf").unwrap(),
            Selection::File("m-I2_S.gguf".into())
        );
        assert_eq!(sel("q5_k").unwrap_err().kind, ErrorKind::InvalidReference);
        let e = select_files(
            "o/r",
            &files(&["a-q4_k_m.gguf", "b-Q4_K_M.gguf"]),
            Some("q4_k_m"),
        )
        .unwrap_err();
        assert!(e.message.contains("several"), "{e}");
        // Non-ASCII tags: an unbounded first match inside a name must not split a character.
        let e = select_files("o/r", &files(&["xé.gguf", "m-é.gguf"]), Some("é"));
        assert_eq!(e.unwrap(), Selection::File("m-é.gguf".into()));
        let e = select_files("o/r", &files(&["aéé.gguf"]), Some("é")).unwrap();
        assert_eq!(e, Selection::File("aéé.gguf".into()));
    }

    #[test]
    fn safetensors_repositories_give_the_model_directory_files() {
        let all = files(&[
            ".gitattributes",
            "README.md",
            "config.json",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "model-00002-of-00002.safetensors",
            "model-00001-of-00002.safetensors",
            "model.safetensors.index.json",
            "optimizer.pt",
            "other.safetensors",
            "sub/model.safetensors",
        ]);
        let s = select_files("o/r", &all, None).unwrap();
        assert_eq!(
            s,
            Selection::Dir(files(&[
                "config.json",
                "generation_config.json",
                "tokenizer.json",
                "tokenizer_config.json",
                "special_tokens_map.json",
                "model.safetensors.index.json",
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors",
            ]))
        );
        let s = select_files("o/r", &files(&["config.json", "model.safetensors"]), None).unwrap();
        assert_eq!(s.files(), files(&["config.json", "model.safetensors"]));
        let e = select_files("o/r", &files(&["README.md", "config.json"]), None).unwrap_err();
        assert!(e.message.contains("not a model"), "{e}");
    }
}
