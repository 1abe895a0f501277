"""The Lua scripts of the job index (``tasks/jobs/index.py``): each runs atomically in Redis.

A job's chunks are queued through a window: at most ``window`` chunks of a job are queued or
running at once. ``sent`` counts the chunks queued so far (in chunk order); whoever moves the job
on (the planner as it plans a chunk, a worker as it finishes one) claims the next chunks that fit
the window and queues them. So the broker holds at most ``window`` messages per job whatever the
job's size, and a cancelled job has at most ``window`` messages to drain.

Claims come back as a flat list ``n1, size1, n2, size2, ...`` (chunk number, keys in it).
"""

from __future__ import annotations

_COMMON = """
local function num(h, field) return tonumber(redis.call('HGET', h, field) or '0') end
local function claims(h, out)
  if redis.call('HGET', h, 'cancelled') == '1' then return out end
  local sent, chunks, done = num(h, 'sent'), num(h, 'chunks'), num(h, 'chunks_done')
  local window, size, total = num(h, 'window'), num(h, 'chunk_size'), num(h, 'total')
  while sent < chunks and sent - done < window do
    table.insert(out, sent)
    table.insert(out, (sent == chunks - 1) and (total - sent * size) or size)
    sent = sent + 1
  end
  redis.call('HSET', h, 'sent', sent)
  return out
end
local function complete(h)
  if redis.call('HGET', h, 'planned') ~= '1' then return false end
  local done = num(h, 'chunks_done')
  return done >= num(h, 'chunks') or (redis.call('HGET', h, 'cancelled') == '1' and done >= num(h, 'sent'))
end
"""

#: KEYS: job hash. ARGV: chunks, total, now. A chunk was planned: note it, beat the planner's
#: heart, claim. Returns {cancelled (0/1), claims...}.
PLAN_CHUNK = _COMMON + """
local h = KEYS[1]
redis.call('HSET', h, 'chunks', ARGV[1], 'total', ARGV[2], 'planner_beat', ARGV[3])
if redis.call('HGET', h, 'cancelled') == '1' then return {1} end
return claims(h, {0})
"""

#: KEYS: job hash, done bitmap. ARGV: chunk, succeeded, failed, skipped, now. Marks the chunk
#: done and adds its counts, once; progress resets the count of heals without progress. Returns {code, claims...}: code -1 for an unknown job, 0 if
#: the chunk was already done, 2 if this completed the job (finish it), else 1.
RECORD_CHUNK = _COMMON + """
local h = KEYS[1]
if redis.call('EXISTS', h) == 0 then return {-1} end
if redis.call('SETBIT', KEYS[2], ARGV[1], 1) == 1 then return claims(h, {0}) end
redis.call('HINCRBY', h, 'succeeded', ARGV[2])
redis.call('HINCRBY', h, 'failed', ARGV[3])
redis.call('HINCRBY', h, 'skipped', ARGV[4])
redis.call('HINCRBY', h, 'chunks_done', 1)
redis.call('HSET', h, 'last_progress', ARGV[5], 'heals', 0)
if complete(h) then return {2} end
return claims(h, {1})
"""

#: KEYS: job hash. ARGV: chunks, total, now. Planning is over. Returns {complete (0/1), claims...}.
FINISH_PLANNING = _COMMON + """
local h = KEYS[1]
redis.call('HSET', h, 'planned', 1, 'chunks', ARGV[1], 'total', ARGV[2], 'planned_at', ARGV[3])
redis.call('HDEL', h, 'planner', 'planner_beat')
if complete(h) then return {1} end
return claims(h, {0})
"""

#: KEYS: job hash. Claims what fits the window (after a lost message broke the chain of
#: claims). Returns {claims...}.
FEED = _COMMON + """
local h = KEYS[1]
if redis.call('EXISTS', h) == 0 then return {} end
return claims(h, {})
"""

#: KEYS: job hash. ARGV: chunk, when its retry is due (epoch s), why, now. A chunk runs again
#: later: keep the latest due time of the job's retries (the healing check waits for it) and the
#: last retry's chunk and reason (for ``clipmask status``). Returns 0 for an unknown job, else 1.
NOTE_RETRY = """
local h = KEYS[1]
if redis.call('EXISTS', h) == 0 then return 0 end
if tonumber(ARGV[2]) > tonumber(redis.call('HGET', h, 'retry_due') or '0') then
  redis.call('HSET', h, 'retry_due', ARGV[2])
end
redis.call('HSET', h, 'retry_chunk', ARGV[1], 'retry_reason', ARGV[3], 'retry_at', ARGV[4])
return 1
"""

#: KEYS: job hash. Flags the job cancelled. Returns 1 if nothing is left in flight (finish it).
CANCEL = _COMMON + """
local h = KEYS[1]
redis.call('HSET', h, 'cancelled', 1)
if complete(h) then return 1 end
return 0
"""
