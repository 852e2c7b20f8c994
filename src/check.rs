//! `fm check`: will `fm consume` start with this configuration? Operators run it before
//! `systemctl restart fm-consumer@NAME`, so a typo or a missing queue is found while the old
//! consumer still runs.
//!
//! It does what `fm consume` does at start, in the same order, without consuming or changing
//! anything on the broker: the configuration is already loaded (errors exit 2 before this
//! module runs); the callback is checked (a plugin is loaded, initialised and shut down; a
//! command's program and a Python callback's interpreter and module must be found); the
//! broker is connected to; every queue is checked with a passive declare (and, when it exists
//! and `passive_declares` is off, with a declare of the configured settings, which the broker
//! answers without changing anything when they match, and refuses with 406 when they do not);
//! every exchange a binding uses is checked with a passive declare. Every problem is reported,
//! and the exit status is the one `fm consume` would exit with for the first of them (see
//! `fm(1)`, EXIT STATUS), 0 when there is none.

use std::collections::BTreeSet;
use std::fmt::Display;

use lapin::options::{ExchangeDeclareOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ExchangeKind};

use crate::amqp::{Connector, errors};
use crate::callback::exec::find_program;
use crate::callback::plugin::Plugin;
use crate::callback::python::check_callback_file;
use crate::config::{CallbackKind, CommandMode, Config};
use crate::error::{code, exit_code_of};

/// The report: lines printed as they come, and the exit code of the first problem.
struct Report {
    problems: usize,
    code: u8,
}

impl Report {
    fn ok(&self, what: impl Display) {
        println!("ok    {what}");
    }

    fn note(&self, what: impl Display) {
        println!("note  {what}");
    }

    fn fail(&mut self, exit: u8, what: impl Display) {
        println!("FAIL  {what} (fm consume would exit with status {exit})");
        if self.problems == 0 {
            self.code = exit;
        }
        self.problems += 1;
    }
}

/// Check `config` as `fm consume` would use it; print the report on stdout and return the exit
/// status.
pub async fn run(config: &Config) -> anyhow::Result<u8> {
    let mut report = Report {
        problems: 0,
        code: code::OK,
    };
    let source = config.path.as_ref().map_or_else(
        || "the defaults (no file)".to_owned(),
        |p| p.display().to_string(),
    );
    report.ok(format!(
        "configuration {source}: {} queue(s), {} binding(s)",
        config.queues.len(),
        config.bindings.len()
    ));

    check_callback(config, &source, &mut report).await;

    match Connector::new(config) {
        Err(err) => report.fail(exit_code_of(&err), format!("broker settings: {err:#}")),
        Ok(connector) => match connector.connect().await {
            Err(err) => report.fail(exit_code_of(&err), format!("{err:#}")),
            Ok(connected) => {
                report.ok(format!(
                    "broker {}: connected (vhost '{}')",
                    connected.url, connected.vhost
                ));
                check_queues(config, &connected.connection, &connected.vhost, &mut report).await;
                check_exchanges(config, &connected.connection, &connected.vhost, &mut report).await;
                let _ = connected
                    .connection
                    .close(200, "fm check done".into())
                    .await;
            }
        },
    }

    if report.problems == 0 {
        println!("fm check: no problem found; fm consume should start");
    } else {
        println!(
            "fm check: {} problem(s); fm consume would exit with status {}",
            report.problems, report.code
        );
    }
    Ok(report.code)
}

