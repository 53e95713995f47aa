//! How keys and values become bytes: JSON (serde) by default, UTF-8 strings,
//! raw bytes, no key at all, or your own [`Codec`].

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// A key or value that could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
#[error("{what}")]
pub struct CodecError {
    /// What was wrong.
    pub what: String,
}

fn error(what: impl Into<String>) -> CodecError {
    CodecError { what: what.into() }
}

/// Turns `T` into the bytes of a record field and back. `None` is a null field.
pub trait Codec<T>: Send + Sync {
    /// The field's bytes.
    fn encode(&self, value: &T) -> Result<Option<Bytes>, CodecError>;
    /// The value from the field's bytes.
    fn decode(&self, bytes: Option<&[u8]>) -> Result<T, CodecError>;
}

/// JSON through serde.
///
/// ```
/// use strom::codec::{Codec, Json};
/// let bytes = Json.encode(&vec![1, 2]).unwrap().unwrap();
/// assert_eq!(&bytes[..], b"[1,2]");
/// let back: Vec<i32> = Json.decode(Some(&bytes)).unwrap();
/// assert_eq!(back, [1, 2]);
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct Json;

impl<T: Serialize + DeserializeOwned> Codec<T> for Json {
    fn encode(&self, value: &T) -> Result<Option<Bytes>, CodecError> {
        serde_json::to_vec(value)
            .map(|v| Some(Bytes::from(v)))
            .map_err(|e| error(format!("cannot encode as JSON: {e}")))
    }
    fn decode(&self, bytes: Option<&[u8]>) -> Result<T, CodecError> {
        let bytes = bytes.ok_or_else(|| error("null where JSON was expected"))?;
        serde_json::from_slice(bytes).map_err(|e| error(format!("not the expected JSON: {e}")))
    }
}

/// UTF-8 text as is.
#[derive(Debug, Clone, Copy, Default)]
pub struct Utf8;

impl Codec<String> for Utf8 {
    fn encode(&self, value: &String) -> Result<Option<Bytes>, CodecError> {
        Ok(Some(Bytes::copy_from_slice(value.as_bytes())))
    }
    fn decode(&self, bytes: Option<&[u8]>) -> Result<String, CodecError> {
        let bytes = bytes.ok_or_else(|| error("null where text was expected"))?;
        String::from_utf8(bytes.to_vec()).map_err(|_| error("not valid UTF-8"))
    }
}

/// Bytes as they are.
#[derive(Debug, Clone, Copy, Default)]
pub struct Raw;

impl Codec<Bytes> for Raw {
    fn encode(&self, value: &Bytes) -> Result<Option<Bytes>, CodecError> {
        Ok(Some(value.clone()))
    }
    fn decode(&self, bytes: Option<&[u8]>) -> Result<Bytes, CodecError> {
        Ok(bytes.map(Bytes::copy_from_slice).unwrap_or_default())
    }
}

/// No key: writes a null key and reads any key as `()`.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoKey;

impl Codec<()> for NoKey {
    fn encode(&self, _: &()) -> Result<Option<Bytes>, CodecError> {
        Ok(None)
    }
    fn decode(&self, _: Option<&[u8]>) -> Result<(), CodecError> {
        Ok(())
    }
}
