//! The tables that describe the broker side: `[exchanges]`, `[queues]`, `bindings`, `[qos]`,
//! `[tls]`, `[monitoring]` and `[log_config]`, each read into its typed struct with located
//! errors (the top level and the shared helpers are in `parse.rs`).

use super::parse::{Item, Parser};
use super::*;

impl<'t> Parser<'t> {
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

    /// `[spool]` (fm): the folder of `fm publish --spool` and `fm relay`.
    pub(super) fn spool(&self, v: &Item<'t>) -> anyhow::Result<Spool> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct RawSpool {
            directory: Option<String>,
        }
        self.table("[spool]", v)?;
        let raw: RawSpool = self.de("[spool]", v)?;
        match raw.directory {
            Some(d) if d.is_empty() => Err(self.err(
                v.span(),
                "[spool] directory must not be empty (leave it out to have none)",
            )),
            d => Ok(Spool {
                directory: d.map(PathBuf::from),
            }),
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::testing::*;

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
    fn spool_names_a_folder() {
        assert_eq!(parse("").spool.directory, None);
        assert_eq!(
            parse("[spool]\ndirectory = \"/var/spool/fm\"")
                .spool
                .directory,
            Some(PathBuf::from("/var/spool/fm"))
        );
        assert_contains(
            &error("[spool]\ndirectory = \"\""),
            &["[spool] directory must not be empty"],
        );
        assert_contains(
            &error("[spool]\ndir = \"x\""),
            &["[spool]: unknown field `dir`"],
        );
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
}