async fn check_callback(config: &Config, source: &str, report: &mut Report) {
    match &config.callback.kind {
        None => report.fail(
            code::USAGE,
            format!(
                "callback: none configured in {source} (set callback in the configuration or \
                 pass --callback)"
            ),
        ),
        Some(CallbackKind::Plugin { path }) => {
            let (path, json) = (path.clone(), config.consumer_config_json());
            let shown = path.display().to_string();
            let loaded = tokio::task::spawn_blocking(move || {
                let plugin = Plugin::load(&path, &json)?;
                let about = format!("{} {}", plugin.name(), plugin.version());
                let thread_safe = plugin.thread_safe();
                plugin.shutdown();
                anyhow::Ok((about, thread_safe))
            })
            .await;
            match loaded {
                Ok(Ok((about, thread_safe))) => {
                    if config.callback.concurrency > 1 && !thread_safe {
                        report.fail(
                            code::USAGE,
                            format!(
                                "callback: plugin {about} ({shown}) is not thread-safe, so it \
                                 cannot run with [callback] concurrency = {}",
                                config.callback.concurrency
                            ),
                        );
                    } else {
                        report.ok(format!(
                            "callback: plugin {about} ({shown}) loaded, initialised and shut down"
                        ));
                    }
                }
                Ok(Err(err)) => report.fail(exit_code_of(&err), format!("callback: {err:#}")),
                Err(join) => report.fail(
                    code::FAILURE,
                    format!("callback: loading plugin {shown} crashed: {join}"),
                ),
            }
        }
        Some(CallbackKind::Command { argv, mode }) => {
            let mode = match mode {
                CommandMode::Exec => "exec",
                CommandMode::Worker => "worker",
            };
            let program = argv.first().map(String::as_str).unwrap_or_default();
            match find_program(program) {
                Ok(path) => report.ok(format!(
                    "callback: command ({mode}) {} found at {}",
                    argv.join(" "),
                    path.display()
                )),
                Err(e) => report.fail(
                    code::FAILURE,
                    format!("callback: command ({mode}): cannot run '{program}': {e}"),
                ),
            }
        }
        Some(CallbackKind::Python {
            target,
            interpreter,
        }) => check_python(target, &interpreter.to_string_lossy(), report).await,
    }
}

/// The interpreter must exist and find the callback's module (without running the callback:
/// `importlib.util.find_spec` imports only the parent packages).
async fn check_python(target: &str, interpreter: &str, report: &mut Report) {
    let python = match find_program(interpreter) {
        Ok(p) => p,
        Err(e) => {
            report.fail(
                code::FAILURE,
                format!("callback: python {target}: cannot run interpreter '{interpreter}': {e}"),
            );
            return;
        }
    };
    let module = target.rsplit_once(':').map_or(target, |(m, _)| m);
    if module.ends_with(".py") {
        // --callback-file: the file is executed at start, not imported.
        match check_callback_file(target) {
            Ok(()) => report.ok(format!("callback: python file {module} exists")),
            Err(e) => report.fail(code::USAGE, format!("callback: python {target}: {e:#}")),
        }
        return;
    }
    let probe = "import importlib.util, sys\n\
                 for name in sys.argv[1:]:\n\
                 \x20   try:\n\
                 \x20       found = importlib.util.find_spec(name) is not None\n\
                 \x20   except Exception:\n\
                 \x20       found = False\n\
                 \x20   if not found:\n\
                 \x20       print(name)\n\
                 \x20       sys.exit(3)\n";
    let out = tokio::process::Command::new(&python)
        .args(["-c", probe, module])
        .stdin(std::process::Stdio::null())
        .output()
        .await;
    match out {
        Ok(out) if out.status.success() => report.ok(format!(
            "callback: python {target}: module '{module}' found by {}",
            python.display()
        )),
        Ok(out) => {
            let missing = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            let missing = if missing.is_empty() {
                module
            } else {
                missing.as_str()
            };
            report.fail(
                code::FAILURE,
                format!(
                    "callback: python {target}: {} cannot import module '{missing}' (is it \
                     installed for that interpreter? [callback] interpreter can name a \
                     virtualenv's python)",
                    python.display()
                ),
            );
        }
        Err(e) => report.fail(
            code::FAILURE,
            format!(
                "callback: python {target}: cannot run {}: {e}",
                python.display()
            ),
        ),
    }
}

