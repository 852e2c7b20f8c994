//! The callback: fedora-messaging's `callback = "package.module:attribute"` string, and fm's
//! `[callback]` table that selects a native plugin, a command or a Python callback.

use super::parse::{Item, Parser};
use super::*;

/// Parse a `callback` string (the config's `callback = "…"` or `--callback`):
/// `package.module:attribute` is a Python callback, a path ending in `.so` a native plugin.
pub fn parse_callback_string(s: &str) -> anyhow::Result<CallbackKind> {
    let s = s.trim();
    if s.ends_with(".so") {
        return Ok(CallbackKind::Plugin {
            path: PathBuf::from(s),
        });
    }
    if s.contains(':') {
        check_python_target(s)?;
        return Ok(CallbackKind::Python {
            target: s.to_owned(),
            interpreter: crate::callback::python::default_interpreter(),
        });
    }
    Err(anyhow!(
        "callback '{s}' is neither a Python callback ('package.module:attribute') nor a plugin \
         (a path ending in .so); to run a command, use a [callback] table with \
         command = [\"/path/to/program\", \"arg\"]"
    ))
}

/// A Python callback must be `module.path:attribute`: dotted identifiers, one colon, one
/// identifier after it (fedora-messaging does `getattr(module, attribute)`).
fn check_python_target(s: &str) -> anyhow::Result<()> {
    fn identifier(s: &str) -> bool {
        let mut chars = s.chars();
        chars.next().is_some_and(|c| c == '_' || c.is_alphabetic())
            && chars.all(|c| c == '_' || c.is_alphanumeric())
    }
    let ok = match s.rsplit_once(':') {
        // fedora-messaging's --callback-file form: a Python file and a name in it.
        Some((file, attr)) if file.ends_with(".py") => identifier(attr),
        Some((module, attr)) => module.split('.').all(identifier) && identifier(attr),
        None => false,
    };
    if ok {
        Ok(())
    } else {
        Err(anyhow!(
            "python callback '{s}' must look like 'package.module:attribute' (Python \
             identifiers separated by dots, one colon, one attribute name) or \
             'path/to/file.py:attribute'"
        ))
    }
}

