//! fedora-messaging's `consume`/`record` command-line overrides (`--app-name`, `--queue-name`,
//! `--exchange`, `--routing-key`, `--callback`), applied to a loaded [`Config`].

use super::*;

/// fedora-messaging's `consume`/`record` command-line overrides (`_consume` in `cli.py`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// `--app-name`: sets `client_properties.app`.
    pub app_name: Option<String>,
    /// `--queue-name`: consume from this queue only, with the settings of the `""` queue.
    pub queue_name: Option<String>,
    /// `--routing-key` (repeatable): replaces the routing keys of every binding.
    pub routing_keys: Vec<String>,
    /// `--exchange`: replaces the exchange of every binding.
    pub exchange: Option<String>,
    /// `--callback`: replaces the callback (see [`parse_callback_string`]).
    pub callback: Option<String>,
}

impl Config {
    /// Apply fedora-messaging's `consume`/`record` overrides (`--app-name`, `--queue-name`,
    /// `--exchange`, `--routing-key`, `--callback`), as its `_consume` does.
    pub fn apply_overrides(&mut self, o: &Overrides) -> anyhow::Result<()> {
        let names = o
            .queue_name
            .iter()
            .chain(&o.exchange)
            .chain(&o.routing_keys);
        if let Some(long) = names.into_iter().find(|n| n.len() > MAX_NAME_BYTES) {
            return Err(Exit::new(
                code::USAGE,
                anyhow::anyhow!("'{long}' is longer than AMQP's 255 bytes"),
            ));
        }
        if let Some(app) = &o.app_name {
            self.client_properties
                .insert("app".to_owned(), Value::from(app.as_str()));
        }
        if let Some(name) = &o.queue_name {
            // fedora-messaging takes the settings of the `""` queue (and fails with a KeyError
            // when the file has none); fm also accepts a file with exactly one queue.
            let settings = match self.queues.iter().find(|(n, _)| n.is_empty()) {
                Some((_, q)) => q.clone(),
                None if self.queues.len() == 1 => self.queues[0].1.clone(),
                None => {
                    let names: Vec<String> =
                        self.queues.iter().map(|(n, _)| format!("'{n}'")).collect();
                    return Err(usage(format!(
                        "--queue-name {name}: {} defines {} queues ({}) and none named \"\", so \
                         fm cannot tell which settings to use; add a [queues.\"\"] table with \
                         the settings for '{name}', or name the queue in the file instead",
                        self.origin(),
                        self.queues.len(),
                        if names.is_empty() {
                            "none".to_owned()
                        } else {
                            names.join(", ")
                        },
                    )));
                }
            };
            self.queues = vec![(name.clone(), settings)];
            let mut bindings = std::mem::take(&mut self.bindings);
            bindings.append(&mut self.ignored_bindings);
            for b in &mut bindings {
                b.queue = name.clone();
            }
            self.bindings = bindings;
        }
        if (o.exchange.is_some() || !o.routing_keys.is_empty()) && self.bindings.is_empty() {
            tracing::warn!(
                "--exchange and --routing-key change existing bindings, and {} has none",
                self.origin()
            );
        }
        for b in self.bindings.iter_mut().chain(&mut self.ignored_bindings) {
            if let Some(exchange) = &o.exchange {
                b.exchange = exchange.clone();
            }
            if !o.routing_keys.is_empty() {
                b.routing_keys = o.routing_keys.clone();
            }
        }
        if let Some(cb) = &o.callback {
            let mut kind = parse_callback_string(cb)
                .map_err(|e| Exit::new(code::USAGE, e.context("--callback")))?;
            // Keep a configured interpreter when only the Python target changes.
            if let (
                CallbackKind::Python { interpreter, .. },
                Some(CallbackKind::Python {
                    interpreter: configured,
                    ..
                }),
            ) = (&mut kind, &self.callback.kind)
            {
                *interpreter = configured.clone();
            }
            if self.callback.timeout.is_some() && matches!(kind, CallbackKind::Plugin { .. }) {
                return Err(usage(format!(
                    "--callback {cb}: {} sets [callback] timeout, which a plugin cannot honour \
                     (it runs in-process); remove the timeout or use a command callback",
                    self.origin()
                )));
            }
            self.callback.kind = Some(kind);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::testing::*;
    use crate::error::exit_code_of;

    #[test]
    fn overrides_follow_fedora_messaging_consume() {
        let mut c = Config::default();
        c.apply_overrides(&Overrides {
            app_name: Some("my-app".into()),
            queue_name: Some("named".into()),
            routing_keys: vec!["a.b".into(), "c.#".into()],
            exchange: Some("ex".into()),
            callback: Some("/x/libp.so".into()),
        })
        .unwrap();
        assert_eq!(str_prop(&c, "app"), "my-app");
        // The named queue takes the settings of the "" queue.
        assert_eq!(
            c.queues,
            [("named".to_owned(), Config::default().queues[0].1.clone())]
        );
        assert_eq!(
            c.bindings,
            [Binding {
                queue: "named".into(),
                exchange: "ex".into(),
                routing_keys: vec!["a.b".into(), "c.#".into()],
                arguments: Map::new(),
            }]
        );
        assert_eq!(
            c.callback.kind,
            Some(CallbackKind::Plugin {
                path: "/x/libp.so".into()
            })
        );

        let mut c = Config::default();
        c.apply_overrides(&Overrides::default()).unwrap();
        assert_eq!(c, Config::default());
    }

    #[test]
    fn queue_name_retargets_ignored_bindings_too() {
        let mut c = Config::load(Some(&fixture("good_conf.toml"))).unwrap();
        c.apply_overrides(&Overrides {
            queue_name: Some("q".into()),
            ..Overrides::default()
        })
        .unwrap();
        assert_eq!(c.queues[0].0, "q");
        assert_eq!(c.bindings.len(), 1);
        assert_eq!(
            (
                c.bindings[0].queue.as_str(),
                c.bindings[0].exchange.as_str()
            ),
            ("q", "e")
        );
        assert!(c.ignored_bindings.is_empty());
    }

    #[test]
    fn queue_name_without_a_server_named_queue() {
        // One named queue: fm uses its settings (fedora-messaging would raise a KeyError).
        let one =
            "[queues.a]\ndurable = true\nauto_delete = false\nexclusive = false\narguments = {}\n";
        let mut c = parse(one);
        c.apply_overrides(&Overrides {
            queue_name: Some("b".into()),
            ..Overrides::default()
        })
        .unwrap();
        assert_eq!(c.queues.len(), 1);
        assert_eq!(c.queues[0].0, "b");
        assert!(c.queues[0].1.durable);

        let two = format!(
            "{one}[queues.z]\ndurable = true\nauto_delete = false\nexclusive = false\narguments = {{}}\n"
        );
        let mut c = parse(&two);
        let err = c
            .apply_overrides(&Overrides {
                queue_name: Some("b".into()),
                ..Overrides::default()
            })
            .unwrap_err();
        assert_eq!(exit_code_of(&err), code::USAGE);
        assert_contains(
            &format!("{err:#}"),
            &["--queue-name b: test.toml defines 2 queues ('a', 'z') and none named \"\""],
        );
    }

    #[test]
    fn a_callback_override_keeps_the_configured_interpreter_and_is_checked() {
        let mut c =
            parse("[callback]\npython = \"a:b\"\ninterpreter = \"/venv/python\"\ntimeout = 3");
        c.apply_overrides(&Overrides {
            callback: Some("c.d:e".into()),
            ..Overrides::default()
        })
        .unwrap();
        assert_eq!(
            c.callback.kind,
            Some(CallbackKind::Python {
                target: "c.d:e".into(),
                interpreter: "/venv/python".into()
            })
        );
        for (bad, expected) in [
            ("nonsense", "--callback: callback 'nonsense' is neither"),
            ("/p.so", "which a plugin cannot honour"),
        ] {
            let err = c
                .apply_overrides(&Overrides {
                    callback: Some(bad.into()),
                    ..Overrides::default()
                })
                .unwrap_err();
            assert_eq!(exit_code_of(&err), code::USAGE);
            assert_contains(&format!("{err:#}"), &[expected]);
        }
    }
}
