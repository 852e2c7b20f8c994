# SPDX-License-Identifier: MIT
"""fm's Python worker shim: runs a fedora-messaging callback, unchanged, for fm.

fm embeds this file and starts it once per concurrency slot, as
``python3 -c <bootstrap> package.module:attribute`` with the source in $FM_SHIM_SOURCE, so it
works wherever fm is installed and leaves nothing on disk. What it does for each message is
what ``fedora-messaging consume`` does (``fedora_messaging/twisted/consumer.py``):

- the callback is imported once; a class is instantiated once, without arguments;
- the message is rebuilt with fedora-messaging's own ``get_message`` (so it is an instance of
  the schema class its headers name, when that schema package is installed) and its ``queue``
  is set; without fedora-messaging, it is a plain object with the same attributes;
- ``fedora_messaging.config.conf`` holds the configuration file's fedora-messaging keys, and
  ``conf["consumer_config"]`` fm's ``[consumer_config]`` table;
- ``Nack``, ``Drop`` and ``HaltConsumer`` map to nack, drop and halt; any other exception is a
  failure (its traceback is logged), which fm handles per ``[callback] on_error``; a
  coroutine function is run to completion on an event loop kept for the worker's life;
- a return value other than ``None`` is the reply to a request (fm): ``bytes`` are sent as
  they are (they must be UTF-8), anything else as ``json.dumps(value)``; a value json cannot
  encode is a failure;
- a message whose body is not a JSON object, handed over under ``[callback] body = "bytes"``
  (its record has ``"raw_body": true``), is built without schema validation: its ``body`` is
  the text fm received.

The protocol runs over fd 0, a Unix socket shared with fm (both ways, one JSON object per
line): first ``{"ready": true}`` (or ``{"ready": false, "error": ..., "exit_code": 1 or 2}``
when the callback cannot be loaded), then one answer per message line:
``{"result": "ack"|"nack"|"drop"|"halt"|"fail", "exit_code": N, "requeue": bool,
"error": "...", "reply_text": "..."}``. fd 0 is then replaced by /dev/null for the callback. stdout is fm's own
stdout, so what a callback prints reaches it unchanged (flushed after every message); stderr
carries log records, each line prefixed by its level name, which fm logs at that level.
"""

import sys

# `python3 -c` puts the working directory first on sys.path; fedora-messaging's console script
# does not, and a stray json.py there must not shadow the standard library.
if sys.path and sys.path[0] in ("", "."):
    del sys.path[0]

import asyncio  # noqa: E402
import copy  # noqa: E402
import importlib  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import traceback  # noqa: E402
import types  # noqa: E402

_log = logging.getLogger("fm_shim")


class _LevelPrefix(logging.Formatter):
    """Prefix every line of a record (tracebacks included) with its level name."""

    def format(self, record):
        text = super().format(record)
        return "\n".join(record.levelname + " " + line for line in text.splitlines() or [""])


