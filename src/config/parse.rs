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

/// The configuration as the top-level keys fill it in; `bindings` is kept apart until every
/// queue is known.
#[derive(Default)]
pub(super) struct Top {
    config: Config,
    bindings: Option<Vec<Binding>>,
}

/// How one top-level key's value is read into the configuration being built.
type Reader = for<'t, 'p> fn(&'p Parser<'t>, &'p Item<'t>, &mut Top) -> anyhow::Result<()>;

/// Every top-level key fm reads, fedora-messaging's then fm's own, with its reader: the one
/// list from which both parsing and [`VALID_KEYS`] come.
pub(super) const TOP_LEVEL: &[(&str, Reader)] = &[
    ("amqp_url", |p, v, top| {
        top.config.amqp_urls = p.amqp_urls(v)?;
        Ok(())
    }),
    ("client_properties", |p, v, top| {
        top.config.client_properties = p.client_properties(v)?;
        Ok(())
    }),
    ("publish_exchange", |p, v, top| {
        top.config.publish_exchange = p.de("publish_exchange", v)?;
        Ok(())
    }),
    ("topic_prefix", |p, v, top| {
        top.config.topic_prefix = p.de("topic_prefix", v)?;
        Ok(())
    }),
    ("publish_priority", |p, v, top| {
        let priority: i64 = p.de("publish_priority", v)?;
        top.config.publish_priority = Some(u8::try_from(priority).map_err(|_| {
            p.err(
                v.span(),
                format!("publish_priority must be between 0 and 255, not {priority}"),
            )
        })?);
        Ok(())
    }),
    ("passive_declares", |p, v, top| {
        top.config.passive_declares = p.de("passive_declares", v)?;
        Ok(())
    }),
    ("exchanges", |p, v, top| {
        top.config.exchanges = p.exchanges(v)?;
        Ok(())
    }),
    ("queues", |p, v, top| {
        top.config.queues = p.queues(v)?;
        Ok(())
    }),
    ("bindings", |p, v, top| {
        top.bindings = Some(p.bindings(v)?);
        Ok(())
    }),
    ("qos", |p, v, top| {
        top.config.qos = p.qos(v)?;
        Ok(())
    }),
    ("callback", |p, v, top| {
        top.config.callback = p.callback(v)?;
        Ok(())
    }),
    ("monitoring", |p, v, top| {
        top.config.monitoring = p.monitoring(v)?;
        Ok(())
    }),
    ("consumer_config", |p, v, top| {
        top.config.consumer_config = p.json_table("[consumer_config]", v)?;
        Ok(())
    }),
    ("tls", |p, v, top| {
        top.config.tls = p.tls(v)?;
        Ok(())
    }),
    ("log_config", |p, v, top| {
        top.config.log_config = p.log_config(v)?;
        Ok(())
    }),
    ("spool", |p, v, top| {
        top.config.spool = p.spool(v)?;
        Ok(())
    }),
    ("connection_timeout", |p, v, top| {
        top.config.connection_timeout = p.seconds("connection_timeout", v, false)?;
        Ok(())
    }),
    ("shutdown_timeout", |p, v, top| {
        top.config.shutdown_timeout = p.seconds("shutdown_timeout", v, true)?;
        Ok(())
    }),
];

/// The names of [`TOP_LEVEL`], in its order.
pub(super) const fn top_level_names<const N: usize>() -> [&'static str; N] {
    let mut names = [""; N];
    let mut i = 0;
    while i < N {
        names[i] = TOP_LEVEL[i].0;
        i += 1;
    }
    names
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
        let mut top = Top::default();
        let mut seen: Vec<(String, Cow<'_, str>)> = Vec::new();
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
            let Some((_, read)) = TOP_LEVEL.iter().find(|(k, _)| *k == name) else {
                return Err(self.err(
                    key.span(),
                    format!(
                        "unknown configuration key '{}'; valid keys are: {}",
                        key.get_ref(),
                        VALID_KEYS.join(", ")
                    ),
                ));
            };
            read(self, value, &mut top)?;
        }
        let Top {
            mut config,
            bindings: all_bindings,
        } = top;
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
    fn line_and_column_count_characters() {
        assert_eq!(line_col("abc", 0), (1, 1));
        assert_eq!(line_col("a\nbc", 3), (2, 2));
        assert_eq!(line_col("é\nxé=", 6), (2, 3));
        assert_eq!(line_col("é\nxé=", 5), (2, 2)); // inside a character: its start
        assert_eq!(line_col("ab", 99), (1, 3));
    }
}
