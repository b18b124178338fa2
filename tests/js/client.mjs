// @xmpp/client over WebSocket, driven by tests/integration/test_xmpp_js.py.
//
// Usage: node client.mjs '{"service": "ws://127.0.0.1:PORT/xmpp-websocket",
//                          "domain": "localhost", "username": "alice",
//                          "password": "...", "resource": "browser"}'
//
// Protocol: one JSON object per line each way.
//   stdin (commands):
//     {"cmd": "send", "to": JID, "body": TEXT, "id": ID}  -> {"event": "sent", "id": ID}
//     {"cmd": "ping", "id": ID}   XEP-0199 ping to the domain -> {"event": "pong", "id": ID}
//     {"cmd": "stop"}             close the stream, then exit 0
//   stdout (events):
//     {"event": "status", "status": S}    every status change of the connection
//     {"event": "online", "jid": JID}     a fresh session (bind done)
//     {"event": "sm_enabled", "id": SMID, "resume": BOOL, "max": N}   initial presence follows
//     {"event": "available"}              the gateway reflected our initial presence
//     {"event": "sm_failed", "condition": C}
//     {"event": "resumed", "id": SMID}    XEP-0198 resumption succeeded (no "online" then)
//     {"event": "reconnecting"} / {"event": "reconnected"}
//     {"event": "message", "id": ID, "from": JID, "type": T, "body": TEXT, "delay": BOOL}
//     {"event": "error", "message": TEXT}
//     {"event": "stopped"}
//
// Stream management is @xmpp/client's own (enabled by default, resume=true): when the
// socket drops, @xmpp/reconnect reconnects after a delay and the stream-management module
// sends <resume previd h/> instead of binding a new resource.

import { createInterface } from "node:readline";
import { client, xml } from "@xmpp/client";

const NS_SM = "urn:xmpp:sm:3";
const NS_PING = "urn:xmpp:ping";
const NS_DELAY = "urn:xmpp:delay";

const options = JSON.parse(process.argv[2]);

function emit(event, fields = {}) {
  process.stdout.write(JSON.stringify({ event, ...fields }) + "\n");
}

const xmpp = client({
  service: options.service,
  domain: options.domain,
  username: options.username,
  password: options.password,
  resource: options.resource,
});
if (options.reconnectDelay !== undefined) {
  xmpp.reconnect.delay = options.reconnectDelay;
}

// A wire trace on stderr (the test shows its tail when a wait times out).
const started = Date.now();
function trace(direction, element) {
  const ms = String(Date.now() - started).padStart(6);
  // SASL payloads stay out of the trace (PLAIN would carry the password).
  const text = element.attrs.xmlns === "urn:ietf:params:xml:ns:xmpp-sasl"
    ? `<${element.name} xmlns="urn:ietf:params:xml:ns:xmpp-sasl">…</${element.name}>`
    : element.toString();
  process.stderr.write(`${ms} ${direction} ${text}\n`);
}
xmpp.on("element", (element) => trace("IN ", element));
xmpp.on("send", (element) => trace("OUT", element));

xmpp.on("error", (err) => emit("error", { message: String(err?.message ?? err) }));
xmpp.on("status", (status) => emit("status", { status }));
xmpp.reconnect.on("reconnecting", () => emit("reconnecting"));
xmpp.reconnect.on("reconnected", () => emit("reconnected"));

// Initial presence (which makes the resource available, and flushes offline storage) goes
// out once the gateway has answered <enable/> with <enabled/> (or <failed/>), not at bind.
// xmpp.js 0.14.0 resets its inbound counter h only in a promise continuation after
// <enabled/> (stream-management/stream-feature.js: `await promiseEnable; enabled(...)`),
// and undici dispatches every WebSocket frame of one TCP read in one go: stanzas that
// arrive in the same read as <enabled/> are counted on top of the stale pre-enable count,
// and the next <a/> claims more than the gateway sent (handled-count-too-high). Sending
// the presence after <enabled/> keeps the offline flush a round trip away from it.
let presencePending = false;
function sendInitialPresence() {
  if (!presencePending) return;
  presencePending = false;
  xmpp.send(xml("presence")).catch((err) => emit("error", { message: `presence: ${err.message}` }));
}

xmpp.on("online", (address) => {
  presencePending = true;
  emit("online", { jid: address.toString() });
});

xmpp.streamManagement.on("resumed", () => {
  emit("resumed", { id: xmpp.streamManagement.id });
});

xmpp.on("nonza", (element) => {
  if (element.is("enabled", NS_SM)) {
    emit("sm_enabled", {
      id: element.attrs.id ?? null,
      resume: ["true", "1"].includes(element.attrs.resume),
      max: element.attrs.max === undefined ? null : Number(element.attrs.max),
    });
    sendInitialPresence();
  } else if (element.is("failed", NS_SM)) {
    const condition = element.children.find((c) => typeof c !== "string");
    emit("sm_failed", { condition: condition ? condition.name : null });
    sendInitialPresence(); // a refused <enable/> (a refused <resume/> comes before bind)
  }
});

xmpp.on("stanza", (stanza) => {
  if (stanza.is("presence")) {
    // The gateway sends our own initial presence back to us: we are available now.
    const own = xmpp.jid && stanza.attrs.from === xmpp.jid.toString();
    if (own && stanza.attrs.type === undefined) emit("available");
    return;
  }
  if (!stanza.is("message")) return;
  const body = stanza.getChildText("body");
  if (body === null) return;
  emit("message", {
    id: stanza.attrs.id ?? null,
    from: stanza.attrs.from ?? null,
    type: stanza.attrs.type ?? null,
    body,
    delay: stanza.getChild("delay", NS_DELAY) !== undefined,
  });
});

async function handle(command) {
  switch (command.cmd) {
    case "send": {
      await xmpp.send(
        xml(
          "message",
          { to: command.to, type: "chat", id: command.id },
          xml("body", {}, command.body),
        ),
      );
      emit("sent", { id: command.id });
      break;
    }
    case "ping": {
      await xmpp.iqCaller.request(
        xml("iq", { type: "get", to: options.domain, id: command.id }, xml("ping", { xmlns: NS_PING })),
        10_000,
      );
      emit("pong", { id: command.id });
      break;
    }
    case "stop": {
      await stop();
      break;
    }
    default:
      emit("error", { message: `unknown command ${JSON.stringify(command)}` });
  }
}

let stopping = false;
async function stop() {
  if (stopping) return;
  stopping = true;
  xmpp.reconnect.stop();
  try {
    await xmpp.stop();
  } catch (err) {
    emit("error", { message: `stop: ${err.message}` });
  }
  emit("stopped");
  process.exit(0);
}

const input = createInterface({ input: process.stdin });
input.on("line", (line) => {
  if (!line.trim()) return;
  let command;
  try {
    command = JSON.parse(line);
  } catch {
    emit("error", { message: `not JSON: ${line}` });
    return;
  }
  handle(command).catch((err) =>
    emit("error", { message: `${command.cmd}: ${err.message}`, id: command.id ?? null }),
  );
});
// The test went away: do not linger.
input.on("close", () => {
  stop();
});

xmpp.start().catch((err) => {
  emit("error", { message: `start: ${err.message}` });
});
