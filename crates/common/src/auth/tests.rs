//! Token tests: every way a token can be wrong is refused, and refused for its own reason.

use super::*;

fn claims(exp_in: i64) -> Claims {
    let now = now_unix();
    Claims {
        sub: "gateway".into(),
        scopes: vec!["services:discover".into()],
        exp: now + exp_in,
        iat: now,
        jti: "tok-1".into(),
    }
}

fn keyset(keys: &[&SigningKey]) -> KeySet {
    KeySet::from_jwks(&Jwks {
        keys: keys.iter().map(|k| k.public_jwk()).collect(),
    })
}

/// Rebuilds a token with `edit` applied to its decoded header and payload, keeping the
/// original signature.
fn edit(token: &str, edit: impl FnOnce(&mut serde_json::Value, &mut serde_json::Value)) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    let mut header: serde_json::Value =
        serde_json::from_slice(&B64.decode(parts[0]).unwrap()).unwrap();
    let mut payload: serde_json::Value =
        serde_json::from_slice(&B64.decode(parts[1]).unwrap()).unwrap();
    edit(&mut header, &mut payload);
    format!(
        "{}.{}.{}",
        B64.encode(header.to_string()),
        B64.encode(payload.to_string()),
        parts[2]
    )
}

#[test]
fn a_signed_token_verifies() {
    let key = SigningKey::generate().unwrap();
    let token = key.sign(&claims(60));
    let verified = keyset(&[&key]).verify(token.expose(), now_unix()).unwrap();
    assert_eq!(verified, claims(60));
    assert!(verified.has_scope("services:discover"));
    assert!(!verified.has_scope("credentials:read"));
}

#[test]
fn a_key_survives_its_pkcs8_round_trip() {
    let key = SigningKey::generate().unwrap();
    let again = SigningKey::from_pkcs8(key.pkcs8().clone()).unwrap();
    assert_eq!(key.kid(), again.kid());
    let token = again.sign(&claims(60));
    assert!(keyset(&[&key]).verify(token.expose(), now_unix()).is_ok());
    assert!(!format!("{key:?}").contains(&B64.encode(key.pkcs8().expose())));
}

#[test]
fn an_expired_token_is_refused() {
    let key = SigningKey::generate().unwrap();
    let token = key.sign(&claims(-60));
    assert_eq!(
        keyset(&[&key]).verify(token.expose(), now_unix()),
        Err(TokenError::Expired)
    );
}

#[test]
fn a_tampered_token_is_refused() {
    let key = SigningKey::generate().unwrap();
    let token = key.sign(&claims(60));
    let forged = edit(token.expose(), |_, payload| payload["sub"] = "admin".into());
    assert_eq!(
        keyset(&[&key]).verify(&forged, now_unix()),
        Err(TokenError::BadSignature)
    );
}

#[test]
fn a_token_signed_by_another_key_is_refused() {
    let ours = SigningKey::generate().unwrap();
    let theirs = SigningKey::generate().unwrap();
    // Signed with their own key, and so naming it: not a key we know.
    let foreign = theirs.sign(&claims(60));
    assert_eq!(
        keyset(&[&ours]).verify(foreign.expose(), now_unix()),
        Err(TokenError::UnknownKid(theirs.kid().to_owned()))
    );
    // Signed with their key while claiming ours: the signature gives it away.
    let mut impostor = Claims {
        sub: "admin".into(),
        ..claims(60)
    };
    impostor.scopes = vec!["admin".into()];
    let mut header = serde_json::json!({"alg": "EdDSA", "typ": "JWT", "kid": ours.kid()});
    let input = format!(
        "{}.{}",
        B64.encode(header.to_string()),
        B64.encode(serde_json::to_vec(&impostor).unwrap())
    );
    let signature = theirs.pair.sign(input.as_bytes());
    let posing = format!("{input}.{}", B64.encode(signature.as_ref()));
    assert_eq!(
        keyset(&[&ours]).verify(&posing, now_unix()),
        Err(TokenError::BadSignature)
    );
    header["kid"] = "".into();
    assert!(keyset(&[&ours]).verify(&posing, now_unix()).is_err());
}