def _setup_logging():
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LevelPrefix("%(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    levels = json.loads(os.environ.get("FM_LOG_LEVELS") or "{}")
    root.setLevel(levels.get("root", "WARNING"))
    for name, level in levels.get("loggers", {}).items():
        logging.getLogger(name).setLevel(level)
    _log.setLevel(logging.INFO)
    logging.captureWarnings(True)


def _load_toml(path):
    try:
        import tomllib
    except ImportError:
        try:
            import tomli as tomllib
        except ImportError:
            _log.warning("neither tomllib nor tomli can be imported: only consumer_config is set")
            return {}
    with open(path, "rb") as f:
        return tomllib.load(f)


def _setup_conf(target, consumer_config):
    """Fill fedora_messaging.config.conf as fedora-messaging's CLI would have."""
    try:
        from fedora_messaging import config
    except ImportError:
        return
    values = copy.deepcopy(config.DEFAULTS)
    path = os.environ.get("FM_CONFIG_FILE")
    if path:
        try:
            for key, value in _load_toml(path).items():
                if key.lower() in values:
                    values[key.lower()] = value
        except Exception as e:  # fm already validated the file; this is a best effort
            _log.warning("cannot read %s for fedora_messaging.config.conf: %s", path, e)
    # fm's extensions mean nothing to fedora-messaging: give it values of its own shapes.
    values["callback"] = target
    if isinstance(values.get("amqp_url"), list):
        values["amqp_url"] = values["amqp_url"][0] if values["amqp_url"] else ""
    values["consumer_config"] = consumer_config
    # Mark it loaded first: LazyConfig would otherwise read $FEDORA_MESSAGING_CONF, which may
    # hold fm-only keys fedora-messaging refuses.
    config.conf.loaded = True
    config.conf.update(values)


class _NotReady(Exception):
    def __init__(self, error, exit_code=1):
        super().__init__(error)
        self.error = error
        self.exit_code = exit_code


def _callback_from_file(target):
    """fedora-messaging's _callback_from_filesystem (its consume --callback-file)."""
    file_path, callable_name = target.strip().rsplit(":", 1)
    namespace = {}
    try:
        with open(file_path, "rb") as fd:
            code = fd.read()
    except OSError as e:
        raise _NotReady("An IOError occurred: %s" % e)
    try:
        exec(compile(code, file_path, "exec"), namespace)
    except Exception as e:
        raise _NotReady("The %s file raised the following exception: %s" % (file_path, e))
    try:
        return namespace[callable_name]
    except KeyError:
        raise _NotReady(
            "The '%s' object was not found in the '%s' file." % (callable_name, file_path)
        )


def _load_callback(target):
    """fedora-messaging's _callback_from_python_path and api._check_callback."""
    if target.strip().rsplit(":", 1)[0].endswith(".py"):
        return _check_callback(_callback_from_file(target), target)
    try:
        module_name, attribute = target.strip().split(":")
    except ValueError:
        raise _NotReady(
            "Unable to parse the callback path (%s); the expected format is "
            '"my_package.module:callable_object"' % target
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise _NotReady("Failed to import the callback module (%s)" % e)
    except Exception:
        raise _NotReady(
            "importing %s raised an exception:\n%s" % (module_name, traceback.format_exc())
        )
    try:
        callback = getattr(module, attribute)
    except AttributeError as e:
        raise _NotReady(
            "Unable to import %s (%s); is the package installed? The python path should be in "
            'the format "my_package.module:callable_object"' % (target, e)
        )
    return _check_callback(callback, target)


def _check_callback(callback, target):
    """fedora-messaging's api._check_callback: a class is instantiated once."""
    if inspect.isclass(callback):
        try:
            callback = callback()
        except ValueError as e:
            raise _NotReady(str(e), exit_code=2)
        except Exception:
            raise _NotReady(
                "instantiating %s raised an exception:\n%s" % (target, traceback.format_exc())
            )
        if not callable(callback):
            raise _NotReady(
                "Callback must be a class that implements __call__ or a function.", exit_code=2
            )
    elif not callable(callback):
        raise _NotReady(
            "Callback must be a class that implements __call__ or a function.", exit_code=2
        )
    return callback


def _is_coro(func):
    """fedora_messaging.twisted.consumer.is_coro."""
    return asyncio.iscoroutinefunction(func) or (
        callable(func) and asyncio.iscoroutinefunction(func.__call__)
    )


class PlainMessage:
    """The message when fedora-messaging cannot be imported: the attributes callbacks use."""

    def __init__(self, record):
        self.topic = record["topic"]
        self.body = record["body"]
        self.id = record.get("id")
        self.queue = record.get("queue")
        self._headers = record.get("headers") or {}
        self.severity = self._headers.get("fedora_messaging_severity", 20)
        self.priority = record.get("priority") or 0

    def __str__(self):
        return "Id: {i}\nTopic: {t}\nHeaders: {h}\nBody: {b}".format(
            i=self.id,
            t=self.topic,
            h=json.dumps(self._headers, sort_keys=True, indent=4, separators=(",", ": ")),
            b=json.dumps(self.body, sort_keys=True, indent=4, separators=(",", ": ")),
        )


class _Invalid(Exception):
    """The message does not pass its schema class's validation."""


def _cache_validators(module):
    """Make ``module`` (fedora_messaging.message) check each schema once, not per message.

    ``jsonschema.validate`` checks the schema itself against its metaschema on every call: in
    fedora-messaging 3.9 with jsonschema 4 that is 0.4 ms of the 0.45 ms ``get_message`` takes.
    Message schemas are class attributes that do not change, so the module gets a
    ``jsonschema`` whose ``validate`` keeps one validator per schema (checked once, rebuilt if
    the schema was changed in place) and raises the same errors. The callback's own
    ``jsonschema`` is left alone.
    """
    try:
        import jsonschema
        from jsonschema import exceptions, validators
    except ImportError:
        return
    original = jsonschema.validate
    cache = {}

    def validate(instance, schema, cls=None, *args, **kwargs):
        if cls is not None or args or kwargs:
            return original(instance, schema, cls, *args, **kwargs)
        entry = cache.get(id(schema))
        if entry is None or entry[1] != schema:
            try:
                snapshot = copy.deepcopy(schema)
            except Exception:
                return original(instance, schema)
            kind = validators.validator_for(schema)
            kind.check_schema(schema)
            if len(cache) >= 256:
                cache.clear()
            # The schema itself is kept too, so its id cannot be reused by another object.
            entry = cache[id(schema)] = (schema, snapshot, kind(schema))
        error = exceptions.best_match(entry[2].iter_errors(instance))
        if error is not None:
            raise error

    proxy = types.ModuleType(jsonschema.__name__)
    proxy.__dict__.update(jsonschema.__dict__)
    proxy.validate = validate
    module.jsonschema = proxy


def _message_builder():
    """A function turning a record line's object into the message a callback receives."""
    try:
        import pika
        from fedora_messaging import exceptions
        from fedora_messaging import message as message_module
        from fedora_messaging.message import get_message
    except ImportError:
        return PlainMessage
    _cache_validators(message_module)

    def build(record):
        if record.get("raw_body"):
            # Not a fedora-messaging message: no schema to find or check, the body is text.
            message = message_module.Message(
                body=record["body"],
                headers=record.get("headers") or {},
                topic=record["topic"],
                properties=pika.BasicProperties(
                    headers=record.get("headers") or {},
                    message_id=record.get("id"),
                    priority=record.get("priority"),
                ),
            )
            message.body = record["body"]  # Message() turns an empty body into {}
            if record.get("id"):
                message.id = record["id"]
            message.queue = record.get("queue")
            return message
        # Rebuild the AMQP properties the message came with, and let fedora-messaging decode it
        # exactly as its consumer does: the same class, headers and attributes.
        properties = pika.BasicProperties(
            content_type="application/json",
            content_encoding="utf-8",
            headers=record.get("headers") or {},
            message_id=record.get("id"),
            priority=record.get("priority"),
        )
        body = json.dumps(record["body"]).encode("utf-8")
        try:
            message = get_message(record["topic"], properties, body)
        except exceptions.ValidationError as e:
            raise _Invalid(str(e))
        message.queue = record.get("queue")
        return message

    return build


def _exception_kind(error):
    """nack, drop or halt for fedora-messaging's consumer exceptions, else None.

    Matched by class name too, so callbacks written against fedora-messaging work when the
    exceptions come from a copy of it fm's interpreter does not share.
    """
    names = {cls.__name__ for cls in type(error).__mro__}
    for name, kind in (("HaltConsumer", "halt"), ("Drop", "drop"), ("Nack", "nack")):
        if name in names:
            return kind
    return None


def _call(callback, message, loop):
    if _is_coro(callback):
        return loop.run_until_complete(callback(message))
    return callback(message)


def _answer_for(callback, record, build, loop):
    try:
        message = build(record)
    except _Invalid as e:
        _log.warning("Message id %s did not pass validation; ignoring message", record.get("id"))
        return {"result": "drop", "error": "the message did not pass validation: %s" % e}
    try:
        result = _call(callback, message, loop)
    except BaseException as e:  # noqa: B902 - every failure must reach fm, SystemExit too
        kind = _exception_kind(e)
        if kind == "halt":
            exit_code = getattr(e, "exit_code", 0)
            reason = getattr(e, "reason", None)
            return {
                "result": "halt",
                "exit_code": exit_code if isinstance(exit_code, int) else 1,
                "requeue": bool(getattr(e, "requeue", False)),
                "error": None if reason is None else str(reason),
            }
        if kind is not None:
            return {"result": kind}
        _log.exception("Received unexpected exception from consumer callback")
        return {"result": "fail", "error": "".join(traceback.format_exception_only(type(e), e)).strip()}
    if result is None:
        return {"result": "ack"}
    return _reply(result)


def _reply(result):
    """The ack answer carrying a callback's return value as the reply."""
    try:
        if isinstance(result, (bytes, bytearray)):
            text = bytes(result).decode("utf-8")
        else:
            text = json.dumps(result)
    except (TypeError, ValueError) as e:
        return {
            "result": "fail",
            "error": "the callback returned a value fm cannot send as a reply "
            "(bytes must be UTF-8, anything else JSON-serialisable): %s" % e,
        }
    return {"result": "ack", "reply_text": text}


def main():
    target = sys.argv[1]
    # The protocol keeps its own descriptor; the callback's stdin becomes /dev/null.
    proto = os.dup(0)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    reader = os.fdopen(proto, "rb")
    writer = os.fdopen(os.dup(proto), "wb")

    def send(obj):
        writer.write(json.dumps(obj).encode("utf-8") + b"\n")
        writer.flush()

    _setup_logging()
    try:
        consumer_config = json.loads(os.environ.get("FM_CONSUMER_CONFIG") or "{}")
        _setup_conf(target, consumer_config)
        callback = _load_callback(target)
        build = _message_builder()
    except _NotReady as e:
        send({"ready": False, "error": e.error, "exit_code": e.exit_code})
        return 0
    except Exception:
        send({"ready": False, "error": traceback.format_exc(), "exit_code": 1})
        return 0
    loop = asyncio.new_event_loop()
    send({"ready": True})

    for line in reader:
        try:
            record = json.loads(line)
        except ValueError as e:
            send({"result": "fail", "error": "fm sent a line that is not JSON: %s" % e})
            continue
        answer = _answer_for(callback, record, build, loop)
        try:
            sys.stdout.flush()
        except Exception as e:
            _log.warning("cannot flush the callback's standard output: %s", e)
        send(answer)
    # End of file: fm is stopping.
    loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
