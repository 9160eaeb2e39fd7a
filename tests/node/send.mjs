// Sends one feedback CloudEvent built by the npm `cloudevents` SDK and parses the reply with it.
//
//   node send.mjs <url> <binary|structured> <fetch|chunked> '<event attributes + data as JSON>'
//
// Prints {status, reply}: reply is the response parsed by HTTP.toEvent (null if empty).
// "chunked" writes the body in two chunks without Content-Length (Transfer-Encoding: chunked).
import http from "node:http";
import { CloudEvent, HTTP } from "cloudevents";

const [url, mode, transport, json] = process.argv.slice(2);
const event = new CloudEvent(JSON.parse(json));
const message = mode === "structured" ? HTTP.structured(event) : HTTP.binary(event);

function viaFetch() {
  return fetch(url, { method: "POST", headers: message.headers, body: message.body }).then(
    async (res) => ({ status: res.status, headers: Object.fromEntries(res.headers), body: await res.text() }),
  );
}

function viaChunks() {
  return new Promise((resolve, reject) => {
    const req = http.request(url, { method: "POST", headers: message.headers }, (res) => {
      let body = "";
      res.setEncoding("utf8");
      res.on("data", (chunk) => (body += chunk));
      res.on("end", () => resolve({ status: res.statusCode, headers: res.headers, body, chunked: req.getHeader("transfer-encoding") ?? null }));
    });
    req.on("error", reject);
    const half = Math.floor(message.body.length / 2);
    req.write(message.body.slice(0, half));
    setTimeout(() => req.end(message.body.slice(half)), 50);
  });
}

const res = await (transport === "chunked" ? viaChunks() : viaFetch());
const reply = res.body ? HTTP.toEvent({ headers: res.headers, body: res.body }) : null;
console.log(JSON.stringify({ status: res.status, body: res.status === 200 ? undefined : res.body, reply }));
