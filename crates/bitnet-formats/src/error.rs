use std::fmt;

/// A one-line, user-facing error about a model file: what is wrong and where (file, key or
/// tensor). Every reader returns this instead of panicking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormatError {
    pub message: String,
}

impl FormatError {
    pub fn new(message: impl Into<String>) -> Self {
        FormatError {
            message: message.into(),
        }
    }

    /// Prefix the message with a context such as the file path.
    pub fn context(self, ctx: impl fmt::Display) -> Self {
        FormatError {
            message: format!("{ctx}: {}", self.message),
        }
    }
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for FormatError {}

impl From<std::io::Error> for FormatError {
    fn from(e: std::io::Error) -> Self {
        FormatError::new(e.to_string())
    }
}

pub type Result<T> = std::result::Result<T, FormatError>;

/// Shorthand for `Err(FormatError::new(format!(...)))`.
#[macro_export]
macro_rules! bail {
    ($($arg:tt)*) => { return Err($crate::FormatError::new(format!($($arg)*))) };
}
