-- Replace reservations of one key by what their requests used, each at its own moment.
-- ARGV: P, now, ttl (ms), then one argument per settlement: 'ticket id, the reservation's
-- moment, requests input output'. Reply: how many were settled (a settlement made before,
-- by a retried call, changes nothing).

local TTL = ARGV[3]

load_meta()
local settled = 0
for k = 4, #ARGV do
  local TID, at, R, I, O = string.match(ARGV[k], '^(%S+) (%S+) (%S+) (%S+) (%S+)$')
  local AT = tonumber(at)
  R, I, O = tonumber(R), tonumber(I), tonumber(O)
  if not redis.call('ZSCORE', S, TID) then
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
      redis.call('ZADD', S, NOW_TEXT, TID)
      settled = settled + 1
    else
      -- Redis no longer holds the reservation (its lease ran out, or Redis restarted and
      -- the windows were rebuilt from the stored rows, which lack this request): what the
      -- request used counts from its moment, folded into the newest entry if that is later,
      -- so it leaves late, never early.
      open_all()
      if #opened > 0 or open_life() then
        for _, w in ipairs(opened) do
          expire(w)
          if NOW - AT < w.sec then
            add(w, AT, AT, R, I, O)
          end
        end
        add_life(R, I, O)
        redis.call('ZADD', S, NOW_TEXT, TID)
        settled = settled + 1
      end -- else nothing counts it (the key was forgotten), so nothing to guard either
    end
  end
end
save()
if settled > 0 then
  redis.call('ZREMRANGEBYSCORE', S, '-inf', fmt(NOW - 600))
  redis.call('PEXPIRE', S, TTL)
end
return settled