#[test]
fn an_unknown_kid_is_refused() {
    let key = SigningKey::generate().unwrap();
    let token = key.sign(&claims(60));
    let renamed = edit(token.expose(), |header, _| {
        header["kid"] = "retired-key".into()
    });
    assert_eq!(
        keyset(&[&key]).verify(&renamed, now_unix()),
        Err(TokenError::UnknownKid("retired-key".into()))
    );
    let unnamed = edit(token.expose(), |header, _| {
        header.as_object_mut().unwrap().remove("kid");
    });
    assert_eq!(
        keyset(&[&key]).verify(&unnamed, now_unix()),
        Err(TokenError::MissingKid)
    );
}

#[test]
fn another_algorithm_is_refused() {
    let key = SigningKey::generate().unwrap();
    let token = key.sign(&claims(60));
    for alg in ["none", "HS256", "RS256", "ES256", "eddsa"] {
        let downgraded = edit(token.expose(), |header, _| header["alg"] = alg.into());
        assert_eq!(
            keyset(&[&key]).verify(&downgraded, now_unix()),
            Err(TokenError::UnsupportedAlgorithm(alg.into()))
        );
    }
}

#[test]
fn garbage_is_malformed_not_a_panic() {
    let key = SigningKey::generate().unwrap();
    let keys = keyset(&[&key]);
    let long = "a".repeat(MAX_TOKEN_BYTES + 1);
    for garbage in [
        "",
        ".",
        "..",
        "a.b.c",
        "a.b.c.d",
        "é.é.é",
        long.as_str(),
        "eyJ9.eyJ9.AA",
    ] {
        assert_eq!(
            keys.verify(garbage, now_unix()),
            Err(TokenError::Malformed),
            "{garbage:.20}"
        );
    }
}

#[test]
fn tokens_from_the_future_are_refused() {
    let key = SigningKey::generate().unwrap();
    let mut future = claims(3600);
    future.iat += 600;
    let token = key.sign(&future);
    assert_eq!(
        keyset(&[&key]).verify(token.expose(), now_unix()),
        Err(TokenError::IssuedInFuture)
    );
}

#[test]
fn the_jwks_skips_keys_it_cannot_use() {
    let key = SigningKey::generate().unwrap();
    let mut rsa = key.public_jwk();
    rsa.kty = "RSA".into();
    let mut short = key.public_jwk();
    short.x = B64.encode([1u8; 16]);
    assert!(
        KeySet::from_jwks(&Jwks {
            keys: vec![rsa, short]
        })
        .is_empty()
    );
}

mod over_http {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::hyper_server;

    /// Serves the current contents of `published` at `/jwks` on a loopback port; counts fetches.
    async fn jwks_server(published: Arc<Mutex<Jwks>>, fetches: Arc<Mutex<u32>>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/jwks", listener.local_addr().unwrap());
        let handler = move |_req, _| {
            let body = serde_json::to_vec(&*published.lock().unwrap()).unwrap();
            *fetches.lock().unwrap() += 1;
            async move {
                hyper_server::Routed::new(http::Response::new(hyper_server::full(body)), "/jwks")
            }
        };
        let registry = prometheus::Registry::new();
        tokio::spawn(async move {
            hyper_server::serve(
                listener,
                &registry,
                handler,
                std::future::pending(),
                &hyper_server::ServerOptions::default(),
            )
            .await
        });
        url
    }

    #[tokio::test]
    async fn the_verifier_fetches_and_refetches_on_an_unknown_kid() {
        let first = SigningKey::generate().unwrap();
        let published = Arc::new(Mutex::new(Jwks {
            keys: vec![first.public_jwk()],
        }));
        let fetches = Arc::new(Mutex::new(0));
        let url = jwks_server(published.clone(), fetches.clone()).await;
        let verifier =
            JwksVerifier::new(url, HttpClient::new(Duration::from_secs(2)), Duration::ZERO);

        let claims = claims(60);
        assert_eq!(
            verifier.verify(first.sign(&claims).expose()).await.unwrap(),
            claims
        );
        assert_eq!(
            verifier.verify(first.sign(&claims).expose()).await.unwrap(),
            claims
        );
        assert_eq!(*fetches.lock().unwrap(), 1, "a known kid needs no fetch");

        // The vault rotates its key: the new kid is unknown until refetched.
        let second = SigningKey::generate().unwrap();
        published.lock().unwrap().keys.push(second.public_jwk());
        assert_eq!(
            verifier
                .verify(second.sign(&claims).expose())
                .await
                .unwrap(),
            claims
        );
        assert_eq!(*fetches.lock().unwrap(), 2);

        let stranger = SigningKey::generate().unwrap();
        let refused = verifier.verify(stranger.sign(&claims).expose()).await;
        assert!(matches!(
            refused,
            Err(VerifyError::Token(TokenError::UnknownKid(_)))
        ));
    }