async fn check_queues(config: &Config, conn: &Connection, vhost: &str, report: &mut Report) {
    for (name, queue) in &config.queues {
        if name.is_empty() {
            report.ok("queue \"\": server-named; the broker creates it when fm consume starts");
            continue;
        }
        // A refused declare closes the channel: one channel per check.
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let found = match conn.create_channel().await {
            Ok(ch) => ch
                .queue_declare(name.as_str().into(), passive, FieldTable::default())
                .await
                .map(|q| (ch, q)),
            Err(e) => Err(e),
        };
        let (channel, declared) = match found {
            Ok(found) => found,
            Err(e) => {
                let err = errors::describe(e);
                match errors::reply_code(&err) {
                    Some(errors::NOT_FOUND) if config.passive_declares => report.fail(
                        code::BAD_DECLARATION,
                        format!(
                            "queue '{name}': does not exist in vhost '{vhost}', and \
                             passive_declares is on, so fm will not create it"
                        ),
                    ),
                    Some(errors::NOT_FOUND) => report.note(format!(
                        "queue '{name}': does not exist yet in vhost '{vhost}'; fm consume \
                         will declare it"
                    )),
                    Some(errors::ACCESS_REFUSED) => report.fail(
                        errors::declaration_exit(&err),
                        format!("queue '{name}': access refused in vhost '{vhost}': {err:#}"),
                    ),
                    Some(errors::RESOURCE_LOCKED) => report.fail(
                        errors::declaration_exit(&err),
                        format!(
                            "queue '{name}': exclusive to another connection (is another \
                             consumer running with this configuration?): {err:#}"
                        ),
                    ),
                    _ => report.fail(
                        errors::declaration_exit(&err),
                        format!("queue '{name}': {err:#}"),
                    ),
                }
                continue;
            }
        };
        let about = format!(
            "{} message(s) ready, {} consumer(s)",
            declared.message_count(),
            declared.consumer_count()
        );
        if config.passive_declares {
            report.ok(format!("queue '{name}': exists ({about})"));
            let _ = channel.close(200, "checked".into()).await;
            continue;
        }
        // It exists: declaring it with the configured settings changes nothing when they match
        // and is refused (406 PRECONDITION_FAILED) when they do not, as fm consume would be.
        let options = QueueDeclareOptions {
            passive: false,
            durable: queue.durable,
            exclusive: queue.exclusive,
            auto_delete: queue.auto_delete,
            nowait: false,
        };
        let args = match crate::amqp::arguments(&queue.arguments) {
            Ok(a) => a,
            Err(e) => {
                report.fail(code::USAGE, format!("queue '{name}': {e:#}"));
                continue;
            }
        };
        match channel
            .queue_declare(name.as_str().into(), options, args)
            .await
        {
            Ok(_) => {
                report.ok(format!(
                    "queue '{name}': exists with the configured settings ({about})"
                ));
                let _ = channel.close(200, "checked".into()).await;
            }
            Err(e) => {
                let err = errors::describe(e);
                report.fail(
                    errors::declaration_exit(&err),
                    format!(
                        "queue '{name}': exists in vhost '{vhost}' with other settings than the \
                         configuration's (durable = {}, auto_delete = {}, exclusive = {}, \
                         arguments): {err:#}",
                        queue.durable, queue.auto_delete, queue.exclusive
                    ),
                );
            }
        }
    }
}

async fn check_exchanges(config: &Config, conn: &Connection, vhost: &str, report: &mut Report) {
    let used: BTreeSet<&str> = config
        .bindings
        .iter()
        .map(|b| b.exchange.as_str())
        .collect();
    for exchange in used {
        let queues: Vec<&str> = config
            .bindings
            .iter()
            .filter(|b| b.exchange == exchange)
            .map(|b| b.queue.as_str())
            .collect();
        let passive = ExchangeDeclareOptions {
            passive: true,
            ..ExchangeDeclareOptions::default()
        };
        let result = match conn.create_channel().await {
            Ok(ch) => {
                let r = ch
                    .exchange_declare(
                        exchange.into(),
                        ExchangeKind::Topic,
                        passive,
                        FieldTable::default(),
                    )
                    .await;
                if r.is_ok() {
                    let _ = ch.close(200, "checked".into()).await;
                }
                r
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => report.ok(format!(
                "exchange '{exchange}': exists (bound to queue(s) {})",
                quoted(&queues)
            )),
            Err(e) => {
                let err = errors::describe(e);
                match errors::reply_code(&err) {
                    Some(errors::NOT_FOUND) => report.fail(
                        code::BAD_DECLARATION,
                        format!(
                            "exchange '{exchange}': does not exist in vhost '{vhost}', so \
                             binding queue(s) {} to it would fail (fm never declares exchanges)",
                            quoted(&queues)
                        ),
                    ),
                    Some(errors::ACCESS_REFUSED) => report.fail(
                        errors::declaration_exit(&err),
                        format!("exchange '{exchange}': access refused: {err:#}"),
                    ),
                    _ => report.fail(
                        errors::declaration_exit(&err),
                        format!("exchange '{exchange}': {err:#}"),
                    ),
                }
            }
        }
    }
}

fn quoted(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("'{n}'"))
        .collect::<Vec<_>>()
        .join(", ")
}
