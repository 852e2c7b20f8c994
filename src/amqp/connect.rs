//! Connecting to a broker: URL list, TLS, authentication, client properties, timeouts.
//!
//! fm drives the TCP and TLS set-up itself and gives lapin the ready stream
//! (`Connection::connector`), so that every step is bounded by `connection_timeout`, the TLS
//! configuration is fm's own (rustls, TLS 1.2 minimum, hostname always verified), and a
//! failure says which step failed in words an operator can act on.
//!
//! With several URLs (`amqp_url = [..]`, as PDC's messaging did with its URL list) each round
//! tries them in a random order, so a fleet of consumers spreads over a cluster; the first
//! URL that completes the AMQP handshake wins.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow};
use lapin::tcp::{AsyncTcpStream, RustlsConnector};
use lapin::types::LongString;
use lapin::uri::SASLMechanism;
use lapin::{Connection, ConnectionProperties};
use serde_json::Value;

use super::url::{self, BrokerUrl};
use super::{errors, tls};
use crate::config::Config;
use crate::error::{Exit, ExitExt, code};

/// Knows how to reach the configured brokers.
pub struct Connector {
    urls: Vec<BrokerUrl>,
    timeout: Duration,
    properties: ConnectionProperties,
    /// Built at start when any URL is `amqps://`, so bad certificate files fail at once.
    tls: Option<Arc<RustlsConnector>>,
}

/// A live connection and the (redacted) URL it was made to.
pub struct Connected {
    /// The AMQP connection.
    pub connection: Connection,
    /// Which broker: the URL with its password hidden.
    pub url: String,
    /// The virtual host, for messages.
    pub vhost: String,
}

impl Connector {
    /// Check the configured URLs and TLS files and prepare the client properties. Errors here
    /// are configuration errors (exit 2).
    pub fn new(config: &Config) -> anyhow::Result<Connector> {
        let tls_settings = tls::Settings::from_config(&config.tls).exit_code(code::USAGE)?;
        let mut urls = Vec::with_capacity(config.amqp_urls.len());
        for raw in &config.amqp_urls {
            let mut parsed = url::parse(raw).exit_code(code::USAGE)?;
            // fedora-messaging authenticates with the client certificate (SASL EXTERNAL)
            // whenever both certfile and keyfile are set.
            if parsed.is_tls()
                && tls_settings.has_client_identity()
                && parsed.uri.query.auth_mechanism.is_none()
            {
                parsed.uri.query.auth_mechanism = Some(SASLMechanism::External);
            }
            urls.push(parsed);
        }
        let tls = if urls.iter().any(BrokerUrl::is_tls) {
            Some(Arc::new(
                tls_settings.connector().exit_code(code::USAGE)?,
            ))
        } else {
            None
        };
        Ok(Connector {
            urls,
            timeout: config.connection_timeout,
            properties: client_properties(config),
            tls,
        })
    }

    /// The brokers, redacted, for status lines.
    pub fn describe(&self) -> String {
        self.urls
            .iter()
            .map(|u| u.redacted.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// One round over the URLs in random order, each tried `connection_attempts` times;
    /// the first that completes the handshake wins. The error lists every failure
    /// and asks for exit code 14 (15 when the broker refused access).
    pub async fn connect(&self) -> anyhow::Result<Connected> {
        let mut order: Vec<&BrokerUrl> = self.urls.iter().collect();
        fastrand::shuffle(&mut order);
        let mut failures = Vec::new();
        let mut refused = false;
        for url in order {
            for attempt in 1..=url.connection_attempts {
                if attempt > 1 {
                    tokio::time::sleep(url.retry_delay).await;
                }
                match self.connect_one(url).await {
                    Ok(connection) => {
                        tracing::info!(broker = %url.redacted, "connected");
                        return Ok(Connected {
                            connection,
                            url: url.redacted.clone(),
                            vhost: url.uri.vhost.clone(),
                        });
                    }
                    Err(err) => {
                        refused |= errors::is_access_refused(&err);
                        tracing::warn!(broker = %url.redacted, attempt, "cannot connect: {err:#}");
                        failures.push(format!("{}: {err:#}", url.redacted));
                    }
                }
            }
        }
        let err = anyhow!(
            "cannot connect to the broker ({})",
            failures.join("; ")
        );
        Err(Exit::new(
            if refused { code::PERMISSION } else { code::CONNECTION },
            err,
        ))
    }

    async fn connect_one(&self, url: &BrokerUrl) -> anyhow::Result<Connection> {
        let timeout = url.connection_timeout.unwrap_or(self.timeout);
        let tls = if url.is_tls() {
            Some(self.tls.clone().context("TLS is not set up")?)
        } else {
            None
        };
        let host = url.uri.authority.host.clone();
        let port = url.uri.authority.port;
        let runtime = lapin::runtime::default_runtime()?;
        let connect = async move |_uri, rt| {
            let addrs: Vec<_> = tokio::net::lookup_host((host.as_str(), port))
                .await
                .map_err(|e| {
                    std::io::Error::new(e.kind(), format!("cannot resolve {host}: {e}"))
                })?
                .collect();
            let stream = AsyncTcpStream::connect(&rt, addrs).await?;
            match &tls {
                Some(connector) => stream.into_rustls(connector, &host).await.map_err(|e| {
                    lapin::Error::from(std::io::Error::other(tls::explain_handshake_error(&e)))
                }),
                None => Ok(stream),
            }
        };
        let fut = Connection::connector(url.uri.clone(), runtime, connect, self.properties.clone());
        match tokio::time::timeout(timeout, fut).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(err)) => Err(errors::describe(err)),
            Err(_) => Err(anyhow!(
                "no answer within {:.1} s (connection_timeout); is this an AMQP port{}?",
                timeout.as_secs_f64(),
                if url.is_tls() { " with TLS" } else { "" }
            )),
        }
    }
}

/// The client properties fm sends: the config's `client_properties` (app, product,
/// information, version and any extra keys), as fedora-messaging sends them.
fn client_properties(config: &Config) -> ConnectionProperties {
    let mut props = ConnectionProperties::default();
    for (key, value) in &config.client_properties {
        let text = match value {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        props = props.with_client_property(key.as_str().into(), LongString::from(text));
    }
    let name = config
        .client_properties
        .get("app")
        .and_then(Value::as_str)
        .unwrap_or("fm");
    props.with_connection_name(LongString::from(format!("fm: {name}")))
}
