//! The SAM v3 line protocol, without I/O: commands to send, replies to
//! parse, and the framing of datagrams on the bridge's UDP port.
//!
//! A reply is one line: two words naming it (`SESSION STATUS`), then
//! `KEY=VALUE` pairs; values may be double-quoted (with `\"` and `\\`
//! escapes, SAM 3.2) to hold spaces.

use std::fmt::{self, Write as _};

/// Versions we speak. 3.1 is the first with SIGNATURE_TYPE and datagram
/// forwarding as used here; i2pd and Java I2P both offer up to 3.3.
pub const MIN_VERSION: &str = "3.1";
pub const MAX_VERSION: &str = "3.3";
/// Ed25519 destinations.
pub const SIGNATURE_TYPE: u16 = 7;
/// The longest reply line we accept (a NAMING REPLY with a large
/// destination is about 1 KB; i2pd's own buffer is 8 KB).
pub const MAX_LINE: usize = 16 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SamError {
    #[error("malformed SAM reply: {0}")]
    Malformed(String),
    #[error("unexpected SAM reply `{got}` (expected {expected})")]
    Unexpected { expected: &'static str, got: String },
    #[error("SAM bridge refused: RESULT={result}{}", message.as_ref().map(|m| format!(" ({m})")).unwrap_or_default())]
    Refused {
        result: String,
        message: Option<String>,
    },
    #[error("SAM reply lacks {0}")]
    Missing(&'static str),
}

/// One parsed reply line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub topic: String,
    pub kind: String,
    pub pairs: Vec<(String, String)>,
}

impl Reply {
    pub fn parse(line: &str) -> Result<Reply, SamError> {
        let line = line.trim_end_matches(['\n', '\r']);
        if line.len() > MAX_LINE {
            return Err(SamError::Malformed(format!(
                "line of {} bytes is too long",
                line.len()
            )));
        }
        let mut tokens = tokenize(line)?.into_iter();
        let (Some(topic), Some(kind)) = (tokens.next(), tokens.next()) else {
            return Err(SamError::Malformed(format!("`{}`", shorten(line))));
        };
        if topic.contains('=') || kind.contains('=') {
            return Err(SamError::Malformed(format!("`{}`", shorten(line))));
        }
        let pairs = tokens
            .map(|t| match t.split_once('=') {
                Some((k, v)) => (k.to_owned(), v.to_owned()),
                // A bare word is a key with no value (SAM allows it).
                None => (t, String::new()),
            })
            .collect();
        Ok(Reply { topic, kind, pairs })
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Checks the reply is `expected` (e.g. "SESSION STATUS") with RESULT=OK.
    pub fn expect_ok(self, expected: &'static str) -> Result<Reply, SamError> {
        if format!("{} {}", self.topic, self.kind) != expected {
            return Err(SamError::Unexpected {
                expected,
                got: shorten(&format!("{} {}", self.topic, self.kind)),
            });
        }
        match self.get("RESULT") {
            Some("OK") => Ok(self),
            // DEST REPLY has no RESULT when it succeeds.
            None if expected == "DEST REPLY" => Ok(self),
            Some(other) => Err(SamError::Refused {
                result: shorten(other),
                message: self.get("MESSAGE").map(shorten),
            }),
            None => Err(SamError::Missing("RESULT")),
        }
    }

    pub fn require(&self, key: &'static str) -> Result<&str, SamError> {
        self.get(key).ok_or(SamError::Missing(key))
    }
}

impl fmt::Display for Reply {
    /// The wire form (without the newline); values are quoted when needed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.topic, self.kind)?;
        for (k, v) in &self.pairs {
            if v.is_empty() || v.contains([' ', '"', '\\', '\t']) {
                f.write_str(" ")?;
                f.write_str(k)?;
                f.write_str("=\"")?;
                for c in v.chars() {
                    if c == '"' || c == '\\' {
                        f.write_char('\\')?;
                    }
                    f.write_char(c)?;
                }
                f.write_str("\"")?;
            } else {
                write!(f, " {k}={v}")?;
            }
        }
        Ok(())
    }
}

/// Splits on blanks outside double quotes; quotes are removed and `\x`
/// yields `x` inside them.
fn tokenize(line: &str) -> Result<Vec<String>, SamError> {
    let mut tokens = Vec::new();
    let mut current = String::new();
    let mut in_token = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' => {
                if in_token {
                    tokens.push(std::mem::take(&mut current));
                    in_token = false;
                }
            }
            '"' => {
                in_token = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(escaped) => current.push(escaped),
                            None => {
                                return Err(SamError::Malformed("escape at end of line".into()))
                            }
                        },
                        Some(other) => current.push(other),
                        None => return Err(SamError::Malformed("unterminated quote".into())),
                    }
                }
            }
            other => {
                in_token = true;
                current.push(other);
            }
        }
    }
    if in_token {
        tokens.push(current);
    }
    Ok(tokens)
}

/// Keeps error messages about network input short.
fn shorten(text: &str) -> String {
    const MAX: usize = 120;
    if text.len() <= MAX {
        return text.to_owned();
    }
    let mut end = MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

pub fn hello() -> String {
    format!("HELLO VERSION MIN={MIN_VERSION} MAX={MAX_VERSION}\n")
}

pub fn dest_generate() -> String {
    format!("DEST GENERATE SIGNATURE_TYPE={SIGNATURE_TYPE}\n")
}

pub fn naming_lookup(name: &str) -> String {
    format!("NAMING LOOKUP NAME={name}\n")
}

/// Tunnel and encryption options of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionOptions {
    pub inbound_length: u8,
    pub outbound_length: u8,
    pub inbound_quantity: u8,
    pub outbound_quantity: u8,
    /// `i2cp.leaseSetEncType`, e.g. "4" (ECIES-X25519) or "4,0".
    pub encryption_types: String,
    /// `crypto.ratchet.inboundTags`: session tags the router keeps ahead
    /// per ECIES session. More than lost messages in a burst, or every
    /// later message fails to decrypt until the session is rebuilt (i2pd
    /// 2.45.1 keeps 320: after an overload, ~30 s of total loss).
    pub inbound_tags: u32,
}

