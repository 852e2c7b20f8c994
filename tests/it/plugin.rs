//! The plugin ABI, tested across the real boundary and in fm's own process (no broker): C
//! plugins compiled with `cc` at test time (one per failure mode, plus a well-behaved one that
//! echoes what it receives), the workspace's Rust plugins (built by `cargo build --workspace`,
//! which scripts/test runs), and a Rust plugin that panics.
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Barrier, Mutex};

use fm::callback::Outcome;
use fm::callback::abi;
use fm::callback::plugin::Plugin;
use fm::error::{code, exit_code_of};
use fm::message::{Message, Received};
use serde_json::json;

use crate::util;

const ID: &str = "273ed91d-b8b5-487a-9576-95b9fbdf3eec";

fn fixture(name: &str) -> PathBuf {
    util::repo_root().join("tests/fixtures/plugins").join(name)
}

/// Build fixture `name.c` as a plugin.
fn c_plugin(name: &str, extra: &[&str]) -> PathBuf {
    util::build_c_plugin_with(&fixture(&format!("{name}.c")), extra)
}

/// The folder of the workspace's Rust plugins: next to the `fm` binary, built by
/// `cargo build --workspace` (the plugin crates are not dependencies of this test binary).
fn rust_plugins() -> PathBuf {
    util::plugin_path("noop")
        .parent()
        .expect("the plugin has a folder")
        .to_owned()
}

/// A message like fedora-messaging's test message, delivered on `topic`.
fn received(topic: &str) -> Received {
    let message = Message {
        topic: topic.to_owned(),
        id: Some(ID.to_owned()),
        headers: json!({
            "fedora_messaging_schema": "base.message",
            "fedora_messaging_severity": 30,
            "sent-at": "2018-11-18T10:11:41+00:00",
        })
        .as_object()
        .unwrap()
        .clone(),
        body: json!({"test_key1": "test_value1", "ünï": [1, 2.5]}).into(),
        queue: Some("test_queue".to_owned()),
        priority: Some(4),
    };
    Received {
        // What a Python publisher sends: default separators, ensure_ascii.
        raw_body: message.encoded_body(),
        record: message.record_line(),
        message,
        exchange: "amq.topic".to_owned(),
        redelivered: true,
        reply_to: None,
        correlation_id: None,
        raw: false,
    }
}

/// A message with nothing optional: no id, queue, priority or headers; first delivery.
fn bare(topic: &str) -> Received {
    let message = Message {
        topic: topic.to_owned(),
        id: None,
        headers: Default::default(),
        body: json!({}).into(),
        queue: None,
        priority: None,
    };
    Received {
        raw_body: b"{}".to_vec(),
        record: message.record_line(),
        message,
        exchange: String::new(),
        redelivered: false,
        reply_to: None,
        correlation_id: None,
        raw: false,
    }
}

fn refusal(lib: &Path, config: &str) -> (String, u8) {
    let err = Plugin::load(lib, config).expect_err("the plugin must be refused");
    (format!("{err:#}"), exit_code_of(&err))
}

const REBUILD: &str = "rebuild it against this fm's include/fm_plugin.h";

