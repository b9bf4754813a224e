-- Replace a reservation by what the request used, at the reservation's moment.
-- ARGV: P, now, ticket id, 'requests input output', the reservation's moment, ttl (ms).
-- Reply: 1 settled, 0 nothing to do (settled before: a retried call changes nothing).

local TID = ARGV[3]
local actual = numbers(ARGV[4])
local R, I, O = actual[1], actual[2], actual[3]
local AT = tonumber(ARGV[5])
local TTL = ARGV[6]

if redis.call('ZSCORE', S, TID) then
  return 0
end
load_meta()
local v = redis.call('HGET', T, TID)
if v then
  local tk = parse_ticket(v)
  local r, i, o = R - tk.r, I - tk.i, O - tk.o
  if r ~= 0 or i ~= 0 or o ~= 0 then
    for sec, id in pairs(tk.refs) do
      local w = open_window(sec)
      if w then
        expire(w)
        adjust(w, id, r, i, o)
      end
    end
    add_life(r, i, o)
  end
  redis.call('HDEL', T, TID)
  redis.call('ZREM', L, TID)
else
  -- Redis no longer holds the reservation (its lease ran out, or Redis restarted and the
  -- windows were rebuilt from the stored rows, which lack this request): what the request
  -- used counts from its moment, folded into the newest entry if that is later, so it
  -- leaves late, never early.
  open_all()
  if #opened == 0 and not open_life() then
    return 0 -- nothing counts it (the key was forgotten), so nothing to guard either
  end
  for _, w in ipairs(opened) do
    expire(w)
    if NOW - AT < w.sec then
      add(w, AT, AT, R, I, O)
    end
  end
  add_life(R, I, O)
end
save()
redis.call('ZADD', S, NOW_TEXT, TID)
redis.call('ZREMRANGEBYSCORE', S, '-inf', fmt(NOW - 600))
redis.call('PEXPIRE', S, TTL)
return 1
