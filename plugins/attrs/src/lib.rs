//! `attrs`: an attribute store served over RPC, the example of fm's request/reply (issue 13).
//!
//! Each request is a JSON object naming an operation; the reply is a JSON object with `"ok"`:
//!
//! | request | reply |
//! |---|---|
//! | `{"op": "set", "key": K, "value": V}` | `{"ok": true}` |
//! | `{"op": "get", "key": K}` | `{"ok": true, "value": V}`, or `{"ok": false, "error": …}` |
//! | `{"op": "delete", "key": K}` | `{"ok": true, "deleted": true or false}` |
//! | `{"op": "query", "prefix": P}` | `{"ok": true, "attrs": {K: V, …}}`, keys sorted |
//!
//! Keys are strings, values any JSON. A request that makes no sense gets `{"ok": false,
//! "error": "…"}` and is acked: an RPC client is owed an answer, not a dead letter. A message
//! without `reply_to` is carried out all the same (a fire-and-forget `set`). The store starts
//! with `[consumer_config] attrs = {…}` and lives in memory, for as long as fm runs.
//!
//! ```sh
//! fm consume --config config/attrs.toml &
//! fm call --routing-key rpc.attrs --body '{"op": "set", "key": "a", "value": [1, 2]}'
//! fm call --routing-key rpc.attrs --body '{"op": "get", "key": "a"}'
//! ```

use std::collections::BTreeMap;
use std::sync::Mutex;

use fm_plugin::{Host, Message, Outcome, ThreadSafePlugin};
use serde_json::{Map, Value, json};

struct Attrs {
    store: Mutex<BTreeMap<String, Value>>,
}

impl ThreadSafePlugin for Attrs {
    fn init(_host: Host, config: &str) -> Result<Self, String> {
        let config: Value = serde_json::from_str(config).map_err(|e| e.to_string())?;
        let store = match config.get("attrs") {
            None => BTreeMap::new(),
            Some(Value::Object(attrs)) => attrs.clone().into_iter().collect(),
            Some(_) => return Err("[consumer_config] attrs must be a table".into()),
        };
        Ok(Attrs {
            store: Mutex::new(store),
        })
    }

    fn handle(&self, msg: &Message<'_>) -> Outcome {
        let reply = match serde_json::from_slice::<Value>(msg.body()) {
            Ok(Value::Object(request)) => self.answer(&request),
            Ok(_) | Err(_) => refuse("a request must be a JSON object with an \"op\""),
        };
        Outcome::Reply(reply.to_string().into_bytes())
    }
}

impl Attrs {
    fn answer(&self, request: &Map<String, Value>) -> Value {
        // Nothing panics while the lock is held, so it is never poisoned in practice.
        let mut store = self.store.lock().unwrap_or_else(|e| e.into_inner());
        let key = || match request.get("key") {
            Some(Value::String(k)) => Ok(k.clone()),
            _ => Err(refuse("\"key\" must be a string")),
        };
        let op = request.get("op").and_then(Value::as_str).unwrap_or("");
        let done = match op {
            "get" => key().map(|k| match store.get(&k) {
                Some(v) => json!({"ok": true, "value": v}),
                None => json!({"ok": false, "error": format!("no attribute {k:?}")}),
            }),
            "set" => key().and_then(|k| match request.get("value") {
                Some(v) => {
                    store.insert(k, v.clone());
                    Ok(json!({"ok": true}))
                }
                None => Err(refuse("\"set\" needs a \"value\"")),
            }),
            "delete" => key().map(|k| json!({"ok": true, "deleted": store.remove(&k).is_some()})),
            "query" => {
                let prefix = request.get("prefix").and_then(Value::as_str).unwrap_or("");
                let attrs: Map<String, Value> = store
                    .range(prefix.to_owned()..)
                    .take_while(|(k, _)| k.starts_with(prefix))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                Ok(json!({"ok": true, "attrs": attrs}))
            }
            _ => Err(refuse(
                "\"op\" must be \"get\", \"set\", \"delete\" or \"query\"",
            )),
        };
        done.unwrap_or_else(|refusal| refusal)
    }
}

fn refuse(why: &str) -> Value {
    json!({"ok": false, "error": why})
}

fm_plugin::export!(Attrs, name = "attrs", thread_safe = true);

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs() -> Attrs {
        Attrs {
            store: Mutex::new(BTreeMap::new()),
        }
    }

    fn ask(a: &Attrs, request: Value) -> Value {
        a.answer(request.as_object().unwrap())
    }

    #[test]
    fn get_set_query_delete() {
        let a = attrs();
        assert_eq!(
            ask(&a, json!({"op": "set", "key": "a.x", "value": [1]})),
            json!({"ok": true})
        );
        assert_eq!(
            ask(&a, json!({"op": "set", "key": "b", "value": null})),
            json!({"ok": true})
        );
        assert_eq!(
            ask(&a, json!({"op": "get", "key": "a.x"})),
            json!({"ok": true, "value": [1]})
        );
        assert_eq!(
            ask(&a, json!({"op": "query", "prefix": "a."})),
            json!({"ok": true, "attrs": {"a.x": [1]}})
        );
        assert_eq!(
            ask(&a, json!({"op": "delete", "key": "a.x"})),
            json!({"ok": true, "deleted": true})
        );
        assert_eq!(ask(&a, json!({"op": "get", "key": "a.x"}))["ok"], false);
        assert_eq!(
            ask(&a, json!({"op": "get", "key": 1}))["error"],
            "\"key\" must be a string"
        );
        assert_eq!(ask(&a, json!({"op": "put"}))["ok"], false);
    }
}
