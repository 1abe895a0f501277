// Receive clipmask's callbacks in Node (18 or later) and verify each signature, as Standard
// Webhooks specifies: the base64 HMAC-SHA256 of `webhook-id.webhook-timestamp.body`, keyed by
// CLIPMASK_WEBHOOK_SECRET (whsec_ and base64), in `webhook-signature` as `v1,<signature>`.
//
//   CLIPMASK_WEBHOOK_SECRET=whsec_... node clients/webhook.mjs PORT [COUNT]
//
// Listens on 127.0.0.1:PORT; for each verified message prints `verified TYPE WEBHOOK-ID` and its
// data (JSON) and answers 204; a bad or stale signature gets 401 (clipmask tries again later). The
// same webhook-id may come twice (delivery is at least once): act on it once. Exits after COUNT
// verified messages, if given.
import { createServer } from "node:http";
import { createHmac, timingSafeEqual } from "node:crypto";

const [port, count] = process.argv.slice(2).map(Number);
const key = Buffer.from((process.env.CLIPMASK_WEBHOOK_SECRET ?? "").replace(/^whsec_/, ""), "base64");
if (!port || key.length === 0) {
  console.error("usage: CLIPMASK_WEBHOOK_SECRET=whsec_... node webhook.mjs PORT [COUNT]");
  process.exit(2);
}
const TOLERANCE_S = 300; // older or newer timestamps are refused: a replayed message fails

function verified(headers, body) {
  const id = headers["webhook-id"], timestamp = headers["webhook-timestamp"];
  const signatures = (headers["webhook-signature"] ?? "").split(" ");
  if (!id || !timestamp || Math.abs(Date.now() / 1000 - Number(timestamp)) > TOLERANCE_S) return false;
  const expected = Buffer.from("v1," + createHmac("sha256", key).update(`${id}.${timestamp}.`).update(body).digest("base64"));
  return signatures.some((given) => given.length === expected.length && timingSafeEqual(Buffer.from(given), expected));
}

let received = 0;
const server = createServer((request, response) => {
  const chunks = [];
  request.on("data", (chunk) => chunks.push(chunk));
  request.on("end", () => {
    const body = Buffer.concat(chunks);
    if (request.method !== "POST" || !verified(request.headers, body)) {
      response.writeHead(401).end();
      return;
    }
    const message = JSON.parse(body);
    console.log(`verified ${message.type} ${request.headers["webhook-id"]}`);
    console.log(JSON.stringify(message.data));
    response.writeHead(204).end();
    if (count && ++received >= count) server.close();
  });
});
server.listen(port, "127.0.0.1", () => console.log(`listening on 127.0.0.1:${port}`));
