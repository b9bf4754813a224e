-- Extend the leases of one node's requests in flight for a key, and restore those Redis lost.
-- ARGV: P, now, lease deadline, ttl (ms), then per request 'id at requests input output'
-- (what it reserved). A request Redis no longer holds and never saw settled (Redis
-- restarted, or its lease ran out while its node lived) is reserved again at its moment,
-- folded into the newest entry if that is later (so it leaves late, never early), and holds
-- its concurrency slot again.
-- Reply: the number of leases extended or restored.

local UNTIL = ARGV[3]
local TTL = ARGV[4]

load_meta()
local restored = 0
local count = 0
for k = 5, #ARGV do
  local id, at, r, i, o = string.match(ARGV[k], '^(%S+) (%S+) (%S+) (%S+) (%S+)$')
  if redis.call('ZSCORE', L, id) then
    redis.call('ZADD', L, UNTIL, id)
    count = count + 1
  elseif not redis.call('ZSCORE', S, id) then
    local tk = { at = tonumber(at), r = tonumber(r), i = tonumber(i), o = tonumber(o), refs = {} }
    if restored == 0 then
      open_all()
    end
    for _, w in ipairs(opened) do
      expire(w)
      if NOW - tk.at < w.sec then
        tk.refs[w.sec] = add(w, tk.at, tk.at, tk.r, tk.i, tk.o)
      end
    end
    add_life(tk.r, tk.i, tk.o)
    redis.call('HSET', T, id, format_ticket(tk))
    redis.call('ZADD', L, UNTIL, id)
    restored = restored + 1
    count = count + 1
  end
end
if restored > 0 then
  save()
  redis.call('PEXPIRE', T, TTL)
  redis.call('PEXPIRE', L, TTL)
end
return count
