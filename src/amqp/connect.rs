//! Connecting to a broker: URL list, TLS, authentication, client properties, timeouts.
//!
//! fm drives the name lookup, the TCP connect and the TLS handshake itself and gives lapin the
//! ready stream (`Connection::connector`), so that
//! - every step is bounded by the attempt's deadline (`connection_timeout`), and a timeout
//!   says which step hung;
//! - the TLS configuration is fm's own (rustls, TLS 1.2 minimum, hostname always verified,
//!   see `tls.rs`), shared by `consume`, `publish` and `record`;
//! - a failure says which step failed in words an operator can act on, and never shows a
//!   password.
//!
//! With several URLs (`amqp_url = [..]`, as PDC's messaging design lists several brokers) each
//! round tries them in a random order, so a fleet of consumers spreads over a cluster; the
//! first URL that completes the AMQP handshake wins. A reconnection after a loss is a new
//! round over the whole list (`consume.rs` calls [`Connector::connect`] again).

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::anyhow;
use futures_lite::{AsyncReadExt, StreamExt as _};
use lapin::tcp::{AsyncTcpStream, RustlsConnector};
use lapin::types::LongString;
use lapin::uri::SASLMechanism;
use lapin::{Connection, ConnectionProperties, ErrorKind, Event};
use serde_json::Value;
use tokio::time::Instant;

use super::url::{self, BrokerUrl};
use super::{errors, tls};
use crate::config::Config;
use crate::error::{Exit, code};
use crate::limits;

/// How long the diagnostic probe (see [`Connector::probe_tls_refusal`]) listens for the
/// broker's TLS alert.
const PROBE_LISTEN: Duration = Duration::from_secs(3);

/// Knows how to reach the configured brokers.
pub struct Connector {
    urls: Vec<BrokerUrl>,
    timeout: Duration,
    properties: ConnectionProperties,
    /// Read at start when any URL is `amqps://`, so bad certificate files fail at once.
    tls: Option<Arc<tls::Settings>>,
}

/// A live connection and the (redacted) URL it was made to.
pub struct Connected {
    /// The AMQP connection; shared, so that what outlives a borrow of it (the reply side of a
    /// consume session, `consume/reply.rs`) can open channels on it.
    pub connection: Arc<Connection>,
    /// Which broker: the URL with its password hidden.
    pub url: String,
    /// The virtual host, for messages.
    pub vhost: String,
}

/// Why one attempt failed.
struct Failure {
    /// The reason, in words (no password).
    text: String,
    /// The broker refused the login (403): exit 15 rather than 14.
    refused: bool,
}

impl Failure {
    fn new(text: impl Into<String>) -> Failure {
        Failure {
            text: text.into(),
            refused: false,
        }
    }
}

/// How far an attempt got, written by the transport closure that lapin runs on its own thread.
#[derive(Default)]
struct Progress {
    step: Step,
    /// fm's own explanation of a failure before lapin had a stream.
    failure: Option<String>,
    /// A second handle on the socket: shutting it down ends lapin's I/O thread when the
    /// AMQP handshake runs past the deadline (lapin has no handle to cancel it).
    socket: Option<std::net::TcpStream>,
}

#[derive(Default, Clone, Copy, PartialEq, Eq, Debug)]
enum Step {
    #[default]
    Resolving,
    Connecting,
    TlsHandshake,
    AmqpHandshake,
}

impl Step {
    fn doing(self) -> &'static str {
        match self {
            Step::Resolving => "looking up the host name",
            Step::Connecting => "connecting over TCP",
            Step::TlsHandshake => "in the TLS handshake",
            Step::AmqpHandshake => "in the AMQP handshake",
        }
    }
}

impl Connector {
    /// Check the configured URLs and TLS files and prepare the client properties. Errors here
    /// are configuration errors (exit 2) and name the configuration file.
    pub fn new(config: &Config) -> anyhow::Result<Connector> {
        Self::build(config).map_err(|err| {
            let err = match &config.path {
                Some(path) => err.context(format!("{}", path.display())),
                None => err,
            };
            Exit::new(code::USAGE, err)
        })
    }

