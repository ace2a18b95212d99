//! Error type of the engine library.

use std::time::Duration;

/// Result alias used across the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong inside the engine. Messages say what to do where possible.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A caller passed something unusable (wrong payload size, bad salt, ...).
    #[error("invalid input: {0}")]
    InvalidInput(String),

    /// A configuration key has a bad value, or is unknown.
    #[error("config key `{key}`: {message}")]
    Config {
        /// The offending key as the user wrote it.
        key: String,
        /// What is wrong and what is allowed.
        message: String,
    },

    /// An I/O operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, naming the path where there is one.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// Stored bytes failed validation (bad magic, checksum mismatch, torn record).
    #[error("corrupt data: {0}")]
    Corrupt(String),

    /// A tier operation did not finish within its deadline.
    #[error("tier `{tier}`: {op} timed out after {after:?}")]
    Timeout {
        /// Tier name.
        tier: String,
        /// Operation name.
        op: &'static str,
        /// The deadline that passed.
        after: Duration,
    },

    /// A tier reported a failure (backend down, injected fault, ...).
    #[error("tier `{tier}`: {message}")]
    Tier {
        /// Tier name.
        tier: String,
        /// What happened.
        message: String,
        /// The error behind it, when there is one (its text is already part of `message`).
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },

    /// The engine or a tier is shut down.
    #[error("engine is shut down")]
    Closed,
}

impl Error {
    /// Shorthand for [`Error::InvalidInput`].
    pub fn invalid(msg: impl Into<String>) -> Error {
        Error::InvalidInput(msg.into())
    }

    /// Shorthand for [`Error::Config`].
    pub fn config(key: impl Into<String>, message: impl Into<String>) -> Error {
        Error::Config {
            key: key.into(),
            message: message.into(),
        }
    }

    /// Shorthand for [`Error::Io`].
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// Shorthand for [`Error::Tier`].
    pub fn tier(tier: impl Into<String>, message: impl Into<String>) -> Error {
        Error::Tier {
            tier: tier.into(),
            message: message.into(),
            source: None,
        }
    }

    /// [`Error::Tier`] caused by `source`, whose text `message` already includes.
    pub fn tier_caused(
        tier: impl Into<String>,
        message: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Error {
        Error::Tier {
            tier: tier.into(),
            message: message.into(),
            source: Some(source.into()),
        }
    }
}
