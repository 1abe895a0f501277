// Mask one image through `clipmask serve` from Node (18 or later: built-in fetch, FormData, Blob):
// upload it, wait for the mask, download it.
//
//   CLIPMASK_URL=http://127.0.0.1:8000 CLIPMASK_TOKEN=... node clients/mask.mjs IMAGE DEST PROMPT [OUT]
//
// IMAGE is a local file; DEST the URL prefix the outputs go under (one of CLIPMASK_API_ALLOWED);
// OUT where the mask is saved (default IMAGE.mask.png). Prints the request's id, then OUT.
import { readFile, writeFile } from "node:fs/promises";
import { basename } from "node:path";

const [image, dest, prompt, out = `${image}.mask.png`] = process.argv.slice(2);
if (!image || !dest || !prompt) {
  console.error("usage: node mask.mjs IMAGE DEST PROMPT [OUT]");
  process.exit(2);
}
const url = process.env.CLIPMASK_URL ?? "http://127.0.0.1:8000";
const headers = { Authorization: `Bearer ${process.env.CLIPMASK_TOKEN}` };

async function fail(what, response) {
  // Errors are application/problem+json: `detail` says what is wrong, `errors` names the fields.
  const problem = await response.json().catch(() => ({}));
  console.error(`${what}: HTTP ${response.status}: ${problem.detail ?? response.statusText}`);
  process.exit(1);
}

// 1. Upload: 202 with {id, state} at once, or 200 with the result if done within ?wait=30 seconds.
const form = new FormData();
form.append("file", new Blob([await readFile(image)]), basename(image));
form.append("dest", dest);
form.append("prompt", prompt);
let response = await fetch(`${url}/v1/masks?wait=30`, { method: "POST", headers, body: form });
if (response.status !== 200 && response.status !== 202) await fail("upload", response);
let answer = await response.json();
const id = answer.id;
console.log(id);

// 2. Until it has an outcome: GET /v1/masks/{id} answers 202 while queued or running, then 200.
while (response.status === 202) {
  response = await fetch(`${url}/v1/masks/${id}?wait=30`, { headers });
  if (response.status !== 200 && response.status !== 202) await fail(`mask ${id}`, response);
  answer = await response.json();
}
if (answer.status !== "succeeded") {
  console.error(`mask ${id} ${answer.status}: ${answer.error}`);
  process.exit(1);
}

// 3. The mask PNG, straight from the API: no storage credentials needed.
response = await fetch(`${url}${answer.files.mask}`, { headers });
if (!response.ok) await fail(`mask ${id}`, response);
await writeFile(out, Buffer.from(await response.arrayBuffer()));
console.log(out);
