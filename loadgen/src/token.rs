//! HS256 client tokens (PROTOCOL.md §3), minted here with the gateway's secret.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::Sha256;

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    exp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    dev: Option<&'a str>,
}

/// A JWT `{"alg":"HS256"}` for user `sub` (device `dev`), expiring at `exp_unix_secs`.
pub fn mint(secret: &[u8], sub: &str, dev: Option<&str>, exp_unix_secs: u64) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let claims = Claims {
        sub,
        exp: exp_unix_secs,
        dev,
    };
    let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).expect("claims serialize"));
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(header.as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    let sig = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{header}.{body}.{sig}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_has_three_parts_claims_and_a_verifiable_signature() {
        let t = mint(b"secret", "alice", Some("phone"), 2_000_000_000);
        let parts: Vec<&str> = t.split('.').collect();
        assert_eq!(parts.len(), 3);
        let claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        assert_eq!(
            claims,
            serde_json::json!({"sub":"alice","exp":2_000_000_000u64,"dev":"phone"})
        );
        let mut mac = Hmac::<Sha256>::new_from_slice(b"secret").unwrap();
        mac.update(format!("{}.{}", parts[0], parts[1]).as_bytes());
        mac.verify_slice(&URL_SAFE_NO_PAD.decode(parts[2]).unwrap())
            .expect("signature verifies with the same secret");
        let mut other = Hmac::<Sha256>::new_from_slice(b"other").unwrap();
        other.update(format!("{}.{}", parts[0], parts[1]).as_bytes());
        assert!(other
            .verify_slice(&URL_SAFE_NO_PAD.decode(parts[2]).unwrap())
            .is_err());
    }
}
