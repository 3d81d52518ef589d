// A small Socket.IO client for the demo page, written for this project so that the page works
// offline (no CDN, no npm install): Engine.IO v4 over WebSocket only, Socket.IO protocol v5,
// the default namespace, the JSON parser. Enough for the chat: `io()`, `socket.id`,
// `socket.on(event, fn)` (with an ack callback when the server asks for one),
// `socket.emit(event, ...args, [ack])`, and reconnection with backoff. As the official client
// does, events emitted while not connected wait in a (bounded) buffer and leave once the
// server has accepted the namespace connect: a Socket.IO server closes a session that sends an
// event before that (the page's first status request used to race the connect under load).
// Packets: "0{...}" open, "2"/"3" ping/pong, "40" connect, "42[...]" event, "43<id>[...]" ack.
(function (global) {
  "use strict";

  function io(url) {
    const base = new URL(url || global.location.href);
    const wsUrl = (base.protocol === "https:" ? "wss:" : "ws:") + "//" + base.host +
      "/socket.io/?EIO=4&transport=websocket";
    const handlers = {};
    const acks = {};
    let nextAck = 0;
    let ws = null;
    let retry = 500;
    const socket = { id: undefined, connected: false };
    // Packets emitted while not connected; the oldest are dropped beyond this many.
    const MAX_BUFFERED = 100;
    const buffered = [];

    function fire(event, args) {
      for (const fn of handlers[event] || []) fn.apply(socket, args);
    }

    function send(text) {
      if (ws && ws.readyState === 1) ws.send(text);
    }

    function onPacket(data) {
      switch (data[0]) {
        case "0": // Engine.IO open: connect to the default namespace
          send("40");
          return;
        case "2": // ping
          send("3");
          return;
        case "4":
          onSocketIo(data.slice(1));
          return;
        default: // noop, close, upgrade: nothing to do over a WebSocket
      }
    }

    function onSocketIo(p) {
      const type = p[0];
      let i = 1;
      while (i < p.length && p[i] >= "0" && p[i] <= "9") i++;
      const id = i > 1 ? Number(p.slice(1, i)) : undefined;
      const payload = i < p.length ? JSON.parse(p.slice(i)) : undefined;
      if (type === "0") { // connected
        socket.id = payload && payload.sid;
        socket.connected = true;
        retry = 500;
        while (buffered.length) send(buffered.shift());
        fire("connect", []);
      } else if (type === "2" && Array.isArray(payload)) { // event
        const args = payload.slice(1);
        if (id !== undefined) {
          args.push(function () {
            send("43" + id + JSON.stringify(Array.prototype.slice.call(arguments)));
          });
        }
        fire(payload[0], args);
      } else if (type === "3" && id !== undefined && acks[id]) { // ack
        const fn = acks[id];
        delete acks[id];
        fn.apply(socket, payload || []);
      } else if (type === "1") { // disconnected by the server
        ws.close();
      } else if (type === "4") { // connect error
        fire("connect_error", [payload]);
      }
    }

    function open() {
      ws = new global.WebSocket(wsUrl);
      ws.onmessage = (m) => {
        if (typeof m.data === "string") onPacket(m.data);
      };
      ws.onclose = () => {
        const was = socket.connected;
        socket.connected = false;
        if (was) fire("disconnect", []);
        if (socket.closed) return;
        setTimeout(open, retry);
        retry = Math.min(retry * 2, 10000);
      };
    }

    socket.on = function (event, fn) {
      (handlers[event] = handlers[event] || []).push(fn);
      return socket;
    };
    socket.emit = function (event) {
      const args = Array.prototype.slice.call(arguments, 1);
      let prefix = "42";
      if (typeof args[args.length - 1] === "function") {
        const id = nextAck++;
        acks[id] = args.pop();
        prefix += id;
      }
      const packet = prefix + JSON.stringify([event].concat(args));
      if (socket.connected) {
        send(packet);
      } else {
        if (buffered.length === MAX_BUFFERED) buffered.shift();
        buffered.push(packet);
      }
      return socket;
    };
    socket.close = function () {
      socket.closed = true;
      if (ws) ws.close();
    };
    open();
    return socket;
  }

  global.io = io;
})(typeof window !== "undefined" ? window : globalThis);
