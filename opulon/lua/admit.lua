-- Admit one request of a key and reserve its expected cost, all or nothing.
-- ARGV: P, now, ticket id, 'requests input output', flexible output (0/1), concurrency
-- (0: none), lease deadline, ttl (ms), the limits (see read_limits).
-- Reply: {0, granted output, in flight, states...} admitted; {1, kind, limit index, retry
-- after or false, used, cost, in flight, states...} refused (kind 1 window, 2 too large for
-- the window, 3 budget, 4 concurrency); {2, ...} the key needs seeding (see needs_seed).

local TID = ARGV[3]
local expected = numbers(ARGV[4])
local R, I, O = expected[1], expected[2], expected[3]
local FLEXIBLE = ARGV[5] == '1'
local CONCURRENCY = tonumber(ARGV[6])
local LEASE_UNTIL = ARGV[7]
local TTL = ARGV[8]
local limits = read_limits(ARGV[9])

load_meta()
purge()
local missing = needs_seed(limits)
if missing then
  save()
  return words(missing)
end

local prior = redis.call('HGET', T, TID)
if prior then
  -- This very admission ran already (a client retry after a lost reply).
  local tk = parse_ticket(prior)
  local reply = append_states({ 0, tk.o, live_tickets() }, limits)
  save()
  return words(reply)
end

open_all()
for _, w in ipairs(opened) do
  expire(w)
end

local function metric_used(lim)
  if lim.sec > 0 then
    return used(windows[lim.sec], lim.code)
  end
  local lf = open_life()
  return value(lim.code, lf.r, lf.i, lf.o)
end

if FLEXIBLE and O > 0 then
  local room = nil
  for _, lim in ipairs(limits) do
    if lim.code == 1 or lim.code == 3 then
      local left = lim.amount - metric_used(lim) - value(lim.code, R, I, 0)
      if room == nil or left < room then
        room = left
      end
    end
  end
  if room ~= nil and room < O then
    -- At least one token: with no room left, the refusal says when there is.
    O = math.max(1, room)
  end
end

local function refuse(kind, index, retry, amount_used, cost)
  local reply = { 1, kind, index, retry and fmt(retry) or '-', amount_used, cost, live_tickets() }
  append_states(reply, limits)
  save()
  return words(reply)
end

local worst, worst_retry = nil, nil
for index, lim in ipairs(limits) do
  local cost = value(lim.code, R, I, O)
  local amount_used = metric_used(lim)
  if amount_used + cost > lim.amount then
    if lim.sec == 0 then
      return refuse(3, index, nil, amount_used, cost)
    end
    if cost > lim.amount then
      return refuse(2, index, nil, amount_used, cost)
    end
    local retry = retry_after(windows[lim.sec], lim.code, amount_used + cost - lim.amount)
    if worst == nil or retry > worst_retry then
      worst, worst_retry = index, retry
    end
  end
end
if worst ~= nil then
  local lim = limits[worst]
  return refuse(1, worst, worst_retry, metric_used(lim), value(lim.code, R, I, O))
end
local in_flight = live_tickets()
if CONCURRENCY > 0 and in_flight >= CONCURRENCY then
  return refuse(4, 0, nil, 0, 0)
end

local tk = { at = NOW, r = R, i = I, o = O, refs = {} }
for _, w in ipairs(opened) do
  tk.refs[w.sec] = add(w, NOW, NOW, R, I, O)
end
add_life(R, I, O)
local reply = append_states({ 0, O, in_flight + 1 }, limits)
save()
redis.call('HSET', T, TID, format_ticket(tk))
redis.call('ZADD', L, LEASE_UNTIL, TID)
redis.call('PEXPIRE', T, TTL)
redis.call('PEXPIRE', L, TTL)

-- Note that these limits are configured, at most every 30 s; drop windows (and the budget)
-- no node has configured for two minutes; keep the key's data alive while it is used.
local stale = false
local wanted = {}
for _, lim in ipairs(limits) do
  local name = lim.sec > 0 and ('w' .. lim.sec) or 'b'
  wanted[name] = true
  if math.abs(NOW - meta[name]) > 30 then
    stale = true
  end
end
for name, at in pairs(meta) do
  if not wanted[name] and NOW - at > 120 then
    stale = true
  end
end
if stale then
  local fields = {}
  for name, _ in pairs(wanted) do
    fields[#fields + 1] = name
    fields[#fields + 1] = NOW_TEXT
  end
  redis.call('HSET', M, unpack(fields))
  local keys = { M, T, L, B, S }
  for name, at in pairs(meta) do
    if not wanted[name] and NOW - at > 120 then
      redis.call('DEL', name == 'b' and B or (P .. name))
      redis.call('HDEL', M, name)
    elseif string.sub(name, 1, 1) == 'w' then
      keys[#keys + 1] = P .. name
    end
  end
  for _, key in ipairs(keys) do
    redis.call('PEXPIRE', key, TTL)
  end
end

return words(reply)
