//! A minimal jsonwebtoken 11 crypto provider: HS256 only, on `ring::hmac`.
//!
//! jsonwebtoken 11 is built with `default-features = false`: its `rust_crypto` backend pulls the
//! `rsa` crate (RUSTSEC-2023-0071) even for HS256, and `aws_lc_rs` builds C. Without any backend
//! or installed provider, jsonwebtoken compiles and then *panics* at the first sign or verify.
//! This provider refuses every algorithm but HS256, so even a mistake in a `Validation` could not
//! enable another one.

use std::sync::Once;

use jsonwebtoken::crypto::{CryptoProvider, JwtSigner, JwtVerifier, KeyUtils};
use jsonwebtoken::errors::{new_error, ErrorKind};
use jsonwebtoken::signature::{self, Signer, Verifier};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, EncodingKey};
use ring::hmac;

/// Installs [`HS256_PROVIDER`] as jsonwebtoken's process-wide default, once. Idempotent; if
/// another provider was installed first (by other code), that one stays and is used.
pub(crate) fn install_hs256_provider() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        if HS256_PROVIDER.install_default().is_err() {
            tracing::debug!("a jsonwebtoken crypto provider was already installed; keeping it");
        }
    });
}

/// Only what HS256 needs. JWK utilities are left unimplemented: we never parse JWKs.
static HS256_PROVIDER: CryptoProvider = CryptoProvider {
    signer_factory: hs256_signer,
    verifier_factory: hs256_verifier,
    key_utils: KeyUtils::new_unimplemented(),
};

struct Hs256(hmac::Key);

fn hs256_signer(
    algorithm: &Algorithm,
    key: &EncodingKey,
) -> jsonwebtoken::errors::Result<Box<dyn JwtSigner>> {
    if *algorithm != Algorithm::HS256 {
        return Err(new_error(ErrorKind::UnsupportedAlgorithm));
    }
    if key.family() != AlgorithmFamily::Hmac {
        return Err(new_error(ErrorKind::InvalidKeyFormat));
    }
    Ok(Box::new(Hs256(hmac::Key::new(
        hmac::HMAC_SHA256,
        key.as_bytes(),
    ))))
}

fn hs256_verifier(
    algorithm: &Algorithm,
    key: &DecodingKey,
) -> jsonwebtoken::errors::Result<Box<dyn JwtVerifier>> {
    if *algorithm != Algorithm::HS256 {
        return Err(new_error(ErrorKind::UnsupportedAlgorithm));
    }
    if key.family() != AlgorithmFamily::Hmac {
        return Err(new_error(ErrorKind::InvalidKeyFormat));
    }
    Ok(Box::new(Hs256(hmac::Key::new(
        hmac::HMAC_SHA256,
        key.try_get_as_bytes()?,
    ))))
}

impl Signer<Vec<u8>> for Hs256 {
    fn try_sign(&self, msg: &[u8]) -> Result<Vec<u8>, signature::Error> {
        Ok(hmac::sign(&self.0, msg).as_ref().to_vec())
    }
}

impl Verifier<Vec<u8>> for Hs256 {
    /// `ring::hmac::verify` compares in constant time.
    fn verify(&self, msg: &[u8], signature: &Vec<u8>) -> Result<(), signature::Error> {
        hmac::verify(&self.0, msg, signature).map_err(|_| signature::Error::new())
    }
}

impl JwtSigner for Hs256 {
    fn algorithm(&self) -> Algorithm {
        Algorithm::HS256
    }
}

impl JwtVerifier for Hs256 {
    fn algorithm(&self) -> Algorithm {
        Algorithm::HS256
    }
}