#[test]
fn the_header_and_the_rust_mirror_agree_on_every_size_and_offset() {
    use std::mem::offset_of;
    let exe = util::build_c(&fixture("layout.c"), &[]);
    let out = Command::new(&exe).output().unwrap();
    let c: Vec<(String, u64)> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let (k, v) = l.split_once(' ').unwrap();
            (k.to_owned(), v.parse().unwrap())
        })
        .collect();
    macro_rules! rust {
        ($t:ident) => {
            (stringify!($t).to_owned(), size_of::<abi::$t>() as u64)
        };
        ($t:ident . $f:ident) => {
            (
                concat!(stringify!($t), ".", stringify!($f)).to_owned(),
                offset_of!(abi::$t, $f) as u64,
            )
        };
        (const $c:ident) => {
            (stringify!($c).to_owned(), abi::$c as u64)
        };
    }
    let rust = vec![
        rust!(fm_bytes),
        rust!(fm_bytes.ptr),
        rust!(fm_bytes.len),
        rust!(fm_error),
        rust!(fm_error.buf),
        rust!(fm_error.cap),
        rust!(fm_host),
        rust!(fm_host.struct_size),
        rust!(fm_host.ctx),
        rust!(fm_host.log),
        rust!(fm_message),
        rust!(fm_message.struct_size),
        rust!(fm_message.flags),
        rust!(fm_message.id),
        rust!(fm_message.topic),
        rust!(fm_message.queue),
        rust!(fm_message.exchange),
        rust!(fm_message.body),
        rust!(fm_message.headers_json),
        rust!(fm_message.json),
        rust!(fm_message.severity),
        rust!(fm_message.priority),
        rust!(fm_message.reply_to),
        rust!(fm_message.correlation_id),
        rust!(fm_message.reply_ctx),
        rust!(fm_message.reply),
        rust!(fm_halt),
        rust!(fm_halt.struct_size),
        rust!(fm_halt.exit_code),
        rust!(fm_halt.requeue),
        rust!(fm_halt.reserved),
        rust!(fm_plugin),
        rust!(fm_plugin.struct_size),
        rust!(fm_plugin.abi_major),
        rust!(fm_plugin.abi_minor),
        rust!(fm_plugin.flags),
        rust!(fm_plugin.name),
        rust!(fm_plugin.version),
        rust!(fm_plugin.init),
        rust!(fm_plugin.handle),
        rust!(fm_plugin.shutdown),
        rust!(const FM_ABI_MAJOR),
        rust!(const FM_ABI_MINOR),
        rust!(const FM_PLUGIN_THREAD_SAFE),
        rust!(const FM_MSG_REDELIVERED),
        rust!(const FM_MSG_RAW_BODY),
        rust!(const FM_REPLY_OK),
        rust!(const FM_REPLY_NO_REPLY_TO),
        rust!(const FM_ACK),
        rust!(const FM_NACK),
        rust!(const FM_DROP),
        rust!(const FM_HALT),
        rust!(const FM_FAIL),
        rust!(const FM_LOG_ERROR),
        rust!(const FM_LOG_WARN),
        rust!(const FM_LOG_INFO),
        rust!(const FM_LOG_DEBUG),
        rust!(const FM_LOG_TRACE),
    ];
    assert_eq!(c, rust);
}