/// Enough to ride out a burst the router drops (its link queue holds 500
/// messages).
pub const DEFAULT_INBOUND_TAGS: u32 = 4096;

/// `SESSION CREATE` for a RAW session whose datagrams the bridge forwards
/// to `forward_host:forward_port`. RAW: no signature per datagram (an
/// Ed25519 sign and verify each in DATAGRAM style) and no 391-byte sender
/// destination in it; the Noise session authenticates the sender instead.
pub fn session_create(
    id: &str,
    private_keys_base64: &str,
    forward_host: &str,
    forward_port: u16,
    options: &SessionOptions,
) -> String {
    format!(
        "SESSION CREATE STYLE=RAW ID={id} DESTINATION={private_keys_base64} \
         SIGNATURE_TYPE={SIGNATURE_TYPE} HOST={forward_host} PORT={forward_port} \
         inbound.length={} outbound.length={} inbound.quantity={} outbound.quantity={} \
         inbound.lengthVariance=0 outbound.lengthVariance=0 i2cp.leaseSetEncType={} \
         crypto.ratchet.inboundTags={}\n",
        options.inbound_length,
        options.outbound_length,
        options.inbound_quantity,
        options.outbound_quantity,
        options.encryption_types,
        options.inbound_tags
    )
}

/// The header of a datagram sent to the bridge's UDP port.
pub fn datagram_header(session_id: &str, destination_base64: &str) -> String {
    format!("3.0 {session_id} {destination_base64}\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn i2pd_replies_parse() {
        let r = Reply::parse("HELLO REPLY RESULT=OK VERSION=3.1\n")
            .unwrap()
            .expect_ok("HELLO REPLY")
            .unwrap();
        assert_eq!(r.get("VERSION"), Some("3.1"));
        let err = Reply::parse("SESSION STATUS RESULT=I2P_ERROR MESSAGE=\"Invalid crypto type\"")
            .unwrap()
            .expect_ok("SESSION STATUS")
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "SAM bridge refused: RESULT=I2P_ERROR (Invalid crypto type)"
        );
        let err = Reply::parse("HELLO REPLY RESULT=NOVERSION")
            .unwrap()
            .expect_ok("HELLO REPLY")
            .unwrap_err();
        assert!(err.to_string().contains("NOVERSION"));
        let r = Reply::parse("NAMING REPLY RESULT=KEY_NOT_FOUND NAME=x.b32.i2p").unwrap();
        assert_eq!(r.get("NAME"), Some("x.b32.i2p"));
        assert!(Reply::parse("DEST REPLY PUB=abc PRIV=def")
            .unwrap()
            .expect_ok("DEST REPLY")
            .is_ok());
    }

    #[test]
    fn a_reply_to_another_question_is_an_error() {
        let err = Reply::parse("STREAM STATUS RESULT=OK")
            .unwrap()
            .expect_ok("SESSION STATUS")
            .unwrap_err();
        assert!(matches!(err, SamError::Unexpected { .. }), "{err}");
        assert!(Reply::parse("").is_err());
        assert!(Reply::parse("HELLO").is_err());
        assert!(Reply::parse("HELLO REPLY MESSAGE=\"unterminated").is_err());
    }

    #[test]
    fn session_create_names_every_option() {
        let line = session_create(
            "veil0-1",
            "PRIV",
            "198.18.0.11",
            40000,
            &SessionOptions {
                inbound_length: 3,
                outbound_length: 3,
                inbound_quantity: 2,
                outbound_quantity: 2,
                encryption_types: "4".into(),
                inbound_tags: 4096,
            },
        );
        assert!(line.ends_with('\n') && line.matches('\n').count() == 1);
        for part in [
            "STYLE=RAW",
            "ID=veil0-1",
            "DESTINATION=PRIV",
            "SIGNATURE_TYPE=7",
            "HOST=198.18.0.11",
            "PORT=40000",
            "inbound.length=3",
            "outbound.length=3",
            "i2cp.leaseSetEncType=4",
            "crypto.ratchet.inboundTags=4096",
        ] {
            assert!(line.contains(part), "{part} missing from {line}");
        }
    }

    fn word() -> impl Strategy<Value = String> {
        "[A-Z][A-Z_]{0,11}"
    }

    fn value() -> impl Strategy<Value = String> {
        // Anything printable on one line, quotes and backslashes included.
        "[ -~]{0,40}"
    }

    proptest! {
        #[test]
        fn replies_round_trip(
            topic in word(),
            kind in word(),
            pairs in proptest::collection::vec((word(), value()), 0..6),
        ) {
            let reply = Reply { topic, kind, pairs };
            prop_assert_eq!(Reply::parse(&reply.to_string()), Ok(reply));
        }

        #[test]
        fn truncated_replies_never_panic(
            pairs in proptest::collection::vec((word(), value()), 0..6),
            cut in 0usize..400,
        ) {
            let line = Reply { topic: "SESSION".into(), kind: "STATUS".into(), pairs }.to_string();
            let mut cut = cut.min(line.len());
            while !line.is_char_boundary(cut) { cut -= 1; }
            if let Ok(reply) = Reply::parse(&line[..cut]) {
                let _ = reply.expect_ok("SESSION STATUS");
            }
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..3000)) {
            let _ = Reply::parse(&String::from_utf8_lossy(&bytes)).map(|r| r.expect_ok("HELLO REPLY"));
        }
    }
}
