//! The client side of SCRAM (RFC 5802) with SHA-256 or SHA-512 (RFC 7677),
//! as Kafka uses it: no channel binding, no authorization identity.
//!
//! ```text
//!  client-first  n,,n=<user>,r=<client nonce>
//!  server-first  r=<client nonce + server nonce>,s=<salt>,i=<iterations>
//!  client-final  c=biws,r=<nonce>,p=<proof>
//!  server-final  v=<server signature>   (or e=<error>)
//! ```

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256, Sha512};

/// The hash of a SCRAM mechanism.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Hash {
    Sha256,
    Sha512,
}

impl Hash {
    pub(super) fn hmac(self, key: &[u8], data: &[u8]) -> Vec<u8> {
        // HMAC takes keys of any length: new_from_slice cannot fail.
        match self {
            Hash::Sha256 => {
                let mut m = Hmac::<Sha256>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
                m.update(data);
                m.finalize().into_bytes().to_vec()
            }
            Hash::Sha512 => {
                let mut m = Hmac::<Sha512>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
                m.update(data);
                m.finalize().into_bytes().to_vec()
            }
        }
    }

    pub(super) fn digest(self, data: &[u8]) -> Vec<u8> {
        match self {
            Hash::Sha256 => Sha256::digest(data).to_vec(),
            Hash::Sha512 => Sha512::digest(data).to_vec(),
        }
    }

    pub(super) fn salted_password(self, password: &[u8], salt: &[u8], iterations: u32) -> Vec<u8> {
        match self {
            Hash::Sha256 => {
                pbkdf2::pbkdf2_hmac_array::<Sha256, 32>(password, salt, iterations).to_vec()
            }
            Hash::Sha512 => {
                pbkdf2::pbkdf2_hmac_array::<Sha512, 64>(password, salt, iterations).to_vec()
            }
        }
    }
}

/// Iterations a server may ask for: Kafka allows 4096 to 16384. Fewer would
/// make the proof cheap to attack offline (RFC 7677 asks for at least 4096,
/// and so does Java's client); more would only burn the client's CPU.
const MIN_ITERATIONS: u32 = 4096;
const MAX_ITERATIONS: u32 = 100_000;

/// A SCRAM exchange in progress.
pub(crate) struct Scram {
    hash: Hash,
    password: String,
    client_first_bare: String,
    nonce: String,
    /// Set once the client's final message is made: the signature the
    /// server must prove it knows.
    server_signature: Option<Vec<u8>>,
}

impl Scram {
    /// Starts an exchange for `username`; returns it and the client's first
    /// message.
    pub fn start(hash: Hash, username: &str, password: &str, nonce: String) -> (Scram, Vec<u8>) {
        let user = username.replace('=', "=3D").replace(',', "=2C");
        let client_first_bare = format!("n={user},r={nonce}");
        let first = format!("n,,{client_first_bare}").into_bytes();
        (
            Scram {
                hash,
                password: password.to_owned(),
                client_first_bare,
                nonce,
                server_signature: None,
            },
            first,
        )
    }

