//! Credentials inside NATS URLs. The nats CLI and most clients take `user:password@`
//! or `token@` from a URL; async-nats 0.51 parses but ignores them, so every turnstile
//! program takes them out here and passes them explicitly.

use crate::{Error, Result};

/// Credentials carried inside a NATS URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UrlAuth {
    /// `nats://user:password@host`.
    UserPassword(String, String),
    /// `nats://token@host`.
    Token(String),
}

impl UrlAuth {
    /// `options` with these credentials.
    pub fn apply(self, options: async_nats::ConnectOptions) -> async_nats::ConnectOptions {
        match self {
            UrlAuth::UserPassword(user, password) => options.user_and_password(user, password),
            UrlAuth::Token(token) => options.token(token),
        }
    }
}

/// Takes `user:password@` (or `token@`) out of each URL of a comma-separated list: the
/// URLs without them, and the credentials (percent-escapes decoded; the same in every
/// URL that carries some).
pub fn split_credentials(urls: &str) -> Result<(String, Option<UrlAuth>)> {
    let mut auth: Option<UrlAuth> = None;
    let mut out = Vec::new();
    for url in urls.split(',').map(str::trim).filter(|u| !u.is_empty()) {
        let start = url.find("://").map_or(0, |i| i + 3);
        let end = url[start..]
            .find(['/', '?', '#'])
            .map_or(url.len(), |i| start + i);
        let Some(at) = url[start..end].rfind('@') else {
            out.push(url.to_string());
            continue;
        };
        let info = &url[start..start + at];
        let found = match info.split_once(':') {
            Some((user, password)) => {
                UrlAuth::UserPassword(percent_decode(user)?, percent_decode(password)?)
            }
            None => UrlAuth::Token(percent_decode(info)?),
        };
        if auth.as_ref().is_some_and(|a| *a != found) {
            return Err(Error::BadUrl(
                "the NATS URLs carry different credentials".into(),
            ));
        }
        auth = Some(found);
        out.push(format!("{}{}", &url[..start], &url[start + at + 1..]));
    }
    Ok((out.join(","), auth))
}

/// Decodes the `%XX` escapes of a URL's user or password.
fn percent_decode(s: &str) -> Result<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hex: Vec<u8> = bytes.by_ref().take(2).collect();
            let v = std::str::from_utf8(&hex)
                .ok()
                .filter(|_| hex.len() == 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| {
                    Error::BadUrl("a bad %-escape in the NATS URL's credentials".into())
                })?;
            out.push(v);
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out)
        .map_err(|_| Error::BadUrl("the NATS URL's credentials are not UTF-8".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_come_out_of_the_urls() {
        let (urls, auth) =
            split_credentials("nats://sched:p%40ss@a:4222, nats://sched:p%40ss@b:4222").unwrap();
        assert_eq!(urls, "nats://a:4222,nats://b:4222");
        assert_eq!(
            auth,
            Some(UrlAuth::UserPassword("sched".into(), "p@ss".into()))
        );
        let (urls, auth) = split_credentials("tok@127.0.0.1:4222").unwrap();
        assert_eq!(
            (urls.as_str(), auth),
            ("127.0.0.1:4222", Some(UrlAuth::Token("tok".into())))
        );
        assert_eq!(
            split_credentials("nats://h:1").unwrap(),
            ("nats://h:1".into(), None)
        );
        assert!(split_credentials("nats://a:b@h:1,nats://c:d@h:2").is_err());
        assert!(split_credentials("nats://a:%zz@h:1").is_err());
    }
}