impl<'t> Parser<'t> {
    pub(super) fn callback(&self, v: &Item<'t>) -> anyhow::Result<CallbackConfig> {
        if let DeValue::String(s) = v.get_ref() {
            let kind = parse_callback_string(s).map_err(|e| self.err(v.span(), e))?;
            return Ok(CallbackConfig {
                kind: Some(kind),
                ..CallbackConfig::default()
            });
        }
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct RawCallback {
            plugin: Option<String>,
            command: Option<Vec<String>>,
            python: Option<String>,
            mode: Option<Spanned<String>>,
            interpreter: Option<Spanned<String>>,
            concurrency: Option<Spanned<i64>>,
            queue_concurrency: Option<Spanned<i64>>,
            #[serde(rename = "timeout")]
            _timeout: Option<serde::de::IgnoredAny>,
            on_error: Option<Spanned<String>>,
            max_redeliveries: Option<Spanned<i64>>,
            body: Option<Spanned<String>>,
            reply: Option<Spanned<String>>,
        }
        if !v.get_ref().is_table() {
            return Err(self.err(
                v.span(),
                format!(
                    "callback must be a string (\"package.module:attribute\" or \
                     \"/path/plugin.so\") or a [callback] table, not a {}",
                    v.get_ref().type_str()
                ),
            ));
        }
        let table = self.table("[callback]", v)?;
        let raw: RawCallback = self.de("[callback]", v)?;
        let at = |key: &str| table.get(key).map_or(v.span(), Spanned::span);

        let given: Vec<&str> = ["plugin", "command", "python"]
            .into_iter()
            .filter(|k| table.contains_key(*k))
            .collect();
        if given.len() > 1 {
            return Err(self.err(
                at(given[1]),
                format!(
                    "[callback] sets {}; choose exactly one of plugin, command and python",
                    given.join(" and ")
                ),
            ));
        }
        let kind = if let Some(path) = raw.plugin {
            if !path.ends_with(".so") {
                return Err(self.err(
                    at("plugin"),
                    format!("[callback] plugin '{path}' must be the path of a .so file"),
                ));
            }
            Some(CallbackKind::Plugin {
                path: PathBuf::from(path),
            })
        } else if let Some(argv) = raw.command {
            if argv.first().is_none_or(|p| p.is_empty()) {
                return Err(self.err(
                    at("command"),
                    "[callback] command must be a non-empty array: the program, then its \
                     arguments, like [\"/usr/bin/prog\", \"--flag\"]",
                ));
            }
            let mode = match raw.mode.as_ref().map(|m| m.get_ref().as_str()) {
                None | Some("exec") => CommandMode::Exec,
                Some("worker") => CommandMode::Worker,
                Some(other) => {
                    return Err(self.err(
                        at("mode"),
                        format!("[callback] mode '{other}' is unknown; use \"exec\" or \"worker\""),
                    ));
                }
            };
            Some(CallbackKind::Command { argv, mode })
        } else if let Some(target) = raw.python {
            check_python_target(&target).map_err(|e| self.err(at("python"), e))?;
            let interpreter = match &raw.interpreter {
                Some(i) if i.get_ref().is_empty() => {
                    return Err(self.err(i.span(), "[callback] interpreter is empty"));
                }
                Some(i) => PathBuf::from(i.get_ref()),
                None => crate::callback::python::default_interpreter(),
            };
            Some(CallbackKind::Python {
                target,
                interpreter,
            })
        } else {
            None
        };
        if raw.mode.is_some() && !matches!(kind, Some(CallbackKind::Command { .. })) {
            return Err(self.err(
                at("mode"),
                "[callback] mode applies only to command callbacks",
            ));
        }
        if raw.interpreter.is_some() && !matches!(kind, Some(CallbackKind::Python { .. })) {
            return Err(self.err(
                at("interpreter"),
                "[callback] interpreter applies only to python callbacks",
            ));
        }

        let mut cb = CallbackConfig {
            kind,
            ..CallbackConfig::default()
        };
        let slots = |key: &str, n: &Spanned<i64>| {
            usize::try_from(*n.get_ref())
                .ok()
                .filter(|n| (1..=MAX_CONCURRENCY).contains(n))
                .ok_or_else(|| {
                    self.err(
                        n.span(),
                        format!(
                            "[callback] {key} must be between 1 and {MAX_CONCURRENCY}, not {}",
                            n.get_ref()
                        ),
                    )
                })
        };
        if let Some(n) = &raw.concurrency {
            cb.concurrency = slots("concurrency", n)?;
        }
        if let Some(n) = &raw.queue_concurrency {
            cb.queue_concurrency = Some(slots("queue_concurrency", n)?);
        }
        if let Some(t) = table.get("timeout") {
            if matches!(cb.kind, Some(CallbackKind::Plugin { .. })) {
                return Err(self.err(
                    t.span(),
                    "[callback] timeout applies to command and python callbacks; a plugin runs \
                     in-process and cannot be interrupted",
                ));
            }
            cb.timeout = Some(self.seconds("[callback] timeout", t, false)?);
        }
        if let Some(e) = raw.on_error {
            cb.on_error = match e.get_ref().as_str() {
                "halt" => OnError::Halt,
                "requeue" => OnError::Requeue,
                "drop" => OnError::Drop,
                other => {
                    return Err(self.err(
                        e.span(),
                        format!(
                            "[callback] on_error '{other}' is unknown; use \"halt\", \"requeue\" \
                             or \"drop\""
                        ),
                    ));
                }
            };
        }
        if let Some(n) = raw.max_redeliveries {
            cb.max_redeliveries = Some(u32::try_from(*n.get_ref()).map_err(|_| {
                self.err(
                    n.span(),
                    format!(
                        "[callback] max_redeliveries must be 0 or more, not {}",
                        n.get_ref()
                    ),
                )
            })?);
        }
        if let Some(b) = raw.body {
            cb.body = match b.get_ref().as_str() {
                "json" => BodyMode::Json,
                "bytes" => BodyMode::Bytes,
                other => {
                    return Err(self.err(
                        b.span(),
                        format!("[callback] body '{other}' is unknown; use \"json\" or \"bytes\""),
                    ));
                }
            };
        }
        if let Some(r) = raw.reply {
            let exec = matches!(
                cb.kind,
                Some(CallbackKind::Command {
                    mode: CommandMode::Exec,
                    ..
                })
            );
            cb.stdout = match r.get_ref().as_str() {
                "stdout" if exec => ExecStdout::Reply,
                "stdout" => {
                    return Err(self.err(
                        r.span(),
                        "[callback] reply = \"stdout\" applies only to commands in exec mode \
                         (workers answer with \"reply\" in their answer line, plugins and \
                         Python callbacks reply themselves)",
                    ));
                }
                other => {
                    return Err(self.err(
                        r.span(),
                        format!("[callback] reply '{other}' is unknown; use \"stdout\""),
                    ));
                }
            };
        }
        Ok(cb)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::testing::*;

    #[test]
    fn a_callback_string_is_a_python_target_or_a_plugin_path() {
        assert_eq!(
            parse_callback_string("pkg.mod:Consumer").unwrap(),
            CallbackKind::Python {
                target: "pkg.mod:Consumer".into(),
                interpreter: "python3".into()
            }
        );
        assert_eq!(
            parse_callback_string("/usr/lib/fm/libx.so").unwrap(),
            CallbackKind::Plugin {
                path: "/usr/lib/fm/libx.so".into()
            }
        );
        assert_eq!(
            parse_callback_string("target/debug/libfm_printer.so").unwrap(),
            CallbackKind::Plugin {
                path: "target/debug/libfm_printer.so".into()
            }
        );
        for bad in ["pkg.mod", "/usr/bin/prog", ""] {
            let msg = format!("{:#}", parse_callback_string(bad).unwrap_err());
            assert_contains(&msg, &["is neither a Python callback", "command = "]);
        }
        for bad in [
            "pkg.mod:",
            ":attr",
            "pkg..mod:a",
            "pkg.mod:a.b",
            "a:b:c",
            "1pkg:a",
            "pkg-x:a",
            "path/f.py:a.b",
        ] {
            let msg = format!("{:#}", parse_callback_string(bad).unwrap_err());
            assert_contains(&msg, &[&format!("python callback '{bad}' must look like")]);
        }
        // fedora-messaging's --callback-file form: a Python file and a name in it.
        assert!(matches!(
            parse_callback_string("/srv/cb/f.py:obj").unwrap(),
            CallbackKind::Python { target, .. } if target == "/srv/cb/f.py:obj"
        ));
        assert_contains(
            &error("callback = \"my_module\""),
            &["line 1, column 12", "callback 'my_module' is neither"],
        );
        assert_contains(&error("callback = 3"), &["callback must be a string"]);
    }

    #[test]
    fn a_callback_table_selects_a_plugin_a_command_or_python() {
        let c = parse("[callback]\nplugin = \"/p/libx.so\"\nconcurrency = 4\non_error = \"drop\"");
        assert_eq!(
            c.callback.kind,
            Some(CallbackKind::Plugin {
                path: "/p/libx.so".into()
            })
        );
        assert_eq!(c.callback.concurrency, 4);
        assert_eq!(c.callback.on_error, OnError::Drop);
        assert_eq!(c.callback.queue_concurrency, None);
        assert_eq!(c.callback.per_queue(), 4);

        // fedora-messaging's model: each queue one at a time, queues side by side; a per-queue
        // limit above the process-wide one is the process-wide one.
        let c = parse("[callback]\ncommand = [\"x\"]\nconcurrency = 3\nqueue_concurrency = 1");
        assert_eq!(c.callback.queue_concurrency, Some(1));
        assert_eq!(c.callback.per_queue(), 1);
        let c = parse("[callback]\ncommand = [\"x\"]\nconcurrency = 2\nqueue_concurrency = 8");
        assert_eq!(c.callback.per_queue(), 2);

        let c = parse(
            "[callback]\ncommand = [\"/bin/cat\", \"-u\"]\ntimeout = 1.5\nmax_redeliveries = 3",
        );
        assert_eq!(
            c.callback.kind,
            Some(CallbackKind::Command {
                argv: vec!["/bin/cat".into(), "-u".into()],
                mode: CommandMode::Exec
            })
        );
        assert_eq!(c.callback.timeout, Some(Duration::from_millis(1500)));
        assert_eq!(c.callback.max_redeliveries, Some(3));
        assert_eq!(c.callback.on_error, OnError::Halt);

        let c = parse("[callback]\ncommand = [\"w\"]\nmode = \"worker\"\non_error = \"requeue\"");
        assert_eq!(
            c.callback.kind,
            Some(CallbackKind::Command {
                argv: vec!["w".into()],
                mode: CommandMode::Worker
            })
        );
        assert_eq!(c.callback.on_error, OnError::Requeue);

        let c = parse(
            "[callback]\npython = \"a.b:c\"\ninterpreter = \"/venv/bin/python\"\ntimeout = 60",
        );
        assert_eq!(
            c.callback.kind,
            Some(CallbackKind::Python {
                target: "a.b:c".into(),
                interpreter: "/venv/bin/python".into()
            })
        );
        assert_eq!(c.callback.timeout, Some(Duration::from_secs(60)));

        let c = parse("[callback]\ncommand = [\"/bin/cat\"]\nreply = \"stdout\"\nbody = \"bytes\"");
        assert_eq!(c.callback.stdout, ExecStdout::Reply);
        assert_eq!(c.callback.body, BodyMode::Bytes);
        let c = parse("[callback]\nplugin = \"/p/libx.so\"\nbody = \"json\"");
        assert_eq!(c.callback.stdout, ExecStdout::Log);
        assert_eq!(c.callback.body, BodyMode::Json);

        // Settings without a kind: the callback comes from --callback.
        let c = parse("[callback]\nconcurrency = 2");
        assert_eq!(c.callback.kind, None);
        assert_eq!(c.callback.concurrency, 2);
    }

    #[test]
    fn bad_callback_tables_are_refused_with_the_reason() {
        let cases: &[(&str, &str)] = &[
            (
                "plugin = \"/a.so\"\npython = \"a:b\"",
                "sets plugin and python; choose exactly one",
            ),
            (
                "command = [\"x\"]\npython = \"a:b\"",
                "sets command and python",
            ),
            (
                "plugin = \"/a.dll\"",
                "plugin '/a.dll' must be the path of a .so file",
            ),
            ("command = []", "command must be a non-empty array"),
            ("command = [\"\"]", "command must be a non-empty array"),
            (
                "command = \"/bin/x\"",
                "[callback] command: invalid type: string \"/bin/x\", expected a sequence",
            ),
            (
                "command = [\"x\"]\nmode = \"daemon\"",
                "mode 'daemon' is unknown; use \"exec\" or \"worker\"",
            ),
            (
                "python = \"a:b\"\nmode = \"worker\"",
                "mode applies only to command callbacks",
            ),
            (
                "plugin = \"/a.so\"\ninterpreter = \"python3\"",
                "interpreter applies only to python callbacks",
            ),
            (
                "python = \"a:b\"\ninterpreter = \"\"",
                "interpreter is empty",
            ),
            (
                "python = \"a/b.py\"",
                "python callback 'a/b.py' must look like",
            ),
            (
                "plugin = \"/a.so\"\ntimeout = 5",
                "a plugin runs in-process and cannot be interrupted",
            ),
            (
                "command = [\"x\"]\ntimeout = 0",
                "line 3, column 11: [callback] timeout must be a number of seconds from 0.001 to \
                 86400 (1 day), not 0",
            ),
            (
                "command = [\"x\"]\ntimeout = -2.5",
                "from 0.001 to 86400 (1 day), not -2.5",
            ),
            (
                "command = [\"x\"]\nmode = \"worker\"\ntimeout = 1e19",
                "line 4, column 11: [callback] timeout must be a number of seconds from 0.001 to \
                 86400 (1 day), not 1e19",
            ),
            (
                "python = \"a:b\"\ntimeout = nan",
                "[callback] timeout must be",
            ),
            (
                "command = [\"x\"]\ntimeout = \"10\"",
                "[callback] timeout: invalid type: string",
            ),
            (
                "command = [\"x\"]\nconcurrency = 0",
                "concurrency must be between 1 and 1024, not 0",
            ),
            (
                "command = [\"x\"]\nqueue_concurrency = 2000",
                "line 3, column 21: [callback] queue_concurrency must be between 1 and 1024, not \
                 2000",
            ),
            (
                "command = [\"x\"]\non_error = \"ignore\"",
                "on_error 'ignore' is unknown",
            ),
            (
                "command = [\"x\"]\nmax_redeliveries = -1",
                "max_redeliveries must be 0 or more",
            ),
            (
                "command = [\"x\"]\nbody = \"text\"",
                "[callback] body 'text' is unknown; use \"json\" or \"bytes\"",
            ),
            (
                "command = [\"x\"]\nreply = \"stderr\"",
                "[callback] reply 'stderr' is unknown",
            ),
            (
                "command = [\"x\"]\nmode = \"worker\"\nreply = \"stdout\"",
                "reply = \"stdout\" applies only to commands in exec mode",
            ),
            (
                "command = [\"x\"]\nretries = 3",
                "[callback]: unknown field `retries`",
            ),
        ];
        for (body, expected) in cases {
            let msg = error(&format!("[callback]\n{body}\n"));
            assert_contains(&msg, &[expected]);
        }
    }
}