    fn build(config: &Config) -> anyhow::Result<Connector> {
        let mut urls = config
            .amqp_urls
            .iter()
            .map(|raw| url::parse(raw))
            .collect::<anyhow::Result<Vec<_>>>()?;
        // [tls] is read only when a URL needs it, as fedora-messaging does: its sample
        // config.toml has a [tls] table with paths that do not exist, and amqp://.
        let tls = if urls.iter().any(BrokerUrl::is_tls) {
            Some(Arc::new(tls::Settings::from_config(&config.tls)?))
        } else {
            if config.tls != crate::config::Tls::default() {
                tracing::debug!("[tls] is not used: no amqps:// URL in amqp_url");
            }
            None
        };
        let has_client_cert = tls.as_ref().is_some_and(|t| t.has_client_identity());
        for url in &mut urls {
            match url.uri.query.auth_mechanism {
                // fedora-messaging authenticates with the client certificate (SASL EXTERNAL)
                // whenever both certfile and keyfile are set.
                None if url.is_tls() && has_client_cert => {
                    url.uri.query.auth_mechanism = Some(SASLMechanism::External);
                }
                Some(SASLMechanism::External) if !url.is_tls() => anyhow::bail!(
                    "amqp_url {}: auth_mechanism=external needs TLS with a client \
                     certificate; use amqps:// and set [tls] certfile and keyfile",
                    url.redacted
                ),
                Some(SASLMechanism::External) if !has_client_cert => anyhow::bail!(
                    "amqp_url {}: auth_mechanism=external needs a client certificate; set \
                     [tls] certfile and keyfile",
                    url.redacted
                ),
                _ => {}
            }
        }
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

    /// [`Connector::connect`] within `timeout`, for the commands that send once and exit (`fm
    /// call`, `fm publish --transaction`), with `fm publish`'s exit codes: a refused login is 1
    /// (fedora-messaging's uncaught `ConnectionException`), a broker not reached in time 111.
    pub async fn connect_within(&self, timeout: Duration) -> anyhow::Result<Connected> {
        match tokio::time::timeout(timeout, self.connect()).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(err)) if crate::error::exit_code_of(&err) == code::PERMISSION => {
                Err(Exit::new(code::FAILURE, err))
            }
            Ok(Err(err)) => Err(Exit::new(
                code::PUBLISH_TIMEOUT,
                err.context("the broker is unreachable"),
            )),
            Err(_) => Err(Exit::new(
                code::PUBLISH_TIMEOUT,
                anyhow!(
                    "the broker is unreachable: no connection within {:.0} s (--timeout)",
                    timeout.as_secs_f64()
                ),
            )),
        }
    }

    /// One round over the URLs in random order, each tried `connection_attempts` times;
    /// the first that completes the handshake wins. The error lists every failure
    /// and asks for exit code 14 (15 when a broker refused the login).
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
                        log_blocking(&connection, url.redacted.clone());
                        return Ok(Connected {
                            connection: Arc::new(connection),
                            url: url.redacted.clone(),
                            vhost: url.uri.vhost.clone(),
                        });
                    }
                    Err(failure) => {
                        refused |= failure.refused;
                        tracing::warn!(
                            broker = %url.redacted,
                            attempt,
                            "cannot connect: {}",
                            failure.text
                        );
                        failures.push(format!("{}: {}", url.redacted, failure.text));
                    }
                }
            }
        }
        let err = if self.urls.len() == 1 && failures.len() == 1 {
            anyhow!("cannot connect to the broker {}", failures[0])
        } else {
            anyhow!(
                "cannot connect to any of the {} brokers in amqp_url ({})",
                self.urls.len(),
                failures.join("; ")
            )
        };
        Err(Exit::new(
            if refused {
                code::PERMISSION
            } else {
                code::CONNECTION
            },
            err,
        ))
    }

    /// One attempt on one URL, within its deadline.
    async fn connect_one(&self, url: &BrokerUrl) -> Result<Connection, Failure> {
        let timeout = url.connection_timeout.unwrap_or(self.timeout);
        let deadline = limits::deadline_in(timeout);
        let tls = match (url.is_tls(), &self.tls) {
            (true, Some(tls)) => Some(tls.connector()),
            (true, None) => return Err(Failure::new("TLS is not set up (an fm bug)")),
            (false, _) => None,
        };
        let progress = Arc::new(Mutex::new(Progress::default()));
        let whole_text = format!(
            "no answer within {:.1} s ({})",
            timeout.as_secs_f64(),
            if url.connection_timeout.is_some() {
                "the URL's connection_timeout"
            } else {
                "connection_timeout"
            }
        );
        let whole = Limit {
            deadline,
            what: whole_text.clone(),
        };
        let transport = Transport {
            host: url.uri.authority.host.clone(),
            port: url.uri.authority.port,
            socket_limit: match url.socket_timeout.map(|t| (t, limits::deadline_in(t))) {
                Some((t, socket_deadline)) if socket_deadline < deadline => Limit {
                    deadline: socket_deadline,
                    what: format!(
                        "no answer within {:.1} s (the URL's socket_timeout)",
                        t.as_secs_f64()
                    ),
                },
                _ => whole.clone(),
            },
            limit: whole.clone(),
            tls,
            explain: self.tls.clone(),
            progress: Arc::clone(&progress),
        };
        let runtime = lapin::runtime::default_runtime()
            .map_err(|e| Failure::new(format!("no async runtime: {e}")))?;
        // The TCP connect is written out here, where lapin's runtime type is known (its
        // stream type cannot be named outside lapin); the rest is in `Transport`.
        let rt = runtime.clone();
        let connect = async move |_uri, _| {
            let addrs = transport.resolve().await?;
            transport.set(|p| p.step = Step::Connecting);
            let mut errors = Vec::new();
            for addr in addrs {
                let attempt = AsyncTcpStream::connect(&rt, addr);
                match tokio::time::timeout_at(transport.socket_limit.deadline, attempt).await {
                    Ok(Ok(stream)) => {
                        if let AsyncTcpStream::Plain(tcp) = &stream {
                            let socket = tcp.get_ref().as_fd().try_clone_to_owned().ok();
                            transport.set(|p| p.socket = socket.map(std::net::TcpStream::from));
                        }
                        return transport.tls(stream).await;
                    }
                    Ok(Err(err)) => errors.push((addr, err)),
                    Err(_) => {
                        return Err(transport.timed_out(&transport.socket_limit, Step::Connecting));
                    }
                }
            }
            Err(transport.fail(tcp_failure(&transport.host, transport.port, &errors)))
        };
        let fut = Connection::connector(url.uri.clone(), runtime, connect, self.properties.clone());
        let result = tokio::time::timeout_at(deadline, fut).await;
        let (step, failure) = {
            let mut p = progress.lock().unwrap_or_else(|e| e.into_inner());
            // The second handle must not outlive this attempt: it would keep the socket open
            // after lapin closes it.
            let socket = p.socket.take();
            if result.is_err()
                && let Some(socket) = &socket
            {
                // Ends lapin's I/O thread, which would otherwise wait for the broker.
                let _ = socket.shutdown(std::net::Shutdown::Both);
            }
            (p.step, p.failure.take())
        };
        match result {
            Ok(Ok(conn)) => Ok(conn),
            Err(_) => Err(Failure::new(timeout_text(&whole_text, step, url.is_tls()))),
            // The transport closure already said what went wrong.
            Ok(Err(_)) if failure.is_some() => Err(Failure::new(failure.unwrap_or_default())),
            Ok(Err(err)) => Err(self.amqp_failure(url, &err, deadline).await),
        }
    }

    /// Say why the AMQP part failed: the broker's refusal, or a TLS alert read late.
    async fn amqp_failure(
        &self,
        url: &BrokerUrl,
        err: &lapin::Error,
        deadline: Instant,
    ) -> Failure {
        let host = url.uri.authority.host.as_str();
        let port = url.uri.authority.port;
        match err.kind() {
            ErrorKind::ProtocolError(amqp) => {
                let said = format!("{} {}", amqp.get_id(), amqp.get_message().as_str());
                if amqp.get_id() == errors::ACCESS_REFUSED {
                    return Failure {
                        text: format!(
                            "the broker refused the login ({}){}",
                            said.trim_end_matches('.'),
                            self.login_hint(url)
                        ),
                        refused: true,
                    };
                }
                let hint = if amqp.get_message().as_str().contains("vhost") {
                    format!(
                        "; check that the vhost {:?} (the URL's path, %2F-encoded) exists and \
                         that the user may use it",
                        url.uri.vhost
                    )
                } else {
                    String::new()
                };
                Failure::new(format!("the broker said {said}{hint}"))
            }
            ErrorKind::IOError(io) => {
                if let (Some(tls_err), Some(settings)) = (tls::rustls_error(io), &self.tls) {
                    return Failure::new(settings.explain(tls_err, host, port));
                }
                let closed = matches!(
                    io.kind(),
                    std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::UnexpectedEof
                        | std::io::ErrorKind::BrokenPipe
                        | std::io::ErrorKind::ConnectionAborted
                );
                if closed && url.is_tls() {
                    // TLS 1.3: the broker checks fm's certificate after fm's side of the
                    // handshake is done; its alert may have been lost in a reset. Ask again.
                    if let Some(text) = self.probe_tls_refusal(url, deadline).await {
                        return Failure::new(text);
                    }
                    return Failure::new(format!(
                        "the broker closed the connection right after the TLS handshake ({}){}",
                        io_text(io),
                        if self.tls.as_ref().is_some_and(|t| t.has_client_identity()) {
                            "; it probably refused fm's client certificate ([tls] certfile): \
                             check that it is valid and signed by a CA the broker trusts"
                        } else {
                            "; it probably requires a client certificate: set [tls] \
                             certfile and keyfile"
                        }
                    ));
                }
                if closed {
                    return Failure::new(format!(
                        "{host}:{port} closed the connection without answering the AMQP \
                         header ({}); is it a TLS port? Use amqps:// for TLS ports (usually \
                         5671)",
                        io_text(io)
                    ));
                }
                Failure::new(io_text(io))
            }
            ErrorKind::InvalidProtocolVersion(version) => Failure::new(version_failure(
                host,
                port,
                (version.major, version.minor, version.revision),
            )),
            ErrorKind::ParsingError(_) => Failure::new(format!(
                "{host}:{port} did not answer in AMQP; {}",
                if url.is_tls() {
                    "is it an AMQP port?"
                } else {
                    "is it a TLS port (use amqps://) or not an AMQP port at all?"
                }
            )),
            _ => Failure::new(format!("{:#}", errors::describe(err.clone()))),
        }
    }

    /// What to check when the broker refused the login.
    fn login_hint(&self, url: &BrokerUrl) -> String {
        match url.uri.query.auth_mechanism {
            Some(SASLMechanism::External) => {
                let subject = self
                    .tls
                    .as_ref()
                    .and_then(|t| t.client_cert())
                    .and_then(|c| c.subject_cn.clone())
                    .map(|cn| format!(" (subject CN={cn})"))
                    .unwrap_or_default();
                format!(
                    ": it has no user for fm's client certificate{subject} (SASL EXTERNAL); \
                     RabbitMQ takes the user name from the certificate's subject, the whole \
                     distinguished name or, with ssl_cert_login_from = common_name, its CN: \
                     ask the broker's administrator to create that user"
                )
            }
            _ => {
                let user = url.uri.authority.userinfo.username.as_str();
                format!(
                    ": check the user name ({user:?}) and password in amqp_url{}",
                    if user == "guest" {
                        " (RabbitMQ lets guest log in from localhost only)"
                    } else {
                        ""
                    }
                )
            }
        }
    }

    /// After the broker closed a TLS connection right after the handshake: connect again,
    /// finish the handshake and listen without sending anything. A broker that refuses fm's
    /// client certificate then sends its alert on a quiet connection, where it cannot be lost
    /// in a reset; a broker that accepts it waits for the AMQP header, and fm gives up after
    /// [`PROBE_LISTEN`]. Only ever runs on a failed attempt.
    async fn probe_tls_refusal(&self, url: &BrokerUrl, deadline: Instant) -> Option<String> {
        let settings = self.tls.as_ref()?;
        let host = url.uri.authority.host.as_str();
        let port = url.uri.authority.port;
        let listen_until = limits::deadline_in(PROBE_LISTEN)
            .min(deadline.max(limits::deadline_in(Duration::from_secs(1))));
        let probe = async {
            let rt = lapin::runtime::default_runtime().ok()?;
            let addrs = tokio::net::lookup_host((host, port)).await.ok()?;
            for addr in addrs {
                let Ok(stream) = AsyncTcpStream::connect(&rt, addr).await else {
                    continue;
                };
                let mut stream = match stream.into_rustls(&settings.connector(), host).await {
                    Ok(stream) => stream,
                    Err(err) => {
                        return tls::rustls_error(&err).map(|e| settings.explain(e, host, port));
                    }
                };
                let mut buf = [0u8; 64];
                return match stream.read(&mut buf).await {
                    Err(err) => tls::rustls_error(&err).map(|e| settings.explain(e, host, port)),
                    Ok(_) => None,
                };
            }
            None
        };
        let found = tokio::time::timeout_at(listen_until, probe)
            .await
            .ok()
            .flatten();
        tracing::debug!(broker = %url.redacted, ?found, "TLS refusal probe");
        found
    }
}

