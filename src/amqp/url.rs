//! Broker URLs, read the way pika's `URLParameters` reads them.
//!
//! fedora-messaging users write pika-style URLs: `amqps://fedora:@host/%2Fpublic_pubsub`
//! (user `fedora`, empty password, vhost `/public_pubsub`), or the default
//! `amqp://?connection_attempts=3&retry_delay=5` (guest on localhost, vhost `/`). lapin's own
//! parser loses IP-address hosts and does not know pika's query parameters, so fm parses URLs
//! itself and hands lapin a ready `AMQPUri`. Every query parameter is either honoured or
//! refused with an error that names it; none is silently ignored.

use std::time::Duration;

use anyhow::{Context, bail};
use lapin::uri::{
    AMQPAuthority, AMQPQueryString, AMQPScheme, AMQPUri, AMQPUserInfo, SASLMechanism,
};

/// One broker URL, parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct BrokerUrl {
    /// What lapin connects with.
    pub uri: AMQPUri,
    /// The URL with its password replaced by `***`, for logs and errors.
    pub redacted: String,
    /// `connection_timeout` / `socket_timeout` from the query (seconds), overriding the config.
    pub connection_timeout: Option<Duration>,
    /// pika's `connection_attempts`: how many times to try this URL per round (default 1).
    pub connection_attempts: u32,
    /// pika's `retry_delay`: the pause between two attempts (default 2 s).
    pub retry_delay: Duration,
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
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        Ok(_) => url.to_owned(),
        // Unparseable: hide everything between "://" and the last "@".
        Err(_) => match (url.find("://"), url.rfind('@')) {
            (Some(start), Some(at)) if at > start => {
                format!("{}***{}", &url[..start + 3], &url[at..])
            }
            _ => url.to_owned(),
        },
    }
}

/// Parse a pika-style AMQP URL.
pub fn parse(raw: &str) -> anyhow::Result<BrokerUrl> {
    let redacted = redact(raw);
    let parsed = url::Url::parse(raw).with_context(|| format!("invalid broker URL {redacted}"))?;
    let scheme = match parsed.scheme() {
        "amqp" => AMQPScheme::AMQP,
        "amqps" => AMQPScheme::AMQPS,
        other => bail!("invalid broker URL {redacted}: the scheme must be amqp or amqps, not {other:?}"),
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
    // pika: an empty path or "/" is the default vhost "/"; otherwise the rest, unquoted.
    let vhost = match parsed.path() {
        "" | "/" => "/".to_owned(),
        path => decode(&path[1..])?,
    };

    let mut query = AMQPQueryString::default();
    let mut connection_timeout = None;
    let mut connection_attempts = 1;
    let mut retry_delay = Duration::from_secs(2);
    for (key, value) in parsed.query_pairs() {
        let bad = |what: &str| {
            anyhow::anyhow!("invalid broker URL {redacted}: query parameter {key}={value:?} {what}")
        };
        match key.as_ref() {
            "heartbeat" | "heartbeat_interval" => {
                query.heartbeat = Some(value.parse().map_err(|_| bad("must be whole seconds"))?);
            }
            "connection_timeout" | "socket_timeout" => {
                let secs: f64 = value.parse().map_err(|_| bad("must be seconds"))?;
                if !(secs > 0.0 && secs.is_finite()) {
                    return Err(bad("must be more than 0 seconds"));
                }
                connection_timeout = Some(Duration::from_secs_f64(secs));
            }
            "connection_attempts" => {
                connection_attempts = value
                    .parse()
                    .ok()
                    .filter(|n| *n >= 1)
                    .ok_or_else(|| bad("must be a whole number of at least 1"))?;
            }
            "retry_delay" => {
                let secs: f64 = value.parse().map_err(|_| bad("must be seconds"))?;
                if !(secs >= 0.0 && secs.is_finite()) {
                    return Err(bad("must be 0 seconds or more"));
                }
                retry_delay = Duration::from_secs_f64(secs);
            }
            "channel_max" => {
                query.channel_max = Some(value.parse().map_err(|_| bad("must be a number"))?);
            }
            "frame_max" => {
                query.frame_max = Some(value.parse().map_err(|_| bad("must be a number"))?);
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
                    "is not supported: set ca_cert, certfile and keyfile in the [tls] table instead",
                ));
            }
            _ => {
                return Err(bad(
                    "is not supported (fm understands heartbeat, connection_timeout, \
                     socket_timeout, connection_attempts, retry_delay, channel_max, frame_max, \
                     auth_mechanism, locale, blocked_connection_timeout)",
                ));
            }
        }
    }
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
        let err = parse("amqp://u:secret@h/?frobnicate=1").unwrap_err().to_string();
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
        assert_eq!(redact("amqp://user:secret@host/%2F"), "amqp://user:***@host/%2F");
        assert_eq!(redact("amqp://host/"), "amqp://host/");
        assert_eq!(redact("amqp://u:s@cr:et@[bad"), "amqp://***@[bad");
    }
}