    #[tokio::test]
    async fn a_retired_key_goes_at_the_reload_and_the_tokens_it_verified_with_it() {
        let old = SigningKey::generate().unwrap();
        let new = SigningKey::generate().unwrap();
        let published = Arc::new(Mutex::new(Jwks {
            keys: vec![old.public_jwk(), new.public_jwk()],
        }));
        let url = jwks_server(published.clone(), Arc::new(Mutex::new(0))).await;
        let auth = Authenticator::new(url.trim_end_matches("/jwks"), None);
        let bearer = |key: &SigningKey| format!("Bearer {}", key.sign(&claims(60)).expose());
        let (by_old, by_new) = (bearer(&old), bearer(&new));

        // Verified once, then served from the cache; a reload that changes nothing keeps it.
        assert!(auth.authenticate(Some(by_old.as_bytes())).await.is_ok());
        auth.reload_keys().await.unwrap();
        assert!(auth.authenticate(Some(by_old.as_bytes())).await.is_ok());

        // The vault retires the old key (it leaked): the cached token goes with it.
        published.lock().unwrap().keys.remove(0);
        auth.reload_keys().await.unwrap();
        let refused = auth.authenticate(Some(by_old.as_bytes())).await;
        assert!(
            matches!(refused, Err(AuthError::Invalid(TokenError::UnknownKid(_)))),
            "{refused:?}"
        );
        assert!(auth.authenticate(Some(by_new.as_bytes())).await.is_ok());

        // Keys refetched another way (a token with an unknown kid triggers it), the cache
        // left as it was: a token whose key is gone is refused all the same.
        let newest = SigningKey::generate().unwrap();
        *published.lock().unwrap() = Jwks {
            keys: vec![newest.public_jwk()],
        };
        auth.verifier.refresh().await.unwrap();
        let refused = auth.authenticate(Some(by_new.as_bytes())).await;
        assert!(
            matches!(refused, Err(AuthError::Invalid(TokenError::UnknownKid(_)))),
            "{refused:?}"
        );
    }

    #[tokio::test]
    async fn refetches_are_rate_limited_and_a_missing_vault_is_reported() {
        let key = SigningKey::generate().unwrap();
        let fetches = Arc::new(Mutex::new(0));
        let url = jwks_server(Arc::new(Mutex::new(Jwks::default())), fetches.clone()).await;
        let verifier = JwksVerifier::new(
            url,
            HttpClient::new(Duration::from_secs(2)),
            Duration::from_secs(60),
        );
        for _ in 0..5 {
            let refused = verifier.verify(key.sign(&claims(60)).expose()).await;
            assert!(matches!(
                refused,
                Err(VerifyError::Token(TokenError::UnknownKid(_)))
            ));
        }
        assert_eq!(
            *fetches.lock().unwrap(),
            1,
            "unknown kids must not hammer the vault"
        );

        let port = testkit::free_port().unwrap();
        let nowhere = JwksVerifier::new(
            format!("http://127.0.0.1:{port}/jwks"),
            HttpClient::new(Duration::from_secs(2)),
            Duration::ZERO,
        );
        let refused = nowhere.verify(key.sign(&claims(60)).expose()).await;
        assert!(
            matches!(refused, Err(VerifyError::KeysUnavailable(_))),
            "{refused:?}"
        );
    }
}

#[test]
fn bearer_tokens_are_taken_from_well_formed_headers_only() {
    assert_eq!(bearer(Some(b"Bearer abc.def.ghi")), Ok("abc.def.ghi"));
    assert_eq!(bearer(Some(b"bearer  abc")), Ok("abc"));
    assert_eq!(bearer(None), Err(AuthError::Missing));
    for bad in [
        &b"Basic abc"[..],
        b"Bearer",
        b"Bearer ",
        b"Bearer two words",
        b"\xff\xfe",
    ] {
        assert_eq!(bearer(Some(bad)), Err(AuthError::Malformed), "{bad:?}");
    }
}
