//! Broker URLs, read the way pika's `URLParameters` reads them.
//!
//! fedora-messaging users write pika-style URLs: `amqps://fedora:@host/%2Fpublic_pubsub`
//! (user `fedora`, empty password, vhost `/public_pubsub`), or the default
//! `amqp://?connection_attempts=3&retry_delay=5` (guest on localhost, vhost `/`). lapin's own
//! parser loses IP-address hosts and does not know pika's query parameters, so fm parses URLs
//! itself and hands lapin a ready `AMQPUri`. Every query parameter is either honoured or
//! refused with an error that names it; none is silently ignored:
//!
//! | parameter | meaning in fm |
//! |---|---|
//! | `heartbeat` (`heartbeat_interval`) | seconds, 1–65535; the broker's value wins when lower. `0` (pika: no heartbeats) is refused: lapin cannot switch heartbeats off |
//! | `connection_timeout`, `stack_timeout` | the whole attempt (TCP, TLS, AMQP handshake), seconds (0.001 to 86400); overrides the top-level `connection_timeout` |
//! | `socket_timeout` | the name lookup and TCP connect only, seconds (0.001 to 86400) |
//! | `connection_attempts` | attempts on this URL per round (default 1) |
//! | `retry_delay` | seconds between two attempts on this URL, 0 to 86400 (default 2) |
//! | `channel_max`, `frame_max` | proposed to the broker (1–65535; 4096–131072 bytes) |
//! | `auth_mechanism` | `plain`, `amqplain` or `external` (default: EXTERNAL when `[tls]` has a client certificate, else PLAIN) |
//! | `locale`, `blocked_connection_timeout` | accepted, no effect (fm logs a blocked connection instead, `connect.rs`) |
//! | `ssl_options`, `client_properties`, `tcp_options`, others | refused, naming the `[tls]` / `[client_properties]` table to use instead |
//!
//! Passwords never reach a log or an error: [`redact`], the one redactor, replaces them with
//! `***` even in a URL that does not parse, [`BrokerUrl`]'s `Debug` shows only the redacted
//! URL, and a URL whose user information cannot be told apart from its host or vhost (an `@`
//! after the host part) is refused before any part of it is shown.

use std::time::Duration;

use anyhow::{Context, bail};
use lapin::uri::{
    AMQPAuthority, AMQPQueryString, AMQPScheme, AMQPUri, AMQPUserInfo, SASLMechanism,
};

use crate::limits;

/// The frame size fm proposes when the URL does not set `frame_max` (pika's default, and
/// RabbitMQ's largest by default).
///
/// Not smaller, although lapin's frame buffers grow with it (fm's fork of lapin keeps them at
/// 4 frames: vendor/lapin/FORK.md): the broker passes a message's header frame on as its
/// publisher sent it, so a consumer whose frames are smaller than a publisher's must refuse a
/// message with large headers, and loses its connection on it again and again.
pub const DEFAULT_FRAME_MAX: u32 = 131_072;

/// One broker URL, parsed.
#[derive(Clone, PartialEq)]
pub struct BrokerUrl {
    /// What lapin connects with (holds the password: never log it).
    pub uri: AMQPUri,
    /// The URL with its password replaced by `***`, for logs and errors.
    pub redacted: String,
    /// `connection_timeout` / `stack_timeout` from the query: the whole attempt, overriding
    /// the config's `connection_timeout`.
    pub connection_timeout: Option<Duration>,
    /// `socket_timeout` from the query: name lookup and TCP connect only.
    pub socket_timeout: Option<Duration>,
    /// pika's `connection_attempts`: how many times to try this URL per round (default 1).
    pub connection_attempts: u32,
    /// pika's `retry_delay`: the pause between two attempts (default 2 s).
    pub retry_delay: Duration,
}

impl std::fmt::Debug for BrokerUrl {
    /// The redacted URL only: `uri` holds the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("BrokerUrl").field(&self.redacted).finish()
    }
}

impl BrokerUrl {
    /// Whether this URL uses TLS.
    pub fn is_tls(&self) -> bool {
        self.uri.scheme == AMQPScheme::AMQPS
    }

    /// `host:port`, for status lines.
    pub fn host_port(&self) -> String {
        format!("{}:{}", self.uri.authority.host, self.uri.authority.port)
    }
}

