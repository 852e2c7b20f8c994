//! The validator: the TOML document, parsed with its spans, becomes a typed [`Config`]; every
//! error names the file, line and column.

use super::*;

/// 1-based line and column (in characters) of byte `offset` in `text`.
pub(super) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rfind('\n')
        .map_or(before, |i| &before[i + 1..])
        .chars()
        .count()
        + 1;
    (line, col)
}

/// A value of the parsed document, with its position in the text.
pub(super) type Item<'a> = Spanned<DeValue<'a>>;

/// The validator: holds the text (for line numbers) and the file's name (for messages).
pub(super) struct Parser<'t> {
    pub(super) text: &'t str,
    pub(super) origin: String,
}

impl<'t> Parser<'t> {
    /// An error at `span`: "FILE: line L, column C: MSG", exit code 2.
    pub(super) fn err(&self, span: Range<usize>, msg: impl fmt::Display) -> anyhow::Error {
        let (line, col) = line_col(self.text, span.start);
        usage(format!("{}: line {line}, column {col}: {msg}", self.origin))
    }

    /// Deserialize a fixed-shape value with serde; errors are located and prefixed by `what`
    /// and, inside a table, by the key whose value is wrong.
    pub(super) fn de<T: Deserialize<'t>>(&self, what: &str, v: &Item<'t>) -> anyhow::Result<T> {
        T::deserialize(ValueDeserializer::from(v.clone())).map_err(|e| {
            let span = e.span().unwrap_or(v.span());
            let key = v.get_ref().as_table().and_then(|t| {
                t.iter()
                    .find(|(_, value)| value.span().contains(&span.start))
                    .map(|(key, _)| key.get_ref())
            });
            match key {
                Some(key) => self.err(span, format!("{what} {key}: {}", e.message())),
                None => self.err(span, format!("{what}: {}", e.message())),
            }
        })
    }

    pub(super) fn table<'v>(&self, what: &str, v: &'v Item<'t>) -> anyhow::Result<&'v DeTable<'t>> {
        v.get_ref().as_table().ok_or_else(|| {
            self.err(
                v.span(),
                format!("{what} must be a table, not a {}", v.get_ref().type_str()),
            )
        })
    }

    /// An error at `entry` unless `table` has every key of `keys`; `message` is given the missing
    /// ones, joined ("durable, arguments").
    pub(super) fn require(
        &self,
        entry: &Item<'t>,
        table: &DeTable<'t>,
        keys: &[&str],
        message: impl FnOnce(&str) -> String,
    ) -> anyhow::Result<()> {
        let missing: Vec<&str> = keys
            .iter()
            .copied()
            .filter(|k| !table.contains_key(*k))
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(self.err(entry.span(), message(&missing.join(", "))))
        }
    }

    /// An open table (`client_properties`, `consumer_config`, `arguments`) as JSON.
    pub(super) fn json_table(
        &self,
        what: &str,
        v: &Item<'t>,
    ) -> anyhow::Result<Map<String, Value>> {
        let mut map = Map::new();
        for (key, entry) in self.table(what, v)? {
            let value: toml::Value = self.de(what, entry)?;
            let json = toml_to_json(value)
                .map_err(|e| self.err(entry.span(), format!("{what} {}: {e}", key.get_ref())))?;
            map.insert(key.get_ref().to_string(), json);
        }
        Ok(map)
    }

    pub(super) fn parse(&self) -> anyhow::Result<Config> {
        let doc = DeTable::parse(self.text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            self.err(span, format!("invalid TOML: {}", e.message().trim_end()))
        })?;
        let mut config = Config::default();
        let mut seen: Vec<(String, Cow<'_, str>)> = Vec::new();
        let mut all_bindings: Option<Vec<Binding>> = None;
        for (key, value) in doc.get_ref() {
            // fedora-messaging lower-cases top-level keys (`config[key.lower()] = …`).
            let name = key.get_ref().to_lowercase();
            if let Some((_, first)) = seen.iter().find(|(n, _)| *n == name) {
                return Err(self.err(
                    key.span(),
                    format!(
                        "configuration key '{}' repeats '{first}' (top-level keys are not case \
                         sensitive); keep one of them",
                        key.get_ref()
                    ),
                ));
            }
            seen.push((name.clone(), key.get_ref().clone()));
            match name.as_str() {
                "amqp_url" => config.amqp_urls = self.amqp_urls(value)?,
                "connection_timeout" => {
                    config.connection_timeout = self.seconds("connection_timeout", value, false)?
                }
                "shutdown_timeout" => {
                    config.shutdown_timeout = self.seconds("shutdown_timeout", value, true)?
                }
                "client_properties" => config.client_properties = self.client_properties(value)?,
                "publish_exchange" => {
                    config.publish_exchange = self.de("publish_exchange", value)?
                }
                "topic_prefix" => config.topic_prefix = self.de("topic_prefix", value)?,
                "publish_priority" => {
                    let p: i64 = self.de("publish_priority", value)?;
                    config.publish_priority = Some(u8::try_from(p).map_err(|_| {
                        self.err(
                            value.span(),
                            format!("publish_priority must be between 0 and 255, not {p}"),
                        )
                    })?);
                }
                "passive_declares" => {
                    config.passive_declares = self.de("passive_declares", value)?
                }
                "exchanges" => config.exchanges = self.exchanges(value)?,
                "queues" => config.queues = self.queues(value)?,
                "bindings" => all_bindings = Some(self.bindings(value)?),
                "qos" => config.qos = self.qos(value)?,
                "callback" => config.callback = self.callback(value)?,
                "monitoring" => config.monitoring = self.monitoring(value)?,
                "consumer_config" => {
                    config.consumer_config = self.json_table("[consumer_config]", value)?
                }
                "tls" => config.tls = self.tls(value)?,
                "log_config" => config.log_config = self.log_config(value)?,
                _ => {
                    return Err(self.err(
                        key.span(),
                        format!(
                            "unknown configuration key '{}'; valid keys are: {}",
                            key.get_ref(),
                            VALID_KEYS.join(", ")
                        ),
                    ));
                }
            }
        }
        if let Some(bindings) = all_bindings {
            // fedora-messaging binds only queues it declared, silently; fm says so.
            let (used, ignored): (Vec<_>, Vec<_>) = bindings
                .into_iter()
                .partition(|b| config.queues.iter().any(|(q, _)| *q == b.queue));
            for b in &ignored {
                tracing::warn!(
                    "{}: the binding of queue '{}' to exchange '{}' is ignored: there is no \
                     [queues.\"{}\"] table (fedora-messaging ignores it too)",
                    self.origin,
                    b.queue,
                    b.exchange,
                    b.queue
                );
            }
            config.bindings = used;
            config.ignored_bindings = ignored;
        } else {
            let (used, ignored): (Vec<_>, Vec<_>) = std::mem::take(&mut config.bindings)
                .into_iter()
                .partition(|b| config.queues.iter().any(|(q, _)| *q == b.queue));
            // The default binding is for the default `""` queue: with queues of the file's
            // own and no bindings, fedora-messaging binds nothing, and neither does fm.
            config.bindings = used;
            config.ignored_bindings = ignored;
        }
        Ok(config)
    }

    pub(super) fn amqp_urls(&self, v: &Item<'t>) -> anyhow::Result<Vec<String>> {
        let urls: Vec<Spanned<String>> = match v.get_ref() {
            DeValue::String(_) => vec![self.de("amqp_url", v)?],
            DeValue::Array(items) => {
                if items.is_empty() {
                    return Err(self.err(
                        v.span(),
                        "amqp_url is an empty array; give at least one amqp:// or amqps:// URL",
                    ));
                }
                items
                    .iter()
                    .map(|i| self.de("amqp_url", i))
                    .collect::<anyhow::Result<_>>()?
            }
            other => {
                return Err(self.err(
                    v.span(),
                    format!(
                        "amqp_url must be a string or an array of strings, not a {}",
                        other.type_str()
                    ),
                ));
            }
        };
        urls.into_iter()
            .map(|u| {
                let lower = u.get_ref().to_ascii_lowercase();
                if lower.starts_with("amqp://") || lower.starts_with("amqps://") {
                    // Parsed here too, so that a bad URL (a query option out of bounds, a raw
                    // '@' or '/' in the password) is located like every other error.
                    crate::amqp::url::parse(u.get_ref())
                        .map_err(|e| self.err(u.span(), format!("amqp_url: {e:#}")))?;
                    Ok(u.into_inner())
                } else {
                    Err(self.err(
                        u.span(),
                        format!(
                            "amqp_url '{}' must start with amqp:// or amqps://",
                            redact(u.get_ref())
                        ),
                    ))
                }
            })
            .collect()
    }

    /// A number of seconds (see [`limits::seconds`]); `what` names the key in errors, which
    /// quote the value as written (`1e19`, `nan`).
    pub(super) fn seconds(
        &self,
        what: &str,
        v: &Item<'t>,
        zero_ok: bool,
    ) -> anyhow::Result<Duration> {
        let secs: f64 = self.de(what, v)?;
        limits::seconds(secs, zero_ok).map_err(|requirement| {
            let written = self.text.get(v.span()).unwrap_or_default().trim();
            self.err(
                v.span(),
                format!("{what} must be {requirement}, not {written}"),
            )
        })
    }

    pub(super) fn client_properties(&self, v: &Item<'t>) -> anyhow::Result<Map<String, Value>> {
        let props = self.json_table("[client_properties]", v)?;
        // These identify the client to broker admins; fedora-messaging forbids changing them.
        for (key, expected) in reserved_properties() {
            if let Some(value) = props.get(key)
                && value.as_str() != Some(expected)
            {
                let span = self
                    .table("[client_properties]", v)?
                    .get(key)
                    .map_or(v.span(), Spanned::span);
                return Err(self.err(
                    span,
                    format!(
                        "\"{key}\" is a reserved keyword in client_properties; remove it \
                         (fm sends {key} = \"{expected}\")"
                    ),
                ));
            }
        }
        Ok(with_reserved_properties(props))
    }

    pub(super) fn exchanges(&self, v: &Item<'t>) -> anyhow::Result<Vec<(String, Exchange)>> {
        // Unlike queues, fedora-messaging never reads these (it does not declare exchanges),
        // so every setting may be left out. `arguments` is checked here and converted by
        // `json_table`, like every open table.
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct RawExchange {
            #[serde(rename = "type")]
            kind: Option<String>,
            durable: Option<bool>,
            auto_delete: Option<bool>,
            #[serde(rename = "arguments")]
            _arguments: Option<serde::de::IgnoredAny>,
        }
        let mut out = Vec::new();
        for (name, entry) in self.table("exchanges", v)? {
            let what = format!("[exchanges.\"{}\"]", name.get_ref());
            let table = self.table(&what, entry)?;
            let raw: RawExchange = self.de(&what, entry)?;
            let arguments = match table.get("arguments") {
                Some(a) => self.json_table(&format!("{what} arguments"), a)?,
                None => Map::new(),
            };
            out.push((
                name.get_ref().to_string(),
                Exchange {
                    kind: raw.kind.unwrap_or_else(|| "topic".to_owned()),
                    durable: raw.durable.unwrap_or(true),
                    auto_delete: raw.auto_delete.unwrap_or(false),
                    arguments,
                },
            ));
        }
        Ok(out)
    }

    pub(super) fn queues(&self, v: &Item<'t>) -> anyhow::Result<Vec<(String, Queue)>> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct RawQueue {
            durable: bool,
            auto_delete: bool,
            exclusive: bool,
            #[serde(rename = "arguments")]
            _arguments: serde::de::IgnoredAny,
        }
        let mut out = Vec::new();
        for (name, entry) in self.table("queues", v)? {
            let what = format!("[queues.\"{}\"]", name.get_ref());
            let table = self.table(&what, entry)?;
            self.require(
                entry,
                table,
                &["durable", "auto_delete", "exclusive", "arguments"],
                |missing| {
                    format!(
                        "queue '{}' is missing {missing}; every queue needs durable, \
                         auto_delete, exclusive and arguments (use arguments = {{}} for none)",
                        name.get_ref()
                    )
                },
            )?;
            let raw: RawQueue = self.de(&what, entry)?;
            if name.get_ref().len() > MAX_NAME_BYTES {
                return Err(self.err(
                    name.span(),
                    format!(
                        "queue name '{}' is longer than AMQP's 255 bytes",
                        name.get_ref()
                    ),
                ));
            }
            let arguments = self.json_table(&format!("{what} arguments"), &table["arguments"])?;
            out.push((
                name.get_ref().to_string(),
                Queue {
                    durable: raw.durable,
                    auto_delete: raw.auto_delete,
                    exclusive: raw.exclusive,
                    arguments,
                },
            ));
        }
        Ok(out)
    }

    pub(super) fn bindings(&self, v: &Item<'t>) -> anyhow::Result<Vec<Binding>> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct RawBinding {
            queue: Option<String>,
            exchange: String,
            routing_keys: Vec<String>,
            #[serde(rename = "arguments")]
            _arguments: Option<serde::de::IgnoredAny>,
        }
        let Some(items) = v.get_ref().as_array() else {
            return Err(self.err(
                v.span(),
                format!(
                    "bindings must be an array of tables ([[bindings]] sections), not a {}",
                    v.get_ref().type_str()
                ),
            ));
        };
        let mut out = Vec::new();
        for (i, entry) in items.iter().enumerate() {
            let what = format!("binding #{}", i + 1);
            let table = self.table(&what, entry)?;
            self.require(entry, table, &["exchange", "routing_keys"], |missing| {
                format!(
                    "{what} is missing {missing}; every binding needs exchange and routing_keys"
                )
            })?;
            if !table["routing_keys"].get_ref().is_array() {
                return Err(self.err(
                    table["routing_keys"].span(),
                    format!(
                        "{what}: routing_keys must be an array of strings, like [\"#\"], not a {}",
                        table["routing_keys"].get_ref().type_str()
                    ),
                ));
            }
            let raw: RawBinding = self.de(&what, entry)?;
            let names = raw
                .queue
                .iter()
                .chain([&raw.exchange])
                .chain(&raw.routing_keys);
            if let Some(long) = names.into_iter().find(|n| n.len() > MAX_NAME_BYTES) {
                return Err(self.err(
                    entry.span(),
                    format!("{what}: '{long}' is longer than AMQP's 255 bytes"),
                ));
            }
            let arguments = match table.get("arguments") {
                Some(a) => self.json_table(&format!("{what} arguments"), a)?,
                None => Map::new(),
            };
            out.push(Binding {
                queue: raw.queue.unwrap_or_default(),
                exchange: raw.exchange,
                routing_keys: raw.routing_keys,
                arguments,
            });
        }
        Ok(out)
    }

    pub(super) fn qos(&self, v: &Item<'t>) -> anyhow::Result<Qos> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct RawQos {
            prefetch_size: Option<Spanned<i64>>,
            prefetch_count: Option<Spanned<i64>>,
        }
        self.table("[qos]", v)?;
        let raw: RawQos = self.de("[qos]", v)?;
        // fm: a missing key takes its default (fedora-messaging would fail with a KeyError).
        let default = Config::default().qos;
        let range = |key: &str, n: &Spanned<i64>, max: i64| {
            if (0..=max).contains(n.get_ref()) {
                Ok(*n.get_ref())
            } else {
                Err(self.err(
                    n.span(),
                    format!(
                        "[qos] {key} must be between 0 and {max}, not {}",
                        n.get_ref()
                    ),
                ))
            }
        };
        Ok(Qos {
            prefetch_size: match &raw.prefetch_size {
                Some(n) => range("prefetch_size", n, u32::MAX.into())? as u32,
                None => default.prefetch_size,
            },
            prefetch_count: match &raw.prefetch_count {
                Some(n) => range("prefetch_count", n, u16::MAX.into())? as u16,
                None => default.prefetch_count,
            },
        })
    }

    pub(super) fn tls(&self, v: &Item<'t>) -> anyhow::Result<Tls> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct RawTls {
            ca_cert: Option<String>,
            certfile: Option<String>,
            keyfile: Option<String>,
        }
        self.table("[tls]", v)?;
        let raw: RawTls = self.de("[tls]", v)?;
        // An empty string means "not set", as it is falsy for fedora-messaging.
        let path = |s: Option<String>| s.filter(|s| !s.is_empty()).map(PathBuf::from);
        Ok(Tls {
            ca_cert: path(raw.ca_cert),
            certfile: path(raw.certfile),
            keyfile: path(raw.keyfile),
        })
    }

    pub(super) fn monitoring(&self, v: &Item<'t>) -> anyhow::Result<Option<Monitoring>> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct RawMonitoring {
            address: Option<String>,
            port: Option<Spanned<i64>>,
        }
        if self.table("[monitoring]", v)?.is_empty() {
            return Ok(None); // an empty table disables monitoring
        }
        let raw: RawMonitoring = self.de("[monitoring]", v)?;
        let Some(port) = raw.port else {
            return Err(self.err(
                v.span(),
                "the port must be defined in [monitoring] to activate it",
            ));
        };
        let port = u16::try_from(*port.get_ref()).map_err(|_| {
            self.err(
                port.span(),
                format!(
                    "[monitoring] port must be between 0 and 65535, not {}",
                    port.get_ref()
                ),
            )
        })?;
        Ok(Some(Monitoring {
            address: raw.address.unwrap_or_default(),
            port,
        }))
    }

    /// The levels of a Python `dictConfig` table; everything else in it is ignored.
    pub(super) fn log_config(&self, v: &Item<'t>) -> anyhow::Result<LogConfig> {
        let table = self.table("[log_config]", v)?;
        // The table replaces fedora-messaging's default, whose root is WARNING; a file's
        // dictConfig without `root` leaves Python's root logger at WARNING too.
        let mut out = LogConfig {
            root: LevelFilter::WARN,
            loggers: Vec::new(),
        };
        if let Some(root) = table.get("root") {
            let root = self.table("[log_config.root]", root)?;
            if let Some(level) = root.get("level") {
                // NOTSET on the root logger lets everything through.
                out.root = self
                    .python_level("[log_config.root] level", level)?
                    .unwrap_or(LevelFilter::TRACE);
            }
        }
        if let Some(loggers) = table.get("loggers") {
            for (name, logger) in self.table("[log_config.loggers]", loggers)? {
                let what = format!("[log_config.loggers.\"{}\"]", name.get_ref());
                if let Some(level) = self.table(&what, logger)?.get("level")
                    && let Some(level) = self.python_level(&format!("{what} level"), level)?
                {
                    out.loggers.push((name.get_ref().to_string(), level));
                }
            }
        }
        Ok(out)
    }

    /// A Python logging level (name or number) as a tracing filter; `None` for NOTSET.
    pub(super) fn python_level(
        &self,
        what: &str,
        v: &Item<'t>,
    ) -> anyhow::Result<Option<LevelFilter>> {
        let bad = |shown: String| {
            self.err(
                v.span(),
                format!(
                    "{what} {shown} is not a Python logging level; use DEBUG, INFO, WARNING, \
                     ERROR or CRITICAL"
                ),
            )
        };
        match v.get_ref() {
            DeValue::String(s) => python_level_name(s).ok_or_else(|| bad(format!("'{s}'"))),
            DeValue::Integer(_) => {
                let n: i64 = self.de(what, v)?;
                python_level_number(n).ok_or_else(|| bad(n.to_string()))
            }
            other => Err(bad(format!("(a {})", other.type_str()))),
        }
    }
}

