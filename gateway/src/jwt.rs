//! Client tokens: JWTs signed with HS256 (PROTOCOL.md §3). `alg:none` and every
//! algorithm but HS256 are refused; `sub` and `exp` are required, `dev` optional.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use flare_codec::ids::is_valid_id;

type HmacSha256 = Hmac<Sha256>;

/// Longest token accepted, before any decoding.
pub const MAX_TOKEN_BYTES: usize = 4096;

/// The claims Flare reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dev: Option<String>,
}

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    /// Malformed, wrong algorithm, bad signature, missing or ill-formed claim.
    Invalid(&'static str),
    /// Well signed but `exp` is in the past.
    Expired,
}

#[derive(Deserialize)]
struct Header {
    alg: String,
}

#[derive(Deserialize)]
struct RawClaims {
    sub: Option<serde_json::Value>,
    exp: Option<serde_json::Value>,
    dev: Option<serde_json::Value>,
}

/// Verifies `token` with `secret` at `now_secs` and returns its claims.
pub fn verify(token: &str, secret: &[u8], now_secs: u64) -> Result<Claims, TokenError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(TokenError::Invalid("token too long"));
    }
    let mut parts = token.split('.');
    let (Some(h64), Some(c64), Some(s64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Invalid("a JWT has three dot-separated parts"));
    };
    let header: Header = decode_json(h64).ok_or(TokenError::Invalid("bad JWT header"))?;
    if header.alg != "HS256" {
        return Err(TokenError::Invalid("algorithm not accepted (HS256 only)"));
    }
    let sig = URL_SAFE_NO_PAD
        .decode(s64)
        .map_err(|_| TokenError::Invalid("bad signature encoding"))?;
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(h64.as_bytes());
    mac.update(b".");
    mac.update(c64.as_bytes());
    mac.verify_slice(&sig)
        .map_err(|_| TokenError::Invalid("bad signature"))?;
    let raw: RawClaims = decode_json(c64).ok_or(TokenError::Invalid("bad JWT claims"))?;
    let sub = match raw.sub {
        Some(serde_json::Value::String(s)) if is_valid_id(&s) => s,
        Some(_) => return Err(TokenError::Invalid("claim sub is not a valid user id")),
        None => return Err(TokenError::Invalid("claim sub is missing")),
    };
    let exp = match raw.exp {
        Some(v) => v
            .as_u64()
            .or_else(|| v.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64)),
        None => return Err(TokenError::Invalid("claim exp is missing")),
    }
    .ok_or(TokenError::Invalid("claim exp is not a number of seconds"))?;
    let dev = match raw.dev {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(d)) if is_valid_id(&d) => Some(d),
        Some(_) => return Err(TokenError::Invalid("claim dev is not a valid device id")),
    };
    if exp <= now_secs {
        return Err(TokenError::Expired);
    }
    Ok(Claims { sub, exp, dev })
}

fn decode_json<T: serde::de::DeserializeOwned>(part: &str) -> Option<T> {
    let bytes = URL_SAFE_NO_PAD.decode(part).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Mints an HS256 token for `claims`.
pub fn mint(claims: &Claims, secret: &[u8]) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).expect("claims serialize"));
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(header.as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    let sig = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{header}.{body}.{sig}")
}

/// Parses a duration like `90s`, `15m`, `1h`, `7d` (or plain seconds).
pub fn parse_ttl(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 's')) => (&s[..i], 1),
        Some((i, 'm')) => (&s[..i], 60),
        Some((i, 'h')) => (&s[..i], 3600),
        Some((i, 'd')) => (&s[..i], 86_400),
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: use a number with s, m, h or d, like 1h"))?;
    n.checked_mul(mult)
        .filter(|v| *v > 0)
        .ok_or_else(|| format!("invalid duration {s:?}: must be positive"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"secret";

    fn claims(sub: &str, exp: u64) -> Claims {
        Claims {
            sub: sub.into(),
            exp,
            dev: Some("phone".into()),
        }
    }

    fn forge(header: &str, body: &str, key: &[u8]) -> String {
        let h = URL_SAFE_NO_PAD.encode(header);
        let b = URL_SAFE_NO_PAD.encode(body);
        let mut mac = HmacSha256::new_from_slice(key).unwrap();
        mac.update(format!("{h}.{b}").as_bytes());
        format!(
            "{h}.{b}.{}",
            URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
        )
    }

    #[test]
    fn round_trip() {
        let t = mint(&claims("alice", 2000), KEY);
        assert_eq!(verify(&t, KEY, 1000), Ok(claims("alice", 2000)));
    }

    #[test]
    fn refusals() {
        let t = mint(&claims("alice", 2000), KEY);
        assert_eq!(
            verify(&t, b"other", 1000),
            Err(TokenError::Invalid("bad signature"))
        );
        assert_eq!(verify(&t, KEY, 2000), Err(TokenError::Expired));
        let none = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#),
            URL_SAFE_NO_PAD.encode(r#"{"sub":"a","exp":9999}"#)
        );
        assert!(matches!(verify(&none, KEY, 1), Err(TokenError::Invalid(_))));
        let hs384 = forge(r#"{"alg":"HS384"}"#, r#"{"sub":"a","exp":9999}"#, KEY);
        assert!(matches!(
            verify(&hs384, KEY, 1),
            Err(TokenError::Invalid(_))
        ));
        let no_sub = forge(r#"{"alg":"HS256"}"#, r#"{"exp":9999}"#, KEY);
        assert_eq!(
            verify(&no_sub, KEY, 1),
            Err(TokenError::Invalid("claim sub is missing"))
        );
        let no_exp = forge(r#"{"alg":"HS256"}"#, r#"{"sub":"a"}"#, KEY);
        assert_eq!(
            verify(&no_exp, KEY, 1),
            Err(TokenError::Invalid("claim exp is missing"))
        );
        let bad_sub = forge(r#"{"alg":"HS256"}"#, r#"{"sub":"a b","exp":9999}"#, KEY);
        assert!(matches!(
            verify(&bad_sub, KEY, 1),
            Err(TokenError::Invalid(_))
        ));
        assert!(matches!(verify("a.b", KEY, 1), Err(TokenError::Invalid(_))));
    }

    #[test]
    fn ttl() {
        assert_eq!(parse_ttl("1h"), Ok(3600));
        assert_eq!(parse_ttl("90"), Ok(90));
        assert_eq!(parse_ttl("2d"), Ok(172_800));
        assert!(parse_ttl("0s").is_err());
        assert!(parse_ttl("soon").is_err());
    }
}