/// The URL with its password replaced by `***`: the one redactor, for every error and log line
/// that shows a URL (valid or not).
///
/// It works on the text, so that a URL that does not parse still hides its password:
///
/// - a well-formed `scheme://user:password@host…` — the last `@` of the whole text ends the
///   authority, which ends at the first `/`, `?` or `#` after `://` — keeps the user name and
///   hides the password (an empty password, Fedora's `fedora:@`, hides nothing);
/// - in any other text with an `@` (a password with a raw `/`, `?`, `#` or `@` after the host
///   part, a missing or misspelt `://`, a `@` in the path), everything from the scheme's `:` (or
///   the start, when there is no scheme) up to the last `@` is hidden: `amqp:***@host/`;
/// - text without an `@` has no password and is shown as it is.
pub fn redact(url: &str) -> String {
    match shape(url) {
        Shape::NoPassword => url.to_owned(),
        Shape::UserInfo { start, at } => match url[start..at].split_once(':') {
            // The user name ends at the first ':'.
            Some((user, password)) if !password.is_empty() => {
                format!("{}{user}:***{}", &url[..start], &url[at..])
            }
            _ => url.to_owned(),
        },
        Shape::Malformed { keep, at } => format!("{}***{}", &url[..keep], &url[at..]),
    }
}

/// Where the password may be in a URL's text (see [`redact`]).
#[derive(Debug, PartialEq, Eq)]
enum Shape {
    /// No '@': no password.
    NoPassword,
    /// `scheme://USERINFO@host…`: `url[start..at]` is the user information.
    UserInfo { start: usize, at: usize },
    /// An '@' anywhere else: `url[keep..at]` may hold a password.
    Malformed { keep: usize, at: usize },
}

fn shape(url: &str) -> Shape {
    let Some(at) = url.rfind('@') else {
        return Shape::NoPassword;
    };
    let scheme_end = scheme_end(url);
    if let Some(colon) = scheme_end
        && url[colon..].starts_with("://")
    {
        let start = colon + 3;
        let authority_end = url[start..]
            .find(['/', '?', '#'])
            .map_or(url.len(), |i| start + i);
        if at < authority_end {
            return Shape::UserInfo { start, at };
        }
    }
    // Keep the scheme, its ':' and the '/'s after it (never an '@': a scheme has none).
    let keep = scheme_end.map_or(0, |colon| {
        let after = &url[colon + 1..];
        colon + 1 + (after.len() - after.trim_start_matches('/').len())
    });
    Shape::Malformed {
        keep: keep.min(at),
        at,
    }
}

/// The index of the ':' that ends the URL's scheme: a letter, then letters, digits, '+', '-'
/// or '.' (RFC 3986).
fn scheme_end(url: &str) -> Option<usize> {
    url.find(':').filter(|&colon| {
        let scheme = &url[..colon];
        scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    })
}

