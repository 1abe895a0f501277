#!/usr/bin/env bash
# Mask one image through `clipmask serve` with curl: upload it, wait for the mask, download it.
#
#   CLIPMASK_URL=http://127.0.0.1:8000 CLIPMASK_TOKEN=... clients/mask.sh IMAGE DEST PROMPT [OUT]
#
# IMAGE is a local file; DEST the URL prefix the outputs go under (one of CLIPMASK_API_ALLOWED);
# OUT where the mask is saved (default IMAGE.mask.png). Prints the request's id, then OUT.
# Needs curl only: the answers are read with sed.
set -euo pipefail
image=${1:?usage: mask.sh IMAGE DEST PROMPT [OUT]}
dest=${2:?usage: mask.sh IMAGE DEST PROMPT [OUT]}
prompt=${3:?usage: mask.sh IMAGE DEST PROMPT [OUT]}
out=${4:-$image.mask.png}
url=${CLIPMASK_URL:-http://127.0.0.1:8000}
auth="Authorization: Bearer ${CLIPMASK_TOKEN:?set CLIPMASK_TOKEN}"
body=$(mktemp)
trap 'rm -f "$body"' EXIT

# 1. Upload: 202 with {"id", "state"} at once, or 200 with the result if done within ?wait=30 seconds.
code=$(curl -sS -o "$body" -w '%{http_code}' -H "$auth" \
  -F "file=@$image" -F "dest=$dest" -F "prompt=$prompt" "$url/v1/masks?wait=30")
case $code in 200|202) ;; *) echo "upload: HTTP $code: $(cat "$body")" >&2; exit 1 ;; esac
id=$(sed -n 's/.*"id":"\([0-9a-f]*\)".*/\1/p' "$body")
echo "$id"

# 2. Until it has an outcome: GET /v1/masks/{id} answers 202 while queued or running, then 200.
while [ "$code" = 202 ]; do
  code=$(curl -sS -o "$body" -w '%{http_code}' -H "$auth" "$url/v1/masks/$id?wait=30")
done
if [ "$code" != 200 ] || ! grep -q '"status":"succeeded"' "$body"; then
  echo "mask $id: HTTP $code: $(cat "$body")" >&2
  exit 1
fi

# 3. The mask PNG, straight from the API: no storage credentials needed.
curl -sS --fail -H "$auth" -o "$out" "$url/v1/masks/$id/mask.png"
echo "$out"
