//! Models from the Hugging Face Hub, the way users refer to them.
//!
//! - [`reference`]: model references `OWNER/REPO[:X][@REVISION]` and which files of a
//!   repository they mean (`:X` is an exact file name or a quantization tag such as `i2_s`).
//! - [`cache`]: the standard `huggingface_hub` cache (`HF_HUB_CACHE`, `HF_HOME/hub` or
//!   `~/.cache/huggingface/hub`; `models--OWNER--REPO/{blobs,snapshots,refs}`), so downloads
//!   are shared with the Python tools; listing and removing cached models.
//! - [`client`]: a small blocking Hub client: the model-info API, file downloads with resume
//!   (`.incomplete` files and `Range` requests), verification against what the Hub reports
//!   (sha256 of LFS files, git blob SHA-1 of small files), `HF_TOKEN`, `HF_ENDPOINT`,
//!   `HF_HUB_OFFLINE`.
//!
//! Every error is one line that says what went wrong and what to do about it ([`HubError`]).

pub mod cache;
pub mod client;
pub mod reference;

pub use client::{Hub, HubConfig};
pub use reference::{select_files, ModelRef, Selection};

use std::fmt;

/// What kind of failure a [`HubError`] is (tests and callers branch on it; users read the
/// message).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The text is not a model reference, or names no file of the repository.
    InvalidReference,
    /// The Hub could not be reached (no network, DNS, refused, timed out, interrupted).
    Network,
    /// 404: no such repository, revision or file.
    NotFound,
    /// 401 / 403: private or gated repository, missing or insufficient token.
    Unauthorized,
    /// No space left on the device holding the cache.
    DiskFull,
    /// The downloaded bytes do not match the checksum the Hub reported.
    ChecksumMismatch,
    /// Offline mode (or no network) and the model is not in the cache.
    NotCached,
    /// Anything else from the file system.
    Io,
    /// The server answered something unexpected.
    Protocol,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubError {
    pub kind: ErrorKind,
    pub message: String,
}

impl HubError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> HubError {
        HubError {
            kind,
            message: message.into(),
        }
    }

    /// A file-system error about `path`; ENOSPC becomes [`ErrorKind::DiskFull`].
    pub fn io(path: &std::path::Path, e: std::io::Error) -> HubError {
        if is_disk_full(&e) {
            HubError::new(
                ErrorKind::DiskFull,
                format!(
                    "disk full while writing {}: free some space (or point HF_HUB_CACHE at a larger disk) and run the command again to resume",
                    path.display()
                ),
            )
        } else {
            HubError::new(ErrorKind::Io, format!("{}: {e}", path.display()))
        }
    }
}

/// Is this the "no space left on device" error (ENOSPC, or EDQUOT for a full quota)?
pub fn is_disk_full(e: &std::io::Error) -> bool {
    // ENOSPC is 28 and EDQUOT 122 on Linux; 28 and 69 on macOS and the BSDs.
    matches!(e.raw_os_error(), Some(28))
        || (cfg!(target_os = "linux") && e.raw_os_error() == Some(122))
        || (cfg!(any(target_os = "macos", target_os = "freebsd")) && e.raw_os_error() == Some(69))
}

impl fmt::Display for HubError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for HubError {}

pub type Result<T> = std::result::Result<T, HubError>;