/// A Python level name, in any case (CRITICAL/FATAL map to ERROR, the most severe tracing has).
pub fn python_level_name(name: &str) -> Option<Option<LevelFilter>> {
    Some(Some(match name.trim().to_ascii_uppercase().as_str() {
        "NOTSET" => return Some(None),
        "DEBUG" => LevelFilter::DEBUG,
        "INFO" => LevelFilter::INFO,
        "WARNING" | "WARN" => LevelFilter::WARN,
        "ERROR" | "CRITICAL" | "FATAL" => LevelFilter::ERROR,
        _ => return None,
    }))
}

/// A Python numeric level: a logger at level `n` shows records of level `n` and above, so a
/// number between two named levels acts as the next named level up; 0 is NOTSET.
pub fn python_level_number(n: i64) -> Option<Option<LevelFilter>> {
    Some(Some(match n {
        0 => return Some(None),
        1..=10 => LevelFilter::DEBUG,
        11..=20 => LevelFilter::INFO,
        21..=30 => LevelFilter::WARN,
        31..=50 => LevelFilter::ERROR,
        51.. => LevelFilter::OFF,
        _ => return None,
    }))
}

/// Convert a TOML value to JSON: datetimes become their RFC 3339 text; non-finite floats,
/// which JSON cannot carry, are refused.
fn toml_to_json(v: toml::Value) -> Result<Value, String> {
    Ok(match v {
        toml::Value::String(s) => Value::String(s),
        toml::Value::Integer(i) => Value::from(i),
        toml::Value::Float(f) => Value::Number(
            serde_json::Number::from_f64(f)
                .ok_or_else(|| format!("{f} cannot be represented in JSON; use a finite number"))?,
        ),
        toml::Value::Boolean(b) => Value::Bool(b),
        toml::Value::Datetime(d) => Value::String(d.to_string()),
        toml::Value::Array(items) => Value::Array(
            items
                .into_iter()
                .map(toml_to_json)
                .collect::<Result<_, _>>()?,
        ),
        toml::Value::Table(t) => Value::Object(
            t.into_iter()
                .map(|(k, v)| Ok((k, toml_to_json(v)?)))
                .collect::<Result<_, String>>()?,
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::testing::*;

    #[test]
    fn an_unknown_top_level_key_is_refused_and_the_valid_keys_listed() {
        let msg = error("amqp_url = \"amqp://\"\nprefetch = 3\n");
        assert_contains(
            &msg,
            &[
                "test.toml: line 2, column 1: unknown configuration key 'prefetch'; valid keys are: ",
            ],
        );
        for key in VALID_KEYS {
            assert!(msg.contains(key), "{key} not listed in {msg}");
        }
    }

    #[test]
    fn top_level_keys_are_not_case_sensitive_but_may_not_repeat() {
        let c = parse("AMQP_URL = \"amqps://h/%2F\"\n[QoS]\nprefetch_count = 3\n");
        assert_eq!(c.amqp_urls, ["amqps://h/%2F"]);
        assert_eq!(c.qos.prefetch_count, 3);
        let msg = error("amqp_url = \"amqp://a\"\nAmqp_Url = \"amqp://b\"\n");
        assert_contains(&msg, &["line 2", "'Amqp_Url' repeats 'amqp_url'"]);
    }

    #[test]
    fn amqp_url_may_be_an_array_of_fail_over_urls() {
        let c = parse("amqp_url = [\"amqps://a/%2F\", \"amqp://b:5672/%2F\"]");
        assert_eq!(c.amqp_urls, ["amqps://a/%2F", "amqp://b:5672/%2F"]);
        assert_contains(&error("amqp_url = []"), &["amqp_url is an empty array"]);
        assert_contains(
            &error("amqp_url = 5"),
            &["amqp_url must be a string or an array"],
        );
        assert_contains(
            &error("amqp_url = [\"amqp://a\", 5]"),
            &["amqp_url: invalid type"],
        );
    }

    #[test]
    fn a_url_that_is_not_amqp_is_refused_with_its_password_hidden() {
        let msg = error("amqp_url = [\"amqp://a\", \"http://user:s3cret@host/\"]");
        assert_contains(
            &msg,
            &[
                "line 1, column 25",
                "amqp_url 'http://user:***@host/' must start with amqp://",
            ],
        );
        assert!(!msg.contains("s3cret"), "{msg}");
    }

    #[test]
    fn amqp_urls_are_parsed_at_load_and_their_errors_located() {
        for (url, expected) in [
            (
                "amqp://u:s3cr3t@h/?socket_timeout=1e19",
                "line 2, column 12: amqp_url: invalid broker URL amqp://u:***@h/?socket_timeout=1e19: \
                 query parameter socket_timeout=\"1e19\" must be a number of seconds from 0.001 to \
                 86400 (1 day)",
            ),
            (
                "amqp:///user:s3cr3t@host/",
                "line 2, column 12: amqp_url: invalid broker URL amqp:///***@host/: it has an '@' \
                 after the host part",
            ),
            (
                "amqp://user:p@ss/w@host/",
                "invalid broker URL amqp://***@host/",
            ),
            (
                "amqps://user:pa/ss@host/",
                "invalid broker URL amqps://***@host/",
            ),
            (
                "amqp://u:s3cr3t@h/?retry_delay=nan",
                "retry_delay=\"nan\" must be",
            ),
        ] {
            let msg = error(&format!("topic_prefix = \"x\"\namqp_url = \"{url}\""));
            assert_contains(&msg, &[expected]);
            assert!(!msg.contains("s3cr3t") && !msg.contains("pa/ss") && !msg.contains("p@ss"));
        }
    }

    #[test]
    fn malformed_urls_are_refused_with_their_password_hidden() {
        for url in [
            "amqp:user:s3cr3t@host/%2F",
            "AMQP:user:s3cr3t@host/",
            "amqp:/user:s3cr3t@host/",
            "amqp//user:s3cr3t@host/",
            "amqpx://user:s3cr3t@host/",
            "user:s3cr3t@host",
        ] {
            let msg = error(&format!("amqp_url = \"{url}\""));
            assert_contains(
                &msg,
                &["line 1, column 12", "must start with amqp:// or amqps://"],
            );
            assert!(!msg.contains("s3cr3t"), "{msg}");
        }
    }

    #[test]
    fn timeouts_are_seconds_and_may_be_decimal() {
        let c = parse("connection_timeout = 2.5\nshutdown_timeout = 0");
        assert_eq!(c.connection_timeout, Duration::from_millis(2500));
        assert_eq!(c.shutdown_timeout, Duration::ZERO);
        assert_contains(
            &error("connection_timeout = 0"),
            &["connection_timeout must be a number of seconds from 0.001 to 86400 (1 day), not 0"],
        );
        assert_contains(
            &error("shutdown_timeout = -1"),
            &["shutdown_timeout must be a number of seconds from 0 to 86400 (1 day), not -1"],
        );
        // One day at most, and never a panic: huge, infinite and NaN values are refused.
        for (line, value) in [
            ("connection_timeout = 1e19", "1e19"),
            ("connection_timeout = 86400.5", "86400.5"),
            ("shutdown_timeout = inf", "inf"),
            ("shutdown_timeout = nan", "nan"),
            ("connection_timeout = -inf", "-inf"),
            ("connection_timeout = 1e-300", "1e-300"),
            (
                "connection_timeout = 9223372036854775807",
                "9223372036854775807",
            ),
        ] {
            let key = line.split(' ').next().unwrap();
            assert_contains(
                &error(line),
                &[
                    "test.toml: line 1, column ",
                    &format!("{key} must be a number of seconds from "),
                    &format!("to 86400 (1 day), not {value}"),
                ],
            );
        }
        let c = parse("connection_timeout = 86400\nshutdown_timeout = 86400.0");
        assert_eq!(c.connection_timeout, Duration::from_secs(86_400));
        assert_contains(
            &error("connection_timeout = \"10\""),
            &["connection_timeout: invalid type"],
        );
    }

    #[test]
    fn publish_settings_are_typed_and_ranged() {
        let c = parse(
            "publish_priority = 255\npublish_exchange = \"x\"\ntopic_prefix = \"org.example\"\n\
             passive_declares = true",
        );
        assert_eq!(c.publish_priority, Some(255));
        assert_eq!(c.publish_exchange, "x");
        assert_eq!(c.topic_prefix, "org.example");
        assert!(c.passive_declares);
        assert_contains(
            &error("publish_priority = 256"),
            &["publish_priority must be between 0 and 255, not 256"],
        );
        assert_contains(
            &error("passive_declares = \"yes\""),
            &["passive_declares: invalid type"],
        );
    }

    #[test]
    fn client_properties_keep_extra_keys_and_get_fms_identity() {
        let c = parse(
            "[client_properties]\nteam = \"infra\"\nport = 3\nwhen = 2024-01-02T03:04:05Z\n\
             product = \"fm\"",
        );
        assert_eq!(str_prop(&c, "team"), "infra");
        assert_eq!(c.client_properties["port"], 3);
        assert_eq!(str_prop(&c, "when"), "2024-01-02T03:04:05Z");
        assert_eq!(str_prop(&c, "app"), "Unknown");
        assert_eq!(str_prop(&c, "product"), "fm");
        assert_eq!(str_prop(&c, "information"), INFORMATION);
        assert_eq!(
            str_prop(&c, "version"),
            concat!("fm-", env!("CARGO_PKG_VERSION"))
        );
    }

    #[test]
    fn reserved_client_properties_may_not_change() {
        for key in ["product", "information", "version"] {
            let msg = error(&format!(
                "[client_properties]\napp = \"a\"\n{key} = \"mine\"\n"
            ));
            assert_contains(
                &msg,
                &[
                    "line 3, column 1",
                    &format!("\"{key}\" is a reserved keyword in client_properties"),
                ],
            );
        }
        assert_contains(
            &error("[client_properties]\nx = nan\n"),
            &["[client_properties] x: NaN cannot be represented in JSON"],
        );
    }

    #[test]
    fn queues_keep_file_order_and_their_arguments() {
        let c = parse(
            r#"
            [queues.zeta]
            durable = true
            auto_delete = false
            exclusive = false
            arguments = {"x-queue-type" = "quorum", "x-max-priority" = 10}
            [queues.alpha]
            durable = false
            auto_delete = true
            exclusive = true
            arguments = {}
            [[bindings]]
            queue = "zeta"
            exchange = "amq.topic"
            routing_keys = ["a.#", "b.*"]
            arguments = {"x-match" = "all"}
            "#,
        );
        let names: Vec<&str> = c.queues.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["zeta", "alpha"]);
        let args = &c.queues[0].1.arguments;
        assert_eq!(args["x-queue-type"], "quorum");
        assert_eq!(args["x-max-priority"], 10);
        assert_eq!(
            args.keys().collect::<Vec<_>>(),
            ["x-queue-type", "x-max-priority"]
        );
        assert_eq!(c.bindings[0].routing_keys, ["a.#", "b.*"]);
        assert_eq!(c.bindings[0].arguments["x-match"], "all");
        // The file's [queues] replaced the default "" queue, and the file's bindings the default.
        assert_eq!(c.bindings.len(), 1);
    }

    #[test]
    fn a_queue_missing_a_setting_is_refused_naming_the_queue_and_keys() {
        let msg = error("[queues.work]\ndurable = true\nexclusive = false\n");
        assert_contains(
            &msg,
            &["queue 'work' is missing auto_delete, arguments; every queue needs durable"],
        );
        assert_contains(
            &error(
                "[queues.w]\ndurable = 1\nauto_delete = false\nexclusive = false\narguments = {}",
            ),
            &[
                "line 2, column 11: [queues.\"w\"] durable: invalid type: integer `1`, expected a boolean",
            ],
        );
        assert_contains(
            &error(
                "[queues.w]\ndurable = true\nauto_delete = false\nexclusive = false\narguments = {}\nttl = 5",
            ),
            &["line 6", "[queues.\"w\"]: unknown field `ttl`"],
        );
        assert_contains(
            &error("queues = [1]"),
            &["queues must be a table, not a array"],
        );
        assert_contains(
            &error("[queues]\nw = 1"),
            &["[queues.\"w\"] must be a table"],
        );
    }

    #[test]
    fn names_longer_than_amqp_allows_are_refused() {
        let long = "q".repeat(256);
        let queue = format!(
            "[queues.{long}]\ndurable = true\nauto_delete = false\nexclusive = false\narguments = {{}}\n"
        );
        assert!(error(&queue).contains("longer than AMQP's 255 bytes"));
        let binding = format!("[[bindings]]\nexchange = \"e\"\nrouting_keys = [\"{long}\"]\n");
        assert!(error(&binding).contains("longer than AMQP's 255 bytes"));
    }

    #[test]
    fn bindings_need_an_exchange_and_an_array_of_routing_keys() {
        assert_contains(
            &error("[[bindings]]\nqueue = \"\"\n"),
            &["binding #1 is missing exchange, routing_keys"],
        );
        assert_contains(
            &error("[[bindings]]\nexchange = \"e\"\nrouting_keys = \"#\"\n"),
            &[
                "line 3, column 16",
                "binding #1: routing_keys must be an array of strings",
            ],
        );
        assert_contains(
            &error("[[bindings]]\nexchange = \"e\"\nrouting_keys = [\"#\"]\nqueues = \"x\""),
            &["binding #1: unknown field `queues`"],
        );
        assert_contains(
            &error("[bindings]\nexchange = \"e\""),
            &["bindings must be an array of tables"],
        );
        // A binding without a queue binds the server-named queue.
        let c = parse("[[bindings]]\nexchange = \"e\"\nrouting_keys = []");
        assert_eq!(c.bindings[0].queue, "");
        assert!(c.bindings[0].routing_keys.is_empty());
    }

    #[test]
    fn exchanges_are_validated_with_defaults_for_missing_settings() {
        let c = parse("[exchanges.logs]\ntype = \"fanout\"\n[exchanges.\"a.b\"]\n");
        assert_eq!(c.exchanges.len(), 2);
        assert_eq!(c.exchanges[0].0, "logs");
        assert_eq!(c.exchanges[0].1.kind, "fanout");
        assert_eq!(c.exchanges[1].0, "a.b");
        assert_eq!(c.exchanges[1].1.kind, "topic");
        assert!(c.exchanges[1].1.durable);
        assert_contains(
            &error("[exchanges.x]\nkind = \"topic\""),
            &["[exchanges.\"x\"]: unknown field `kind`"],
        );
    }

    #[test]
    fn qos_and_tls_keys_left_out_take_their_defaults() {
        let c = parse("[qos]\nprefetch_count = 1\n[tls]\nca_cert = \"/ca.pem\"\n");
        assert_eq!(
            c.qos,
            Qos {
                prefetch_size: 0,
                prefetch_count: 1
            }
        );
        assert_eq!(
            c.tls,
            Tls {
                ca_cert: Some("/ca.pem".into()),
                certfile: None,
                keyfile: None
            }
        );
        let c = parse("[qos]\nprefetch_size = 4294967295\n[tls]\ncertfile = \"\"");
        assert_eq!(c.qos.prefetch_count, 10);
        assert_eq!(c.qos.prefetch_size, u32::MAX);
        assert_eq!(c.tls.certfile, None);
    }

    #[test]
    fn qos_values_are_ranged_and_tables_reject_unknown_keys() {
        assert_contains(
            &error("[qos]\nprefetch_count = 65536"),
            &[
                "line 2, column 18",
                "[qos] prefetch_count must be between 0 and 65535, not 65536",
            ],
        );
        assert_contains(
            &error("[qos]\nprefetch_size = -1"),
            &["[qos] prefetch_size must be between 0 and 4294967295"],
        );
        assert_contains(
            &error("[qos]\nprefetch = 1"),
            &["[qos]: unknown field `prefetch`, expected `prefetch_size` or `prefetch_count`"],
        );
        assert_contains(
            &error("[tls]\ncafile = \"x\""),
            &["[tls]: unknown field `cafile`"],
        );
        assert_contains(&error("qos = 3"), &["[qos] must be a table, not a integer"]);
    }

    #[test]
    fn monitoring_is_off_when_empty_and_needs_a_port_otherwise() {
        assert_eq!(parse("[monitoring]\n").monitoring, None);
        assert_eq!(
            parse("[monitoring]\nport = 8070").monitoring,
            Some(Monitoring {
                address: String::new(),
                port: 8070
            })
        );
        assert_eq!(
            parse("[monitoring]\naddress = \"127.0.0.1\"\nport = 0").monitoring,
            Some(Monitoring {
                address: "127.0.0.1".into(),
                port: 0
            })
        );
        assert_contains(
            &error("[monitoring]\naddress = \"::1\"\n"),
            &["the port must be defined in [monitoring] to activate it"],
        );
        assert_contains(
            &error("[monitoring]\nport = 70000"),
            &["[monitoring] port must be between 0 and 65535"],
        );
        assert_contains(
            &error("[monitoring]\nport = 1\nhost = \"x\""),
            &["[monitoring]: unknown field `host`"],
        );
    }

    #[test]
    fn log_config_levels_are_read_and_the_rest_ignored() {
        let c = parse(
            r#"
            [log_config]
            version = 1
            [log_config.handlers.console]
            class = "logging.StreamHandler"
            [log_config.loggers.app]
            level = 10
            [log_config.loggers.quiet]
            level = "NOTSET"
            [log_config.loggers.nolevel]
            propagate = false
            "#,
        );
        assert_eq!(c.log_config.root, LevelFilter::WARN);
        assert_eq!(
            c.log_config.loggers,
            [("app".to_owned(), LevelFilter::DEBUG)]
        );
        assert_contains(
            &error("[log_config.root]\nlevel = \"LOUD\""),
            &["[log_config.root] level 'LOUD' is not a Python logging level"],
        );
        assert_contains(
            &error("[log_config.loggers.x]\nlevel = true"),
            &["[log_config.loggers.\"x\"] level (a boolean) is not a Python logging level"],
        );
    }

    #[test]
    fn line_and_column_count_characters() {
        assert_eq!(line_col("abc", 0), (1, 1));
        assert_eq!(line_col("a\nbc", 3), (2, 2));
        assert_eq!(line_col("é\nxé=", 6), (2, 3));
        assert_eq!(line_col("é\nxé=", 5), (2, 2)); // inside a character: its start
        assert_eq!(line_col("ab", 99), (1, 3));
    }
}
