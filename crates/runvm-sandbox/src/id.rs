//! Validated identifiers.

use std::fmt;

/// Why an id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid id {value:?}: {reason}; valid: 1 to 128 characters of A-Z a-z 0-9 _ . -, not \".\" or \"..\"")]
pub struct InvalidId {
    /// The value given (cut to 200 characters).
    pub value: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// A sandbox id: safe as a file name and in messages.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SandboxId(String);

impl SandboxId {
    /// Validates `value`.
    pub fn parse(value: &str) -> Result<SandboxId, InvalidId> {
        let refuse = |reason| InvalidId {
            value: value.chars().take(200).collect(),
            reason,
        };
        if value.is_empty() {
            return Err(refuse("it is empty"));
        }
        if value.len() > 128 {
            return Err(refuse("it is longer than 128 bytes"));
        }
        if value.contains('\0') {
            return Err(refuse("it holds a NUL byte"));
        }
        if value.contains('/') {
            return Err(refuse("it holds '/'"));
        }
        if value == "." || value == ".." || value.contains("..") {
            return Err(refuse("it holds \"..\""));
        }
        if !value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        {
            return Err(refuse("it holds a character outside A-Z a-z 0-9 _ . -"));
        }
        Ok(SandboxId(value.to_string()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SandboxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A container id: the same rules as [`SandboxId`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContainerId(String);

impl ContainerId {
    /// Validates `value` (the rules of [`SandboxId::parse`]).
    pub fn parse(value: &str) -> Result<ContainerId, InvalidId> {
        SandboxId::parse(value).map(|id| ContainerId(id.0))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ContainerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Ids are stored as strings and validated again when read back: a state file is input too.
macro_rules! serde_as_validated_string {
    ($id:ident) => {
        impl serde::Serialize for $id {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }

        impl<'de> serde::Deserialize<'de> for $id {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = <String as serde::Deserialize>::deserialize(deserializer)?;
                $id::parse(&text).map_err(serde::de::Error::custom)
            }
        }
    };
}
serde_as_validated_string!(SandboxId);
serde_as_validated_string!(ContainerId);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_ids_pass() {
        for id in ["a", "pod-1", "A_b.c-9", &"x".repeat(128)] {
            assert_eq!(SandboxId::parse(id).unwrap().as_str(), id);
        }
    }

    #[test]
    fn bad_ids_are_refused_with_the_reason() {
        let cases = [
            ("", "empty"),
            (&*"x".repeat(129), "longer than 128"),
            ("a/b", "'/'"),
            ("..", "\"..\""),
            ("a..b", "\"..\""),
            ("a\0b", "NUL"),
            ("a b", "outside"),
            ("é", "outside"),
        ];
        for (id, reason) in cases {
            let err = SandboxId::parse(id).unwrap_err().to_string();
            assert!(err.contains(reason), "{id:?}: {err}");
        }
    }

    #[test]
    fn container_ids_follow_the_same_rules() {
        assert_eq!(ContainerId::parse("c-1").unwrap().as_str(), "c-1");
        assert!(ContainerId::parse("../c").is_err());
        assert!(ContainerId::parse("").is_err());
    }

    #[test]
    fn ids_are_validated_when_deserialized() {
        let id: SandboxId = serde_json::from_str("\"pod-1\"").unwrap();
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"pod-1\"");
        let err = serde_json::from_str::<ContainerId>("\"../etc\"").unwrap_err();
        assert!(err.to_string().contains("\"..\""), "{err}");
    }
}