/// Parse a pika-style AMQP URL.
pub fn parse(raw: &str) -> anyhow::Result<BrokerUrl> {
    let redacted = redact(raw);
    // An '@' after the host part means a user name or password with a raw '/', '?', '#' or '@'
    // (or an '@' in the vhost): where the user information ends is a guess, and a wrong guess
    // would put the password in the host, the vhost or a query value, and from there into an
    // error message. Refuse it before anything is parsed.
    if !scheme_end(raw).is_some_and(|colon| raw[colon..].starts_with("://")) {
        bail!("invalid broker URL {redacted}: it must start with amqp:// or amqps://");
    }
    if let Shape::Malformed { .. } = shape(raw) {
        bail!(
            "invalid broker URL {redacted}: it has an '@' after the host part; percent-encode \
             special characters of the user name, password and vhost: %2F for /, %40 for @, \
             %3A for :, %3F for ?, %23 for #"
        );
    }
    let parsed = url::Url::parse(raw).with_context(|| {
        format!(
            "invalid broker URL {redacted} (percent-encode special characters of the user \
             name, password and vhost: %2F for /, %40 for @, %3A for :)"
        )
    })?;
    let scheme = match parsed.scheme() {
        "amqp" => AMQPScheme::AMQP,
        "amqps" => AMQPScheme::AMQPS,
        other => {
            bail!("invalid broker URL {redacted}: the scheme must be amqp or amqps, not {other:?}")
        }
    };
    let decode = |s: &str| -> anyhow::Result<String> {
        Ok(percent_encoding::percent_decode_str(s)
            .decode_utf8()
            .with_context(|| format!("invalid broker URL {redacted}: bad percent-encoding"))?
            .into_owned())
    };
    let (username, password) = if parsed.username().is_empty() && parsed.password().is_none() {
        ("guest".to_owned(), "guest".to_owned())
    } else {
        (
            decode(parsed.username())?,
            decode(parsed.password().unwrap_or(""))?,
        )
    };
    let host = match parsed.host_str() {
        None | Some("") => "localhost".to_owned(),
        Some(h) => h.trim_start_matches('[').trim_end_matches(']').to_owned(),
    };
    let port = parsed.port().unwrap_or(match scheme {
        AMQPScheme::AMQP => 5672,
        AMQPScheme::AMQPS => 5671,
    });
    // pika: an empty path or "/" is the default vhost "/"; otherwise the rest, unquoted. A
    // raw "/" inside the vhost is ambiguous (pika keeps only the first segment): refuse it.
    let vhost = match parsed.path() {
        "" | "/" => "/".to_owned(),
        path if path[1..].contains('/') => bail!(
            "invalid broker URL {redacted}: the vhost {:?} holds a raw \"/\"; write it \
             percent-encoded (%2F), as in amqps://host/%2Fpublic_pubsub for the vhost \
             \"/public_pubsub\"",
            &path[1..]
        ),
        path => decode(&path[1..])?,
    };

    let mut query = AMQPQueryString::default();
    let mut connection_timeout = None;
    let mut socket_timeout = None;
    let mut connection_attempts = 1;
    let mut retry_delay = Duration::from_secs(2);
    for (key, value) in parsed.query_pairs() {
        let bad = |what: &str| {
            anyhow::anyhow!("invalid broker URL {redacted}: query parameter {key}={value:?} {what}")
        };
        match key.as_ref() {
            "heartbeat" | "heartbeat_interval" => {
                let secs: u16 = value
                    .parse()
                    .map_err(|_| bad("must be whole seconds, 1 to 65535"))?;
                if secs == 0 {
                    return Err(bad(
                        "would switch heartbeats off, which fm does not do (a dead broker \
                         would go unnoticed); give a number of seconds, or leave it out to \
                         use the broker's",
                    ));
                }
                query.heartbeat = Some(secs);
            }
            "connection_timeout" | "stack_timeout" => {
                connection_timeout = Some(
                    limits::parse_seconds(&value, false)
                        .map_err(|r| bad(&format!("must be {r}")))?,
                );
            }
            "socket_timeout" => {
                socket_timeout = Some(
                    limits::parse_seconds(&value, false)
                        .map_err(|r| bad(&format!("must be {r}")))?,
                );
            }
            "connection_attempts" => {
                connection_attempts = value
                    .parse()
                    .ok()
                    .filter(|n| *n >= 1)
                    .ok_or_else(|| bad("must be a whole number of at least 1"))?;
            }
            "retry_delay" => {
                retry_delay = limits::parse_seconds(&value, true)
                    .map_err(|r| bad(&format!("must be {r}")))?;
            }
            "channel_max" => {
                query.channel_max = Some(
                    value
                        .parse()
                        .ok()
                        .filter(|n| *n >= 1)
                        .ok_or_else(|| bad("must be a whole number from 1 to 65535"))?,
                );
            }
            "frame_max" => {
                query.frame_max = Some(
                    value
                        .parse()
                        .ok()
                        .filter(|n| (4096..=131_072).contains(n))
                        .ok_or_else(|| bad("must be a number of bytes from 4096 to 131072"))?,
                );
            }
            "auth_mechanism" => {
                query.auth_mechanism = Some(match value.to_ascii_lowercase().as_str() {
                    "external" => SASLMechanism::External,
                    "plain" => SASLMechanism::Plain,
                    "amqplain" => SASLMechanism::AMQPlain,
                    _ => return Err(bad("must be external, plain or amqplain")),
                });
            }
            // Accepted and without effect here: the locale is always en_US on RabbitMQ, and
            // fm never blocks on a blocked connection (it only stops receiving).
            "locale" | "blocked_connection_timeout" => {}
            "ssl_options" => {
                return Err(bad(
                    "is not supported: set ca_cert, certfile and keyfile in the [tls] table \
                     instead",
                ));
            }
            "client_properties" => {
                return Err(bad(
                    "is not supported: set them in the [client_properties] table instead",
                ));
            }
            _ => {
                return Err(bad(
                    "is not supported (fm understands heartbeat, connection_timeout, \
                     stack_timeout, socket_timeout, connection_attempts, retry_delay, \
                     channel_max, frame_max, auth_mechanism, locale and \
                     blocked_connection_timeout)",
                ));
            }
        }
    }
    // Proposing nothing ends at the same size (the broker's), but lapin then grows its two
    // frame buffers to it after the handshake, writing zeros that stay resident; proposed up
    // front, the buffers are allocated at that size and only the pages in use are touched.
    query.frame_max.get_or_insert(DEFAULT_FRAME_MAX);
    Ok(BrokerUrl {
        uri: AMQPUri {
            scheme,
            authority: AMQPAuthority {
                userinfo: AMQPUserInfo { username, password },
                host,
                port,
            },
            vhost,
            query,
        },
        redacted,
        connection_timeout,
        socket_timeout,
        connection_attempts,
        retry_delay,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fedora_production_url_has_an_empty_password_and_a_slashed_vhost() {
        let u = parse("amqps://fedora:@rabbitmq.fedoraproject.org/%2Fpublic_pubsub").unwrap();
        assert!(u.is_tls());
        assert_eq!(u.uri.authority.userinfo.username, "fedora");
        assert_eq!(u.uri.authority.userinfo.password, "");
        assert_eq!(u.uri.authority.host, "rabbitmq.fedoraproject.org");
        assert_eq!(u.uri.authority.port, 5671);
        assert_eq!(u.uri.vhost, "/public_pubsub");
    }

    #[test]
    fn fedora_messaging_default_url_is_guest_on_localhost() {
        let u = parse("amqp://?connection_attempts=3&retry_delay=5").unwrap();
        assert_eq!(u.uri.authority.host, "localhost");
        assert_eq!(u.uri.authority.port, 5672);
        assert_eq!(u.uri.authority.userinfo.username, "guest");
        assert_eq!(u.uri.vhost, "/");
        assert_eq!(u.connection_attempts, 3);
        assert_eq!(u.retry_delay, Duration::from_secs(5));
    }

    #[test]
    fn ip_hosts_ports_and_options_are_kept() {
        let u = parse("amqp://u:p%40ss@127.0.0.1:5673/vh?heartbeat=7&connection_timeout=2.5&auth_mechanism=EXTERNAL").unwrap();
        assert_eq!(u.uri.authority.host, "127.0.0.1");
        assert_eq!(u.uri.authority.port, 5673);
        assert_eq!(u.uri.authority.userinfo.password, "p@ss");
        assert_eq!(u.uri.vhost, "vh");
        assert_eq!(u.uri.query.heartbeat, Some(7));
        assert_eq!(u.uri.query.auth_mechanism, Some(SASLMechanism::External));
        assert_eq!(u.connection_timeout, Some(Duration::from_millis(2500)));
        let v6 = parse("amqp://[::1]:5672/").unwrap();
        assert_eq!(v6.uri.authority.host, "::1");
    }

    #[test]
    fn unknown_or_bad_parameters_are_refused_by_name_without_the_password() {
        let err = parse("amqp://u:secret@h/?frobnicate=1")
            .unwrap_err()
            .to_string();
        assert!(err.contains("frobnicate"), "{err}");
        assert!(!err.contains("secret"), "{err}");
        let err = parse("amqp://h/?heartbeat=soon").unwrap_err().to_string();
        assert!(err.contains("heartbeat"), "{err}");
        let err = parse("amqp://h/?ssl_options=x").unwrap_err().to_string();
        assert!(err.contains("[tls]"), "{err}");
        let err = parse("http://h/").unwrap_err().to_string();
        assert!(err.contains("scheme"), "{err}");
    }

    #[test]
    fn redaction_hides_only_the_password_of_a_well_formed_url() {
        for (raw, shown) in [
            ("amqp://user:s3cr3t@host/%2F", "amqp://user:***@host/%2F"),
            ("amqps://u:s3cr3t@h:5671/%2F", "amqps://u:***@h:5671/%2F"),
            // '@' and ':' are allowed in the password: the user information ends at the last
            // '@' of the authority, the user name at its first ':'.
            ("amqp://u:s3@cr3t@h/v?x=1", "amqp://u:***@h/v?x=1"),
            ("amqp://u:s3:cr:3t@[bad", "amqp://u:***@[bad"),
            ("amqp://u:s3cr3t%2F%40@h/", "amqp://u:***@h/"),
            ("http://user:s3cr3t@host/", "http://user:***@host/"),
            // Nothing to hide.
            ("amqp://host/", "amqp://host/"),
            ("amqp://u@h/", "amqp://u@h/"),
            (
                "amqp://?connection_attempts=3",
                "amqp://?connection_attempts=3",
            ),
            ("not a url", "not a url"),
            (
                "amqps://fedora:@rabbitmq.fedoraproject.org/%2Fpublic_pubsub",
                "amqps://fedora:@rabbitmq.fedoraproject.org/%2Fpublic_pubsub",
            ),
        ] {
            assert_eq!(redact(raw), shown, "{raw}");
        }
    }

    /// Every malformed shape seen leaking a password (issue 17), and passwords with every
    /// special character, raw: the redacted form of each.
    const MALFORMED: &[(&str, &str)] = &[
        ("amqp:user:s3cr3t@host/%2F", "amqp:***@host/%2F"),
        ("amqp:/user:s3cr3t@host/", "amqp:/***@host/"),
        ("amqp//user:s3cr3t@host/", "***@host/"),
        ("AMQP:user:s3cr3t@host/", "AMQP:***@host/"),
        ("amqp:///user:s3cr3t@host/", "amqp:///***@host/"),
        ("amqpx://user:pa/ss@host/", "amqpx://***@host/"),
        ("amqp://user:p@ss/w@host/", "amqp://***@host/"),
        ("amqp://u:s3cr3t/x@host/vh", "amqp://***@host/vh"),
        ("amqp://u:s3cr3t?x@host/", "amqp://***@host/"),
        ("amqp://u:s3c#r3t@host:5672/%2F", "amqp://***@host:5672/%2F"),
        ("amqp://u:s3cr3t@h/x@y", "amqp://***@y"),
        ("user:s3cr3t@host", "user:***@host"),
        ("//user:s3cr3t@host", "***@host"),
        (" amqp://u:s3cr3t@h/", "***@h/"),
    ];

    #[test]
    fn redaction_hides_everything_up_to_the_last_at_of_a_malformed_url() {
        for (raw, shown) in MALFORMED {
            let redacted = redact(raw);
            assert_eq!(redacted, *shown, "{raw}");
            assert!(
                !redacted.contains("s3c") && !redacted.contains("pa/ss"),
                "{raw}"
            );
        }
    }

    #[test]
    fn parse_errors_never_show_the_password() {
        let well_formed = [
            "amqp://u:s3cr3t@host:notaport/",
            "amqp://u:s3cr3t@host/?heartbeat=x",
            "amqp://u:s3cr3t@host/?socket_timeout=1e19",
            "amqp://u:s3cr3t@host/a/b",
            "amqp://u:s3cr3t@[::1/",
            "amqp://u:s3cr3t%ff@host/",
            "ftp://u:s3cr3t@host/",
        ];
        let malformed = MALFORMED.iter().map(|(raw, _)| *raw);
        for raw in well_formed.into_iter().chain(malformed) {
            let err = format!("{:#}", parse(raw).unwrap_err());
            assert!(
                !err.contains("s3c") && !err.contains("pa/ss") && !err.contains("p@ss"),
                "{raw}: {err}"
            );
            assert!(err.contains("***"), "{raw}: {err}");
        }
        let err = format!("{:#}", parse("amqp://u:pa/ss@host/vh").unwrap_err());
        assert_eq!(
            err,
            "invalid broker URL amqp://***@host/vh: it has an '@' after the host part; \
             percent-encode special characters of the user name, password and vhost: %2F for /, \
             %40 for @, %3A for :, %3F for ?, %23 for #"
        );
        let err = format!("{:#}", parse("amqp:user:s3cr3t@host/%2F").unwrap_err());
        assert_eq!(
            err,
            "invalid broker URL amqp:***@host/%2F: it must start with amqp:// or amqps://"
        );
    }

    #[test]
    fn debug_output_shows_only_the_redacted_url() {
        let u = parse("amqp://user:s3cret@host/").unwrap();
        let debug = format!("{u:?}");
        assert_eq!(debug, "BrokerUrl(\"amqp://user:***@host/\")");
    }

    #[test]
    fn frame_max_is_proposed_as_pika_does_unless_the_url_says() {
        // Proposed up front so that lapin never grows (and dirties) its frame buffers.
        assert_eq!(
            parse("amqp://h/").unwrap().uri.query.frame_max,
            Some(DEFAULT_FRAME_MAX)
        );
        assert_eq!(
            parse("amqp://h/?frame_max=8192")
                .unwrap()
                .uri
                .query
                .frame_max,
            Some(8192)
        );
    }

    #[test]
    fn heartbeat_is_seconds_and_cannot_be_switched_off() {
        assert_eq!(
            parse("amqp://h/?heartbeat=30").unwrap().uri.query.heartbeat,
            Some(30)
        );
        assert_eq!(
            parse("amqp://h/?heartbeat_interval=5")
                .unwrap()
                .uri
                .query
                .heartbeat,
            Some(5)
        );
        let err = parse("amqp://h/?heartbeat=0").unwrap_err().to_string();
        assert!(
            err.contains("heartbeat=\"0\"") && err.contains("switch heartbeats off"),
            "{err}"
        );
        let err = parse("amqp://h/?heartbeat=70000").unwrap_err().to_string();
        assert!(err.contains("1 to 65535"), "{err}");
    }

    #[test]
    fn timeouts_attempts_and_delays() {
        let u = parse("amqp://h/?stack_timeout=4&socket_timeout=0.5").unwrap();
        assert_eq!(u.connection_timeout, Some(Duration::from_secs(4)));
        assert_eq!(u.socket_timeout, Some(Duration::from_millis(500)));
        let u = parse("amqp://h/").unwrap();
        assert_eq!(
            (
                u.connection_timeout,
                u.socket_timeout,
                u.connection_attempts,
                u.retry_delay
            ),
            (None, None, 1, Duration::from_secs(2))
        );
        assert_eq!(
            parse("amqp://h/?retry_delay=0").unwrap().retry_delay,
            Duration::ZERO
        );
        for (query, expected) in [
            ("connection_timeout=0", "from 0.001 to 86400 (1 day)"),
            ("socket_timeout=-1", "from 0.001 to 86400 (1 day)"),
            ("connection_timeout=inf", "from 0.001 to 86400 (1 day)"),
            ("connection_timeout=1e19", "from 0.001 to 86400 (1 day)"),
            ("stack_timeout=nan", "from 0.001 to 86400 (1 day)"),
            ("socket_timeout=1e19", "from 0.001 to 86400 (1 day)"),
            ("socket_timeout=soon", "from 0.001 to 86400 (1 day)"),
            ("connection_attempts=0", "at least 1"),
            ("retry_delay=-1", "from 0 to 86400 (1 day)"),
            ("retry_delay=1e300", "from 0 to 86400 (1 day)"),
            ("retry_delay=1e19", "from 0 to 86400 (1 day)"),
            ("retry_delay=86401", "from 0 to 86400 (1 day)"),
            ("channel_max=0", "1 to 65535"),
            ("frame_max=100", "4096 to 131072"),
            ("auth_mechanism=gssapi", "external, plain or amqplain"),
            ("client_properties=x", "[client_properties]"),
        ] {
            let err = parse(&format!("amqp://h/?{query}"))
                .unwrap_err()
                .to_string();
            let key = query.split('=').next().unwrap();
            assert!(
                err.contains(key) && err.contains(expected),
                "{query}: {err}"
            );
        }
        // Accepted without effect.
        parse("amqp://h/?locale=en_US&blocked_connection_timeout=30").unwrap();
    }

    #[test]
    fn a_raw_slash_in_the_vhost_is_refused_with_the_encoded_form() {
        let err = parse("amqps://h/public/pubsub").unwrap_err().to_string();
        assert!(err.contains("%2F"), "{err}");
        assert_eq!(parse("amqp://h/%2F").unwrap().uri.vhost, "/");
        assert_eq!(parse("amqp://h").unwrap().uri.vhost, "/");
        assert_eq!(parse("amqp://h/%2Fa%2Fb").unwrap().uri.vhost, "/a/b");
    }

    #[test]
    fn user_names_and_passwords_are_percent_decoded() {
        let u = parse("amqp://us%3Aer:p%2Fw%40@h/").unwrap();
        assert_eq!(u.uri.authority.userinfo.username, "us:er");
        assert_eq!(u.uri.authority.userinfo.password, "p/w@");
        // A user without a password has an empty one (pika).
        let u = parse("amqp://fm@h/").unwrap();
        assert_eq!(
            (
                u.uri.authority.userinfo.username.as_str(),
                u.uri.authority.userinfo.password.as_str()
            ),
            ("fm", "")
        );
        assert!(!parse("amqp://h/").unwrap().is_tls());
        assert_eq!(parse("AMQPS://h/").unwrap().host_port(), "h:5671");
    }
}