/// Issue 13: ABI 1.1 appended fields to fm_message. A plugin built against the 1.0 header (a
/// copy is kept in tests/fixtures/plugins) loads and answers every message exactly as the same
/// source built against 1.1 does, requests included.
#[test]
fn a_plugin_built_against_abi_1_0_loads_and_behaves_as_before() {
    let header_1_0 = fixture("fm_plugin_1_0.h");
    let text = std::fs::read_to_string(&header_1_0).unwrap();
    assert!(text.contains("#define FM_ABI_MINOR 0") && !text.contains("reply"));
    let old = Plugin::load(
        // -include reads the 1.0 header first, so the source's own #include is a no-op (same
        // include guard); it also fixes the feature macros the source would define.
        &c_plugin(
            "roundtrip",
            &[
                "-D_POSIX_C_SOURCE=200809L",
                "-include",
                header_1_0.to_str().unwrap(),
            ],
        ),
        r#"{"k": 1}"#,
    )
    .unwrap();
    let new = Plugin::load(&c_plugin("roundtrip", &[]), r#"{"k": 1}"#).unwrap();
    let topics = [
        "ack",
        "nack",
        "drop",
        "halt",
        "halt-plain",
        "echo",
        "config",
        "log",
        "fail",
        "unterminated",
    ];
    for topic in topics {
        for mut msg in [received(topic), bare(topic)] {
            msg.reply_to = Some("amq.rabbitmq.reply-to.abc".into());
            msg.correlation_id = Some("c-1".into());
            assert_eq!(old.handle(&msg), new.handle(&msg), "topic {topic}");
        }
    }
    // Only the 1.1 build knows what a reply is.
    let mut request = received("reply");
    request.reply_to = Some("amq.rabbitmq.reply-to.abc".into());
    assert!(
        matches!(old.handle(&request), Outcome::Fail(e) if e.contains("unexpected topic reply"))
    );
    assert!(matches!(new.handle(&request), Outcome::Reply(_)));
}

/// ABI 1.1: a reply given during handle() comes back as Outcome::Reply; a message without
/// reply_to refuses it (FM_REPLY_NO_REPLY_TO); a raw body is flagged, with an empty json.
#[test]
fn a_plugin_replies_to_a_request_through_fm_message_reply() {
    let plugin = Plugin::load(&c_plugin("roundtrip", &[]), "{}").unwrap();
    let mut request = received("reply");
    request.reply_to = Some("amq.rabbitmq.reply-to.abc".into());
    request.correlation_id = Some("c-1".into());
    let json_len = request.record.len();
    assert_eq!(
        plugin.handle(&request),
        Outcome::Reply(
            format!("to=amq.rabbitmq.reply-to.abc|correlation=c-1|raw=0|json={json_len}")
                .into_bytes()
        )
    );
    assert_eq!(plugin.handle(&received("reply")), Outcome::Drop);
    request.raw = true;
    request.correlation_id = None;
    assert_eq!(
        plugin.handle(&request),
        Outcome::Reply(b"to=amq.rabbitmq.reply-to.abc|correlation=|raw=1|json=0".to_vec())
    );
}

#[test]
fn a_plugin_built_for_another_abi_major_is_refused() {
    let lib = c_plugin("bad_abi_major", &[]);
    let shown = lib.display();
    assert_eq!(
        refusal(&lib, "{}"),
        (
            format!(
                "plugin {shown} was built for plugin ABI 2, but this fm speaks ABI 1; {REBUILD}"
            ),
            code::FAILURE
        )
    );
}

#[test]
fn a_table_smaller_than_this_abi_is_refused() {
    let lib = c_plugin("small_struct_size", &[]);
    let shown = lib.display();
    let full = size_of::<abi::fm_plugin>();
    assert_eq!(
        refusal(&lib, "{}"),
        (
            format!(
                "plugin {shown} is not usable: its fm_plugin table says struct_size = 16, \
                 but ABI 1.{} needs at least {full} bytes; {REBUILD}",
                abi::FM_ABI_MINOR
            ),
            code::FAILURE
        )
    );
}

#[test]
fn a_library_without_the_entry_point_is_refused() {
    let lib = c_plugin("missing_symbol", &[]);
    let shown = lib.display();
    assert_eq!(
        refusal(&lib, "{}"),
        (
            format!(
                "plugin {shown} does not export fm_plugin_v1: it is not an fm plugin, or it \
                 hides the symbol (declare it with FM_PLUGIN_EXPORT from include/fm_plugin.h)"
            ),
            code::FAILURE
        )
    );
}

#[test]
fn a_failing_init_is_refused_with_the_plugins_own_words() {
    let lib = c_plugin("init_fails", &[]);
    let shown = lib.display();
    assert_eq!(
        refusal(&lib, r#"{"db": null}"#),
        (
            format!(
                "plugin init-fails ({shown}) failed to initialise (init returned -1): \
                 cannot use consumer_config {{\"db\": null}}: no database configured"
            ),
            code::FAILURE
        )
    );
}

#[test]
fn missing_and_unloadable_files_are_refused() {
    let (text, code) = refusal(Path::new("/nonexistent/libnothing.so"), "{}");
    assert_eq!(
        text,
        "cannot load plugin /nonexistent/libnothing.so cannot be read: no such file or \
         directory; check the plugin path in the configuration"
    );
    assert_eq!(code, code::FAILURE);

    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("libfifo.so");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let (text, code) = refusal(&fifo, "{}");
    assert_eq!(
        text,
        format!(
            "cannot load plugin {} is not a regular file: it is a FIFO (named pipe); check \
             the plugin path in the configuration",
            fifo.display()
        )
    );
    assert_eq!(code, code::FAILURE);

    let dir = tempfile::tempdir().unwrap();
    let not_elf = dir.path().join("libtext.so");
    std::fs::write(&not_elf, "this is not a shared library\n".repeat(10)).unwrap();
    let (text, code) = refusal(&not_elf, "{}");
    let prefix = format!("cannot load plugin {}: ", not_elf.display());
    assert!(text.starts_with(&prefix), "{text}");
    assert!(
        text.contains("invalid ELF header"),
        "dlerror's reason: {text}"
    );
    assert_eq!(code, code::FAILURE);
}

#[test]
fn a_result_that_is_not_an_fm_result_is_a_failure_with_the_plugins_text() {
    let lib = c_plugin("handle_returns_42", &[]);
    let plugin = Plugin::load(&lib, "{}").unwrap();
    assert_eq!(
        plugin.handle(&received("org.example.jam")),
        Outcome::Fail(
            "plugin handle-returns-42 returned 42, which is not FM_ACK, FM_NACK, FM_DROP or \
             FM_HALT: the frobnicator jammed on org.example.jam"
                .into()
        )
    );
}

#[test]
fn every_message_field_reaches_a_c_plugin_intact() {
    let lib = c_plugin("roundtrip", &[]);
    let plugin = Plugin::load(&lib, "{}").unwrap();
    assert_eq!(
        (plugin.name(), plugin.version(), plugin.thread_safe()),
        ("roundtrip", "1.2.3", false)
    );

    let msg = received("echo");
    let body = r#"{"test_key1": "test_value1", "\u00fcn\u00ef": [1, 2.5]}"#;
    assert_eq!(
        msg.raw_body,
        body.as_bytes(),
        "the body goes over as received"
    );
    let headers = r#"{"fedora_messaging_schema":"base.message","fedora_messaging_severity":30,"sent-at":"2018-11-18T10:11:41+00:00"}"#;
    let record = r#"{"body": {"test_key1": "test_value1", "ünï": [1, 2.5]}, "headers": {"fedora_messaging_schema": "base.message", "fedora_messaging_severity": 30, "sent-at": "2018-11-18T10:11:41+00:00"}, "id": "273ed91d-b8b5-487a-9576-95b9fbdf3eec", "priority": 4, "queue": "test_queue", "topic": "echo"}"#;
    assert_eq!(msg.record, record);
    assert_eq!(
        plugin.handle(&msg),
        Outcome::Halt {
            exit_code: 4,
            requeue: true,
            reason: Some(format!(
                "id={ID}|topic=echo|queue=test_queue|exchange=amq.topic|body={body}\
                 |headers={headers}|json={record}|severity=30|priority=4|redelivered=1"
            )),
        },
        "exit code = priority, requeue = redelivered"
    );

    let msg = bare("echo");
    let record =
        r#"{"body": {}, "headers": {}, "id": null, "priority": 0, "queue": null, "topic": "echo"}"#;
    assert_eq!(
        plugin.handle(&msg),
        Outcome::Halt {
            exit_code: 0,
            requeue: false,
            reason: Some(format!(
                "id=|topic=echo|queue=|exchange=|body={{}}|headers={{}}|json={record}\
                 |severity=20|priority=0|redelivered=0"
            )),
        },
        "absent fields are empty, severity defaults to INFO, priority to 0"
    );
}

#[test]
fn results_map_onto_outcomes() {
    let lib = c_plugin("roundtrip", &[]);
    let plugin = Plugin::load(&lib, r#"{"example_key": "é"}"#).unwrap();
    let outcome = |topic: &str| plugin.handle(&received(topic));
    assert_eq!(outcome("ack"), Outcome::Ack);
    assert_eq!(outcome("nack"), Outcome::Nack);
    assert_eq!(outcome("drop"), Outcome::Drop);
    let halt = |exit_code, requeue, reason: Option<&str>| Outcome::Halt {
        exit_code,
        requeue,
        reason: reason.map(str::to_owned),
    };
    assert_eq!(outcome("halt"), halt(7, true, Some("told to stop")));
    assert_eq!(outcome("halt-plain"), halt(0, false, None));
    assert_eq!(
        outcome("config"),
        halt(0, false, Some(r#"{"example_key": "é"}"#)),
        "init got consumer_config, NUL-terminated"
    );
    assert_eq!(
        outcome("fail"),
        Outcome::Fail("plugin roundtrip failed: failed on purpose".into())
    );
    assert_eq!(
        outcome("unterminated"),
        Outcome::Fail(format!(
            "plugin roundtrip failed: {}",
            "x".repeat(fm::callback::plugin::ERROR_CAP)
        )),
        "an error text without its NUL is read up to the buffer's end, not beyond"
    );
    assert_eq!(
        outcome("what"),
        Outcome::Fail("plugin roundtrip failed: unexpected topic what".into())
    );
}

/// Run `f` with a tracing subscriber that records every event; return what it wrote.
fn capture_logs<T>(f: impl FnOnce() -> T) -> (T, String) {
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf::default();
    let writer = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .without_time()
        .with_max_level(tracing::Level::TRACE)
        .finish();
    let out = tracing::subscriber::with_default(subscriber, f);
    let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    (out, text)
}

#[test]
fn plugins_log_through_fm_with_their_name_and_are_shut_down_exactly_once() {
    let lib = c_plugin("roundtrip", &[]);
    let (outcomes, logs) = capture_logs(|| {
        let plugin = Plugin::load(&lib, "{}").unwrap();
        let logged = plugin.handle(&received("log"));
        plugin.shutdown();
        plugin.shutdown();
        let after = plugin.handle(&received("ack"));
        drop(plugin);
        (logged, after)
    });
    assert_eq!(outcomes.0, Outcome::Ack);
    assert_eq!(
        outcomes.1,
        Outcome::Fail("plugin roundtrip was called after it was shut down".into())
    );
    let lines: Vec<&str> = logs.lines().filter(|l| l.contains("fm::plugin")).collect();
    assert_eq!(
        lines,
        [
            "ERROR fm::plugin: level 0 plugin=\"roundtrip\"",
            "ERROR fm::plugin: level 1 plugin=\"roundtrip\"",
            " WARN fm::plugin: level 2 plugin=\"roundtrip\"",
            " INFO fm::plugin: level 3 plugin=\"roundtrip\"",
            "DEBUG fm::plugin: level 4 plugin=\"roundtrip\"",
            "TRACE fm::plugin: level 5 plugin=\"roundtrip\"",
            "TRACE fm::plugin: level 6 plugin=\"roundtrip\"",
            " INFO fm::plugin: shutdown plugin=\"roundtrip\"",
        ],
        "levels map one to one, out-of-range ones clamp; shutdown ran once\n{logs}"
    );
}

/// Run 4 "slow" messages at once through `plugin`; answer the most it saw overlap.
fn max_overlap(plugin: Plugin) -> i32 {
    let plugin = Arc::new(plugin);
    let start = Arc::new(Barrier::new(4));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (plugin, start) = (Arc::clone(&plugin), Arc::clone(&start));
            std::thread::spawn(move || {
                start.wait();
                plugin.handle(&received("slow"))
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), Outcome::Ack);
    }
    match plugin.handle(&received("max")) {
        Outcome::Halt { exit_code, .. } => exit_code,
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn a_plugin_that_is_not_thread_safe_is_never_called_concurrently() {
    let lib = c_plugin("roundtrip", &[]);
    let plugin = Plugin::load(&lib, "{}").unwrap();
    assert!(!plugin.thread_safe());
    assert_eq!(max_overlap(plugin), 1);
}

#[test]
fn a_thread_safe_plugin_is_called_concurrently() {
    let lib = c_plugin("roundtrip", &["-DROUNDTRIP_FLAGS=FM_PLUGIN_THREAD_SAFE"]);
    let plugin = Plugin::load(&lib, "{}").unwrap();
    assert!(plugin.thread_safe());
    assert!(
        max_overlap(plugin) > 1,
        "4 calls sleeping 50 ms each overlapped"
    );
}

#[test]
fn the_noop_plugin_acks_everything() {
    let lib = rust_plugins().join("libfm_noop.so");
    let plugin = Plugin::load(&lib, "{}").unwrap();
    assert_eq!(
        (plugin.name(), plugin.version(), plugin.thread_safe()),
        ("noop", "0.1.0", true)
    );
    assert_eq!(plugin.handle(&received("any.topic")), Outcome::Ack);
    assert_eq!(plugin.handle(&bare("")), Outcome::Ack);
}

#[test]
fn a_panicking_rust_plugin_fails_instead_of_aborting() {
    let deps = rust_plugins();
    let dir = tempfile::tempdir().unwrap();
    let lib = dir.path().join("libpanics.so");
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let status = Command::new(rustc)
        .current_dir(util::repo_root())
        .args([
            "--edition",
            "2024",
            "--crate-type",
            "cdylib",
            "--crate-name",
            "panics",
        ])
        .arg("-L")
        .arg(format!("dependency={}", deps.join("deps").display()))
        .arg("--extern")
        .arg(format!(
            "fm_plugin={}",
            deps.join("libfm_plugin.rlib").display()
        ))
        .arg("-o")
        .arg(&lib)
        .arg(fixture("panics.rs"))
        .status()
        .expect("running rustc");
    assert!(status.success(), "rustc failed on panics.rs");

    let (text, code) = refusal(&lib, r#"{"x": "panic in init"}"#);
    assert_eq!(
        (text.as_str(), code),
        (
            &*format!(
                "plugin panics ({}) failed to initialise (init returned 1): init panicked: \
                 init panicked on purpose",
                lib.display()
            ),
            code::FAILURE
        )
    );

    let plugin = Plugin::load(&lib, "{}").unwrap();
    assert_eq!(plugin.handle(&received("fine")), Outcome::Ack);
    assert_eq!(
        plugin.handle(&received("panic")),
        Outcome::Fail(format!(
            "plugin panics failed: the plugin panicked: handle panicked on purpose for {ID}"
        ))
    );
    assert_eq!(
        plugin.handle(&received("fine")),
        Outcome::Fail(
            "plugin panics failed: the plugin panicked earlier and is not usable any more".into()
        ),
        "a plugin that panicked stays failed"
    );
}

const PRINTED_START: &str = "<<<printed>>>\n";
const PRINTED_END: &str = "<<<end>>>\n";

/// Messages for the printers: fedora-messaging's test message, and one with no id or
/// headers and a body that exercises sorting, nesting, escapes and float formatting.
fn printer_messages() -> Vec<Received> {
    let mut first = received("test_topic");
    first.message.headers = json!({
        "fedora_messaging_schema": "base.message",
        "fedora_messaging_severity": 20,
        "sent-at": "2018-11-18T10:11:41+00:00",
    })
    .as_object()
    .unwrap()
    .clone();
    first.message.body = json!({"test_key1": "test_value1"}).into();
    first.record = first.message.record_line();
    let mut second = bare("org.fedoraproject.prod.bodhi.update.comment");
    second.message.body = json!({
        "b": [1, {}, [], 2.5, 1e16, null, true],
        "a": {"z": "é😀\u{7f}\n\"\\/", "ä": -0.0, "n": {"y": 1e-05, "x": -12}},
    })
    .into();
    second.record = second.message.record_line();
    vec![first, second]
}

/// What fedora-messaging's `example:printer` prints for [`printer_messages`] (CPython 3).
const PYTHON_PRINTS: &str = concat!(
    "Id: 273ed91d-b8b5-487a-9576-95b9fbdf3eec\n",
    "Topic: test_topic\n",
    "Headers: {\n",
    "    \"fedora_messaging_schema\": \"base.message\",\n",
    "    \"fedora_messaging_severity\": 20,\n",
    "    \"sent-at\": \"2018-11-18T10:11:41+00:00\"\n",
    "}\n",
    "Body: {\n",
    "    \"test_key1\": \"test_value1\"\n",
    "}\n",
    "Id: None\n",
    "Topic: org.fedoraproject.prod.bodhi.update.comment\n",
    "Headers: {}\n",
    "Body: {\n",
    "    \"a\": {\n",
    "        \"n\": {\n",
    "            \"x\": -12,\n",
    "            \"y\": 1e-05\n",
    "        },\n",
    "        \"z\": \"\\u00e9\\ud83d\\ude00\\u007f\\n\\\"\\\\/\",\n",
    "        \"\\u00e4\": -0.0\n",
    "    },\n",
    "    \"b\": [\n",
    "        1,\n",
    "        {},\n",
    "        [],\n",
    "        2.5,\n",
    "        1e+16,\n",
    "        null,\n",
    "        true\n",
    "    ]\n",
    "}\n",
);

/// Child half of `the_printers_print_what_fedora_messagings_printer_prints`: load the
/// plugin named by FM_TEST_PRINTER and print [`printer_messages`] between markers. Run in a
/// child process so the plugin's standard output can be captured.
#[test]
#[ignore = "run as a child process by the_printers_print_what_fedora_messagings_printer_prints"]
fn printer_child() {
    let lib = std::env::var_os("FM_TEST_PRINTER").expect("FM_TEST_PRINTER names the plugin");
    let plugin = Plugin::load(Path::new(&lib), "{}").unwrap();
    print!("{PRINTED_START}");
    for msg in printer_messages() {
        assert_eq!(plugin.handle(&msg), Outcome::Ack);
    }
    print!("{PRINTED_END}");
}

fn printed_by(lib: &Path) -> String {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "plugin::printer_child"])
        .args(["--nocapture", "--test-threads=1"])
        .env("FM_TEST_PRINTER", lib)
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "printer child failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, rest) = stdout.split_once(PRINTED_START).expect("start marker");
    let (printed, _) = rest.split_once(PRINTED_END).expect("end marker");
    printed.to_owned()
}

#[test]
fn the_printers_print_what_fedora_messagings_printer_prints() {
    let rust = rust_plugins().join("libfm_printer.so");
    assert_eq!(printed_by(&rust), PYTHON_PRINTS, "the Rust printer");
    let c = util::build_c_plugin(&util::repo_root().join("plugins/printer-c/printer.c"));
    assert_eq!(printed_by(&c), PYTHON_PRINTS, "the C printer");
}
