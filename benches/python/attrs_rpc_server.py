# SPDX-License-Identifier: MIT
"""The attribute store of plugins/attrs as a pika RPC server, written the way RabbitMQ's RPC
tutorial writes its server (tutorial six): the benchmark's peer for `fm consume` serving the
same store with the attrs plugin. Same requests, same replies (compact JSON).

usage: python attrs_rpc_server.py AMQP_URL QUEUE PREFETCH
"""
import json
import sys

import pika

url, queue, prefetch = sys.argv[1], sys.argv[2], int(sys.argv[3])
store = {}


def answer(request):
    op = request.get("op")
    key = request.get("key")
    if op in ("get", "set", "delete") and not isinstance(key, str):
        return {"ok": False, "error": '"key" must be a string'}
    if op == "get":
        if key in store:
            return {"ok": True, "value": store[key]}
        return {"ok": False, "error": "no attribute %r" % key}
    if op == "set":
        store[key] = request.get("value")
        return {"ok": True}
    if op == "delete":
        return {"ok": True, "deleted": store.pop(key, None) is not None}
    if op == "query":
        prefix = request.get("prefix", "")
        return {"ok": True, "attrs": {k: store[k] for k in sorted(store) if k.startswith(prefix)}}
    return {"ok": False, "error": '"op" must be "get", "set", "delete" or "query"'}


def on_request(ch, method, props, body):
    try:
        request = json.loads(body)
        reply = answer(request) if isinstance(request, dict) else {"ok": False}
    except ValueError:
        reply = {"ok": False, "error": "not JSON"}
    ch.basic_publish(exchange="", routing_key=props.reply_to,
                     properties=pika.BasicProperties(correlation_id=props.correlation_id,
                                                     content_type="application/json"),
                     body=json.dumps(reply, separators=(",", ":")))
    ch.basic_ack(delivery_tag=method.delivery_tag)


connection = pika.BlockingConnection(pika.URLParameters(url))
channel = connection.channel()
channel.queue_declare(queue=queue)
channel.basic_qos(prefetch_count=prefetch)
channel.basic_consume(queue=queue, on_message_callback=on_request)
print("ready", flush=True)
channel.start_consuming()
