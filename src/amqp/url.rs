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
//! | `locale`, `blocked_connection_timeout` | accepted, no effect |
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

/// The frame size fm proposes when the URL does not set `frame_max` (pika's default).
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

/// Replace the password of an AMQP URL with `***` (the user name is kept).
///
/// Works on the text, the way Python's `urlsplit` finds the parts (the authority ends at the
/// first `/`, `?` or `#`; the user information ends at its last `@`), so that a URL that does
/// not parse still hides its password. When a `@` appears only after the authority — a
/// password with an unencoded `/`, `?` or `#` — everything up to that `@` is hidden.
pub fn redact(url: &str) -> String {
    let Some(start) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[start..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    if let Some(at) = authority.rfind('@') {
        let userinfo = &authority[..at];
        return match userinfo.split_once(':') {
            // An empty password (Fedora's `fedora:@`) hides nothing.
            Some((_, "")) | None => url.to_owned(),
            Some((user, _)) => format!("{}{user}:***{}", &url[..start], &rest[at..]),
        };
    }
    match rest.rfind('@') {
        Some(at) => format!("{}***{}", &url[..start], &rest[at..]),
        None => url.to_owned(),
    }
}

/// Parse a pika-style AMQP URL.
pub fn parse(raw: &str) -> anyhow::Result<BrokerUrl> {
    let redacted = redact(raw);
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
    // pika proposes 131072 bytes, and so does fm. Proposing nothing ends at the same size (the
    // broker's), but lapin then grows its two frame buffers to it after the handshake, writing
    // 8 MB of zeros that stay resident; proposed up front, the buffers are allocated at that
    // size and only the pages in use are touched (idle RSS 16 → 8 MB, see BENCHMARKS.md).
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
    fn redaction_hides_only_the_password() {
        assert_eq!(
            redact("amqp://user:secret@host/%2F"),
            "amqp://user:***@host/%2F"
        );
        assert_eq!(redact("amqp://host/"), "amqp://host/");
        assert_eq!(redact("amqp://u:s@cr:et@[bad"), "amqp://u:***@[bad");
        // Fedora's empty password has nothing to hide.
        assert_eq!(
            redact("amqps://fedora:@rabbitmq.fedoraproject.org/%2Fpublic_pubsub"),
            "amqps://fedora:@rabbitmq.fedoraproject.org/%2Fpublic_pubsub"
        );
        assert_eq!(
            redact("amqp://?connection_attempts=3"),
            "amqp://?connection_attempts=3"
        );
        assert_eq!(redact("not a url"), "not a url");
    }

    #[test]
    fn redaction_hides_passwords_with_unencoded_special_characters() {
        // A raw '/', '?' or '#' ends the authority early: the '@' comes later.
        for (raw, shown) in [
            ("amqp://u:pa/ss@host/vh", "amqp://***@host/vh"),
            ("amqp://u:1234?x@host/", "amqp://***@host/"),
            ("amqp://u:p#w@host:5672/%2F", "amqp://***@host:5672/%2F"),
        ] {
            assert_eq!(redact(raw), shown);
        }
    }

    #[test]
    fn parse_errors_never_show_the_password() {
        for raw in [
            "amqp://u:pa/ss@host/vh",
            "amqp://u:s3cret@host:notaport/",
            "amqp://u:s3cret@host/?heartbeat=x",
            "amqp://u:s3cret@host/a/b",
            "ftp://u:s3cret@host/",
        ] {
            let err = format!("{:#}", parse(raw).unwrap_err());
            assert!(!err.contains("s3cret") && !err.contains("pa/ss"), "{err}");
            assert!(err.contains("***"), "{err}");
        }
        let err = format!("{:#}", parse("amqp://u:pa/ss@host/vh").unwrap_err());
        assert!(
            err.contains("percent-encode") && err.contains("%2F for /"),
            "{err}"
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