/// A deadline and how to say it passed ("no answer within 10.0 s (connection_timeout)").
#[derive(Clone)]
struct Limit {
    deadline: Instant,
    what: String,
}

/// "no answer within 10.0 s (connection_timeout) while in the TLS handshake; is it a TLS port?"
fn timeout_text(what: &str, step: Step, tls: bool) -> String {
    let hint = match step {
        Step::Connecting => "; is a firewall dropping the connection?",
        Step::TlsHandshake => "; is it a TLS port?",
        Step::AmqpHandshake if !tls => "; is it an AMQP port? (a TLS port needs amqps://)",
        Step::AmqpHandshake => "; is the broker overloaded?",
        Step::Resolving => "",
    };
    format!("{what} while {}{hint}", step.doing())
}

/// "cannot connect to localhost:5672 (::1: connection refused; 127.0.0.1: connection
/// refused); is the broker running and listening on that port?"
fn tcp_failure(host: &str, port: u16, errors: &[(SocketAddr, std::io::Error)]) -> String {
    let refused = errors
        .iter()
        .all(|(_, e)| e.kind() == std::io::ErrorKind::ConnectionRefused);
    let each = if errors.len() == 1 {
        io_text(&errors[0].1).to_lowercase()
    } else {
        errors
            .iter()
            .map(|(addr, e)| format!("{}: {}", addr.ip(), io_text(e).to_lowercase()))
            .collect::<Vec<_>>()
            .join("; ")
    };
    format!(
        "cannot connect to {host}:{port} ({each}){}",
        if refused {
            "; is the broker running and listening on that port?"
        } else {
            ""
        }
    )
}