    /// The client's final message, answering the server's first.
    pub fn answer(&mut self, server_first: &[u8]) -> Result<Vec<u8>, String> {
        let server_first = std::str::from_utf8(server_first)
            .map_err(|_| "the server's first message is not UTF-8".to_owned())?;
        let (mut nonce, mut salt, mut iterations) = (None, None, None);
        for field in server_first.split(',') {
            match field.split_once('=') {
                Some(("r", v)) => nonce = Some(v),
                Some(("s", v)) => salt = Some(v),
                Some(("i", v)) => iterations = Some(v),
                Some(("e", v)) => return Err(format!("the server says: {v}")),
                _ => {}
            }
        }
        let nonce = nonce.ok_or("the server's first message has no nonce")?;
        if !nonce.starts_with(&self.nonce) || nonce.len() == self.nonce.len() {
            return Err("the server's nonce does not extend the client's".into());
        }
        let salt = BASE64
            .decode(salt.ok_or("the server's first message has no salt")?)
            .map_err(|e| format!("the server's salt is not base64: {e}"))?;
        let iterations: u32 = iterations
            .ok_or("the server's first message has no iteration count")?
            .parse()
            .map_err(|_| "the server's iteration count is not a number".to_owned())?;
        if !(MIN_ITERATIONS..=MAX_ITERATIONS).contains(&iterations) {
            return Err(format!(
                "the server asks for {iterations} iterations ({MIN_ITERATIONS} to {MAX_ITERATIONS} accepted)"
            ));
        }
        let h = self.hash;
        let salted = h.salted_password(self.password.as_bytes(), &salt, iterations);
        let client_key = h.hmac(&salted, b"Client Key");
        let stored_key = h.digest(&client_key);
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{server_first},{without_proof}", self.client_first_bare);
        let signature = h.hmac(&stored_key, auth_message.as_bytes());
        let proof: Vec<u8> = client_key
            .iter()
            .zip(&signature)
            .map(|(a, b)| a ^ b)
            .collect();
        let server_key = h.hmac(&salted, b"Server Key");
        self.server_signature = Some(h.hmac(&server_key, auth_message.as_bytes()));
        Ok(format!("{without_proof},p={}", BASE64.encode(proof)).into_bytes())
    }

    /// Checks the server's final message: it must prove the server knows
    /// the password too.
    pub fn verify(&self, server_final: &[u8]) -> Result<(), String> {
        let text = std::str::from_utf8(server_final)
            .map_err(|_| "the server's final message is not UTF-8".to_owned())?;
        if let Some(e) = text.strip_prefix("e=") {
            return Err(match e {
                "invalid-proof" | "unknown-user" => {
                    format!("wrong user name or password (the server says: {e})")
                }
                e => format!("the server says: {e}"),
            });
        }
        let v = text
            .split(',')
            .find_map(|f| f.strip_prefix("v="))
            .ok_or("the server's final message has no signature")?;
        let v = BASE64
            .decode(v)
            .map_err(|e| format!("the server's signature is not base64: {e}"))?;
        match &self.server_signature {
            Some(expected) if *expected == v => Ok(()),
            Some(_) => Err("the server's signature is wrong: it does not know the password (or is not the server)".into()),
            None => Err("the server ended the exchange early".into()),
        }
    }
}

/// A fresh client nonce: 24 random bytes, base64 (printable, no comma).
pub(crate) fn nonce() -> Result<String, String> {
    let mut bytes = [0u8; 24];
    getrandom::fill(&mut bytes).map_err(|e| format!("no randomness for a nonce: {e}"))?;
    Ok(BASE64.encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The SCRAM-SHA-256 example of RFC 7677, section 3.
    #[test]
    fn rfc7677_example() {
        let (mut scram, first) = Scram::start(
            Hash::Sha256,
            "user",
            "pencil",
            "rOprNGfwEbeRWgbNEkqO".into(),
        );
        assert_eq!(first, b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO");
        let server_first = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
        let last = scram.answer(server_first).unwrap();
        assert_eq!(
            String::from_utf8(last).unwrap(),
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        scram
            .verify(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
            .unwrap();
        assert!(scram
            .verify(b"v=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")
            .is_err());
        assert!(scram
            .verify(b"e=invalid-proof")
            .unwrap_err()
            .contains("invalid-proof"));
    }

    #[test]
    fn names_are_escaped_and_bad_server_messages_refused() {
        let (mut scram, first) = Scram::start(Hash::Sha512, "a=b,c", "pw", "abc".into());
        assert_eq!(first, b"n,,n=a=3Db=2Cc,r=abc");
        for bad in [
            &b"r=xyz,s=AAAA,i=4096"[..],
            b"r=abc,s=AAAA,i=4096",
            b"r=abcd,s=!!,i=4096",
            b"r=abcd,s=AAAA,i=0",
            b"r=abcd,s=AAAA,i=1",
            b"r=abcd,s=AAAA,i=4095",
            b"r=abcd,s=AAAA,i=999999999",
            b"s=AAAA,i=4096",
            b"e=unknown-user",
            b"\xff",
        ] {
            assert!(
                scram.answer(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn nonces_differ() {
        assert_ne!(nonce().unwrap(), nonce().unwrap());
    }
}