/// Opens the byte stream lapin speaks AMQP over: name lookup, TCP, TLS. Runs on lapin's I/O
/// thread (inside the tokio runtime's context), so it reports through `progress`.
struct Transport {
    host: String,
    port: u16,
    /// Name lookup and TCP connect: the URL's `socket_timeout`, else the whole limit.
    socket_limit: Limit,
    /// The whole attempt.
    limit: Limit,
    tls: Option<Arc<RustlsConnector>>,
    explain: Option<Arc<tls::Settings>>,
    progress: Arc<Mutex<Progress>>,
}

impl Transport {
    fn set(&self, update: impl FnOnce(&mut Progress)) {
        update(&mut self.progress.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Record fm's explanation and hand lapin an error.
    fn fail(&self, text: String) -> lapin::Error {
        let err = lapin::Error::from(std::io::Error::other(text.clone()));
        self.set(|p| p.failure = Some(text));
        err
    }

    fn timed_out(&self, limit: &Limit, step: Step) -> lapin::Error {
        self.fail(timeout_text(&limit.what, step, self.tls.is_some()))
    }

    async fn resolve(&self) -> lapin::Result<Vec<SocketAddr>> {
        let lookup = tokio::net::lookup_host((self.host.as_str(), self.port));
        match tokio::time::timeout_at(self.socket_limit.deadline, lookup).await {
            Ok(Ok(addrs)) => {
                let addrs: Vec<SocketAddr> = addrs.collect();
                if addrs.is_empty() {
                    return Err(self.fail(format!("the host name {:?} has no address", self.host)));
                }
                Ok(addrs)
            }
            Ok(Err(err)) => Err(self.fail(format!(
                "cannot find the host {:?} ({}); check the host name in amqp_url",
                self.host,
                io_text(&err)
            ))),
            Err(_) => Err(self.timed_out(&self.socket_limit, Step::Resolving)),
        }
    }

    /// The TLS handshake, for `amqps://` URLs; plain streams pass through.
    async fn tls<S>(&self, stream: AsyncTcpStream<S>) -> lapin::Result<AsyncTcpStream<S>>
    where
        S: futures_lite::AsyncRead + futures_lite::AsyncWrite + Send + Unpin + 'static,
    {
        let Some(connector) = &self.tls else {
            self.set(|p| p.step = Step::AmqpHandshake);
            return Ok(stream);
        };
        self.set(|p| p.step = Step::TlsHandshake);
        let handshake = stream.into_rustls(connector, &self.host);
        match tokio::time::timeout_at(self.limit.deadline, handshake).await {
            Ok(Ok(stream)) => {
                self.set(|p| p.step = Step::AmqpHandshake);
                Ok(stream)
            }
            Ok(Err(err)) => Err(self.fail(match (tls::rustls_error(&err), &self.explain) {
                (Some(tls_err), Some(settings)) => settings.explain(tls_err, &self.host, self.port),
                _ => format!(
                    "TLS handshake with {}:{} failed: {}",
                    self.host,
                    self.port,
                    io_text(&err)
                ),
            })),
            Err(_) => Err(self.timed_out(&self.limit, Step::TlsHandshake)),
        }
    }
}

/// An I/O error without Rust's " (os error N)" suffix.
fn io_text(err: &std::io::Error) -> String {
    let text = err.to_string();
    match text.find(" (os error") {
        Some(i) => text[..i].to_owned(),
        None => text,
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

/// Log the broker's `connection.blocked` and `connection.unblocked`, for as long as the
/// connection lives. RabbitMQ blocks a connection that publishes while one of its resource
/// alarms (memory, disk) is on; nothing is lost, but publishing (and so `fm publish`, the
/// relay, and a consumer's replies) waits until the alarm clears, and without this line an
/// operator sees a stuck process with nothing in its log. fm does not tear the connection down
/// after `blocked_connection_timeout` as pika does: a new connection would be blocked again,
/// and every command that waits on the broker has a limit of its own (`--timeout`).
fn log_blocking(connection: &Connection, broker: String) {
    let mut events = connection.events_listener();
    tokio::spawn(async move {
        // The stream ends when the connection is dropped.
        while let Some(event) = events.next().await {
            match event {
                Event::ConnectionBlocked(reason) => tracing::warn!(
                    broker = %broker,
                    "the broker blocks publishing on this connection: {reason} (a resource \
                     alarm); messages wait until it clears"
                ),
                Event::ConnectionUnblocked => tracing::info!(
                    broker = %broker,
                    "the broker unblocked this connection: publishing goes on"
                ),
                _ => {}
            }
        }
    });
}

/// Why a peer that answered fm's protocol header with one of its own is not a broker fm can
/// use. A broker sends its header only to refuse fm's version; a peer that sends 0-9-1 back
/// echoes what it reads (an echo service, or a socket that reached itself).
fn version_failure(host: &str, port: u16, (major, minor, revision): (u8, u8, u8)) -> String {
    if (major, minor, revision) == (0, 9, 1) {
        format!(
            "{host}:{port} sent fm's own AMQP 0-9-1 header back instead of starting the \
             handshake: it echoes what it reads and is not an AMQP broker"
        )
    } else {
        format!("{host}:{port} speaks AMQP {major}-{minor}-{revision}; fm speaks AMQP 0-9-1")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(toml: &str) -> Config {
        Config::from_toml_str(toml, None).unwrap()
    }

    #[test]
    fn tcp_failures_name_the_address_and_suggest_a_fix() {
        let refused = || std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let v4: SocketAddr = "127.0.0.1:5672".parse().unwrap();
        let v6: SocketAddr = "[::1]:5672".parse().unwrap();
        assert_eq!(
            tcp_failure("localhost", 5672, &[(v6, refused()), (v4, refused())]),
            "cannot connect to localhost:5672 (::1: connection refused; 127.0.0.1: connection \
             refused); is the broker running and listening on that port?"
        );
        let unreachable = std::io::Error::from(std::io::ErrorKind::HostUnreachable);
        assert_eq!(
            tcp_failure("h", 1, &[(v4, unreachable)]),
            "cannot connect to h:1 (host unreachable)"
        );
    }

    #[test]
    fn a_timeout_says_which_step_hung() {
        let what = "no answer within 2.0 s (connection_timeout)";
        assert_eq!(
            timeout_text(what, Step::TlsHandshake, true),
            "no answer within 2.0 s (connection_timeout) while in the TLS handshake; is it a \
             TLS port?"
        );
        assert!(timeout_text(what, Step::AmqpHandshake, false).ends_with("needs amqps://)"));
        assert!(timeout_text(what, Step::Connecting, false).contains("firewall"));
        assert!(timeout_text(what, Step::Resolving, false).ends_with("looking up the host name"));
    }

    #[test]
    fn a_peer_with_its_own_protocol_header_is_named_plainly() {
        assert_eq!(
            version_failure("h", 5672, (1, 0, 0)),
            "h:5672 speaks AMQP 1-0-0; fm speaks AMQP 0-9-1"
        );
        assert!(version_failure("h", 7, (0, 9, 1)).contains("echoes what it reads"));
    }

    #[test]
    fn io_errors_lose_their_os_error_number() {
        let err = std::io::Error::from_raw_os_error(111);
        assert_eq!(io_text(&err), "Connection refused");
    }

    #[test]
    fn a_client_certificate_means_external_auth_on_tls_urls_only() {
        // No [tls] files are needed for plain URLs, even when [tls] names missing ones.
        let c = Connector::new(&config(
            "amqp_url = [\"amqp://a/\", \"amqp://b/?auth_mechanism=plain\"]\n\
             [tls]\ncertfile = \"/missing/c.pem\"\nkeyfile = \"/missing/k.pem\"\n",
        ))
        .unwrap();
        assert!(c.tls.is_none());
        assert!(
            c.urls
                .iter()
                .all(|u| u.uri.query.auth_mechanism != Some(SASLMechanism::External))
        );
        assert_eq!(c.describe(), "amqp://a/, amqp://b/?auth_mechanism=plain");

        // An amqps:// URL reads them, and says which is missing (exit 2).
        let err = Connector::new(&config(
            "amqp_url = \"amqps://a/\"\n[tls]\ncertfile = \"/missing/c.pem\"\n\
             keyfile = \"/missing/k.pem\"\n",
        ))
        .err()
        .unwrap();
        assert_eq!(crate::error::exit_code_of(&err), code::USAGE);
        assert!(format!("{err:#}").contains("[tls] certfile /missing/c.pem cannot be read"));
    }

    /// A refused TCP connect fails the attempt at once, however quickly it comes. lapin's I/O
    /// thread can fail before the handshake's first step is registered; lapin 4.12.3 then
    /// waited for a reply that could never come until `connection_timeout` (about one attempt
    /// in a thousand on a busy machine, found by the configuration fuzz test). The fork in
    /// `vendor/lapin` closes that window; this runs enough attempts to hit it.
    #[test]
    fn a_refused_connection_always_fails_at_once() {
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let connector = Connector::new(&config(&format!(
            "amqp_url = \"amqp://127.0.0.1:{port}/%2F?connection_attempts=1\"\n\
             connection_timeout = 30\n"
        )))
        .unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            for attempt in 1..=3_000 {
                let started = std::time::Instant::now();
                let tried = tokio::time::timeout(Duration::from_secs(5), connector.connect()).await;
                let err = match tried {
                    Ok(Err(err)) => format!("{err:#}"),
                    Ok(Ok(_)) => panic!("attempt {attempt}: connected to a closed port"),
                    Err(_) => panic!(
                        "attempt {attempt}: still connecting after {:?}",
                        started.elapsed()
                    ),
                };
                assert!(
                    err.contains("connection refused"),
                    "attempt {attempt}: {err}"
                );
            }
        });
    }
}
